"""Autoregressive generation over a ragged batch: prefill the prompts, then one decode step per new token.

Every request carries its own sampling parameters (FasterTransformer / HF names: top_k, top_p, temperature,
random_seed, end_id); a scalar applies to the whole batch. `stream` yields each step's tokens as they are produced;
`generate` runs the stream to the end and returns prompt + generated ids with sequence lengths. Nothing is global:
all state (KV cache, positions, finished flags) belongs to the call, or on a GPU to the model's captured graph of
that batch size, which the call loads and then owns until it returns (one CUDA-graph generate() per model at a time).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .kernels.embedding import embedding
from .kernels.finish_step import finish_step, greedy_finish_step
from .kernels.sampling import check_sampling_params, sample
from .model import GPT, DeviceColumns, HostPrompts, host_to_device, pack_prompts_host
from .processing import LogitsProcessor, normalize_words


class GenerationError(ValueError):
    """A request cannot be run; the message names the request and the parameter."""


@dataclass
class StepOutput:
    step: int  # 0 for the first generated token
    token_ids: list[int]  # (B,) this step's token of each request (end_id for requests already finished)
    finished: list[bool]  # (B,) finished after this step
    log_probs: list[float] | None = None  # (B,) log-probability of each token (return_log_probs)


@dataclass
class GenerationOutput:
    output_ids: list[list[int]]  # per request: prompt followed by the generated ids (end_id included if produced)
    sequence_length: list[int]  # len(output_ids[b]) — FasterTransformer's and HF's convention
    input_length: list[int]
    output_log_probs: list[list[float]] | None = None  # per request, one per generated token
    cum_log_probs: list[float] | None = None

    def generated_ids(self, b: int) -> list[int]:
        return self.output_ids[b][self.input_length[b]:]


def _is_scalar(value) -> bool:
    """Whether _column repeats one value for the whole batch."""
    return not isinstance(value, (list, tuple, torch.Tensor))


def _column(name: str, value, batch_size: int, cast) -> list:
    """_per_request's values cast (int or float); a scalar is cast once."""
    if not _is_scalar(value):
        return [cast(v) for v in _per_request(name, value, batch_size)]
    return [cast(value)] * batch_size


def _per_request(name: str, value, batch_size: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != batch_size:
            raise GenerationError(f"{name} has {len(value)} values for a batch of {batch_size} requests")
        return list(value)
    if isinstance(value, torch.Tensor):
        return _per_request(name, value.tolist() if value.dim() else value.item(), batch_size)
    return [value] * batch_size


@dataclass
class RequestParams:
    """Validated per-request parameters of one batch (FasterTransformer's names), with the device tensors the
    sampling kernel reads. Every parameter takes one value for the whole batch or a list with one per request:

    top_k (1: greedy; 0: no limit), top_p (0, 1] (1: no limit), temperature > 0, random_seed (uint64),
    end_id (default: the model's), repetition_penalty > 0 (multiplicative, 1: off), presence_penalty (additive,
    0: off; exclusive with repetition_penalty, as in FT), min_length (end_id is masked until that many tokens were
    generated), stop_words / bad_words (per request a list of words, each a list of token ids, or FT's
    [batch, 2, L] layout; see ftlab.processing).
    """
    top_k: list[int]
    top_p: list[float]
    temperature: list[float]
    random_seed: list[int]
    end_id: list[int]
    repetition_penalty: list[float]
    presence_penalty: list[float]
    min_length: list[int]
    stop_words: list | None = None
    bad_words: list | None = None
    device: object = None
    _tensors: dict | None = field(default=None, repr=False)

    def columns(self) -> dict:
        """What the sampler and the end-of-sequence check read on the device, as name=(host values, dtype); FT's
        random_seed is a uint64: its bits are kept in an int64."""
        seeds = [s - 2**64 if s >= 2**63 else s for s in self.random_seed]
        return dict(top_k=(self.top_k, torch.int32), top_p=(self.top_p, torch.float32),
                    temperature=(self.temperature, torch.float32), seeds=(seeds, torch.int64),
                    end_id=(self.end_id, torch.int64))

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """columns() on the device: copied on first use, unless a session loaded them with its own state in one
        copy (use_tensors)."""
        if self._tensors is None:
            self._tensors = host_to_device(self.device, **self.columns())
        return self._tensors

    def use_tensors(self, moved: dict[str, torch.Tensor]) -> None:
        """Take columns() from device columns a session loaded (views; the session keeps them alive)."""
        self._tensors = {name: moved[name] for name in self.columns()}

    @classmethod
    def build(cls, batch_size: int, vocab_size: int, device, *, top_k=1, top_p=1.0, temperature=1.0, random_seed=0,
              end_id, repetition_penalty=1.0, presence_penalty=0.0, min_length=0, stop_words=None,
              bad_words=None) -> "RequestParams":
        B = batch_size
        params = cls(top_k=_column("top_k", top_k, B, int),
                     top_p=_column("top_p", top_p, B, float),
                     temperature=_column("temperature", temperature, B, float),
                     random_seed=_column("random_seed", random_seed, B, int),
                     end_id=_column("end_id", end_id, B, int),
                     repetition_penalty=_column("repetition_penalty", repetition_penalty, B, float),
                     presence_penalty=_column("presence_penalty", presence_penalty, B, float),
                     min_length=_column("min_length", min_length, B, int), device=device)
        cols = (params.top_k, params.top_p, params.temperature, params.random_seed, params.end_id,
                params.repetition_penalty, params.presence_penalty, params.min_length)
        # a batch sharing every value (given once, as scalars) is checked on one row (64 requests on our CPU: 23 ->
        # 11 us; the H200 machine's host is several times slower at such Python work)
        if B > 1 and all(map(_is_scalar, (top_k, top_p, temperature, random_seed, end_id, repetition_penalty,
                                          presence_penalty, min_length))):
            cols = tuple(c[:1] for c in cols)
        try:
            check_sampling_params(*cols[:3], vocab_size)
            params.stop_words = normalize_words("stop_words", stop_words, B, vocab_size)
            params.bad_words = normalize_words("bad_words", bad_words, B, vocab_size)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        for b, (seed, end, rep, pres, min_len) in _first_of_each(zip(*cols[3:])):
            if not -(2**63) <= seed < 2**64:
                raise GenerationError(f"random_seed of request {b} = {seed} does not fit in 64 bits")
            if not 0 <= end < vocab_size:
                raise GenerationError(f"end_id of request {b} = {end} is outside the vocabulary [0, {vocab_size})")
            if not rep > 0:
                raise GenerationError(f"repetition_penalty of request {b} = {rep} must be > 0 (1 turns it off)")
            if rep != 1.0 and pres != 0.0:
                raise GenerationError(f"request {b} sets both repetition_penalty={rep} and presence_penalty={pres}; "
                                      f"they are exclusive (as in FasterTransformer)")
            if min_len < 0:
                raise GenerationError(f"min_length of request {b} = {min_len} must be >= 0")
        return params


def _first_of_each(rows) -> list[tuple[int, tuple]]:
    """(index, row) of each row's first occurrence: a batch of 64 requests sharing their parameters is checked
    once (each value is of a type cast by build(), so equal rows are the same check)."""
    first = {}
    for b, row in enumerate(rows):
        first.setdefault(row, b)
    return [(b, row) for row, b in first.items()]


def _token_ids(prompt, b: int) -> np.ndarray:
    """A prompt as a 1-D int64 array (from a list, tuple, numpy array or tensor of integer token ids)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.cpu()
    try:
        arr = np.asarray(prompt)
    except (TypeError, ValueError) as e:
        raise GenerationError(f"request {b}: the prompt must be a sequence of integer token ids ({e})") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise GenerationError(f"request {b}: the prompt must be a flat sequence of integer token ids, got "
                              f"{arr.dtype} values of shape {arr.shape}")
    return arr


def _as_int_matrix(prompts) -> np.ndarray | None:
    """prompts as a (B, T) integer numpy array when given as one 2-D array or tensor (ftlab bench, the server's
    input_ids), else None."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.cpu().numpy() if prompts.dim() == 2 and not prompts.is_floating_point() else None
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2 and prompts.dtype.kind in "iu":
        return prompts
    return None


def validate_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                     max_pos_seq_len: int) -> list[list[int]]:
    """The prompts as lists of Python ints, or a GenerationError naming the request and what is wrong."""
    return [ids.tolist() for ids in _checked_prompts(prompts, max_new_tokens, vocab_size, max_pos_seq_len)]


