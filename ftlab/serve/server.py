"""An HTTP server speaking Triton Inference Server's protocol (KServe v2 + binary tensors) for one GPT model, with
FasterTransformer's `fastertransformer` model tensors: existing tritonclient code (FT's end_to_end_test.py, the
identity tests) can point at it unchanged.

Threads: the HTTP server answers each connection in its own thread; one worker thread owns the model. Requests are
validated on arrival (a bad one is answered 400 at once and never reaches the model), then queued. The worker takes
the oldest request and, for up to max_queue_delay_us, more sampling requests until max_batch_size sequences
(dynamic batching: every parameter is per sequence, so batched sequences give what they give alone). If a batch
fails, its requests are retried one by one, so only the one at fault gets the error; the server keeps serving.

With grpc_port, Triton's gRPC protocol is served too (grpc_server.py), feeding the same queue.

Endpoints: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/<m>[/versions/<v>], .../ready, .../config,
.../stats; POST /v2/repository/index, /v2/models/<m>[/versions/<v>]/infer, /v2/models/<m>/generate_stream
(Triton's generate extension: a JSON object of tensor-named values for one sequence in, server-sent events out,
one per generated token).
"""
from __future__ import annotations

import functools
import json
import queue
import re
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .. import __version__
from ..generate import GenerationOutput, generate, stream
from . import fastertransformer as ft
from .protocol import HEADER_LENGTH, InferRequest, ProtocolError, decode_request, encode_response

_MODEL_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/[a-z_]+)?$")


@dataclass
class _Work:
    job: ft.Job
    future: Future = field(default_factory=Future)
    events: queue.Queue | None = None  # generate_stream: one item per step, then None


