"""FasterTransformer's GPT model as its Triton backend serves it (model `fastertransformer`): the request tensors
become ftlab generate() calls, the results its output tensors.

Inputs (batch dimension first; per-sequence values as [B, 1] or [B]): input_ids UINT32 [B, L] (right-padded),
input_lengths [B, 1], request_output_len [B, 1]; optional runtime_top_k, runtime_top_p, temperature,
repetition_penalty, presence_penalty, min_length, random_seed (UINT64), end_id, start_id, is_return_log_probs,
beam_width, len_penalty, beam_search_diversity_rate ([B, 1] each, the beam ones equal over the batch),
stop_words_list / bad_words_list INT32 [B, 2, L] (ids, then cumulative end offsets padded with -1).
Outputs: output_ids UINT32 [B, beam, S] (prompt then generated ids, padded with end_id), sequence_length UINT32
[B, beam]; with is_return_log_probs, cum_log_probs FP32 [B, beam] and output_log_probs FP32 [B, beam, out_len]
(the latter without beam search). Integer inputs may come in any integer datatype, floats in any float one.
FT's sampling conventions: runtime_top_p = 0 means no top-p limit, and runtime_top_k = 0 with it means greedy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..beam import MAX_BEAM_WIDTH
from ..config import GPTConfig
from ..generate import GenerationError, RequestParams, validate_prompts
from ..processing import words_from_ft_layout
from .protocol import ProtocolError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = any length
    optional: bool = False

    def as_config(self) -> dict:
        return {"name": self.name, "data_type": f"TYPE_{self.datatype}", "dims": list(self.dims),
                "optional": self.optional}

    def as_metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


INPUTS = (
    TensorSpec("input_ids", "UINT32", (-1,)),
    TensorSpec("input_lengths", "UINT32", (1,)),
    TensorSpec("request_output_len", "UINT32", (-1,)),
    TensorSpec("runtime_top_k", "UINT32", (1,), True),
    TensorSpec("runtime_top_p", "FP32", (1,), True),
    TensorSpec("temperature", "FP32", (1,), True),
    TensorSpec("repetition_penalty", "FP32", (1,), True),
    TensorSpec("presence_penalty", "FP32", (1,), True),
    TensorSpec("min_length", "UINT32", (1,), True),
    TensorSpec("random_seed", "UINT64", (1,), True),
    TensorSpec("start_id", "UINT32", (1,), True),
    TensorSpec("end_id", "UINT32", (1,), True),
    TensorSpec("is_return_log_probs", "BOOL", (1,), True),
    TensorSpec("beam_width", "UINT32", (1,), True),
    TensorSpec("len_penalty", "FP32", (1,), True),
    TensorSpec("beam_search_diversity_rate", "FP32", (1,), True),
    TensorSpec("stop_words_list", "INT32", (2, -1), True),
    TensorSpec("bad_words_list", "INT32", (2, -1), True),
)
OUTPUTS = (
    TensorSpec("output_ids", "UINT32", (-1, -1)),
    TensorSpec("sequence_length", "UINT32", (-1,)),
    TensorSpec("cum_log_probs", "FP32", (-1,)),
    TensorSpec("output_log_probs", "FP32", (-1, -1)),
)
_SPECS = {spec.name: spec for spec in INPUTS}
_KINDS = {"UINT32": "iu", "UINT64": "iu", "INT32": "iu", "FP32": "fiu", "BOOL": "biu"}
# per-sequence inputs -> generate() parameters (defaults: generate's)
_PER_SEQUENCE = {"runtime_top_k": "top_k", "runtime_top_p": "top_p", "temperature": "temperature",
                 "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                 "min_length": "min_length", "random_seed": "random_seed", "end_id": "end_id"}
_DEFAULTS = {"top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
             "min_length": 0, "random_seed": 0}


@dataclass
class Job:
    """One infer request: B sequences with their own parameters (every list has B entries)."""
    prompts: list[list[int]]
    output_lens: list[int]
    params: dict[str, list] = field(default_factory=dict)  # generate() keyword -> per-sequence values
    beam_width: int = 1
    beam: dict = field(default_factory=dict)  # len_penalty, beam_search_diversity_rate (beam_width > 1)
    return_log_probs: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


def _per_sequence(inputs: dict, name: str, batch: int) -> list | None:
    array = inputs.get(name)
    if array is None:
        return None
    spec = _SPECS[name]
    if array.dtype.kind not in _KINDS[spec.datatype]:
        raise ProtocolError(f"input '{name}' must be {spec.datatype} (or another "
                            f"{'integer' if 'f' not in _KINDS[spec.datatype] else 'numeric'} type), got {array.dtype}")
    if array.shape not in ((batch,), (batch, 1)):
        raise ProtocolError(f"input '{name}' must have shape [{batch}, 1] (one value per sequence), "
                            f"got {list(array.shape)}")
    values = array.reshape(batch).tolist()
    return [bool(v) for v in values] if spec.datatype == "BOOL" else values


def _same_for_all(name: str, values: list | None, default):
    if values is None:
        return default
    if any(v != values[0] for v in values):
        raise ProtocolError(f"input '{name}' must be the same for every sequence of a request, got {values}")
    return values[0]


def parse_job(inputs: dict[str, np.ndarray], config: GPTConfig, max_batch_size: int) -> Job:
    """Validate a request's tensors (ProtocolError names the tensor and what is wrong) -> Job."""
    unknown = sorted(set(inputs) - set(_SPECS))
    if unknown:
        raise ProtocolError(f"unknown input(s) {unknown}; the model takes {[s.name for s in INPUTS]}")
    missing = [s.name for s in INPUTS if not s.optional and s.name not in inputs]
    if missing:
        raise ProtocolError(f"missing required input(s) {missing}")
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ProtocolError(f"input 'input_ids' must have shape [batch, max_input_len] with both >= 1, "
                            f"got {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise ProtocolError(f"input 'input_ids' must be UINT32 (or another integer type), got {ids.dtype}")
    batch = ids.shape[0]
    if batch > max_batch_size:
        raise ProtocolError(f"input 'input_ids' has a batch of {batch}, more than max_batch_size={max_batch_size}")
    lengths = _per_sequence(inputs, "input_lengths", batch)
    output_lens = _per_sequence(inputs, "request_output_len", batch)
    for b, (n, out) in enumerate(zip(lengths, output_lens)):
        if not 1 <= n <= ids.shape[1]:
            raise ProtocolError(f"input 'input_lengths'[{b}] = {n} is outside [1, {ids.shape[1]}] "
                                f"(the width of input_ids)")
        if out < 1:
            raise ProtocolError(f"input 'request_output_len'[{b}] = {out} must be >= 1")
    prompts = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
    params = {}
    for name, key in _PER_SEQUENCE.items():
        values = _per_sequence(inputs, name, batch)
        params[key] = values if values is not None else [_DEFAULTS.get(key, config.end_id)] * batch
    # FT: top_p = 0 turns nucleus sampling off; top_k = 0 with it means greedy
    params["top_k"] = [1 if k == 0 and p == 0 else k for k, p in zip(params["top_k"], params["top_p"])]
    params["top_p"] = [1.0 if p == 0 else p for p in params["top_p"]]
    for name, key in (("stop_words_list", "stop_words"), ("bad_words_list", "bad_words")):
        if name in inputs:
            words = inputs[name]
            if words.dtype.kind not in "iu" or words.ndim != 3 or words.shape[:2] != (batch, 2):
                raise ProtocolError(f"input '{name}' must be INT32 of shape [{batch}, 2, L] (ids, then end offsets "
                                    f"padded with -1), got {words.dtype} {list(words.shape)}")
            try:
                params[key] = words_from_ft_layout(words.astype(np.int64))
            except ValueError as exc:
                raise ProtocolError(f"input '{name}': {exc}") from None
    log_probs = _per_sequence(inputs, "is_return_log_probs", batch)
    job = Job(prompts, output_lens, params, return_log_probs=bool(log_probs and any(log_probs)))
    job.beam_width = int(_same_for_all("beam_width", _per_sequence(inputs, "beam_width", batch), 1))
    if not 1 <= job.beam_width <= MAX_BEAM_WIDTH:
        raise ProtocolError(f"input 'beam_width' = {job.beam_width} is outside [1, {MAX_BEAM_WIDTH}]")
    if job.beam_width > 1:
        job.beam = {"len_penalty": _same_for_all("len_penalty", _per_sequence(inputs, "len_penalty", batch), 1.0),
                    "beam_search_diversity_rate": _same_for_all(
                        "beam_search_diversity_rate", _per_sequence(inputs, "beam_search_diversity_rate", batch), 0.0)}
        _same_for_all("end_id", params["end_id"], None)
    _check_values(job, config)
    return job


def _check_values(job: Job, config: GPTConfig) -> None:
    """The checks generate() itself makes, made here so that a bad request fails alone before it is batched."""
    try:
        # the request's sequences run together, all to its longest request_output_len
        validate_prompts(job.prompts, max(job.output_lens), config.vocab_size, config.max_pos_seq_len)
        RequestParams.build(job.batch_size, config.vocab_size, "cpu", **job.params)
    except GenerationError as exc:
        raise ProtocolError(_named_by_tensor(str(exc))) from None


def _named_by_tensor(message: str) -> str:
    """generate()'s message names its parameter (top_p[0] = ...): say which request tensor that is."""
    for tensor, key in (*_PER_SEQUENCE.items(), ("stop_words_list", "stop_words"), ("bad_words_list", "bad_words")):
        if tensor != key and re.match(rf"{key}\b", message):
            return f"input '{tensor}': {message}"
    return message


def merge(jobs: list[Job]) -> Job:
    """Sampling jobs as one batch (every parameter is per sequence, so sequences do not affect each other)."""
    merged = Job([p for j in jobs for p in j.prompts], [n for j in jobs for n in j.output_lens],
                 return_log_probs=any(j.return_log_probs for j in jobs))
    for key in jobs[0].params:
        if key in ("stop_words", "bad_words"):
            continue
        merged.params[key] = [v for j in jobs for v in j.params[key]]
    for key in ("stop_words", "bad_words"):
        if any(key in j.params for j in jobs):
            merged.params[key] = [w for j in jobs for w in j.params.get(key, [[] for _ in j.prompts])]
    return merged


def outputs_of(job: Job, result) -> dict[str, np.ndarray]:
    """A finished job's output tensors from generate()'s GenerationOutput."""
    width = job.beam_width
    if width > 1:
        hypotheses = result.beams
        cum = result.beam_log_probs
    else:
        hypotheses = [[ids] for ids in result.output_ids]
        cum = None
    ends = job.params["end_id"]
    seqs = [[h[:len(p) + n] for h in hyps[:width]] for hyps, p, n in zip(hypotheses, job.prompts, job.output_lens)]
    longest = max(len(h) for hyps in seqs for h in hyps)
    output_ids = np.empty((job.batch_size, width, longest), dtype=np.uint32)
    lengths = np.zeros((job.batch_size, width), dtype=np.uint32)
    for b, hyps in enumerate(seqs):
        output_ids[b] = ends[b]
        for k, h in enumerate(hyps):
            output_ids[b, k, :len(h)] = h
            lengths[b, k] = len(h)
    out = {"output_ids": output_ids, "sequence_length": lengths}
    if job.return_log_probs:
        if width > 1:
            out["cum_log_probs"] = np.array([c[:width] + [0.0] * (width - len(c)) for c in cum], dtype=np.float32)
        else:
            per_token = [lp[:n] for lp, n in zip(result.output_log_probs, job.output_lens)]
            table = np.zeros((job.batch_size, 1, max(job.output_lens)), dtype=np.float32)
            for b, lp in enumerate(per_token):
                table[b, 0, :len(lp)] = lp
            out["output_log_probs"] = table
            out["cum_log_probs"] = np.array([[sum(lp)] for lp in per_token], dtype=np.float32)
    return out