def _checked_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                     max_pos_seq_len: int) -> list[np.ndarray]:
    """validate_prompts, returning int64 arrays: what generate() works with (packing them is one concatenate; a
    batch of 64 x 512 tokens is converted from Python once, not two or three times, each ~2.5 ms on the H200's
    host in a cProfile of generate())."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not len(prompts):
        raise GenerationError("no prompts given (an empty batch)")
    batch = _as_int_matrix(prompts)
    if batch is not None and batch.shape[1]:  # one (B, T) array: its checks run once, not once per row
        # two reductions, no temporaries (64 x 512 on our CPU: 21 -> 7 us for the two comparisons, | and any())
        if batch.min() >= 0 and batch.max() < vocab_size and batch.shape[1] + max_new_tokens <= max_pos_seq_len:
            return list(batch.astype(np.int64, copy=False))  # row views; otherwise the loop below names the culprit
    out = []
    for b, prompt in enumerate(prompts):
        arr = _token_ids(prompt, b)  # vectorised checks: prompts run to thousands of tokens
        if not arr.size:
            raise GenerationError(f"request {b} has an empty prompt; give at least one token (e.g. start_id)")
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        if bad.size:
            raise GenerationError(f"request {b}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if arr.size + max_new_tokens > max_pos_seq_len:
            raise GenerationError(
                f"request {b}: prompt of {arr.size} tokens + max_new_tokens={max_new_tokens} needs "
                f"{arr.size + max_new_tokens} positions, more than the model's max_pos_seq_len={max_pos_seq_len}")
        out.append(arr.astype(np.int64, copy=False))
    return out


def cache_capacity(prompt_lengths: list[int], max_new_tokens: int, max_pos_seq_len: int) -> int:
    """KV-cache slots for a batch, rounded up to a multiple of 256 (capped at max_pos_seq_len) so that CUDA graphs
    captured for one call are reused by calls of similar size; decode attention skips the unused slots."""
    need = max(prompt_lengths) + max_new_tokens
    return min(max_pos_seq_len, -(-need // 256) * 256)


def sample_step(logits: torch.Tensor, params: RequestParams, steps: torch.Tensor,
                processor: LogitsProcessor | None):
    """Logits processing, then sampling: (tokens, log-probs of the processed distribution, stopped or None)."""
    if processor is not None:
        logits = processor.process(logits, steps)
    t = params.tensors
    tokens, log_probs = sample(logits, t["top_k"], t["top_p"], t["temperature"], t["seeds"], steps,
                               return_logprobs=True)
    return tokens, log_probs, (processor.observe(tokens) if processor is not None else None)


def capture_cuda_graph(step: Callable[[], object], device) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `step` once outside the graph (compiles every kernel variant, sets up cuBLAS workspaces), then capture
    it: (graph, what step returned inside the capture: static buffers each replay rewrites).

    The warm-up runs on the current stream, not on a side stream as torch's examples do. With side-stream warm-ups,
    a second capture over the buffers a captured decode step reads (generate() captures its prefill on a shape's
    second call: its warm-up writes the step's KV cache and inputs) left that step ~17 us slower at every later
    replay, even with every buffer copied back to its contents (H200, GPT-345M, bs1 step 340-345 -> 358-367 us in
    sessions 25 and 26; with both warm-ups on the current stream 344 -> 345; an unrelated GEMM or LayerNorm warmed up
    on a side stream changed nothing; the cause inside the driver or the GPU is not known;
    data/bench/capture_warmup_state.csv). `ftlab bench` alternating side / current, bs1 512 -> 32 12.63-13.06 ->
    12.02-12.23 ms on one machine, 12.69-12.81 -> 12.63-12.66 on another (data/bench/capture_warmup_ab.csv).
    FTLAB_CAPTURE_WARMUP=side restores the side stream (for measuring)."""
    if os.environ.get("FTLAB_CAPTURE_WARMUP") == "side":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
    else:
        step()
    graph = torch.cuda.CUDAGraph()
    # No cycle collection inside the capture: it can free an older graph (a dropped model's or session's graphs sit
    # in reference cycles), and destroying a graph while a stream captures invalidates the capture ("operation
    # failed due to a previous error during capture"; seen on an H100 in the GPU suite, 2026-12-07). torch's
    # graph context no longer collects on entry unless torch.compiler.config.force_cudagraph_gc is set.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            out = step()
    finally:
        if collecting:
            gc.enable()
    return graph, out


