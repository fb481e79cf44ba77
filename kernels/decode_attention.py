"""Decode attention: one new token per sequence attends over its KV cache, with the KV append fused in.

Flash-decoding in one launch whose grid depends only on shapes (B, nh, S_max), so the step can be captured in a
CUDA graph while positions change between replays. Grid (num_partitions, nh, B): program j covers the j-th share
of a sequence's keys in tiles of BLOCK_S keys and writes a partial (max, sum, unnormalised acc) to a workspace.
Programs whose share starts after positions[b] exit at once. Cached keys are read strictly below positions[b]; the new
key/value are taken from qkv in registers by the one program whose partition holds positions[b], and that program
alone writes them to the cache slot, so no program ever reads the slot being written in the same launch.
Partitions share out the keys a sequence has, not the cache's slots: with P partitions of up to PART slots (the
grid), a sequence at position pos gets partitions of ceil(ceil((pos + 1) / P) / BLOCK_S) whole tiles, so no program
is left with a tail of a few keys while others loop over a full PART (H200, GPT-345M, decode step at context 512
with 768 slots, alternating in one process, data/bench/decode_balanced_ab.csv: bs64 1.751 / 1.805 -> 1.707 / 1.733
ms, where the fixed split gave partitions of 256, 256 and 17 keys; bs1, bs8 and bs32 unchanged within 1 %).
FTLAB_DECODE_BALANCED=0 goes back to the fixed split (read per call).
Each program then bumps a per-(sequence, head) counter (atomic, acquire-release); the program that finishes its
head's last valid partition rescales and sums all of them into out, and resets the counter to zero. This replaces
a second reduction launch, which cost ~3 us per layer at batch 1 on the H200 (8.6 % of a GPT-345M decode step).
With one partition per (sequence, head) the program writes its output directly (SINGLE_PART: no partials, counter
or combine): always under the interpreter; on a GPU where pick_decode_blocks gives one partition (decode batches
of ~4.3-12 (sequence, head) pairs per SM: one wave of programs) or FTLAB_DECODE_BLOCKS is wide enough for one.
FTLAB_DECODE_SINGLE_PART=0 sends one partition through the partial and the combine (read per call). At small
batches one partition per pair was slower (see below: too few programs).
With PDL (kernels/_pdl.py) the first tile of cached keys/values can be loaded while the QKV GEMV still runs.
Scores are kept in log2 units (scale folded with log2(e)) so exp2 can be used; everything accumulates in fp32.

What the counter and combine cost, and what did not pay (H200, GPT-345M fp16, context 512, decode step in ms;
data/bench/decode_attention_experiments.csv; the variants were scratch edits, not kept): with no counter and no
combine at all (wrong output, timing only) the bs1 step took 0.341-0.349 against 0.380-0.388, the counter's release
and atomic ~0.02 of it and the combine's reload ~0.02. Ways tried to take that off the critical path, all slower or
equal: one partition per (sequence, head) with big tiles (bs1 0.454-1.45); one program per (sequence, head) that
holds the whole history in registers, loaded before the PDL wait (512 + 32 keys, 8 warps: bs1 0.385, bs4
0.713-0.722 vs 0.729-0.730; 16 or 32 warps 0.42-0.50); partials polled by a designated combiner for a
never-computed NaN sentinel instead of a release + counter (0.393-0.399 vs 0.373-0.385); the out-projection GEMV
combining the partials in its prologue (0.424-0.557: every program reads every partial). Session 14
(data/bench/attn_out_step_ab.csv): left out entirely (wrong output, timing only) the out-projection GEMV is 0.040
ms of the bs1 step (0.365 -> 0.325) and attention another 0.082 (-> 0.243); folding the out-projection in here (every
program of a head waited on the counter until all partials were stored, combined them itself, multiplied its 64
rows of W_o by the head's output and added them into an int64 fixed-point accumulator that FC1 read with the bias and
residual) measured 0.394-0.396 ms at bs1 and 0.510-0.512 at bs2 against 0.364-0.367 and 0.443-0.444: the spin on the
counter costs what the kernel boundary it replaces did (not kept).
Session 19 (2026-12-02, the kernel alone at bs64, data/bench/decode_attention_pipelining.csv): the tile loop left
to the compiler's pipeliner (tl.range with 2-3 stages instead of the one-tile lookahead by hand) took 43.3-44.4 us
against 38.8 for the pick, and no other tile beat the pick by more than 1 us; Nsight Compute puts the pick at 3.46
TB/s with 137 registers, 12 one-warp blocks per SM, most cycles waiting on loads (data/bench/ncu_decode_bs64.txt).
Session 20: the cached keys and values are loaded with L2 policy evict_first (read once per step, they need not
stay; FTLAB_DECODE_KV_EVICT="" restores the default). Decode step, 16 replays back to back, alternating in one
process (data/bench/eviction_policy_ab.csv): bs64 1.721-1.735 -> 1.665-1.681 ms, bs32 1.118-1.122 -> 1.090-1.099,
bs16 0.681-0.683 -> 0.671-0.676, bs1 0.359-0.363 -> 0.354-0.356, bs8 unchanged; .cg or .cv instead, or evict_last,
gained nothing.
Session 21 (scratch edit, not kept): two tiles loaded ahead instead of one made every step slower, alternating in
one process (data/bench/decode_lookahead_ab.csv, ms): bs1 0.354-0.355 -> 0.393-0.394, bs8 0.556 -> 0.626-0.628,
bs32 1.077-1.085 -> 1.298-1.303, bs64 1.648-1.659 -> 2.027-2.046.
Session 23 (scratch edit, not kept): asking L2 for the next 1-6 tiles (or the whole partition) with bulk prefetches
(`cp.async.bulk.prefetch.L2`, no registers held) made it slower at every distance (data/bench/
decode_kv_l2_prefetch_ab.csv): the kernel alone at bs64 37.2-38.7 us -> 44.6-50.1, the bs64 step 1.61-1.64 ->
1.76-1.93 ms, bs32 1.07-1.08 -> 1.17-1.23, bs8 0.560 -> 0.603, bs1 unchanged. More requests in flight do not raise
the ~3.5 TB/s it reaches.
Session 24 (scratch probe, data/bench/decode_read_ceiling.csv, bs64 at positions 512-543 of 768 slots): a kernel that
only reads the same keys and values in this grid takes 35.0-35.7 us at its best tiles (3.88-3.96 TB/s), this kernel
37.2-38.0 us; tiles loaded through TMA descriptors in a loop pipelined by the compiler read no faster (36.1-42.8 us)
and made this kernel slower (39.1-54.6 us).
Session 33 (scratch probes, the same shape and timing; rows in data/bench/decode_read_ceiling.csv): a plain read of
138 MB laid flat, by programs of 4-16 warps summing 32-64 KB each, takes 33.4-35.3 us (4.10-4.33 TB/s; 512 MB:
4.40-4.60 TB/s), so the attention-shaped read above leaves ~1.6 us on the table and this kernel (36.7-37.1 us that
day) ~3.5. Two layouts that would read whole token rows did not get there: this kernel over a token-major cache
(B, S_max, nh, d) passed as a strided view, 38.0 us; a scratch kernel holding all 16 heads of a sequence per program
over that layout (tiles of 4-16 whole token rows, 4-16 partitions, 2-16 warps; outputs checked in fp16 / bf16),
47.3 us at best and up to 194 (the per-head reductions over 3-D tiles cost more than the longer reads save).
"""
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ._env import eviction_policy_from_env, ints_from_env, is_pow2
from ._pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_for
from ._prefetch import l2_prefetch, prefetch_plan
from .attention import LOG2E

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _decode_partition_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, positions_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,  # workspace (B, nh, NP) and (B, nh, NP, d), fp32
    counter_ptr, out_ptr,  # counter (B, nh) int32, zero at launch; out (B, nh, d)
    pf_ptr, pf_bytes, pf_share,  # L2 prefetch of a later kernel's weight (kernels/_prefetch.py)
    qk_scale,  # softmax scale * log2(e)
    stride_qkv_b, stride_qkv_part, stride_qkv_h,
    stride_kc_b, stride_kc_h, stride_kc_s,
    stride_vc_b, stride_vc_h, stride_vc_s,
    stride_ws_b, stride_ws_h,  # of part_max/part_sum; part_acc adds a factor head_dim
    stride_out_b, stride_out_h,
    head_dim, s_max, num_heads, num_parts,
    BLOCK_S: tl.constexpr, TILES_PER_PART: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_PDL: tl.constexpr, HISTORY_READY: tl.constexpr, PREFETCH: tl.constexpr, SINGLE_PART: tl.constexpr,
    BALANCED: tl.constexpr, KV_EVICT: tl.constexpr,
):
    part = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    if USE_PDL:
        gdc_launch_dependents()
    if PREFETCH:  # every program, before the early exit below: HBM is otherwise idle while attention runs
        l2_prefetch(pf_ptr, pf_bytes, pf_share, PREFETCH, 128)
    if USE_PDL:
        if not HISTORY_READY:
            gdc_wait()
    pos = tl.load(positions_ptr + seq)
    if BALANCED:  # the pos + 1 keys in equal shares of whole tiles (never longer than BLOCK_S * TILES_PER_PART)
        part_len = tl.cdiv(tl.cdiv(pos + 1, num_parts), BLOCK_S) * BLOCK_S
    else:
        part_len = BLOCK_S * TILES_PER_PART
    part_lo = part * part_len
    if part_lo > pos:  # beyond this sequence's keys: the reduction never reads this partition
        return
    part_hi = part_lo + part_len

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs_s = tl.arange(0, BLOCK_S)
    kc = k_cache_ptr + seq.to(tl.int64) * stride_kc_b + head * stride_kc_h
    vc = v_cache_ptr + seq.to(tl.int64) * stride_vc_b + head * stride_vc_h
    # cached keys [part_lo, min(part_hi, pos)): every tile visited holds >= 1 valid key, so m_i turns finite at once.
    # The loop is software-pipelined (the next tile's keys and values are loaded before the current tile is used);
    # the first tile is loaded here, before the new token's q/k/v, and with HISTORY_READY before the PDL wait.
    kv_hi = tl.minimum(tl.minimum(part_hi, pos), s_max)
    k_next, v_next = _load_kv_tile(kc, vc, part_lo + offs_s, kv_hi, offs_d, d_mask, stride_kc_s, stride_vc_s,
                                    KV_EVICT)
    if USE_PDL:
        if HISTORY_READY:
            gdc_wait()  # qkv comes from the previous kernel; the cache slot written below may be read by others
    qkv_base = qkv_ptr + seq.to(tl.int64) * stride_qkv_b + head * stride_qkv_h + offs_d
    q = tl.load(qkv_base, mask=d_mask, other=0.0).to(tl.float32) * qk_scale  # (BLOCK_D,)
    k_new = tl.load(qkv_base + stride_qkv_part, mask=d_mask, other=0.0)
    v_new = tl.load(qkv_base + 2 * stride_qkv_part, mask=d_mask, other=0.0)

    # a position past the cache is dropped rather than written out of bounds; the mask is built per lane because the
    # interpreter rejects a vector & scalar mask
    owns_new = (pos < part_hi) & (pos < s_max)
    new_mask = d_mask & (offs_d * 0 + pos < tl.minimum(part_hi, s_max))
    tl.store(kc + pos * stride_kc_s + offs_d, k_new, mask=new_mask)
    tl.store(vc + pos * stride_vc_s + offs_d, v_new, mask=new_mask)

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for kv_lo in range(part_lo, kv_hi, BLOCK_S):
        k = k_next
        v = v_next
        k_next, v_next = _load_kv_tile(kc, vc, kv_lo + BLOCK_S + offs_s, kv_hi, offs_d, d_mask, stride_kc_s,
                                       stride_vc_s, KV_EVICT)
        kv_mask = kv_lo + offs_s < kv_hi
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
        s = tl.where(kv_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    # the new key, from registers; -inf (weight 0) in partitions that do not own it. Either this partition owns it
    # or it had cached keys, so m_new is finite here.
    s_new = tl.sum(k_new.to(tl.float32) * q, axis=0)
    s_new = tl.where(owns_new, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha + p_new * v_new.to(tl.float32)

    if SINGLE_PART:  # the program holds the whole row: no partials, no counter, no combine
        out = acc / l_i
        tl.store(out_ptr + seq.to(tl.int64) * stride_out_b + head * stride_out_h + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)
        return
    ws_head = seq.to(tl.int64) * stride_ws_b + head * stride_ws_h
    ws = ws_head + part
    tl.store(part_max_ptr + ws, m_new)
    tl.store(part_sum_ptr + ws, l_i)
    tl.store(part_acc_ptr + ws * head_dim + offs_d, acc, mask=d_mask)

    # the partitions that did not exit early; the one to finish last combines them (its acquire sees their stores)
    n_valid = tl.minimum(pos // part_len + 1, num_parts)
    counter = counter_ptr + seq * num_heads + head
    tl.debug_barrier()  # every thread's partial stores are issued before the (single-thread) release below
    finished_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if finished_before == n_valid - 1:
        _combine_partitions(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, ws_head,
                            seq.to(tl.int64) * stride_out_b + head * stride_out_h, head_dim, n_valid,
                            BLOCK_P, BLOCK_D)
        tl.store(counter, 0)  # every partition has counted: leave the counter zero for the next launch


@triton.jit
def _load_kv_tile(kc, vc, offs_kv, kv_hi, offs_d, d_mask, stride_kc_s, stride_vc_s, KV_EVICT: tl.constexpr):
    # keys and values of cache slots offs_kv (BLOCK_S,), nothing at or beyond kv_hi; KV_EVICT: an L2 eviction
    # policy for them ("evict_first": read once per step, they need not stay)
    tile_mask = (offs_kv < kv_hi)[:, None] & d_mask[None, :]
    k = tl.load(kc + offs_kv[:, None] * stride_kc_s + offs_d[None, :], mask=tile_mask, other=0.0,
                eviction_policy=KV_EVICT)
    v = tl.load(vc + offs_kv[:, None] * stride_vc_s + offs_d[None, :], mask=tile_mask, other=0.0,
                eviction_policy=KV_EVICT)
    return k, v


@triton.jit
def _combine_partitions(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, ws, out_offset, head_dim, n_valid,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # partials of other programs: loaded with .cg (L2, never a stale L1 line). One pass, merged online like the
    # tiles of the main loop: a chunk's maxima, sums and accumulators are requested together (at GPT sizes one
    # chunk holds every partition), so the combine costs one memory round trip after the counter.
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    run_max = float("-inf")
    run_sum = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p_lo in range(0, n_valid, BLOCK_P):
        p_idx = p_lo + offs_p
        p_mask = p_idx < n_valid
        part_max = tl.load(part_max_ptr + ws + p_idx, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
        part_sum = tl.load(part_sum_ptr + ws + p_idx, mask=p_mask, other=0.0, cache_modifier=".cg")
        acc_ptrs = part_acc_ptr + (ws + p_idx)[:, None] * head_dim + offs_d[None, :]
        part_acc = tl.load(acc_ptrs, mask=p_mask[:, None] & d_mask[None, :], other=0.0,
                           cache_modifier=".cg")  # (BLOCK_P, BLOCK_D)
        new_max = tl.maximum(run_max, tl.max(part_max, axis=0))  # finite: every valid partition saw a key
        rescale = tl.exp2(run_max - new_max)
        weight = tl.exp2(part_max - new_max)  # 0 for masked slots
        run_sum = run_sum * rescale + tl.sum(weight * part_sum, axis=0)
        acc = acc * rescale + tl.sum(weight[:, None] * part_acc, axis=0)
        run_max = new_max
    out = acc / run_sum
    tl.store(out_ptr + out_offset + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# (sequence, head) pairs per SM between which pick_decode_blocks gives each pair one program (H200 decode step)
SINGLE_PART_PROGRAMS_PER_SM = (4.3, 12)


@dataclass(frozen=True)
class DecodeBlocks:
    block_s: int  # keys per tile (one iteration of a program's loop)
    tiles_per_part: int  # tiles per partition: a partition covers block_s * tiles_per_part cache slots
    num_warps: int

    @property
    def part_size(self) -> int:
        return self.block_s * self.tiles_per_part


@lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_decode_blocks(batch: int, num_heads: int, s_max: int, head_dim: int, num_sms: int = 132) -> DecodeBlocks:
    """Tile and partition sizes from the shapes only (the grid must not depend on positions), from the H200 sweep
    (`python -m ftlab.kernels.decode_attention --sweep`, fp16, caches of 768 slots, data/bench/
    decode_attention_sweep.csv; 2026-11-30, the KV loop pipelined).

    2 warps and a (BLOCK_S, BLOCK_D) tile of ~4K elements (64 keys for d <= 64, 32 for d = 128) won at every
    batch. Tiles shrink (down to 16 keys) only while there would be fewer programs than SMs. Since the loop loads
    the next tile while it uses this one, a partition pays to have two tiles whenever that still leaves two
    programs per SM, and four or eight while 16 per SM remain (large batches: fewer partials to combine).
    Chosen vs best measured (us): B=1 nh=16 d=64 6.7/6.7; B=8 11.3/11.3; B=64 42.7/42.7; B=1 nh=32 d=128
    9.4/9.4 (the previous heuristic: 7.1, 12.8, 45.7, 10.7).

    Then the decode step itself (not the kernel alone) preferred ONE warp per program at d <= 64, with tiles of
    ~2K elements (32 keys at d = 64): at one warp the softmax and the combine reduce by shuffles alone. H200,
    GPT-345M, context 512, with kernels/gemv_rows.py, decode step (data/bench/decode_attention_step.csv): bs1
    0.391-0.395 -> 0.382 ms, bs4 0.760-0.766 -> 0.727 (one tile per partition up to 64 (sequence, head) pairs; 2
    tiles 2-4 % slower, 16 or 64 keys 5-14 %), bs8 1.000 -> 0.984 (2 tiles), bs32 1.414 -> 1.319 (8 tiles; 4:
    1.351-1.382), bs64 1.847-1.942 -> 1.846-1.873 (8 tiles); 64-key tiles at one warp 13-42 % slower. Partitions
    grow to 8 tiles while 8 programs per SM remain. d = 128 keeps the kernel sweep's rule (not measured in a step).

    Between SINGLE_PART_PROGRAMS_PER_SM (sequence, head) pairs per SM (d <= 64), one one-warp program per pair
    reads its whole history and writes its output itself: one wave of programs, no partials, counter or combine
    (SINGLE_PART). H200, GPT-345M, decode step at context 512 (544 slots), alternating in one process, three
    rounds (`ftlab bench --ab-decode`, data/bench/decode_single_part_ab.csv, 2026-12-04), ms against the
    partitions above: bs36 1.151 -> 1.123, bs38 1.176 -> 1.137, bs40 1.202 -> 1.151, bs48 1.331 -> 1.238, bs56
    1.414 -> 1.331, bs64 1.496-1.499 -> 1.433-1.438, bs96 2.123 -> 2.034; slower at bs32 (0.960 -> 1.127, 3.9
    pairs per SM) and bs128 (2.490 -> 2.537: two waves). 64-key tiles (bs64 1.440), 16-key tiles (1.724) or 2 warps
    (1.528) were slower. End to end, `ftlab bench` in alternating processes, two rounds (decode_single_part_e2e_ab.
    csv): bs48 512 -> 32 69.53 / 69.66 -> 66.62 / 67.75 ms, bs64 83.94 / 83.79 -> 82.46 / 82.67. Two tiles loaded
    ahead instead of one (scratch edit, not kept) were slower on this path too: bs48 1.247 -> 1.366, bs64 1.446 ->
    1.476, bs96 2.043 -> 2.372 (and bs1 0.333 -> 0.375, bs32 0.964 -> 1.162; decode_lookahead_single_part_ab.csv).
    Nor (scratch edit) did each program ask L2 for its next 2-32 tiles (one bulk prefetch per cache) before its PDL
    wait, while the QKV GEMM runs: bs64 1.435 -> 1.483-1.681 ms, bs32 0.960 -> 0.994-1.042, bs1 0.333 ->
    0.334-0.339, bs8 0.536 -> 0.531-0.532 (decode_history_prefetch_ab.csv).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    heads = batch * num_heads
    one_warp = block_d <= 64
    block_s = max(16, min(64, (2048 if one_warp else 4096) // block_d))
    if one_warp and SINGLE_PART_PROGRAMS_PER_SM[0] * num_sms <= heads <= SINGLE_PART_PROGRAMS_PER_SM[1] * num_sms:
        return DecodeBlocks(block_s, triton.cdiv(s_max, block_s), 1)  # one partition per (sequence, head)

    def programs(tiles: int) -> int:
        return heads * triton.cdiv(s_max, block_s * tiles)

    while block_s > 16 and programs(1) < num_sms:
        block_s //= 2
    if one_warp and heads <= 64:
        return DecodeBlocks(block_s, 1, 1)
    tiles = 2 if programs(2) >= 2 * num_sms else 1
    while 2 <= tiles < 8 and programs(tiles * 2) >= (8 if one_warp else 16) * num_sms:
        tiles *= 2
    return DecodeBlocks(block_s, tiles, 1 if one_warp else 2)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: Optional[float] = None, blocks: Optional["DecodeBlocks"] = None, *,
                     counter: Optional[torch.Tensor] = None, history_ready: bool = False,
                     prefetch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Append each sequence's new k/v at cache[b, :, positions[b]] and attend over slots 0..positions[b] inclusive.

    qkv (B, 3, nh, d) for the new token; k_cache/v_cache (B, nh, S_max, d), last dim contiguous, written in place;
    positions int32 (B,) on qkv's device with 0 <= positions[b] < S_max (not checked: that would need a host sync).
    Returns out (B, nh, d) in qkv's dtype. No host synchronisation; safe to capture in a CUDA graph.
    blocks: tile/partition sizes (default: pick_decode_blocks; the micro-benchmark's sweep passes its own).
    counter: int32 (B, nh) workspace that is zero before the call; the kernel leaves it zero again, so a caller can
    keep one for every call (it saves a memset launch per call, which would also end the PDL overlap). Calls that
    share a counter must not run concurrently (on other streams). Default: a zeroed one per call.
    history_ready: the caller promises that `positions` and the cache slots below them were written by work that
    had finished before the previous kernel in the stream started (in a decode step: before the step's embedding),
    so with PDL they are read before waiting for that kernel.
    prefetch: a tensor a later kernel reads (a weight): L2 fetches it while attention runs (a hint, GPU only).
    """
    _check(qkv.dim() == 4 and qkv.shape[1] == 3, f"qkv must be (B, 3, nh, d), got {tuple(qkv.shape)}")
    _check(qkv.dtype in _SUPPORTED_DTYPES, f"qkv dtype must be float32/float16/bfloat16, got {qkv.dtype}")
    _check(qkv.stride(-1) == 1, f"qkv must be contiguous in its last dim, strides {qkv.stride()}")
    batch, _, num_heads, head_dim = qkv.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache.dim() == 4 and cache.shape[0] == batch and cache.shape[1] == num_heads
               and cache.shape[3] == head_dim,
               f"{name} must be (B={batch}, nh={num_heads}, S_max, d={head_dim}), got {tuple(cache.shape)}")
        _check(cache.dtype == qkv.dtype, f"{name} dtype {cache.dtype} != qkv dtype {qkv.dtype}")
        _check(cache.device == qkv.device, f"{name} is on {cache.device}, qkv on {qkv.device}")
        _check(cache.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {cache.stride()}")
    _check(k_cache.shape[2] == v_cache.shape[2],
           f"k_cache S_max={k_cache.shape[2]} != v_cache S_max={v_cache.shape[2]}")
    _check(positions.dim() == 1 and positions.shape[0] == batch,
           f"positions must be (B={batch},), got {tuple(positions.shape)}")
    _check(positions.dtype == torch.int32, f"positions must be int32, got {positions.dtype}")
    _check(positions.device == qkv.device, f"positions is on {positions.device}, qkv on {qkv.device}")
    if counter is not None:
        _check(counter.shape == (batch, num_heads) and counter.dtype == torch.int32 and counter.is_contiguous(),
               f"counter must be a contiguous int32 (B={batch}, nh={num_heads}) tensor, got "
               f"{counter.dtype} {tuple(counter.shape)}")
        _check(counter.device == qkv.device, f"counter is on {counter.device}, qkv on {qkv.device}")
    s_max = k_cache.shape[2]
    _check(s_max >= 1, "k_cache has no slots (S_max = 0)")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    out = torch.empty((batch, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out
    num_sms = _num_sms(qkv.device.index or 0) if qkv.is_cuda else 132
    if blocks is None:
        blocks = _blocks_from_env()
    if blocks is None:
        blocks = pick_decode_blocks(batch, num_heads, s_max, head_dim, num_sms)
        if not qkv.is_cuda:
            # Triton's interpreter pays Python overhead per program and per loop step, not per element: one partition
            blocks = DecodeBlocks(min(128, triton.next_power_of_2(s_max)), triton.cdiv(s_max, 128), blocks.num_warps)
    num_parts = triton.cdiv(s_max, blocks.part_size)
    part_max = torch.empty((batch, num_heads, num_parts), dtype=torch.float32, device=qkv.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((batch, num_heads, num_parts, head_dim), dtype=torch.float32, device=qkv.device)
    block_d = max(16, triton.next_power_of_2(head_dim))

    if counter is None:
        counter = torch.zeros((batch, num_heads), dtype=torch.int32, device=qkv.device)
    use_pdl = pdl_for(qkv.device)
    pf = prefetch_plan(prefetch, num_parts * num_heads * batch, out)
    _decode_partition_kernel[(num_parts, num_heads, batch)](
        qkv, k_cache, v_cache, positions,
        part_max, part_sum, part_acc, counter, out, pf.target, pf.nbytes, pf.share,
        float(scale) * LOG2E,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part_max.stride(0), part_max.stride(1),
        out.stride(0), out.stride(1),
        head_dim, s_max, num_heads, num_parts,
        BLOCK_S=blocks.block_s, TILES_PER_PART=blocks.tiles_per_part, BLOCK_D=block_d,
        BLOCK_P=max(4, min(32, triton.next_power_of_2(num_parts))), USE_PDL=use_pdl, HISTORY_READY=history_ready,
        PREFETCH=pf.mode, SINGLE_PART=num_parts == 1 and _single_part_on(qkv.device),
        BALANCED=os.environ.get("FTLAB_DECODE_BALANCED", "1") == "1",
        KV_EVICT=eviction_policy_from_env("FTLAB_DECODE_KV_EVICT", "evict_first"),
        num_warps=blocks.num_warps, **launch_options(use_pdl), **_maxnreg_from_env(qkv.device),
    )
    return out


def _maxnreg_from_env(device: torch.device) -> dict:
    """FTLAB_DECODE_MAXNREG=n caps the kernel's registers per thread (a ptxas option; GPU only, read per call):
    fewer registers let more one-warp programs share an SM, for measuring occupancy against spills."""
    value = os.environ.get("FTLAB_DECODE_MAXNREG", "")
    if not value or device.type != "cuda":
        return {}
    _check(value.isdigit() and 24 <= int(value) <= 255, f"FTLAB_DECODE_MAXNREG must be 24..255, got {value!r}")
    return {"maxnreg": int(value)}


def _blocks_from_env() -> Optional[DecodeBlocks]:
    """FTLAB_DECODE_BLOCKS="block_s,tiles_per_part,num_warps": every call without blocks= uses these instead of
    pick_decode_blocks (for measuring other partitions inside a model's decode step; read per call)."""
    values = ints_from_env("FTLAB_DECODE_BLOCKS", "block_s,tiles_per_part,num_warps")
    if values is None:
        return None
    block_s, tiles, warps = values
    _check(block_s >= 16 and is_pow2(block_s) and tiles >= 1 and is_pow2(warps) and warps <= 32,
           f"FTLAB_DECODE_BLOCKS={values}: block_s must be a power of two >= 16, tiles_per_part >= 1, num_warps "
           f"a power of two up to 32")
    return DecodeBlocks(block_s, tiles, warps)


def _single_part_on(device: torch.device) -> bool:
    # a launch with one partition per (sequence, head) writes its output directly instead of a partial, a counter
    # bump and a combine. Always under the interpreter (its default is one partition, tested there); on a GPU unless
    # FTLAB_DECODE_SINGLE_PART=0 (then one partition still goes through the partial and the combine, for measuring)
    return device.type != "cuda" or os.environ.get("FTLAB_DECODE_SINGLE_PART", "1") != "0"


def decode_attention_reference(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Plain torch: write the new k/v into the caches, then softmax (fp32, fp64 for fp64 input) over slots 0..pos."""
    batch, _, num_heads, head_dim = qkv.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    for b, pos in enumerate(positions.tolist()):
        k_cache[b, :, pos] = qkv[b, 1].to(k_cache.dtype)
        v_cache[b, :, pos] = qkv[b, 2].to(v_cache.dtype)
        q = qkv[b, 0].to(compute_dtype)  # (nh, d)
        k = k_cache[b, :, : pos + 1].to(compute_dtype)  # (nh, pos+1, d)
        v = v_cache[b, :, : pos + 1].to(compute_dtype)
        probs = (torch.einsum("hd,hsd->hs", q, k) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hs,hsd->hd", probs, v).to(qkv.dtype)
    return out


def _benchmark() -> None:
    from ._bench import save_rows

    from triton.testing import do_bench

    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA device")
        return
    dtype, device = torch.float16, "cuda"
    elem = torch.finfo(dtype).bits // 8
    rows = []
    header = (f"{'nh':>3} {'d':>4} {'B':>3} {'ctx':>5} | {'triton us':>9} {'GB/s':>7} | "
              f"{'torch us':>9} {'GB/s':>7} | speedup")
    print(header)
    print("-" * len(header))
    for num_heads, head_dim in ((16, 64), (32, 128)):
        for batch in (1, 8, 64):
            for context in (128, 512, 2048):
                s_max = context + 64
                qkv = torch.randn(batch, 3, num_heads, head_dim, dtype=dtype, device=device)
                k_cache = torch.randn(batch, num_heads, s_max, head_dim, dtype=dtype, device=device)
                v_cache = torch.randn_like(k_cache)
                positions = torch.full((batch,), context, dtype=torch.int32, device=device)
                batch_idx = torch.arange(batch, device=device)
                slots = torch.arange(s_max, device=device)

                def torch_step():
                    k_cache[batch_idx, :, positions.long()] = qkv[:, 1]
                    v_cache[batch_idx, :, positions.long()] = qkv[:, 2]
                    mask = (slots[None, :] <= positions[:, None]).view(batch, 1, 1, s_max)
                    return torch.nn.functional.scaled_dot_product_attention(
                        qkv[:, 0].unsqueeze(2), k_cache, v_cache, attn_mask=mask)

                us_triton = do_bench(lambda: decode_attention(qkv, k_cache, v_cache, positions)) * 1e3
                us_torch = do_bench(torch_step) * 1e3
                kv_bytes = 2 * batch * num_heads * (context + 1) * head_dim * elem  # keys and values actually needed
                gbs_triton, gbs_torch = kv_bytes / us_triton * 1e-3, kv_bytes / us_torch * 1e-3
                print(f"{num_heads:>3} {head_dim:>4} {batch:>3} {context:>5} | {us_triton:>9.1f} {gbs_triton:>7.0f} | "
                      f"{us_torch:>9.1f} {gbs_torch:>7.0f} | {us_torch / us_triton:.2f}x")
                rows.append(dict(num_heads=num_heads, head_dim=head_dim, batch=batch, context=context, s_max=s_max,
                                 triton_us=us_triton, torch_us=us_torch, triton_gbs=gbs_triton, torch_gbs=gbs_torch))
    save_rows(rows, "decode_attention_bench.csv")


def _sweep() -> None:
    """Tile, partition and warp choices around the heuristic at decode shapes (fp16, KV caches rotated so each
    call reads HBM, CUDA-graph timings); prints the best per shape and the heuristic's time."""
    from ._bench import save_rows, time_us_rotating

    dtype, device = torch.float16, "cuda"
    rows = []
    for batch, num_heads, head_dim, context in ((1, 16, 64, 512), (8, 16, 64, 512), (64, 16, 64, 512),
                                                (1, 32, 128, 512)):
        s_max = -(-(context + 33) // 256) * 256  # a generate() cache: rounded up to 256 slots
        kv_bytes = 2 * batch * num_heads * s_max * head_dim * 2
        copies = max(1, min(64, -(-(160 << 20) // kv_bytes)))
        caches = [(torch.randn(batch, num_heads, s_max, head_dim, dtype=dtype, device=device),
                   torch.randn(batch, num_heads, s_max, head_dim, dtype=dtype, device=device)) for _ in range(copies)]
        qkv = torch.randn(batch, 3, num_heads, head_dim, dtype=dtype, device=device)
        positions = torch.full((batch,), context, dtype=torch.int32, device=device)
        block_d = max(16, triton.next_power_of_2(head_dim))
        results = []
        for block_s in (16, 32, 64, 128):
            for tiles in (1, 2, 4, 8):
                for warps in (2, 4, 8):
                    if block_s * block_d > 16384 or block_s * tiles > s_max:
                        continue
                    cfg = DecodeBlocks(block_s, tiles, warps)
                    t = time_us_rotating(lambda kv, cfg=cfg: decode_attention(qkv, kv[0], kv[1], positions,
                                                                              blocks=cfg), caches, rep=10)
                    results.append((t, cfg))
        heur = pick_decode_blocks(batch, num_heads, s_max, head_dim, _num_sms(0))
        t_heur = time_us_rotating(lambda kv: decode_attention(qkv, kv[0], kv[1], positions), caches)
        needed = 2 * batch * num_heads * (context + 1) * head_dim * 2
        results.sort(key=lambda r: r[0])
        print(f"B={batch} nh={num_heads} d={head_dim} ctx={context} S={s_max}: heuristic {heur} {t_heur:.2f} us "
              f"({needed / t_heur * 1e-3:.0f} GB/s)", flush=True)
        for t, cfg in results[:5]:
            print(f"    {t:8.2f} us {needed / t * 1e-3:6.0f} GB/s  {cfg}")
        rows += [dict(batch=batch, num_heads=num_heads, head_dim=head_dim, context=context, s_max=s_max,
                      block_s=c.block_s, tiles=c.tiles_per_part, warps=c.num_warps, us=t, gbs=needed / t * 1e-3,
                      heuristic_us=t_heur) for t, c in results]
        del caches
    save_rows(rows, "decode_attention_sweep.csv")


if __name__ == "__main__":
    import sys

    _sweep() if "--sweep" in sys.argv[1:] else _benchmark()
