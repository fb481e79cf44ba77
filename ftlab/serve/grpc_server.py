"""Triton Inference Server's gRPC protocol (GRPCInferenceService: what `tritonclient.grpc` speaks) in front of an
InferenceServer's model thread, so gRPC and HTTP requests share one queue and its dynamic batching.

Served: ServerLive / ServerReady / ModelReady, ServerMetadata, ModelMetadata, ModelConfig, RepositoryIndex,
ModelStatistics (request counts only), ModelInfer, and ModelStreamInfer: FT's decoupled streaming, one response per
generated token carrying output_ids [B, 1, prompt + tokens so far] and sequence_length [B, 1] in the layout of the
final ModelInfer result, so the last response of a request equals what ModelInfer returns (beam search and log
probabilities are ModelInfer only). With the request parameter `triton_enable_empty_final_response`, a last empty
response flagged `triton_final_response` closes each request, as Triton does for decoupled models.

Tensors arrive as raw_input_contents (what tritonclient sends) or typed `contents`; outputs go back as
raw_output_contents. A bad request is answered INVALID_ARGUMENT naming the tensor at fault (on a stream: an
error_message response, and the stream goes on); it never reaches the model. The generated stubs and messages come
from tritonclient's own package (`pip install "tritonclient[grpc]"`).
"""
from __future__ import annotations

import math
import queue
from concurrent import futures

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .. import __version__
from ..generate import GenerationOutput
from . import fastertransformer as ft
from .protocol import DATATYPES, InferRequest, ProtocolError, datatype_of

# typed `contents` field per datatype (used when a client sends no raw_input_contents)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents"}