def lru_get(cache: dict, key, make: Callable[[], object], limit: int):
    """cache[key], made by make() on a miss; the dict is kept most recently used last, and the least recently used
    entries beyond `limit` are dropped (captured graphs hold their KV caches and memory pools)."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
    cache[key] = value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return value


class DecodeGraph:
    """The whole decode step (every block, LM head, sampling, end-of-sequence bookkeeping, and the embedding of the
    emitted tokens: the next step's input `x`) captured once as a CUDA graph over static buffers: one launch per
    token and no host synchronisation. Kept on the model per (batch, capacity) so that later calls of the same size
    reuse both the graph and its KV cache.

    A call loads its parameters and starting state in one copy (load_request), runs `first` (the prefill and the
    first token; captured too from a packed shape's second call) and then `replay`s the step: each token, its
    log-prob and the finished flags land in row `step` of the history buffers (kernels/finish_step.py), which the
    caller reads every few steps. By default (FTLAB_PREFILL_FIRST=0: `first` instead) a call runs `launch_prefill`
    before load_request and `first_token` after it, so that the host loads the parameters while the device runs the
    prompt (since session 30 before the parameters are even checked: generate's _launch_early). H200, 2026-12-03
    (`.ci/gpu-check prefill-first`): a bs1 512 -> 32 call's prefill launched 0.339 ms after entry instead of 0.403;
    `ftlab bench` in alternating processes, five rounds on two machines, bs1 512 -> 32
    12.05-12.51 -> 11.93-12.30 ms, bs64 85.8-87.1 -> 85.6-86.8, 25 of 32 cell pairs faster
    (data/bench/prefill_first_e2e_ab.csv). With the first token sampled by eager launches, a process that had run
    bs1 128 -> 8 calls before then ran bs1 512 -> 32 in 12.61-12.88 ms (against 12.27-12.37 in the other order),
    the ~17 us per step of capture_cuda_graph's unexplained slow state; with the first token as a graph of its own
    (PrefillGraph.sample_first) 12.04 / 12.27 (data/bench/prefill_first_grid_order.csv). One step per
    graph: capturing 2, 4 or 8 steps in one graph measured no gain on the H200 (GPT-345M, context 512, replays
    back to back: bs1 367.6 -> 365.3-368.4 us per step, bs64 1788 -> 1804-1848;
    data/bench/decode_attention_experiments.csv).

    Two variants of the step, each captured the first time a call needs it: the general one samples with
    kernels/sampling.py, runs finish_step and embeds the tokens (four launches), and the one for calls whose requests
    all decode greedily (top_k = 1) does all of it in one launch (greedy_finish_step). A step ends with its tokens'
    embedding rather than starting with it, so that its first kernel, the QKV GEMV, loads its weights as soon as the
    graph starts. H200, GPT-345M, fp16 (data/bench/greedy_finish_ab.csv): the sampler's two launches and finish_step
    alone took 6.6 / 7.3 / 16.2 us at bs1 / 8 / 64, greedy_finish_step (no embedding) 4.5 / 5.0 / 8.7;
    `ftlab bench` alternating with the code before (085ce8d), two rounds: decode step 0.356-0.359 -> 0.354 ms, bs1
    512 -> 32 12.80-13.03 -> 12.65-12.71 ms, bs64 86.76-87.02 -> 86.05-86.63 ms; in a timeline of the bs1 step the
    one launch adds 4.2 us where the four it replaces added ~7.3 (data/bench/decode_timeline.csv)."""

    def __init__(self, model: GPT, batch_size: int, capacity: int):
        dev, B = model.device, batch_size
        self.model = model
        self.cache = model.new_kv_cache(batch_size, capacity)
        self.tokens = torch.zeros(batch_size, dtype=torch.int64, device=dev)  # each step's input (last tokens)
        # ... embedded at `positions`: what the step's blocks start from (written by the prefill and each step)
        self.x = torch.zeros(batch_size, model.config.hidden, dtype=model.dtype, device=dev)
        self.request = DeviceColumns(dev, pinned_staging=True, top_k=(B, torch.int32), top_p=(B, torch.float32),
                                     temperature=(B, torch.float32), seeds=(B, torch.int64), end_id=(B, torch.int64),
                                     positions=(B, torch.int32), steps=(B, torch.int32), finished=(B, torch.bool))
        self.request.load(top_k=1, top_p=1.0, temperature=1.0, seeds=0, end_id=0, positions=0, steps=0,
                          finished=False)
        for name, view in self.request.views.items():  # top_k .. finished: the graph's inputs and state
            setattr(self, name, view)
        # row s: what step s produced (s = 0: the first token, from the prefill); capacity >= max_new_tokens
        self.hist_tokens = torch.zeros(capacity, B, dtype=torch.int64, device=dev)
        self.hist_log_probs = torch.zeros(capacity, B, dtype=torch.float32, device=dev)
        self.hist_finished = torch.zeros(capacity, B, dtype=torch.bool, device=dev)
        self.prefill_graphs: dict = {}  # PrefillGraph by (total tokens, longest prompt)
        self.prefill_seen: set = set()
        self.greedy_counter = torch.zeros(B, dtype=torch.int32, device=dev)  # greedy_finish_step's, left zero
        self.greedy_log_probs = torch.zeros(B, dtype=torch.float32, device=dev)
        self.variants: dict = {}  # all-greedy (bool) -> (captured step, its log-probs buffer)
        self.greedy = False  # the variant of the current call, chosen (and captured) by load_request
        self.graph = self.out_log_probs = None
        self.pending_logits = None  # launch_prefill's logits until first_token samples them
        self.pending_prefill = None  # and the PrefillGraph that wrote them (None after an eager prefill)
        self.host_rows_kept: dict = {}  # _HostRows by (max_new_tokens, with log-probs): see host_rows

    def _use_variant(self, greedy: bool) -> None:
        """Replay the general or the all-greedy step from now on, capturing it first if this graph has not yet. The
        capture's warm-up runs one step: the loaded state is put back (what else it wrote, the KV cache at the
        positions, history row `steps`, the tokens and x, the call writes again before anything reads them)."""
        self.greedy = greedy
        if greedy not in self.variants:
            saved = self.request.buffer.clone()
            graph, (_, log_probs) = capture_cuda_graph(self._step, self.model.device)
            self.variants[greedy] = graph, log_probs
            self.request.buffer.copy_(saved)
        self.graph, self.out_log_probs = self.variants[greedy]

    def _finish(self, logits: torch.Tensor, positions: torch.Tensor | None,
                greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling, the bookkeeping (positions advanced when given: a decode step) and the next step's input x.
        greedy (decode steps only: the embedding needs positions): every request has top_k = 1, all in one launch."""
        if greedy:
            w = self.model.weights
            greedy_finish_step(logits, self.end_id, self.finished, self.tokens, self.greedy_log_probs, self.steps,
                               self.hist_tokens, self.hist_log_probs, self.hist_finished, positions=positions,
                               counter=self.greedy_counter, embed=(w.wte, w.wpe, self.x))
            return self.tokens, self.greedy_log_probs
        tokens, log_probs = sample(logits, self.top_k, self.top_p, self.temperature, self.seeds, self.steps,
                                   return_logprobs=True)
        finish_step(tokens, log_probs, self.end_id, self.finished, self.tokens, self.steps, self.hist_tokens,
                    self.hist_log_probs, self.hist_finished, positions=positions)
        self._embed_tokens()
        return self.tokens, log_probs

    def _embed_tokens(self) -> None:
        embedding(self.tokens, self.positions, self.model.weights.wte, self.model.weights.wpe, out=self.x)

    def _step(self):
        logits = self.model.lm_logits(self.model.run_blocks_decode(self.x, self.positions, self.cache))
        return self._finish(logits, self.positions, self.greedy)

    def load_request(self, params: "RequestParams", lengths: list[int]) -> dict[str, torch.Tensor]:
        """A call's parameters and starting state into the graph's inputs, in one copy: the decode steps start at
        the prompts' ends; the first token is RNG step 0; no request has finished; the step variant for these
        parameters (all greedy or not) is replayed. Returns the views."""
        views = self.request.load(**{name: values for name, (values, _) in params.columns().items()},
                                  positions=lengths, steps=0, finished=False)
        self._use_variant(params.top_k.count(1) == len(params.top_k))
        return views

    def first(self, prompts: HostPrompts) -> tuple[torch.Tensor, torch.Tensor]:
        """The context phase into this graph's cache and the first token: (B,) tokens and log-probs (static
        buffers), history row 0 written. A packed shape (total tokens, longest prompt) seen a second time is
        captured as a CUDA graph and replayed from then on: the prefill is ~150 launches, whose host cost exceeds
        their GPU time for short prompts, while capturing a shape that never comes back would only cost time."""
        graph = self._prefill_graph(prompts, first_token=True)
        if graph is None:
            return self._finish(self._eager_prefill(prompts), None)
        return graph.run(prompts)

    def _prefill_graph(self, prompts: HostPrompts, first_token: bool) -> "PrefillGraph | None":
        """This packed shape's captured prefill (with or without the first token), captured on its second sight;
        None the first time it is seen (the caller runs it eagerly)."""
        key = (prompts.total, prompts.max_seqlen) + (() if first_token else ("prefill only",))
        if key not in self.prefill_graphs and key not in self.prefill_seen:
            self.prefill_seen.add(key)
            return None
        return lru_get(self.prefill_graphs, key, lambda: PrefillGraph(self, prompts, first_token), MAX_PREFILL_GRAPHS)

    def _eager_prefill(self, prompts: HostPrompts) -> torch.Tensor:
        b = prompts.to_device(self.model.device)
        return self.model.prefill(b.token_ids, b.positions, b.cu_seqlens, b.max_seqlen, self.cache)

    def launch_prefill(self, prompts: HostPrompts) -> None:
        """The context phase alone (the first token waits for `first_token`), so that it can be launched before
        the call's parameters are loaded (LocalSession's default order): the host loads them while the
        device runs the prompt. Captured per packed shape as in `first`, without the sampling."""
        self.pending_prefill = graph = self._prefill_graph(prompts, first_token=False)
        self.pending_logits = self._eager_prefill(prompts) if graph is None else graph.run(prompts)

    def first_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """After launch_prefill and load_request: the first token sampled from the prompt's logits, as `first`
        returns it: the replayed prefill's own first-token graph, or eager launches after an eager prefill
        (FTLAB_FIRST_TOKEN_GRAPH=0, read per call: eager after either)."""
        logits, self.pending_logits = self.pending_logits, None
        prefill, self.pending_prefill = self.pending_prefill, None
        if prefill is not None and os.environ.get("FTLAB_FIRST_TOKEN_GRAPH", "1") != "0":
            return prefill.sample_first()
        return self._finish(logits, None)

    def host_rows(self, n: int, with_log_probs: bool) -> "_HostRows":
        """The pinned host buffers (and event) into which a call reads its history rows, kept per (n, log-probs) and
        reused by the next call of the same size: _HostRows.wait hands out copies, and a graph serves one call at
        a time (FTLAB_KEEP_HOST_ROWS=0, read per call: per-call buffers again). Made per call they cost the H200
        machine's host ~0.06 ms while the prefill runs, and freeing them falls in the call's tail: one process per
        variant, return - last read 0.148 -> 0.080 ms at bs1 512 -> 32 and 0.533 -> 0.276 at bs64, but 0.146 / 0.482
        in a later process on another machine, and `ftlab bench` moved within its noise (bs1 512 -> 32 11.94-12.16
        -> 12.07-12.11 ms; data/bench/host_rows_kept_marks.csv, host_rows_kept_ab.csv)."""
        make = lambda: _HostRows(self.hist_tokens, self.hist_finished, self.hist_log_probs, n, with_log_probs)
        if os.environ.get("FTLAB_KEEP_HOST_ROWS", "1") == "0":
            return make()
        return lru_get(self.host_rows_kept, (n, with_log_probs), make, MAX_HOST_ROWS)

    def replay(self) -> None:
        """One decode step (its outputs: `tokens`, `out_log_probs`, history row `step`)."""
        self.graph.replay()

    def run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the given last tokens: (B,) next tokens and their log-probs, in the graph's static buffers
        (valid until the next step; not cloned)."""
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
            self._embed_tokens()
        self.graph.replay()
        return self.tokens, self.out_log_probs


class PrefillGraph:
    """The context phase and first token of one packed shape, captured over a DecodeGraph's KV cache and state
    (the prompts loaded from the host in one copy per call). first_token=False: the context phase alone, whose
    replay returns the last tokens' logits (DecodeGraph.launch_prefill), and the first token's sampling from them
    as a second graph (sample_first), replayed once the call's parameters are loaded."""

    def __init__(self, decode: DecodeGraph, prompts: HostPrompts, first_token: bool = True):
        model, columns = decode.model, prompts.columns()
        self.inputs = DeviceColumns.like(model.device, columns, pinned_staging=True)
        b = prompts.on_device(self.inputs.load_columns(columns))

        def first():
            logits = model.prefill(b.token_ids, b.positions, b.cu_seqlens, b.max_seqlen, decode.cache)
            return decode._finish(logits, None) if first_token else logits

        # the capture's warm-up run samples a first token: leave the call's state as it was loaded
        saved = decode.request.buffer.clone()
        self.graph, self.out = capture_cuda_graph(first, model.device)
        self.token_graph = None
        if not first_token:
            self.token_graph, self.token_out = capture_cuda_graph(lambda: decode._finish(self.out, None),
                                                                  model.device)
        decode.request.buffer.copy_(saved)

    def run(self, prompts: HostPrompts) -> tuple[torch.Tensor, torch.Tensor]:
        self.inputs.load_columns(prompts.columns())
        self.graph.replay()
        return self.out

    def sample_first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first_token=False) The first token from the logits the last `run` left in place, as `first` returns it."""
        self.token_graph.replay()
        return self.token_out


MAX_GRAPHS_PER_MODEL = 4
MAX_PREFILL_GRAPHS = 4  # per decode graph
MAX_HOST_ROWS = 4  # _HostRows per decode graph (one per max_new_tokens and log-probs choice)


def decode_graph(model: GPT, batch_size: int, capacity: int) -> DecodeGraph:
    """The model's captured decode step for this (batch, capacity), capturing it on first use (least recently
    used ones beyond MAX_GRAPHS_PER_MODEL are dropped with their KV caches). Calls sharing a graph share its cache,
    so a model runs one CUDA-graph generate() at a time."""
    return lru_get(model.graph_cache, (batch_size, capacity), lambda: DecodeGraph(model, batch_size, capacity),
                   MAX_GRAPHS_PER_MODEL)


def _prefill_first() -> bool:
    return os.environ.get("FTLAB_PREFILL_FIRST", "1") != "0"


def _uses_graph(model: GPT, use_cuda_graph: bool | None, unprocessed: bool) -> bool:
    return (model.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph) and unprocessed


def _graph_for(model: GPT, prompts: HostPrompts, max_new_tokens: int, use_cuda_graph: bool | None,
               unprocessed: bool) -> DecodeGraph | None:
    """The decode graph a single-process call of these prompts runs on, or None for an eager call: graphs by
    default on a GPU (use_cuda_graph), and never for calls with logits processors (`unprocessed` False)."""
    if not _uses_graph(model, use_cuda_graph, unprocessed):
        return None
    capacity = cache_capacity(prompts.lengths, max_new_tokens, model.config.max_pos_seq_len)
    return decode_graph(model, len(prompts.lengths), capacity)


# generate() parameters that make a LogitsProcessor, with the values that leave it out
_PROCESSOR_PARAMS = dict(repetition_penalty=1.0, presence_penalty=0.0, min_length=0, stop_words=None, bad_words=None)


def _surely_unprocessed(params: dict) -> bool:
    """Whether raw generate() keywords certainly need no LogitsProcessor: each of its parameters absent or given
    as its default number (after RequestParams.build they then hold the defaults, and LogitsProcessor.build
    returns None). Anything else (lists, tensors, other values) answers False, also where it would turn out
    inactive."""
    for name, default in _PROCESSOR_PARAMS.items():
        value = params.get(name, default)
        if value is default:
            continue
        if default is None or type(value) not in (int, float) or value != default:
            return False
    return True


@dataclass
class EarlyPrefill:
    prompts: HostPrompts  # the call's packed prompts
    graph: DecodeGraph  # the decode graph whose cache the context phase is filling


def _launch_early(model, prompts: list[np.ndarray], max_new_tokens: int, use_cuda_graph: bool | None,
                  params: dict) -> EarlyPrefill | None:
    """For a single-process call that will run on a decode graph: its prompt's context phase launched before the
    call's parameters are checked and built (RequestParams.build: ~0.05 ms of the H200 machine's host at bs1 inside
    a call, 10 us in a loop), so that the device starts sooner. The prompts were checked already; parameters that
    fail their checks afterwards leave a prefill of the graph's cache behind, which the graph's next call
    overwrites (a model runs one graph call at a time, see decode_graph). None where the call goes another way (an
    engine with open_session, eager calls, calls that may need logits processors) or with FTLAB_EARLY_PREFILL=0 or
    FTLAB_PREFILL_FIRST=0 (read per call): LocalSession then decides and launches itself.

    H200, GPT-345M, 2026-12-03: host marks (one process per variant) put the prefill launch 0.264 -> 0.174 ms after
    entry at bs1 512 -> 32, 0.789 -> 0.585 at bs64 512 -> 32, 0.138 -> 0.090 at bs1 128 -> 8
    (data/bench/host_marks_ab.csv). End to end in fresh processes alternating (9 pairs from four runs,
    data/bench/early_prefill_ab.csv) bs1 512 -> 32 moved by -0.086 ms on average (6 faster, 3 slower, -0.42 to
    +0.23), bs1 128 -> 8 by -0.018 (5 / 4), i.e. within the noise of single runs; in one run both 128 -> 8 cells
    were slower in each of its three rounds (bs1 +0.11-0.21, bs64 +0.08-0.31 ms), which the other runs did not
    repeat."""
    if (hasattr(model, "open_session") or not _prefill_first() or os.environ.get("FTLAB_EARLY_PREFILL", "1") == "0"
            or not _uses_graph(model, use_cuda_graph, _surely_unprocessed(params))):
        return None
    host = pack_prompts_host(prompts)
    graph = _graph_for(model, host, max_new_tokens, use_cuda_graph, True)
    graph.launch_prefill(host)
    return EarlyPrefill(host, graph)


class LocalSession:
    """One generate() call on a single-process model: owns (or borrows from a DecodeGraph) the KV cache, positions
    and per-request RNG steps.

    `first()` runs the context phase and samples the first token of every request; `next(tokens)` feeds each
    request's last token and samples the following one. ftlab.parallel provides the same two methods across ranks.
    On a DecodeGraph both already return the end-of-sequence-masked tokens (finished requests emit end_id with
    log-prob 0) and record them in the graph's history rows; eager sessions return raw samples.
    Request parameters, positions and RNG steps reach the device in one copy (one per call, too, for the prompts).
    `launched`: the call's prompts and decode graph, whose context phase _open launched already (_launch_early).
    """

    def __init__(self, model: GPT, prompts: list[list[int]], max_new_tokens: int, params: RequestParams,
                 use_cuda_graph: bool | None = None, launched: "EarlyPrefill | None" = None):
        self.model, self.params = model, params
        B, dev = len(prompts), model.device
        self.processor = LogitsProcessor.build(prompts, model.config.vocab_size, dev, params)
        if launched is not None:  # _open launched the prompt's context phase on this graph before checking params
            assert self.processor is None, "a call with logits processors was launched on a decode graph"
            self.prompts, self.graph, self.prefill_launched = launched.prompts, launched.graph, True
        else:
            self.prompts = pack_prompts_host(prompts)
            # the logits processors keep their own device state outside the captured step: those calls run eagerly
            self.graph = _graph_for(model, self.prompts, max_new_tokens, use_cuda_graph, self.processor is None)
            # the prompt's context phase is launched before the parameters are loaded into the graph's inputs, and
            # the first token sampled behind it (DecodeGraph; FTLAB_PREFILL_FIRST=0, read per call: the other order)
            self.prefill_launched = self.graph is not None and _prefill_first()
            if self.prefill_launched:
                self.graph.launch_prefill(self.prompts)
        lengths = self.prompts.lengths
        if self.graph is not None:
            state = self.graph.load_request(params, lengths)  # the graph's own inputs: nothing to copy later
            self.cache = self.graph.cache
        else:
            state = host_to_device(dev, **params.columns(), positions=(lengths, torch.int32),
                                   steps=(np.zeros(B), torch.int32))
            self.cache = model.new_kv_cache(B, cache_capacity(lengths, max_new_tokens, model.config.max_pos_seq_len))
        params.use_tensors(state)
        self.positions = state["positions"]  # (B,) int32, the next slot of each sequence
        self.steps = state["steps"]  # (B,) int32, the RNG step of each request's next token

    def _sample(self, logits: torch.Tensor):
        tokens, log_probs, stopped = sample_step(logits, self.params, self.steps, self.processor)
        self.steps += 1
        return tokens, log_probs, stopped

    def first(self):
        """Context phase + first token: (tokens, log_probs, stopped-by-a-stop-word or None), each (B,)."""
        if self.graph is not None:  # the graph also masks finished requests (kernels/finish_step.py)
            if self.prefill_launched:
                return (*self.graph.first_token(), None)
            return (*self.graph.first(self.prompts), None)
        b = self.prompts.to_device(self.model.device)
        return self._sample(self.model.prefill(b.token_ids, b.positions, b.cu_seqlens, b.max_seqlen, self.cache))

    def next(self, tokens: torch.Tensor):
        if self.graph is not None:
            return (*self.graph.run(tokens), None)
        logits = self.model.decode(tokens, self.positions, self.cache)
        self.positions += 1
        return self._sample(logits)


def _open(model, prompts: list[np.ndarray], max_new_tokens: int, use_cuda_graph, params: dict):
    """Open the session of a checked batch (_checked_prompts): (session, RequestParams)."""
    cfg = model.config
    if params.get("end_id") is None:
        params = dict(params, end_id=cfg.end_id)
    launched = _launch_early(model, prompts, max_new_tokens, use_cuda_graph, params)
    try:
        request = RequestParams.build(len(prompts), cfg.vocab_size, model.device, **params)
    except TypeError as exc:  # an unknown keyword
        raise GenerationError(f"unknown generation parameter: {exc}") from None
    if hasattr(model, "open_session"):
        session = model.open_session(prompts, max_new_tokens, request, use_cuda_graph=use_cuda_graph)
    else:
        session = LocalSession(model, prompts, max_new_tokens, request, use_cuda_graph=use_cuda_graph,
                               launched=launched)
    return session, request


class _Rows:
    """Each step's tokens, finished flags and log-probs as rows on the device, for a session whose first()/next()
    hand back raw samples (eager or tensor/layer-parallel): the end-of-sequence bookkeeping in torch ops, written
    straight into the step's row (out=)."""

    def __init__(self, session, request: RequestParams, n: int, device):
        B = len(request.top_k)
        self.session, self.end = session, request.tensors["end_id"]
        self.tokens = torch.empty(n, B, dtype=torch.int64, device=device)
        self.finished = torch.empty(n, B, dtype=torch.bool, device=device)
        self.log_probs = torch.empty(n, B, dtype=torch.float32, device=device)
        self.running = torch.zeros(B, dtype=torch.bool, device=device)  # finished before the current step

    def first(self) -> None:
        out = self.session.first()
        self.zero = torch.zeros((), dtype=torch.float32, device=self.end.device)  # once the prefill is queued
        self._record(0, *out)

    def advance(self, step: int) -> None:
        self._record(step, *self.session.next(self.tokens[step - 1]))

    def _record(self, step, tokens, log_probs, stopped) -> None:
        tokens = torch.where(self.running, self.end, tokens, out=self.tokens[step])  # finished: keep emitting end_id
        torch.where(self.running, self.zero, log_probs, out=self.log_probs[step])
        done = torch.eq(tokens, self.end)
        if stopped is not None:  # the sequence now ends with a stop word (kept in the output, as FT and HF do)
            done |= stopped
        self.running = torch.logical_or(self.running, done, out=self.finished[step])


