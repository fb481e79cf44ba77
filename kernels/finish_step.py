"""A decode step's bookkeeping after sampling, in one launch: end-of-sequence, the step's history row, counters.

For every request b of the batch:
    token = end_id[b] if finished[b] else sampled[b]   (a finished request keeps emitting end_id, as in FT)
    log_prob = 0 if finished[b] else sampled_log_probs[b]
    finished[b] |= token == end_id[b]
    history row steps[b]: token, log_prob, finished[b]   (rows at or beyond the history's length are not written)
    next_tokens[b] = token;  sampled_log_probs[b] = log_prob;  steps[b] += 1;  positions[b] += 1 (if given)
Why: run from Python these are ~7 small launches per token (where, where, eq, or, the copy of the token into the
captured step's input, two counter increments), each a few microseconds of a ~0.42 ms bs1 step on the H200. Inside
the captured decode step this is one kernel, and generate() replays the graph once per token and reads the history
rows every few steps.
"""
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _finish_step_kernel(
    sampled_ptr, log_prob_ptr, end_ptr, finished_ptr, next_ptr, steps_ptr, positions_ptr,
    hist_tokens_ptr, hist_log_probs_ptr, hist_finished_ptr,
    B, rows,
    HAS_POSITIONS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    was_done = tl.load(finished_ptr + offs, mask=mask, other=0) != 0
    end = tl.load(end_ptr + offs, mask=mask, other=0)
    token = tl.where(was_done, end, tl.load(sampled_ptr + offs, mask=mask, other=0).to(end.dtype))
    log_prob = tl.where(was_done, 0.0, tl.load(log_prob_ptr + offs, mask=mask, other=0.0))
    done = was_done | (token == end)
    step = tl.load(steps_ptr + offs, mask=mask, other=0)
    in_rows = mask & (step >= 0) & (step < rows)
    row = step.to(tl.int64) * B + offs
    tl.store(hist_tokens_ptr + row, token, mask=in_rows)
    tl.store(hist_log_probs_ptr + row, log_prob, mask=in_rows)
    tl.store(hist_finished_ptr + row, done, mask=in_rows)
    tl.store(finished_ptr + offs, done, mask=mask)
    tl.store(next_ptr + offs, token, mask=mask)
    tl.store(log_prob_ptr + offs, log_prob, mask=mask)
    tl.store(steps_ptr + offs, step + 1, mask=mask)
    if HAS_POSITIONS:
        tl.store(positions_ptr + offs, tl.load(positions_ptr + offs, mask=mask, other=0) + 1, mask=mask)


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != device:
        raise ValueError(f"finish_step: {name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def finish_step(sampled: torch.Tensor, sampled_log_probs: torch.Tensor, end_id: torch.Tensor,
                finished: torch.Tensor, next_tokens: torch.Tensor, steps: torch.Tensor,
                hist_tokens: torch.Tensor, hist_log_probs: torch.Tensor, hist_finished: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> None:
    """In place (see the module docstring). sampled (B,) int64, sampled_log_probs (B,) fp32 (overwritten with the
    masked log-probs), end_id (B,) int64, finished (B,) bool, next_tokens (B,) int64, steps (B,) int32 (the history
    row this step writes; incremented), hist_* (R, B) int64 / fp32 / bool, positions (B,) int32 or None.
    No host synchronisation: safe to capture in a CUDA graph."""
    B, dev = sampled.shape[0], sampled.device
    for name, t, dtype in (("sampled", sampled, torch.int64), ("sampled_log_probs", sampled_log_probs, torch.float32),
                           ("end_id", end_id, torch.int64), ("finished", finished, torch.bool),
                           ("next_tokens", next_tokens, torch.int64), ("steps", steps, torch.int32)):
        _check(t, name, dtype, (B,), dev)
    if positions is not None:
        _check(positions, "positions", torch.int32, (B,), dev)
    rows = hist_tokens.shape[0] if hist_tokens.dim() == 2 else -1
    for name, t, dtype in (("hist_tokens", hist_tokens, torch.int64), ("hist_log_probs", hist_log_probs, torch.float32),
                           ("hist_finished", hist_finished, torch.bool)):
        _check(t, name, dtype, (rows, B), dev)
    if B == 0:
        return
    block_b = min(1024, triton.next_power_of_2(B))
    _finish_step_kernel[(triton.cdiv(B, block_b),)](
        sampled, sampled_log_probs, end_id, finished, next_tokens, steps,
        positions if positions is not None else steps,
        hist_tokens, hist_log_probs, hist_finished, B, rows,
        HAS_POSITIONS=positions is not None, BLOCK_B=block_b, num_warps=1 if block_b <= 128 else 4,
    )


def finish_step_reference(sampled, sampled_log_probs, end_id, finished, steps, rows: int, positions=None):
    """The same in torch, out of place: (token, log_prob, finished, history row index or None per request, steps,
    positions)."""
    token = torch.where(finished, end_id, sampled)
    log_prob = torch.where(finished, torch.zeros_like(sampled_log_probs), sampled_log_probs)
    done = finished | (token == end_id)
    row = [int(s) if 0 <= int(s) < rows else None for s in steps.tolist()]
    return (token, log_prob, done, row, steps + 1, None if positions is None else positions + 1)