def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest -> the same InferRequest the HTTP side decodes (ProtocolError names the input)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        if tensor.datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': datatype {tensor.datatype!r} is not one of {sorted(DATATYPES)}")
        dtype, shape = DATATYPES[tensor.datatype], list(tensor.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input '{name}': shape must be non-negative, got {shape}")
        count = math.prod(shape)
        if raw:
            if len(raw[i]) != count * dtype.itemsize:
                raise ProtocolError(f"input '{name}': {len(raw[i])} bytes of raw contents for shape {shape} of "
                                    f"{tensor.datatype} ({count * dtype.itemsize} bytes)")
            array = np.frombuffer(raw[i], dtype=dtype, count=count)
        else:
            field = _CONTENTS.get(tensor.datatype)
            values = list(getattr(tensor.contents, field)) if field else []
            if len(values) != count:
                raise ProtocolError(f"input '{name}': {len(values)} values for shape {shape} ({count})")
            array = np.asarray(values, dtype=dtype)
        inputs[name] = array.reshape(shape)
    requested = {o.name: True for o in request.outputs} if len(request.outputs) else None
    return InferRequest(request.id or None, inputs, requested, True)


def encode_infer_response(model_name: str, version: str, request_id: str | None,
                          outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request_id or "")
    for name, array in outputs.items():
        entry = response.outputs.add()
        entry.name, entry.datatype = name, datatype_of(array)
        entry.shape.extend(array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return response


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server):
        self.server = server  # the InferenceServer whose model thread runs the jobs

    # --- health and metadata ------------------------------------------------------------------------------------
    def ServerLive(self, request, context):  # noqa: N802 - the service's method names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self.server.check_model(request.name, request.version) is None)

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="ftlab", version=__version__,
                                         extensions=["model_repository", "statistics"])

    def _known(self, request, context) -> None:
        problem = self.server.check_model(request.name, request.version)
        if problem is not None:
            context.abort(grpc.StatusCode.NOT_FOUND, problem)

    def ModelMetadata(self, request, context):  # noqa: N802
        self._known(request, context)
        s = self.server

        def meta(specs):
            return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
                    for t in specs]
        return pb.ModelMetadataResponse(name=s.model_name, versions=[s.version], platform="ftlab",
                                        inputs=meta(ft.INPUTS), outputs=meta(ft.OUTPUTS))

    def ModelConfig(self, request, context):  # noqa: N802
        self._known(request, context)
        config = self.server.model_config()
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=config["name"], platform=config["platform"], backend=config["backend"],
            max_batch_size=config["max_batch_size"],
            input=[mc.ModelInput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"), dims=t.dims,
                                 optional=t.optional) for t in ft.INPUTS],
            output=[mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"), dims=t.dims)
                    for t in ft.OUTPUTS],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=config["dynamic_batching"]["max_queue_delay_microseconds"]),
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
            parameters={k: mc.ModelParameter(string_value=v["string_value"])
                        for k, v in config["parameters"].items()}))

    def RepositoryIndex(self, request, context):  # noqa: N802
        s = self.server
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=s.model_name, version=s.version, state="READY")])

    def ModelStatistics(self, request, context):  # noqa: N802
        s = self.server
        if request.name:
            self._known(request, context)
        stats = s.stats_snapshot()
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name=s.model_name, version=s.version, inference_count=stats["requests"],
            execution_count=stats["batches"])])

    # --- inference ----------------------------------------------------------------------------------------------
    def _job(self, request) -> tuple[InferRequest, ft.Job]:
        problem = self.server.check_model(request.model_name, request.model_version)
        if problem is not None:
            raise LookupError(problem)
        self.server.count("requests")
        try:
            decoded = decode_infer_request(request)
        except ProtocolError:
            self.server.count("rejected")
            raise
        return decoded, self.server.prepare(decoded)

    def ModelInfer(self, request, context):  # noqa: N802
        s = self.server
        try:
            decoded, job = self._job(request)
        except LookupError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (ProtocolError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            outputs = ft.outputs_of(job, s.submit(job).result())
        except ValueError as exc:  # generate() refused the request's values
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this request fails, the server goes on
            context.abort(grpc.StatusCode.INTERNAL, f"request failed: {type(exc).__name__}: {exc}")
        if decoded.requested is not None:
            outputs = {k: v for k, v in outputs.items() if k in decoded.requested}
        return encode_infer_response(s.model_name, s.version, decoded.id, outputs)

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        for request in request_iterator:
            yield from self._stream_one(request)

    def _stream_one(self, request):
        s = self.server
        empty_final = request.parameters["triton_enable_empty_final_response"].bool_param \
            if "triton_enable_empty_final_response" in request.parameters else False
        try:
            decoded, job = self._job(request)
            if job.beam_width > 1:
                raise ProtocolError("beam search returns whole hypotheses: it cannot stream (use ModelInfer)")
        except (LookupError, ProtocolError, ValueError) as exc:
            yield pb.ModelStreamInferResponse(error_message=str(exc))
            return
        job.return_log_probs = False  # streamed responses carry output_ids and sequence_length
        events: queue.Queue = queue.Queue()
        future = s.submit(job, events)
        generated: list[list[int]] = [[] for _ in job.prompts]
        done = [False] * job.batch_size
        while (event := events.get()) is not None:
            for b, (token, finished) in enumerate(zip(event["output_ids"], event["finished"])):
                if not done[b]:
                    generated[b].append(int(token))
                done[b] = bool(finished)
            partial = GenerationOutput([p + g for p, g in zip(job.prompts, generated)],
                                       [len(p) + len(g) for p, g in zip(job.prompts, generated)],
                                       [len(p) for p in job.prompts])
            outputs = ft.outputs_of(job, partial)
            if decoded.requested is not None:
                outputs = {k: v for k, v in outputs.items() if k in decoded.requested}
            response = encode_infer_response(s.model_name, s.version, decoded.id, outputs)
            if empty_final:
                response.parameters["triton_final_response"].bool_param = False
            yield pb.ModelStreamInferResponse(infer_response=response)
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - the request's last response says what went wrong
            yield pb.ModelStreamInferResponse(error_message=f"request failed: {type(exc).__name__}: {exc}")
            return
        if empty_final:
            final = pb.ModelInferResponse(model_name=s.model_name, model_version=s.version, id=decoded.id or "")
            final.parameters["triton_final_response"].bool_param = True
            yield pb.ModelStreamInferResponse(infer_response=final)


def start_grpc(server, host: str, port: int, workers: int = 16) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `server` (an InferenceServer) on host:port (0: any free port). Returns it and the
    port it listens on."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftlab-grpc"))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(server), grpc_server)
    bound = grpc_server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    grpc_server.start()
    return grpc_server, bound