class _GraphRows:
    """The same rows for a LocalSession on a DecodeGraph, which keeps them itself (kernels/finish_step.py): one
    graph launch per step and nothing else."""

    def __init__(self, session: LocalSession):
        self.session, graph = session, session.graph
        self.tokens, self.finished, self.log_probs = graph.hist_tokens, graph.hist_finished, graph.hist_log_probs

    def first(self) -> None:
        self.session.first()

    def advance(self, step: int) -> None:
        self.session.graph.replay()


@torch.no_grad()
def stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, return_log_probs: bool = False,
           sync_every: int = 1, use_cuda_graph: bool | None = None, **params) -> Iterator[StepOutput]:
    """Yield one StepOutput per generated position until every request has finished (end_id, a stop word) or
    produced max_new_tokens. `params`: the per-request parameters of RequestParams (top_k, top_p, temperature,
    random_seed, end_id, repetition_penalty, presence_penalty, min_length, stop_words, bad_words).

    `model` is a GPT, or any engine with `config`, `device` and `open_session(prompts, max_new_tokens, params,
    use_cuda_graph)` (ftlab.parallel's tensor/layer-parallel engine). Tokens are handed to the host every `sync_every` steps:
    1 streams each token as soon as it exists; larger values avoid a host synchronisation per token (the decode
    steps then run back to back on the device) at the price of up to sync_every steps past the last end_id (the
    step after a read is queued before the host waits for it).
    use_cuda_graph: replay the decode step as one CUDA graph (default: on a GPU); False runs kernel by kernel."""
    cfg = model.config
    checked = _checked_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_pos_seq_len)
    for chunk in _chunks(model, checked, max_new_tokens, return_log_probs, sync_every, use_cuda_graph, params):
        for step in chunk.steps():
            yield step
            if all(step.finished):
                return


