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

`greedy_finish_step` is the same bookkeeping fused with a greedy sampler (argmax, lowest index among ties, and its
log-softmax), for a captured step whose requests all decode greedily: grid (row, chunk of the vocabulary), each
program reduces its chunk to (largest key, max, sum of exp), and the last program of a row to finish (an
acquire-release counter, as in kernels/decode_attention.py) merges the chunks and does the row's bookkeeping, and
optionally writes the emitted token's embedding, the next step's input. One launch instead of four (the sampler's
two, finish_step and the next step's embedding). Its reference: greedy_finish_step_reference.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._env import ints_from_env
from .sampling import INT64_MIN, _load_scaled, _pack, _unpack


@triton.jit
def _finish_step_kernel(
    sampled_ptr, log_prob_ptr, end_ptr, finished_ptr, next_ptr, steps_ptr, positions_ptr,
    hist_tokens_ptr, hist_log_probs_ptr, hist_finished_ptr,
    B, rows,
    HAS_POSITIONS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < B
    sampled = tl.load(sampled_ptr + offs, mask=mask, other=0)
    _bookkeeping(offs, mask, sampled, tl.load(log_prob_ptr + offs, mask=mask, other=0.0), end_ptr, finished_ptr,
                 next_ptr, log_prob_ptr, steps_ptr, positions_ptr, hist_tokens_ptr, hist_log_probs_ptr,
                 hist_finished_ptr, B, rows, HAS_POSITIONS)


@triton.jit
def _bookkeeping(offs, mask, sampled, sampled_log_prob, end_ptr, finished_ptr, next_ptr, log_prob_ptr, steps_ptr,
                 positions_ptr, hist_tokens_ptr, hist_log_probs_ptr, hist_finished_ptr, B, rows,
                 HAS_POSITIONS: tl.constexpr):
    # requests `offs` (mask: real ones) got `sampled` with `sampled_log_prob`: the module docstring's updates.
    # Returns the tokens they emit and their positions from now on (the steps' when there are no positions).
    was_done = tl.load(finished_ptr + offs, mask=mask, other=0) != 0
    end = tl.load(end_ptr + offs, mask=mask, other=0)
    step = tl.load(steps_ptr + offs, mask=mask, other=0)
    next_position = step + 1
    if HAS_POSITIONS:
        next_position = tl.load(positions_ptr + offs, mask=mask, other=0) + 1
    # every state load above before any store below: where a request's values are held by several threads (one
    # request per program in _greedy_finish_kernel, num_warps 4), a thread that loaded late would otherwise see
    # another thread's update (position + 2 in its columns of the embedding; a GPU race, rare and silent)
    tl.debug_barrier()
    token = tl.where(was_done, end, sampled.to(end.dtype))
    log_prob = tl.where(was_done, 0.0, sampled_log_prob)
    done = was_done | (token == end)
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
        tl.store(positions_ptr + offs, next_position, mask=mask)
    return token, next_position


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, device) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != device:
        raise ValueError(f"finish_step: {name} must be a contiguous {dtype} tensor of shape {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _check_state(B: int, dev, end_id, finished, next_tokens, steps, hist_tokens, hist_log_probs, hist_finished,
                 positions, **more) -> int:
    """Checks the per-request state both launchers update, and more name=(tensor, dtype) of shape (B,): the
    history's number of rows."""
    for name, t, dtype in (("end_id", end_id, torch.int64), ("finished", finished, torch.bool),
                           ("next_tokens", next_tokens, torch.int64), ("steps", steps, torch.int32),
                           *((name, t, dtype) for name, (t, dtype) in more.items())):
        _check(t, name, dtype, (B,), dev)
    if positions is not None:
        _check(positions, "positions", torch.int32, (B,), dev)
    rows = hist_tokens.shape[0] if hist_tokens.dim() == 2 else -1
    for name, t, dtype in (("hist_tokens", hist_tokens, torch.int64), ("hist_log_probs", hist_log_probs, torch.float32),
                           ("hist_finished", hist_finished, torch.bool)):
        _check(t, name, dtype, (rows, B), dev)
    return rows


def finish_step(sampled: torch.Tensor, sampled_log_probs: torch.Tensor, end_id: torch.Tensor,
                finished: torch.Tensor, next_tokens: torch.Tensor, steps: torch.Tensor,
                hist_tokens: torch.Tensor, hist_log_probs: torch.Tensor, hist_finished: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> None:
    """In place (see the module docstring). sampled (B,) int64, sampled_log_probs (B,) fp32 (overwritten with the
    masked log-probs), end_id (B,) int64, finished (B,) bool, next_tokens (B,) int64, steps (B,) int32 (the history
    row this step writes; incremented), hist_* (R, B) int64 / fp32 / bool, positions (B,) int32 or None.
    No host synchronisation: safe to capture in a CUDA graph."""
    B, dev = sampled.shape[0], sampled.device
    rows = _check_state(B, dev, end_id, finished, next_tokens, steps, hist_tokens, hist_log_probs, hist_finished,
                        positions, sampled=(sampled, torch.int64), sampled_log_probs=(sampled_log_probs, torch.float32))
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


@triton.jit
def _greedy_finish_kernel(
    logits_ptr, stride_row, keys_ptr, maxes_ptr, sums_ptr, counter_ptr,
    end_ptr, finished_ptr, next_ptr, log_prob_ptr, steps_ptr, positions_ptr,
    hist_tokens_ptr, hist_log_probs_ptr, hist_finished_ptr,
    wte_ptr, wpe_ptr, x_ptr,  # with EMBED: x[row] = wte[token] + wpe[position], the next step's input
    B, rows, V, NCHUNK, H, P,  # P: rows of wpe
    HAS_POSITIONS: tl.constexpr, CHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, EMBED: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    s, valid = _load_scaled(logits_ptr + row.to(tl.int64) * stride_row, idx, V, tl.full([1], 1.0, tl.float32))
    ws = row * NCHUNK + chunk + tl.arange(0, 1)  # this chunk's slot in the workspaces
    m_c = tl.max(s, 1)  # (1,)
    shift = tl.where(m_c > float("-inf"), m_c, 0.0)
    tl.store(keys_ptr + ws, tl.max(_pack(s, idx[None, :], valid), 1))  # largest value, lowest index among equals
    tl.store(maxes_ptr + ws, m_c)
    tl.store(sums_ptr + ws, tl.sum(tl.exp(s - shift[:, None]), 1))
    # every thread's stores are issued before the (single-thread) release below, and, with one chunk, before the
    # other threads of this program read them back
    tl.debug_barrier()
    if NCHUNK > 1:  # the row's last chunk to finish merges them all (its acquire sees the others' stores)
        if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu") != NCHUNK - 1:
            return
        tl.store(counter_ptr + row, 0)  # every chunk has counted: leave the counter zero for the next launch
    ch = tl.arange(0, NCHUNK_P2)
    ch_ok = ch < NCHUNK
    part = row * NCHUNK + ch
    keys = tl.load(keys_ptr + part, mask=ch_ok, other=INT64_MIN, cache_modifier=".cg")
    maxes = tl.load(maxes_ptr + part, mask=ch_ok, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(sums_ptr + part, mask=ch_ok, other=0.0, cache_modifier=".cg")
    s_tok, token = _unpack(tl.max(keys, 0))
    m = tl.max(maxes, 0)
    shift = tl.where(m > float("-inf"), m, 0.0)
    log_prob = s_tok - m - tl.log(tl.sum(sums * tl.exp(maxes - shift), 0))
    one = tl.arange(0, 1)
    offs = row + one
    token, position = _bookkeeping(offs, offs < B, token + one, log_prob + one.to(tl.float32), end_ptr,
                                   finished_ptr, next_ptr, log_prob_ptr, steps_ptr, positions_ptr, hist_tokens_ptr,
                                   hist_log_probs_ptr, hist_finished_ptr, B, rows, HAS_POSITIONS)
    if EMBED:  # kernels/embedding.py's sum for the token just emitted, at the position it will be fed at
        word = wte_ptr + (token.to(tl.int64) * H)[:, None]
        pos = wpe_ptr + (tl.minimum(position.to(tl.int64), P - 1) * H)[:, None]  # as kernels/embedding.py
        x_row = x_ptr + (offs.to(tl.int64) * H)[:, None]
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)[None, :]
            ok = cols < H
            summed = (tl.load(word + cols, mask=ok, other=0.0).to(tl.float32)
                      + tl.load(pos + cols, mask=ok, other=0.0).to(tl.float32))
            tl.store(x_row + cols, summed.to(x_ptr.dtype.element_ty), mask=ok)


def greedy_chunk(V: int, device_type: str) -> tuple[int, int]:
    """(logits per program, warps): chunks of 2048 on a GPU (~25 programs per row of GPT-2's vocabulary, merged by
    the last; FTLAB_GREEDY_CHUNK="chunk,num_warps" instead, read per call); under the interpreter, which pays per
    operation, one chunk per row (up to 65536 logits). H200, GPT-345M, what the kernel adds to the captured decode
    step (`ftlab bench --timeline-decode`, one process per setting, data/bench/greedy_chunk_timeline_ab.csv), us at
    bs1 / bs64: 2048 x 4 warps 4.33 / 8.56, 2048 x 2 4.80 / 8.40, 4096 x 4 4.82 / 8.62, 4096 x 8 4.58 / 8.98,
    8192 x 8 5.26 / 9.35."""
    if device_type != "cuda":
        return min(max(16, triton.next_power_of_2(V)), 65536), 1
    return ints_from_env("FTLAB_GREEDY_CHUNK", "chunk,num_warps") or (2048, 4)


def greedy_finish_step(logits: torch.Tensor, end_id: torch.Tensor, finished: torch.Tensor,
                       next_tokens: torch.Tensor, log_probs: torch.Tensor, steps: torch.Tensor,
                       hist_tokens: torch.Tensor, hist_log_probs: torch.Tensor, hist_finished: torch.Tensor,
                       positions: Optional[torch.Tensor] = None, counter: Optional[torch.Tensor] = None,
                       chunk: Optional[int] = None, embed: Optional[tuple] = None) -> None:
    """Greedy sampling of every row of logits (B, V), then finish_step's bookkeeping, in one launch: the same as
    sample(logits, top_k=1, ..., return_logprobs=True) into (sampled, log_probs) followed by finish_step(sampled,
    log_probs, ...). log_probs (B,) fp32 receives the masked log-probs. counter: int32 (B,) that is zero before the
    call; the kernel leaves it zero (a caller keeps one, e.g. a captured step; default: a zeroed one per call).
    No host synchronisation: safe to capture in a CUDA graph. chunk: logits per program (a power of two; default
    greedy_chunk's), for tests of the merge under the interpreter. embed=(wte (V', H), wpe (P, H), x (B, H)), with
    positions: also x[b] = wte[token] + wpe[positions[b]] for the token each request emits and its position after
    the update (kernels/embedding.py's sum, fp32 then x's dtype, a position past wpe reading its last row): the next
    decode step's input, so that step needs no embedding launch of its own."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"greedy_finish_step: logits must be 2-D (B, V) with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"greedy_finish_step: logits dtype must be float16/bfloat16/float32, got {logits.dtype}")
    B, V = logits.shape
    dev = logits.device
    rows = _check_state(B, dev, end_id, finished, next_tokens, steps, hist_tokens, hist_log_probs, hist_finished,
                        positions, log_probs=(log_probs, torch.float32))
    if counter is None:
        counter = torch.zeros(B, dtype=torch.int32, device=dev)
    _check(counter, "counter", torch.int32, (B,), dev)
    if B == 0:
        return
    if V < 1:
        raise ValueError("greedy_finish_step: logits have no columns (V = 0)")
    wte, wpe, x = embed if embed is not None else (logits, logits, logits)
    if embed is not None:
        H = x.shape[-1]
        if positions is None:
            raise ValueError("greedy_finish_step: embed needs positions (the next token's position)")
        for name, t in (("wte", wte), ("wpe", wpe), ("x", x)):
            if t.dim() != 2 or t.shape[1] != H or not t.is_contiguous() or t.device != dev:
                raise ValueError(f"greedy_finish_step: embed's {name} must be a contiguous (rows, H={H}) tensor on "
                                 f"{dev}, got {tuple(t.shape)} on {t.device}")
        if x.shape[0] != B:
            raise ValueError(f"greedy_finish_step: embed's x must have B={B} rows, got {x.shape[0]}")
    default_chunk, warps = greedy_chunk(V, dev.type)
    chunk = chunk or default_chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"greedy_finish_step: chunk must be a power of two >= 16, got {chunk}")
    nchunk = triton.cdiv(V, chunk)
    keys = torch.empty(B, nchunk, dtype=torch.int64, device=dev)
    maxes = torch.empty(B, nchunk, dtype=torch.float32, device=dev)
    sums = torch.empty_like(maxes)
    _greedy_finish_kernel[(B, nchunk)](
        logits, logits.stride(0), keys, maxes, sums, counter,
        end_id, finished, next_tokens, log_probs, steps, positions if positions is not None else steps,
        hist_tokens, hist_log_probs, hist_finished, wte, wpe, x, B, rows, V, nchunk, x.shape[-1], wpe.shape[0],
        HAS_POSITIONS=positions is not None, CHUNK=chunk, NCHUNK_P2=max(2, triton.next_power_of_2(nchunk)),
        EMBED=embed is not None, BLOCK_H=min(1024, triton.next_power_of_2(x.shape[-1])) if embed is not None else 16,
        num_warps=warps,
    )


def greedy_finish_step_reference(logits, end_id, finished, steps, rows: int, positions=None):
    """greedy_finish_step in torch, out of place: the argmax of each row (the first of equal maxima) and its
    log-softmax in fp32, then finish_step_reference's (token, log_prob, finished, history row, steps, positions)."""
    scaled = logits.float()
    token = scaled.argmax(dim=1)
    log_prob = torch.log_softmax(scaled, dim=1).gather(1, token[:, None])[:, 0]
    return finish_step_reference(token, log_prob, end_id, finished, steps, rows, positions)
