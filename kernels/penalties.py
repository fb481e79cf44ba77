"""Logit penalties of FasterTransformer 5 / HF, per request, in one pass over the logits.

For every request b and vocabulary entry v, with count[b, v] the number of times v occurs in the request's prompt and
generated tokens so far:
  repetition_penalty p (multiplicative; 1 = off):  logit / p where logit > 0, logit * p otherwise, if count > 0
  presence_penalty q (additive; 0 = off):          logit - q                                        if count > 0
  min_length m:                                    logit[end_id[b]] = -inf while step[b] < m
FT treats the two penalties as exclusive (the caller checks); applying both here is still well defined.
The output is fp32 (the sampler reads any float dtype). No host synchronisation: usable inside a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _penalties_kernel(logits_ptr, counts_ptr, out_ptr, repetition_ptr, presence_ptr, min_length_ptr, steps_ptr,
                      end_ids_ptr, V, logits_row_stride, counts_row_stride,
                      HAS_COUNTS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    logit = tl.load(logits_ptr + row.to(tl.int64) * logits_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_COUNTS:
        seen = tl.load(counts_ptr + row.to(tl.int64) * counts_row_stride + cols, mask=mask, other=0) > 0
        rep = tl.load(repetition_ptr + row)
        pres = tl.load(presence_ptr + row)
        penalised = tl.where(logit > 0, logit / rep, logit * rep) - pres
        logit = tl.where(seen, penalised, logit)
    blocked = tl.load(steps_ptr + row) < tl.load(min_length_ptr + row)
    end_id = tl.load(end_ids_ptr + row)
    logit = tl.where(blocked & (cols == end_id), float("-inf"), logit)
    tl.store(out_ptr + row.to(tl.int64) * V + cols, logit, mask=mask)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, repetition_penalty: torch.Tensor,
                    presence_penalty: torch.Tensor, min_length: torch.Tensor, steps: torch.Tensor,
                    end_ids: torch.Tensor) -> torch.Tensor:
    """logits (B, V) any float dtype; counts (B, V) int32 token occurrences or None (no penalties); per request
    (B,): repetition_penalty, presence_penalty float32, min_length, steps int32, end_ids int64. -> (B, V) fp32."""
    _check(logits.dim() == 2 and logits.stride(1) == 1, f"logits must be (B, V) with unit column stride, "
                                                        f"got shape {tuple(logits.shape)}")
    B, V = logits.shape
    for name, t, dtype in (("repetition_penalty", repetition_penalty, torch.float32),
                           ("presence_penalty", presence_penalty, torch.float32),
                           ("min_length", min_length, torch.int32), ("steps", steps, torch.int32),
                           ("end_ids", end_ids, torch.int64)):
        _check(t.shape == (B,) and t.dtype == dtype and t.device == logits.device,
               f"{name} must be a ({B},) {dtype} tensor on {logits.device}, got {tuple(t.shape)} {t.dtype} {t.device}")
    if counts is not None:
        _check(counts.shape == (B, V) and counts.dtype == torch.int32 and counts.stride(1) == 1,
               f"counts must be a ({B}, {V}) int32 tensor, got {tuple(counts.shape)} {counts.dtype}")
    out = torch.empty((B, V), dtype=torch.float32, device=logits.device)
    if B == 0:
        return out
    block_v = 4096 if logits.is_cuda else 1 << 16  # the interpreter prefers few large programs
    block_v = min(block_v, triton.next_power_of_2(V))
    grid = (B, triton.cdiv(V, block_v))
    _penalties_kernel[grid](logits, counts if counts is not None else logits, out, repetition_penalty,
                            presence_penalty, min_length, steps, end_ids, V, logits.stride(0),
                            counts.stride(0) if counts is not None else 0,
                            HAS_COUNTS=counts is not None, BLOCK_V=block_v)
    return out


def apply_penalties_reference(logits, counts, repetition_penalty, presence_penalty, min_length, steps, end_ids):
    out = logits.float().clone()
    if counts is not None:
        seen = counts > 0
        rep = repetition_penalty[:, None]
        penalised = torch.where(out > 0, out / rep, out * rep) - presence_penalty[:, None]
        out = torch.where(seen, penalised, out)
    blocked = steps < min_length
    rows = torch.nonzero(blocked).flatten()
    out[rows, end_ids[rows]] = float("-inf")
    return out