@dataclass
class _Chunk:
    first_step: int
    tokens: np.ndarray  # (steps, B) int64
    finished: np.ndarray  # (steps, B) bool: finished after that step
    log_probs: np.ndarray | None  # (steps, B) float32

    def steps(self) -> list[StepOutput]:
        tokens, finished = self.tokens.tolist(), self.finished.tolist()
        log_probs = self.log_probs.tolist() if self.log_probs is not None else [None] * len(tokens)
        return [StepOutput(self.first_step + i, tokens[i], finished[i], log_probs[i]) for i in range(len(tokens))]


@torch.no_grad()
def _chunks(model, prompts: list[np.ndarray], max_new_tokens: int, return_log_probs: bool, sync_every: int,
            use_cuda_graph: bool | None, params: dict,
            while_device_runs: Callable[[], None] | None = None) -> Iterator[_Chunk]:
    """The steps of a checked batch as host arrays, every `sync_every` steps, until every request has finished or
    max_new_tokens were produced. while_device_runs: host work that can wait until the prefill and the first
    steps are queued (it runs once, before the host first waits for the device)."""
    session, request = _open(model, prompts, max_new_tokens, use_cuda_graph, params)
    graphed = isinstance(session, LocalSession) and session.graph is not None
    rows = _GraphRows(session) if graphed else _Rows(session, request, max_new_tokens, model.device)
    rows.first()
    host = (session.graph.host_rows(max_new_tokens, return_log_probs) if graphed  # kept with the graph
            else _HostRows(rows.tokens, rows.finished, rows.log_probs, max_new_tokens, return_log_probs))
    flushed = 0  # steps already handed to the host
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        read = last or (step + 1) % sync_every == 0
        if read:
            host.start(flushed, step + 1)
        if not last:  # queued before the host waits for the rows above: the device never idles at a read
            rows.advance(step + 1)
        if read:
            if while_device_runs is not None:
                while_device_runs()
                while_device_runs = None
            chunk = _Chunk(flushed, *host.wait(flushed, step + 1))
            yield chunk
            if chunk.finished.all(axis=1).any():  # every request has finished
                return
            flushed = step + 1


