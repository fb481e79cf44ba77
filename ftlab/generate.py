"""Autoregressive generation over a ragged batch: prefill the prompts, then one decode step per new token.

Every request carries its own sampling parameters (FasterTransformer / HF names: top_k, top_p, temperature,
random_seed, end_id); a scalar applies to the whole batch. `stream` yields each step's tokens as they are produced;
`generate` runs the stream to the end and returns prompt + generated ids with sequence lengths. Nothing is global:
all state (KV cache, positions, finished flags) lives in the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .kernels.sampling import check_sampling_params, sample
from .model import GPT, pack_prompts


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

    def padded(self, pad_id: int) -> torch.Tensor:
        """(B, max sequence_length) with pad_id after each sequence's end."""
        width = max(self.sequence_length)
        return torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in self.output_ids], dtype=torch.int64)


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
    """Validated per-request parameters of one batch, as device tensors for the sampling kernel."""
    top_k: list[int]
    top_p: list[float]
    temperature: list[float]
    random_seed: list[int]
    end_id: list[int]
    tensors: dict = field(default_factory=dict)

    @classmethod
    def build(cls, batch_size: int, vocab_size: int, device, *, top_k, top_p, temperature, random_seed,
              end_id) -> "RequestParams":
        params = cls(top_k=[int(k) for k in _per_request("top_k", top_k, batch_size)],
                     top_p=[float(p) for p in _per_request("top_p", top_p, batch_size)],
                     temperature=[float(t) for t in _per_request("temperature", temperature, batch_size)],
                     random_seed=[int(s) for s in _per_request("random_seed", random_seed, batch_size)],
                     end_id=[int(e) for e in _per_request("end_id", end_id, batch_size)])
        try:
            check_sampling_params(params.top_k, params.top_p, params.temperature, vocab_size)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        for b, seed in enumerate(params.random_seed):
            if not -(2**63) <= seed < 2**64:
                raise GenerationError(f"random_seed of request {b} = {seed} does not fit in 64 bits")
        for b, end in enumerate(params.end_id):
            if not 0 <= end < vocab_size:
                raise GenerationError(f"end_id of request {b} = {end} is outside the vocabulary [0, {vocab_size})")
        # FT's random_seed is a uint64: keep its bits in an int64 tensor
        seeds = [s - 2**64 if s >= 2**63 else s for s in params.random_seed]
        params.tensors = {
            "top_k": torch.tensor(params.top_k, dtype=torch.int32, device=device),
            "top_p": torch.tensor(params.top_p, dtype=torch.float32, device=device),
            "temperature": torch.tensor(params.temperature, dtype=torch.float32, device=device),
            "seeds": torch.tensor(seeds, dtype=torch.int64, device=device),
            "end_id": torch.tensor(params.end_id, dtype=torch.int64, device=device),
        }
        return params


def validate_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                     max_pos_seq_len: int) -> list[list[int]]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts:
        raise GenerationError("no prompts given (an empty batch)")
    out = []
    for b, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerationError(f"request {b} has an empty prompt; give at least one token (e.g. start_id)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"request {b}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(ids) + max_new_tokens > max_pos_seq_len:
            raise GenerationError(
                f"request {b}: prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} needs "
                f"{len(ids) + max_new_tokens} positions, more than the model's max_pos_seq_len={max_pos_seq_len}")
        out.append(ids)
    return out


class LocalSession:
    """One generate() call on a single-process model: owns the KV cache, positions and per-request RNG steps.

    `first()` runs the context phase and samples the first token of every request; `next(tokens)` feeds each
    request's last token and samples the following one. ftlab.parallel provides the same two methods across ranks.
    """

    def __init__(self, model: GPT, prompts: list[list[int]], max_new_tokens: int, params: RequestParams):
        self.model, self.params = model, params
        self.batch = pack_prompts(prompts, model.device)
        self.cache = model.new_kv_cache(len(prompts), max(self.batch.lengths) + max_new_tokens)
        self.positions = torch.tensor(self.batch.lengths, dtype=torch.int32, device=model.device)  # next slot
        self.steps = torch.zeros(len(prompts), dtype=torch.int32, device=model.device)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.params.tensors
        out = sample(logits, t["top_k"], t["top_p"], t["temperature"], t["seeds"], self.steps, return_logprobs=True)
        self.steps += 1
        return out

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        return self._sample(self.model.prefill(b.token_ids, b.positions, b.cu_seqlens, b.max_seqlen, self.cache))

    def next(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.decode(tokens, self.positions, self.cache)
        self.positions += 1
        return self._sample(logits)


@torch.no_grad()
def stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, top_k=1, top_p=1.0,
           temperature=1.0, random_seed=0, end_id=None, return_log_probs: bool = False) -> Iterator[StepOutput]:
    """Yield one StepOutput per generated position until every request has produced end_id or max_new_tokens.

    `model` is a GPT, or any engine with `config`, `device` and `open_session(prompts, max_new_tokens, params)`
    (ftlab.parallel's pipeline/tensor-parallel engine)."""
    cfg = model.config
    prompts = validate_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_pos_seq_len)
    B = len(prompts)
    params = RequestParams.build(B, cfg.vocab_size, model.device, top_k=top_k, top_p=top_p, temperature=temperature,
                                 random_seed=random_seed, end_id=cfg.end_id if end_id is None else end_id)
    end = params.tensors["end_id"]
    if hasattr(model, "open_session"):
        session = model.open_session(prompts, max_new_tokens, params)
    else:
        session = LocalSession(model, prompts, max_new_tokens, params)
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    tokens, log_probs = session.first()
    for step in range(max_new_tokens):
        tokens = torch.where(finished, end, tokens)
        was_active = ~finished
        finished = finished | (tokens == end)
        out = StepOutput(step=step, token_ids=tokens.tolist(), finished=finished.tolist())
        if return_log_probs:
            out.log_probs = torch.where(was_active, log_probs, 0.0).tolist()
        yield out
        if all(out.finished) or step == max_new_tokens - 1:
            return
        tokens, log_probs = session.next(tokens)


def generate(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, top_k=1, top_p=1.0,
             temperature=1.0, random_seed=0, end_id=None, return_log_probs: bool = False,
             on_step: Callable[[StepOutput], None] | None = None) -> GenerationOutput:
    """Run `stream` to the end. on_step (optional) sees every StepOutput as it is produced."""
    prompts = [list(map(int, p)) for p in prompts]
    outputs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    log_probs: list[list[float]] = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p,
                       temperature=temperature, random_seed=random_seed, end_id=end_id,
                       return_log_probs=return_log_probs):
        if on_step is not None:
            on_step(step)
        for b, token in enumerate(step.token_ids):
            if not done[b]:
                outputs[b].append(token)
                if return_log_probs:
                    log_probs[b].append(step.log_probs[b])
        done = step.finished
    result = GenerationOutput(output_ids=outputs, sequence_length=[len(o) for o in outputs],
                              input_length=[len(p) for p in prompts])
    if return_log_probs:
        result.output_log_probs = log_probs
        result.cum_log_probs = [sum(lp) for lp in log_probs]
    return result