class InferenceServer:
    """Serve `model` (a GPT, anything generate() takes, or a ParallelLeader on rank 0 of a parallel engine) at
    http://host:port. Use start()/stop(), or a `with`."""

    def __init__(self, model, *, model_name: str = "fastertransformer", host: str = "127.0.0.1", port: int = 8000,
                 max_batch_size: int = 64, max_queue_delay_us: int = 1000, grpc_port: int | None = None):
        if max_batch_size < 1 or max_queue_delay_us < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue_delay_us >= 0, got {max_batch_size} and "
                             f"{max_queue_delay_us}")
        self.model, self.model_name, self.version = model, model_name, "1"
        # ftlab.parallel_serve.ParallelLeader runs each call on every rank of a parallel engine; else here alone
        self._generate_fn = getattr(model, "run_generate", None) or functools.partial(generate, model)
        self._stream_fn = getattr(model, "run_stream", None) or functools.partial(stream, model)
        self.max_batch_size, self.max_queue_delay_us = max_batch_size, max_queue_delay_us
        self.stats = {"requests": 0, "batches": 0, "failed": 0, "rejected": 0}
        self._queue: queue.Queue = queue.Queue()  # _Work items, then _STOP
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []
        # gRPC (grpc_server.py, Triton's default port is 8001; 0 = any free one), started with the rest
        self._grpc_address, self._grpc, self.grpc_port = (host, grpc_port), None, grpc_port

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    @property
    def grpc_url(self) -> str | None:
        return None if self._grpc is None else f"{self._grpc_address[0]}:{self.grpc_port}"

    def start(self) -> "InferenceServer":
        if self.grpc_port is not None:
            try:
                from .grpc_server import start_grpc
            except ImportError as exc:
                raise ImportError(f"serving gRPC needs grpcio and tritonclient's stubs: pip install "
                                  f"'tritonclient[grpc]' ({exc})") from None
            self._grpc, self.grpc_port = start_grpc(self, self._grpc_address[0], self.grpc_port)
        self._threads = [threading.Thread(target=self._work_loop, name="ftlab-model", daemon=True),
                         threading.Thread(target=self._httpd.serve_forever, name="ftlab-http", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def serve_forever(self) -> None:
        if not self._threads:
            self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.stop()

    def count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def stats_snapshot(self) -> dict:
        with self._lock:
            return dict(self.stats)

    def model_config(self) -> dict:
        """Triton's model configuration of the served model (JSON form; the gRPC side builds its message from it)."""
        cfg = self.model.config
        parameters = {"model_name": cfg.model_name, "head_num": cfg.head_num, "size_per_head": cfg.size_per_head,
                      "num_layer": cfg.num_layer, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_pos_seq_len,
                      "start_id": cfg.start_id, "end_id": cfg.end_id,
                      "tensor_para_size": getattr(cfg, "tensor_para_size", 1),
                      "pipeline_para_size": getattr(self.model, "pipeline_para_size", 1),
                      "data_type": str(getattr(self.model, "dtype", "")).replace("torch.", "")}
        return {"name": self.model_name, "platform": "ftlab", "backend": "fastertransformer",
                "max_batch_size": self.max_batch_size,
                "input": [t.as_config() for t in ft.INPUTS], "output": [t.as_config() for t in ft.OUTPUTS],
                "dynamic_batching": {"max_queue_delay_microseconds": self.max_queue_delay_us},
                "parameters": {k: {"string_value": str(v)} for k, v in parameters.items()}}

    def check_model(self, name: str, version: str | None) -> str | None:
        """None when (name, version) is this server's model, else the message to answer (not found)."""
        if name != self.model_name or version not in (None, "", self.version):
            return (f"unknown model '{name}' version {version!r}; this server has '{self.model_name}' version "
                    f"{self.version}")
        return None

    def prepare(self, request: InferRequest) -> ft.Job:
        """A decoded infer request -> the job to run; ProtocolError / ValueError name what is wrong (counted)."""
        try:
            job = ft.parse_job(request.inputs, self.model.config, self.max_batch_size)
            if request.requested is not None:
                unknown = sorted(set(request.requested) - {t.name for t in ft.OUTPUTS})
                if unknown:
                    raise ProtocolError(f"unknown output(s) {unknown}; the model gives "
                                        f"{[t.name for t in ft.OUTPUTS]}")
                if {"cum_log_probs", "output_log_probs"} & set(request.requested):
                    job.return_log_probs = True
        except (ProtocolError, ValueError):
            self.count("rejected")
            raise
        return job

    # --- the model's thread ------------------------------------------------------------------------------------
    def submit(self, job: ft.Job, events: queue.Queue | None = None) -> Future:
        work = _Work(job, events=events)
        self._queue.put(work)
        return work.future

    def _work_loop(self) -> None:
        taken = None  # a request taken from the queue that did not fit the batch before it: it starts the next one
        while True:
            work, taken = (taken if taken is not None else self._queue.get()), None
            if work is _STOP:
                return
            batch, rows = [work], work.job.batch_size
            deadline = time.monotonic() + self.max_queue_delay_us / 1e6
            while _batchable(work) and rows < self.max_batch_size:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is _STOP or not _batchable(more) or rows + more.job.batch_size > self.max_batch_size \
                        or not _fits(batch + [more], self.model):
                    taken = more
                    break
                batch.append(more)
                rows += more.job.batch_size
            self._run(batch)

    def _run(self, batch: list[_Work]) -> None:
        self.count("batches")
        try:
            if len(batch) == 1:
                batch[0].future.set_result(self._generate(batch[0]))
                return
            merged = ft.merge([w.job for w in batch])
            result = self._generate(_Work(merged))
            start = 0
            for w in batch:
                w.future.set_result(_rows(result, start, w.job.batch_size))
                start += w.job.batch_size
        except Exception as exc:  # noqa: BLE001 - answered to the client; the server goes on
            if len(batch) > 1:  # find the one at fault: each request alone
                for w in batch:
                    self._run([w])
            else:
                self.count("failed")
                batch[0].future.set_exception(exc)

    def _generate(self, work: _Work):
        job = work.job
        params = dict(job.params)
        n_out = max(job.output_lens)
        if job.beam_width > 1:
            params = {k: v for k, v in params.items() if k not in ("top_k", "top_p", "temperature", "random_seed")}
            params["end_id"] = params["end_id"][0]
            return self._generate_fn(job.prompts, max_new_tokens=n_out, beam_width=job.beam_width, **job.beam,
                                     **params)
        if work.events is None:
            return self._generate_fn(job.prompts, max_new_tokens=n_out, return_log_probs=job.return_log_probs,
                                     **params)
        try:
            for step in self._stream_fn(job.prompts, max_new_tokens=n_out, **params):
                work.events.put({"output_ids": step.token_ids, "step": step.step, "finished": step.finished})
        finally:
            work.events.put(None)
        return None


_STOP = object()


def _batchable(work: _Work) -> bool:
    # streams and beam searches run alone (beam search takes one end_id and beam setting per call)
    return work.events is None and work.job.beam_width == 1


def _fits(works: list[_Work], model) -> bool:
    """Whether sequences of several requests can share one generate() call (one max_new_tokens for all)."""
    longest_prompt = max(len(p) for w in works for p in w.job.prompts)
    return longest_prompt + max(n for w in works for n in w.job.output_lens) <= model.config.max_pos_seq_len


def _rows(result, start: int, count: int):
    """The GenerationOutput of sequences start..start+count-1 of a merged batch."""
    part = GenerationOutput(result.output_ids[start:start + count], result.sequence_length[start:start + count],
                            result.input_length[start:start + count])
    if result.output_log_probs is not None:
        part.output_log_probs = result.output_log_probs[start:start + count]
        part.cum_log_probs = result.cum_log_probs[start:start + count]
    return part


class _Handler(BaseHTTPRequestHandler):
    server_state: InferenceServer
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient uses it

    def log_message(self, format, *args):  # noqa: A002 - quiet; errors are answered to the client
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _body(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding in ("gzip", "deflate"):
            body = zlib.decompress(body, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        return body

    def _model(self, match) -> bool:
        problem = self.server_state.check_model(match.group("model"), match.group("version"))
        if problem is not None:
            self._error(404, problem)
            return False
        return True

    # --- routes -------------------------------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - http.server's naming
        s, path = self.server_state, self.path.split("?")[0].rstrip("/")
        if path in ("/v2/health/live", "/v2/health/ready"):
            return self._send(200, b"", {})
        if path == "/v2":
            return self._json(200, {"name": "ftlab", "version": __version__,
                                    "extensions": ["binary_tensor_data", "model_repository", "statistics",
                                                   "generate"]})
        match = _MODEL_PATH.match(path)
        if match is None:
            return self._error(404, f"no route GET {path}")
        if not self._model(match):
            return None
        rest = match.group("rest")
        if rest is None:
            return self._json(200, {"name": s.model_name, "versions": [s.version], "platform": "ftlab",
                                    "inputs": [t.as_metadata() for t in ft.INPUTS],
                                    "outputs": [t.as_metadata() for t in ft.OUTPUTS]})
        if rest == "/ready":
            return self._send(200, b"", {})
        if rest == "/config":
            return self._json(200, s.model_config())
        if rest == "/stats":
            return self._json(200, {"model_stats": [{"name": s.model_name, "version": s.version,
                                                     **s.stats_snapshot()}]})
        return self._error(404, f"no route GET {path}")

    def do_POST(self):  # noqa: N802
        s, path = self.server_state, self.path.split("?")[0].rstrip("/")
        try:
            body = self._body()
        except zlib.error as exc:
            return self._error(400, f"cannot decompress the request body: {exc}")
        if path == "/v2/repository/index":
            return self._json(200, [{"name": s.model_name, "version": s.version, "state": "READY"}])
        match = _MODEL_PATH.match(path)
        if match is None or match.group("rest") not in ("/infer", "/generate_stream"):
            return self._error(404, f"no route POST {path}")
        if not self._model(match):
            return None
        s.count("requests")
        if match.group("rest") == "/generate_stream":
            return self._generate_stream(body)
        try:
            header = self.headers.get(HEADER_LENGTH)
            request = decode_request(body, int(header) if header is not None else None)
        except (ProtocolError, ValueError) as exc:
            s.count("rejected")
            return self._error(400, str(exc))
        try:
            job = s.prepare(request)
        except (ProtocolError, ValueError) as exc:
            return self._error(400, str(exc))
        try:
            outputs = ft.outputs_of(job, s.submit(job).result())
        except ValueError as exc:  # generate() refused the request's values
            return self._error(400, f"request failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this request fails, the server goes on
            return self._error(500, f"request failed: {type(exc).__name__}: {exc}")
        if request.requested is not None:
            outputs = {k: v for k, v in outputs.items() if k in request.requested}
            binary = request.requested
        else:
            binary = dict.fromkeys(outputs, request.binary_default)
        body, headers = encode_response(s.model_name, s.version, request.id, outputs, binary)
        self._send(200, body, headers)

    def _generate_stream(self, body: bytes) -> None:
        s = self.server_state
        try:
            values = json.loads(body)
            if not isinstance(values, dict):
                raise ProtocolError("generate_stream takes a JSON object of tensor names -> values")
            job = ft.parse_job(_one_sequence(values), s.model.config, s.max_batch_size)
            if job.beam_width > 1:
                raise ProtocolError("beam search returns whole hypotheses: it cannot stream (use /infer)")
        except (ProtocolError, ValueError) as exc:
            s.count("rejected")
            return self._error(400, str(exc))
        events: queue.Queue = queue.Queue()
        future = s.submit(job, events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        while (event := events.get()) is not None:
            event = {"model_name": s.model_name, "model_version": s.version, **event}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - the stream's last event says what went wrong
            self.wfile.write(f"data: {json.dumps({'error': f'{type(exc).__name__}: {exc}'})}\n\n".encode())


def _one_sequence(values: dict) -> dict[str, np.ndarray]:
    """generate_stream's JSON (input_ids as a list, other inputs as scalars or FT's [2, L] word lists) -> tensors of
    a batch of one."""
    if "input_ids" not in values:
        raise ProtocolError("missing required input 'input_ids'")
    ids = np.asarray(values["input_ids"])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ProtocolError(f"input 'input_ids' must be a list of token ids, got {values['input_ids']!r:.80}")
    tensors = {"input_ids": ids[None, :], "input_lengths": np.array([[ids.size]], dtype=np.uint32)}
    for name, value in values.items():
        if name in ("input_ids", "input_lengths"):
            continue
        array = np.asarray(value)
        tensors[name] = array[None] if name.endswith("_words_list") else array.reshape(1, 1)
    return tensors