class _HostRows:
    """History rows [lo, hi) on their way to the host: copied into pinned memory behind the step that wrote them,
    with an event, so that the caller can queue the next step before it waits (a plain .tolist() would wait for
    that step too, and the device would idle until the host queued another). H200, GPT-345M, alternating in one
    process (data/bench/host_read_ab.csv): streaming a token per step (on_step) bs1 128 -> 128 50.2 -> 47.0 ms, bs1
    512 -> 32 13.85-13.89 -> 13.48-13.73, bs8 512 -> 32 24.3 -> 23.8; generate() (a read every 16 steps) bs1
    128 -> 128 46.4-46.5 -> 45.9. Off a GPU a plain copy."""

    def __init__(self, tokens: torch.Tensor, finished: torch.Tensor, log_probs: torch.Tensor, n: int,
                 with_log_probs: bool):
        self.with_log_probs = with_log_probs
        self.sources = (tokens, finished, log_probs)[:3 if with_log_probs else 2]  # (steps, B) device rows
        self.pinned = tokens.is_cuda
        B = tokens.shape[1]
        self.tokens = torch.empty(n, B, dtype=torch.int64, pin_memory=self.pinned)
        self.finished = torch.empty(n, B, dtype=torch.bool, pin_memory=self.pinned)
        self.log_probs = torch.empty(n, B, dtype=torch.float32, pin_memory=self.pinned) if with_log_probs else None
        self.event = torch.cuda.Event() if self.pinned else None
        self.buffers = [t for t in (self.tokens, self.finished, self.log_probs) if t is not None]
        # numpy views made once: wait() slices them without a torch op per buffer
        self.host = [t.numpy() for t in self.buffers]

    def start(self, lo: int, hi: int) -> None:
        for dst, src in zip(self.buffers, self.sources):
            dst[lo:hi].copy_(src[lo:hi], non_blocking=self.pinned)
        if self.pinned:
            self.event.record()

    def wait(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows [lo, hi) as numpy arrays (copies: the caller may keep them)."""
        if self.pinned:
            self.event.synchronize()
        rows = [a[lo:hi].copy() for a in self.host]
        return rows[0], rows[1], rows[2] if self.with_log_probs else None


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, return_log_probs: bool = False,
             on_step: Callable[[StepOutput], None] | None = None, use_cuda_graph: bool | None = None,
             **params) -> GenerationOutput:
    """Generate for every request (params: see RequestParams). With on_step, tokens are handed over as they are
    produced (via `stream`); without it, the host looks at them only every few steps (no sync per token).
    beam_width > 1 (with len_penalty, beam_search_diversity_rate) runs beam search instead: see ftlab.beam."""
    beam = {k: params.pop(k) for k in ("beam_width", "len_penalty", "beam_search_diversity_rate") if k in params}
    if beam.get("beam_width", 1) != 1 or len(beam) > ("beam_width" in beam):
        from .beam import beam_search

        if on_step is not None:
            raise GenerationError("beam search returns whole hypotheses: it cannot stream (drop on_step)")
        if "beam_width" not in beam:
            raise GenerationError(f"{sorted(beam)} need beam_width > 1")
        return beam_search(model, prompts, max_new_tokens=max_new_tokens, **beam, **params)
    cfg = model.config
    checked = _checked_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_pos_seq_len)
    outputs: list[list[int]] = []

    def prompts_as_lists():  # while the device runs the prefill (64 x 512 tokens: ~1.7 ms of the H200 host's time)
        outputs.extend(ids.tolist() for ids in checked)

    chunks = []
    for chunk in _chunks(model, checked, max_new_tokens, return_log_probs, 1 if on_step is not None else 16,
                         use_cuda_graph, params, while_device_runs=prompts_as_lists):
        chunks.append(chunk)
        if on_step is not None:  # a read per step: each handed over as soon as it was read
            for step in chunk.steps():
                on_step(step)
    # each request keeps its tokens up to the step that finished it, end_id included (numpy, not a loop per token;
    # what remains after the last read at bs64 on the H200 host, ~0.5 ms, is the caller freeing the lists)
    tokens = np.concatenate([c.tokens for c in chunks])  # (steps, B)
    finished = np.concatenate([c.finished for c in chunks])
    if finished[:-1].any():  # some request stopped before the last step: its tokens up to it
        kept = np.where(finished.any(0), finished.argmax(0) + 1, len(tokens))
        columns = lambda rows: [rows[:kept[b], b].tolist() for b in range(len(checked))]
    else:  # whole columns in one tolist() (64 x 32 on our CPU: 130 -> 111 us with the rest of this tail)
        columns = lambda rows: rows.T.tolist()
    for ids, new in zip(outputs, columns(tokens)):
        ids.extend(new)
    if return_log_probs:
        log_probs = columns(np.concatenate([c.log_probs for c in chunks]))
    result = GenerationOutput(output_ids=outputs, sequence_length=[len(o) for o in outputs],
                              input_length=[len(p) for p in checked])
    if return_log_probs:
        result.output_log_probs = log_probs
        result.cum_log_probs = [sum(lp) for lp in log_probs]
    return result
