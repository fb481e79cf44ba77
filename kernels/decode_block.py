"""A whole decoder block for a decode step at small batch, in one persistent launch.

At batch 1 a block is five short kernels (QKV GEMV, decode attention, out-proj, FC1, FC2), each of which can
start streaming its weights only once the previous one is (nearly) done, and each pays a launch gap. Here one
launch of `programs` programs (one per SM) runs all five stages; between stages every program meets the others at a
grid barrier (`_grid_barrier`: an arrival counter in global memory, acquire/release atomics),
and before it waits there it has already issued the loads of its share of the NEXT stage's weight: the barrier's
latency hides behind weight streaming instead of adding to it.

    stage 1  qkv = LN1(x) @ W_qkv^T + b     rows split over programs; k, v also written to the cache slot pos
    stage 2  attention over the cache       (sequence, head, partition) units; the last partition of a head to
                                            finish combines them (per-head counter) into attn (B, H)
    stage 3  x1 = x + attn @ W_o^T + b_o
    stage 4  h  = gelu(LN2(x1) @ W_fc1^T + b)
    stage 5  out = x1 + h @ W_fc2^T + b

Every GEMV stage gives program p the output features [p*R, (p+1)*R) (R = ceil(N / programs)), so its share of the
weight is one (BLOCK_R, K) tile, loaded in K chunks of one 16-byte vector per lane (the 4-D layout of the GEMV in
linear.py: the loop needs no shuffles). Data that other programs wrote in this launch (qkv, partials, attn, x1, h)
is read with .cg loads (L2, never a stale L1 line) after the barrier's acquire.

The barrier needs every program resident at once: the grid is at most one program per SM, nothing else of ours runs
beside it (one stream; with PDL the next kernel can only start once all of these programs have started), and it is
used only in a single process (no tensor/pipeline parallel peers whose kernels could hold SMs). Under the
interpreter programs run one after another, so there the grid is one program that walks every work item (the work
split `programs` is independent of the grid, which lets the CPU tests cover awkward splits).

Measured (H200, fp16, GPT-345M shapes, context 512, a CUDA graph of 24 blocks with distinct weights; `python -m
ftlab.kernels.decode_block`, data/bench/decode_block_bench.csv): SLOWER than the five-kernel block, which is why the
model uses it only with FTLAB_FUSED_BLOCK=1. Batch 1: 33.2 us per block at 8 warps x 1 program per SM (4 warps: 90
us; 16 warps: 43.8; 4 warps x 2 per SM: 27.7) vs 22.0 us; batch 2: 44.6 vs 29.8; batch 4: 98.8 vs 47.4. Stage by
stage at batch 1 (cumulative, 8 warps): QKV 6.8 us (with the launch), + attention 13.4, + out-proj 17.2, + FC1 26.6,
+ FC2 33.4, while streaming a block's 25 MB takes ~6 us: each GEMV stage runs at 1-2 TB/s (likely: one program of 8
warps per SM, 193 registers per thread, keeps too few loads in flight), and the grid barrier costs 0.90 us. Reaching
the bandwidth inside one persistent program per SM is the open problem (more programs per SM risk non-resident
programs and a hang; see _benchmark). A lead: at 4 warps the compiled kernel keeps 156-168 registers per thread
whether a program's weight tile is 64 KB or 16 KB (splits of 2 and 4 programs per SM), so something other than the
tile (the attention stage's state, the prefetched KV tile and out-proj weight held across the barrier) sets the
register use, and with it how many programs fit per SM.

Sync state: `sync` int32 (1 + B*nh,), zero before the first launch: [arrivals, per-head combine counters]; every
launch leaves it zero again, so one buffer serves every layer of every step with no memset launch.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_for
from .attention import LOG2E
from .decode_attention import _combine_partitions, _load_kv_tile
from ._shared import gelu_tanh as _gelu_tanh

_KV_EVICT = tl.constexpr("")  # default L2 policy for the cache loads (evict_first not measured on this path)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BATCH = 4  # rows of x per launch (every GEMV stage multiplies all of them with each weight load)
# a program's weight in flight (registers): its whole share when that fits _MAX_TILE_BYTES (128 registers per thread
# at 4 warps), else K chunks of _MAX_CHUNK_BYTES, two in flight (the chunk loop is software-pipelined)
_MAX_TILE_BYTES = 64 * 1024
_MAX_CHUNK_BYTES = 16 * 1024


# ----------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _grid_barrier(sync_ptr, target):
    """Every program of the grid arrives before any leaves; stores before it are visible to loads after it.

    sync_ptr[0] counts arrivals over the whole launch: barrier i (1, 2, ...) is passed once it reaches
    i * programs (`target`); _grid_exit resets it. One thread of each program does the atomics (Triton runs scalar
    atomics on one thread); debug_barrier orders the other threads' stores before its release and its acquire
    before their loads. 0.90 us per barrier with 132 programs on the H200 (spinning on volatile loads plus one
    acquire afterwards: 1.04 us; the first version, an arrival count reset by the last arrival plus a round
    number read before arriving: 1.69 us)."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _grid_exit(sync_ptr, barriers):
    # the last program to leave (every other has passed every barrier) leaves the arrival count zero
    left_before = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if left_before == (barriers + 1) * tl.num_programs(0) - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _load_w_tile(w_ptr, N, K, rows_per_item, item, n_items, k0, offs_r, chunk3):
    # (BLOCK_R, LANES, VEC): weight rows of work item `item` (nothing past the item, N, or the last item), K chunk k0
    rows = item * rows_per_item + offs_r
    row_ok = (offs_r < rows_per_item) & (rows < N) & (offs_r * 0 + item < n_items)
    ptrs = w_ptr + rows.to(tl.int64)[:, None, None] * K + k0 + chunk3
    return tl.load(ptrs, mask=row_ok[:, None, None] & (k0 + chunk3 < K), other=0.0, eviction_policy="evict_first")


@triton.jit
def _first_w_tile(w_ptr, N, K, rows_per_item, n_items, BLOCK_R: tl.constexpr, LANES: tl.constexpr,
                  VEC: tl.constexpr):
    # the first chunk of this program's first item: issued a stage early (before the barrier the stage waits at)
    chunk = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    return _load_w_tile(w_ptr, N, K, rows_per_item, tl.program_id(0), n_items, 0, tl.arange(0, BLOCK_R),
                        chunk[None, :, :])


@triton.jit
def _sum_vec_lanes(v):
    # (BM, 1, LANES, VEC) -> (BM,)
    return tl.sum(tl.sum(tl.sum(v, axis=3), axis=2), axis=1)


@triton.jit
def _gemv_stage(
    w_ptr, N, K, rows_per_item, n_items, w_first,
    x_ptr, B, ln_w_ptr, ln_b_ptr, eps,
    bias_ptr, res_ptr, out_ptr,
    kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
    H, head_dim, cap,
    HAS_LN: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, APPEND_KV: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """out (B, N) = act(LN?(x) @ W^T + bias) (+ res) for this program's items; x (B, K) was written this launch."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    BLOCK_K = LANES * VEC
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    chunk = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    chunk3 = chunk[None, :, :]
    chunk4 = chunk[None, None, :, :]
    m_ok4 = (offs_m < B)[:, None, None, None]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None, None] * K  # (BM, 1, 1, 1)
    n_chunks = tl.cdiv(K, BLOCK_K)

    if ONE_CHUNK:  # the whole rows of x at once: the LN statistics come from the same registers
        x_all = tl.load(x_rows + chunk4, mask=m_ok4 & (chunk4 < K), other=0.0, cache_modifier=".cg").to(tl.float32)
    if HAS_LN:
        if ONE_CHUNK:
            mean = _sum_vec_lanes(x_all) / K
            dev = tl.where(chunk4 < K, x_all - mean[:, None, None, None], 0.0)
            var = _sum_vec_lanes(dev * dev) / K
        else:  # Chan's merge of per-chunk mean and squared deviations (no cancellation)
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c in range(0, n_chunks):
                k0 = c * BLOCK_K
                k_ok = k0 + chunk4 < K
                v = tl.load(x_rows + k0 + chunk4, mask=m_ok4 & k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                n_seen = k0 * 1.0
                n_new = tl.minimum(K - k0, BLOCK_K) * 1.0
                c_mean = _sum_vec_lanes(v) / n_new
                c_dev = tl.where(k_ok, v - c_mean[:, None, None, None], 0.0)
                delta = c_mean - mean
                total = n_seen + n_new
                mean = mean + delta * (n_new / total)
                m2 = m2 + _sum_vec_lanes(c_dev * c_dev) + delta * delta * (n_seen * n_new / total)
            var = m2 / K
        mean4 = mean[:, None, None, None]
        rstd4 = (1.0 / tl.sqrt(var + eps))[:, None, None, None]

    n_mine = tl.maximum(tl.cdiv(n_items - pid, grid), 0)
    w_cur = w_first
    acc = tl.zeros((BLOCK_M, BLOCK_R, LANES), dtype=tl.float32)
    for j in range(0, n_mine * n_chunks):
        if ONE_CHUNK:  # one tile per item: the first was prefetched; later items (if any) load their own
            if j > 0:
                w_cur = _load_w_tile(w_ptr, N, K, rows_per_item, pid + j * grid, n_items, 0, offs_r, chunk3)
        else:  # software pipelining: the next (item, chunk) tile is requested before this one is used
            nxt = j + 1
            w_next = _load_w_tile(w_ptr, N, K, rows_per_item, pid + (nxt // n_chunks) * grid, n_items,
                                  (nxt % n_chunks) * BLOCK_K, offs_r, chunk3)
        k0 = (j % n_chunks) * BLOCK_K
        if ONE_CHUNK:
            xk = x_all
        else:
            xk = tl.load(x_rows + k0 + chunk4, mask=m_ok4 & (k0 + chunk4 < K), other=0.0,
                         cache_modifier=".cg").to(tl.float32)
        if HAS_LN:  # g = b = 0 beyond K, so padded columns stay 0
            k_ok = k0 + chunk4 < K
            g = tl.load(ln_w_ptr + k0 + chunk4, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(ln_b_ptr + k0 + chunk4, mask=k_ok, other=0.0).to(tl.float32)
            xk = (xk - mean4) * rstd4 * g + b
        acc += tl.sum(xk * w_cur.to(tl.float32)[None, :, :, :], axis=3)  # (BM, BR, LANES)
        if j % n_chunks == n_chunks - 1:
            _gemv_epilogue(tl.sum(acc, axis=2), pid + (j // n_chunks) * grid, rows_per_item, N, B, offs_m, offs_r,
                           bias_ptr, res_ptr, out_ptr, kc_ptr, vc_ptr, positions_ptr,
                           stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
                           H, head_dim, cap, ACT_GELU, HAS_RES, APPEND_KV)
            acc = tl.zeros((BLOCK_M, BLOCK_R, LANES), dtype=tl.float32)
        if not ONE_CHUNK:
            w_cur = w_next


@triton.jit
def _gemv_epilogue(y, item, rows_per_item, N, B, offs_m, offs_r, bias_ptr, res_ptr, out_ptr,
                   kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s,
                   stride_vc_b, stride_vc_h, stride_vc_s, H, head_dim, cap,
                   ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, APPEND_KV: tl.constexpr):
    # y (BM, BR) fp32 for output features item*R + offs_r
    rows = item * rows_per_item + offs_r
    r_ok = (offs_r < rows_per_item) & (rows < N)
    m_ok = offs_m < B
    mask = m_ok[:, None] & r_ok[None, :]
    y = y + tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    if ACT_GELU:
        y = _gelu_tanh(y)
    offs = offs_m.to(tl.int64)[:, None] * N + rows[None, :]
    if HAS_RES:
        y = y + tl.load(res_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=mask)
    if APPEND_KV:
        # qkv features are ordered [3, nh, hs]: rows H..2H-1 are keys, 2H..3H-1 values; they also go to the
        # caches' slot positions[b] (a position past the cache is dropped, never written out of bounds)
        pos = tl.load(positions_ptr + offs_m, mask=m_ok, other=0)
        feat = rows - H
        is_v = feat >= H
        feat = tl.where(is_v, feat - H, feat)
        head = feat // head_dim
        d = feat % head_dim
        ok = mask & (rows >= H)[None, :] & (pos < cap)[:, None]
        seq = offs_m.to(tl.int64)[:, None]
        slot = pos.to(tl.int64)[:, None]
        k_off = seq * stride_kc_b + head[None, :] * stride_kc_h + slot * stride_kc_s + d[None, :]
        v_off = seq * stride_vc_b + head[None, :] * stride_vc_h + slot * stride_vc_s + d[None, :]
        tl.store(kc_ptr + k_off, y, mask=ok & ~is_v[None, :])
        tl.store(vc_ptr + v_off, y, mask=ok & is_v[None, :])


@triton.jit
def _unit_kv_first(kc_ptr, vc_ptr, positions_ptr, unit, n_units, num_heads, n_parts, part_size, cap,
                   stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s, head_dim,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # the first tile of cached keys/values of attention unit `unit` (nothing for a unit past the last)
    seq = unit // (num_heads * n_parts)
    head = (unit // n_parts) % num_heads
    part_lo = (unit % n_parts) * part_size
    pos = tl.load(positions_ptr + seq, mask=unit < n_units, other=0)
    kv_hi = tl.where(unit < n_units, tl.minimum(tl.minimum(part_lo + part_size, pos), cap), 0)
    offs_d = tl.arange(0, BLOCK_D)
    kc = kc_ptr + seq.to(tl.int64) * stride_kc_b + head * stride_kc_h
    vc = vc_ptr + seq.to(tl.int64) * stride_vc_b + head * stride_vc_h
    return _load_kv_tile(kc, vc, part_lo + tl.arange(0, BLOCK_S), kv_hi, offs_d, offs_d < head_dim,
                         stride_kc_s, stride_vc_s, _KV_EVICT)


@triton.jit
def _attention_stage(
    qkv_ptr, kc_ptr, vc_ptr, positions_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, counter_ptr, attn_ptr,
    k_first, v_first, B, H, num_heads, head_dim, cap, n_parts, part_size, qk_scale,
    stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Flash-decoding over units (sequence, head, partition of part_size cache slots), as in decode_attention.py:
    partials to the workspace, the last partition of a head to finish combines them into attn (B, H)."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs_s = tl.arange(0, BLOCK_S)
    n_units = B * num_heads * n_parts
    for unit in range(pid, n_units, grid):
        seq = unit // (num_heads * n_parts)
        head = (unit // n_parts) % num_heads
        part = unit % n_parts
        pos = tl.load(positions_ptr + seq)
        part_lo = part * part_size
        if part_lo <= pos:  # else beyond this sequence's keys: the combine never reads this partition
            part_hi = part_lo + part_size
            kc = kc_ptr + seq.to(tl.int64) * stride_kc_b + head * stride_kc_h
            vc = vc_ptr + seq.to(tl.int64) * stride_vc_b + head * stride_vc_h
            kv_hi = tl.minimum(tl.minimum(part_hi, pos), cap)
            if unit == pid:
                k_next = k_first
                v_next = v_first
            else:
                k_next, v_next = _load_kv_tile(kc, vc, part_lo + offs_s, kv_hi, offs_d, d_mask, stride_kc_s,
                                               stride_vc_s, _KV_EVICT)
            qkv_base = qkv_ptr + seq.to(tl.int64) * 3 * H + head * head_dim + offs_d
            q = tl.load(qkv_base, mask=d_mask, other=0.0, cache_modifier=".cg").to(tl.float32) * qk_scale
            k_new = tl.load(qkv_base + H, mask=d_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            v_new = tl.load(qkv_base + 2 * H, mask=d_mask, other=0.0, cache_modifier=".cg").to(tl.float32)

            m_i = float("-inf")
            l_i = 0.0
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for kv_lo in range(part_lo, kv_hi, BLOCK_S):
                k = k_next
                v = v_next
                k_next, v_next = _load_kv_tile(kc, vc, kv_lo + BLOCK_S + offs_s, kv_hi, offs_d, d_mask,
                                               stride_kc_s, stride_vc_s, _KV_EVICT)
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
                s = tl.where(kv_lo + offs_s < kv_hi, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                m_i = m_new
            # the new key (from qkv; its cache slot was written in stage 1) counts in the partition that holds it
            s_new = tl.sum(k_new * q, axis=0)
            s_new = tl.where((pos < part_hi) & (pos < cap), s_new, float("-inf"))
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha + p_new * v_new

            ws_head = (seq * num_heads + head).to(tl.int64) * n_parts
            tl.store(part_max_ptr + ws_head + part, m_new)
            tl.store(part_sum_ptr + ws_head + part, l_i)
            tl.store(part_acc_ptr + (ws_head + part) * head_dim + offs_d, acc, mask=d_mask)

            n_valid = tl.minimum(pos // part_size + 1, n_parts)
            counter = counter_ptr + seq * num_heads + head
            tl.debug_barrier()  # every thread's partial stores are issued before the (single-thread) release
            finished_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if finished_before == n_valid - 1:
                _combine_partitions(part_max_ptr, part_sum_ptr, part_acc_ptr, attn_ptr, ws_head,
                                    seq.to(tl.int64) * H + head * head_dim, head_dim, n_valid, BLOCK_P, BLOCK_D)
                tl.store(counter, 0)


# ----------------------------------------------------------------------------------------------------------------
# the kernel


@triton.jit
def _decode_block_kernel(
    x_ptr, out_ptr, positions_ptr, kc_ptr, vc_ptr,
    ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc1, b_fc1, w_fc2, b_fc2,
    qkv_ws, attn_ws, x1_ws, h_ws, part_max, part_sum, part_acc, sync_ptr,
    B, H, I, num_heads, head_dim, cap, eps, qk_scale,
    stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
    r_qkv, n_qkv, r_o, n_o, r_fc1, n_fc1, r_fc2, n_fc2,  # rows per work item and items, per GEMV stage
    n_parts, part_size,
    BLOCK_M: tl.constexpr, VEC: tl.constexpr,
    BR_QKV: tl.constexpr, LANES_QKV: tl.constexpr, ONE_QKV: tl.constexpr,
    BR_O: tl.constexpr, LANES_O: tl.constexpr, ONE_O: tl.constexpr,
    BR_FC1: tl.constexpr, LANES_FC1: tl.constexpr, ONE_FC1: tl.constexpr,
    BR_FC2: tl.constexpr, LANES_FC2: tl.constexpr, ONE_FC2: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr,
    STAGES: tl.constexpr,  # 5; fewer only in the micro-benchmark's breakdown (the output is then not written)
):
    n = tl.num_programs(0)
    counters = sync_ptr + 1
    if USE_PDL:
        gdc_launch_dependents()
    w_first = _first_w_tile(w_qkv, 3 * H, H, r_qkv, n_qkv, BR_QKV, LANES_QKV, VEC)
    if USE_PDL:
        gdc_wait()  # x, the caches' slots and the sync state belong to the kernel chain
    _gemv_stage(w_qkv, 3 * H, H, r_qkv, n_qkv, w_first, x_ptr, B, ln1_w, ln1_b, eps, b_qkv, x_ptr, qkv_ws,
                kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s,
                stride_vc_b, stride_vc_h, stride_vc_s, H, head_dim, cap,
                True, False, False, True, ONE_QKV, BLOCK_M, BR_QKV, LANES_QKV, VEC)
    if STAGES >= 2:
        # before waiting: the out-proj weight and the first tile of cached keys/values (written by earlier steps)
        w_first = _first_w_tile(w_o, H, H, r_o, n_o, BR_O, LANES_O, VEC)
        k_first, v_first = _unit_kv_first(kc_ptr, vc_ptr, positions_ptr, tl.program_id(0),
                                          B * num_heads * n_parts, num_heads, n_parts, part_size, cap,
                                          stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h,
                                          stride_vc_s, head_dim, BLOCK_S, BLOCK_D)
        _grid_barrier(sync_ptr, n)
        _attention_stage(qkv_ws, kc_ptr, vc_ptr, positions_ptr, part_max, part_sum, part_acc, counters, attn_ws,
                         k_first, v_first, B, H, num_heads, head_dim, cap, n_parts, part_size, qk_scale,
                         stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
                         BLOCK_S, BLOCK_D, BLOCK_P)
    if STAGES >= 3:
        _grid_barrier(sync_ptr, 2 * n)
        _gemv_stage(w_o, H, H, r_o, n_o, w_first, attn_ws, B, ln1_w, ln1_b, eps, b_o, x_ptr, x1_ws,
                    kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s,
                    stride_vc_b, stride_vc_h, stride_vc_s, H, head_dim, cap,
                    False, False, True, False, ONE_O, BLOCK_M, BR_O, LANES_O, VEC)
    if STAGES >= 4:
        w_first = _first_w_tile(w_fc1, I, H, r_fc1, n_fc1, BR_FC1, LANES_FC1, VEC)
        _grid_barrier(sync_ptr, 3 * n)
        _gemv_stage(w_fc1, I, H, r_fc1, n_fc1, w_first, x1_ws, B, ln2_w, ln2_b, eps, b_fc1, x1_ws, h_ws,
                    kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s,
                    stride_vc_b, stride_vc_h, stride_vc_s, H, head_dim, cap,
                    True, True, False, False, ONE_FC1, BLOCK_M, BR_FC1, LANES_FC1, VEC)
    if STAGES >= 5:
        w_first = _first_w_tile(w_fc2, H, I, r_fc2, n_fc2, BR_FC2, LANES_FC2, VEC)
        _grid_barrier(sync_ptr, 4 * n)
        _gemv_stage(w_fc2, H, I, r_fc2, n_fc2, w_first, h_ws, B, ln1_w, ln1_b, eps, b_fc2, x1_ws, out_ptr,
                    kc_ptr, vc_ptr, positions_ptr, stride_kc_b, stride_kc_h, stride_kc_s,
                    stride_vc_b, stride_vc_h, stride_vc_s, H, head_dim, cap,
                    False, False, True, False, ONE_FC2, BLOCK_M, BR_FC2, LANES_FC2, VEC)
    _grid_exit(sync_ptr, STAGES - 1)


# ----------------------------------------------------------------------------------------------------------------
# launcher


class GemvSplit(NamedTuple):
    rows_per_item: int  # output features per work item (one program's share when items <= programs)
    items: int
    block_r: int  # rows_per_item rounded up to a power of two
    lanes: int  # 16-byte vectors per K chunk
    one_chunk: bool  # K fits one chunk


def split_gemv(N: int, K: int, programs: int, elem_bytes: int, tile_bytes: int = _MAX_TILE_BYTES,
               chunk_bytes: int = _MAX_CHUNK_BYTES) -> GemvSplit:
    """Features split evenly over `programs`; the whole K in one tile when it fits tile_bytes, else chunks of at
    most chunk_bytes."""
    vec = 16 // elem_bytes
    rows = triton.cdiv(N, programs)
    block_r = triton.next_power_of_2(rows)
    lanes = triton.next_power_of_2(triton.cdiv(K, vec))
    if block_r * lanes * 16 <= tile_bytes:
        return GemvSplit(rows, triton.cdiv(N, rows), block_r, lanes, True)
    while lanes > 1 and block_r * lanes * 16 > chunk_bytes:
        lanes //= 2
    return GemvSplit(rows, triton.cdiv(N, rows), block_r, lanes, lanes * vec >= K)


class AttentionSplit(NamedTuple):
    block_s: int  # keys per tile
    part_size: int  # cache slots per partition (a multiple of block_s)
    parts: int  # partitions per (sequence, head): cdiv(capacity, part_size)


def split_attention(batch: int, num_heads: int, capacity: int, head_dim: int, programs: int) -> AttentionSplit:
    """About one unit (sequence, head, partition) per program; tiles of ~4K elements (as in decode_attention)."""
    want_parts = max(1, programs // (batch * num_heads))
    per_part = triton.cdiv(capacity, want_parts)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_s = max(16, min(4096 // block_d, triton.next_power_of_2(per_part)))
    part_size = triton.cdiv(per_part, block_s) * block_s
    return AttentionSplit(block_s, part_size, triton.cdiv(capacity, part_size))


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def new_sync_state(batch: int, num_heads: int, device) -> torch.Tensor:
    """The zeroed sync buffer a caller keeps across launches (see the module docstring)."""
    return torch.zeros(1 + batch * num_heads, dtype=torch.int32, device=device)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def decode_block(x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                 ln1_weight, ln1_bias, qkv_weight, qkv_bias, attn_out_weight, attn_out_bias,
                 ln2_weight, ln2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                 num_heads: int, eps: float = 1e-5, sync: Optional[torch.Tensor] = None,
                 programs: Optional[int] = None, num_warps: int = 8, tile_bytes: int = _MAX_TILE_BYTES,
                 chunk_bytes: int = _MAX_CHUNK_BYTES, stages: int = 5,
                 compiled: Optional[dict] = None, grid: Optional[int] = None) -> torch.Tensor:
    """One pre-LN GPT block for one new token per sequence: returns x + attn + mlp (B, H) and appends k, v at
    cache[b, :, positions[b]]. x (B, H) with B <= MAX_BATCH; positions int32 (B,); caches (B, nh, S, hs), last dim
    contiguous; Linear weights (out, in) contiguous, qkv rows ordered [3, nh, hs]. sync: see new_sync_state
    (default: a fresh zeroed one). programs: the work split (default one per SM on a GPU, 1 in the interpreter);
    on a GPU it is also the grid, in the interpreter the grid is always one program. num_warps, tile_bytes,
    chunk_bytes and stages (< 5: stop early, for timing the stages) are the
    micro-benchmark's knobs; `compiled` (a dict) receives the compiled kernel's register, spill and shared-memory
    counts; `grid` (default: programs on a GPU, 1 in the interpreter) may be 1 to compile a split safely."""
    _check(x.dim() == 2 and 1 <= x.shape[0] <= MAX_BATCH,
           f"x must be (B, H) with 1 <= B <= {MAX_BATCH}, got {tuple(x.shape)}")
    _check(x.dtype in _SUPPORTED_DTYPES and x.is_contiguous(), f"x must be a contiguous float tensor, got {x.dtype}")
    B, H = x.shape
    _check(H % num_heads == 0, f"hidden size {H} is not divisible by num_heads={num_heads}")
    head_dim = H // num_heads
    weights = dict(ln1_weight=(H,), ln1_bias=(H,), qkv_weight=(3 * H, H), qkv_bias=(3 * H,),
                   attn_out_weight=(H, H), attn_out_bias=(H,), ln2_weight=(H,), ln2_bias=(H,),
                   fc1_weight=(None, H), fc1_bias=(None,), fc2_weight=(H, None), fc2_bias=(H,))
    given = dict(ln1_weight=ln1_weight, ln1_bias=ln1_bias, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
                 attn_out_weight=attn_out_weight, attn_out_bias=attn_out_bias, ln2_weight=ln2_weight,
                 ln2_bias=ln2_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    _check(fc1_weight is not None and fc1_weight.dim() == 2, "fc1_weight must be (I, H)")
    inter = fc1_weight.shape[0]
    for name, shape in weights.items():
        t = given[name]
        want = tuple(inter if s is None else s for s in shape)
        _check(t is not None, f"{name} is required (the fused block has no tensor-parallel partial sums)")
        _check(tuple(t.shape) == want and t.is_contiguous(),
               f"{name} must be a contiguous {want} tensor, got {tuple(t.shape)}")
        _check(t.dtype == x.dtype and t.device == x.device,
               f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache.dim() == 4 and cache.shape[0] == B and cache.shape[1] == num_heads and cache.shape[3] == head_dim,
               f"{name} must be (B={B}, nh={num_heads}, S, hs={head_dim}), got {tuple(cache.shape)}")
        _check(cache.dtype == x.dtype and cache.device == x.device and cache.stride(-1) == 1,
               f"{name} must be {x.dtype} on {x.device}, contiguous in its last dim")
    _check(k_cache.shape[2] == v_cache.shape[2] >= 1, "k_cache and v_cache need the same number (>= 1) of slots")
    _check(positions.shape == (B,) and positions.dtype == torch.int32 and positions.device == x.device,
           f"positions must be int32 (B={B},) on {x.device}, got {positions.dtype} {tuple(positions.shape)}")
    if sync is None:
        sync = new_sync_state(B, num_heads, x.device)
    _check(sync.dtype == torch.int32 and sync.numel() >= 1 + B * num_heads and sync.is_contiguous(),
           f"sync must be a contiguous int32 tensor of >= {1 + B * num_heads} elements (new_sync_state)")

    on_gpu = x.is_cuda
    if programs is None:
        programs = _num_sms(x.device) if on_gpu else 1
    _check(programs >= 1, f"programs must be >= 1, got {programs}")
    cap = k_cache.shape[2]
    elem = x.element_size()
    qkv, proj, fc1, fc2 = (split_gemv(n, k, programs, elem, tile_bytes, chunk_bytes)
                           for n, k in ((3 * H, H), (H, H), (inter, H), (H, inter)))
    att = split_attention(B, num_heads, cap, head_dim, programs)

    dev, f32 = x.device, torch.float32
    out = torch.empty_like(x)
    qkv_ws = torch.empty((B, 3 * H), dtype=x.dtype, device=dev)
    attn_ws = torch.empty_like(x)
    x1_ws = torch.empty_like(x)
    h_ws = torch.empty((B, inter), dtype=x.dtype, device=dev)
    part_max = torch.empty((B, num_heads, att.parts), dtype=f32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((B, num_heads, att.parts, head_dim), dtype=f32, device=dev)
    use_pdl = pdl_for(x.device)
    if grid is None:
        grid = programs if on_gpu else 1
    kernel = _decode_block_kernel[(grid,)](
        x, out, positions, k_cache, v_cache,
        ln1_weight, ln1_bias, qkv_weight, qkv_bias, attn_out_weight, attn_out_bias,
        ln2_weight, ln2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
        qkv_ws, attn_ws, x1_ws, h_ws, part_max, part_sum, part_acc, sync,
        B, H, inter, num_heads, head_dim, cap, float(eps), LOG2E / math.sqrt(head_dim),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        qkv.rows_per_item, qkv.items, proj.rows_per_item, proj.items, fc1.rows_per_item, fc1.items,
        fc2.rows_per_item, fc2.items, att.parts, att.part_size,
        BLOCK_M=triton.next_power_of_2(B), VEC=16 // elem,
        BR_QKV=qkv.block_r, LANES_QKV=qkv.lanes, ONE_QKV=qkv.one_chunk,
        BR_O=proj.block_r, LANES_O=proj.lanes, ONE_O=proj.one_chunk,
        BR_FC1=fc1.block_r, LANES_FC1=fc1.lanes, ONE_FC1=fc1.one_chunk,
        BR_FC2=fc2.block_r, LANES_FC2=fc2.lanes, ONE_FC2=fc2.one_chunk,
        BLOCK_S=att.block_s, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_P=max(4, min(32, triton.next_power_of_2(att.parts))), USE_PDL=use_pdl,
        STAGES=stages, num_warps=num_warps, **launch_options(use_pdl),
    )
    if compiled is not None:
        meta = getattr(kernel, "metadata", None)
        compiled.update(n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None),
                        shared=getattr(meta, "shared", None))
    return out


def decode_block_reference(x, positions, k_cache, v_cache, *, ln1_weight, ln1_bias, qkv_weight, qkv_bias,
                           attn_out_weight, attn_out_bias, ln2_weight, ln2_bias, fc1_weight, fc1_bias, fc2_weight,
                           fc2_bias, num_heads: int, eps: float = 1e-5) -> torch.Tensor:
    """Plain torch in fp32 (fp64 for fp64 input): the same block, writing the new k/v into the caches."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, H = x.shape
    hs = H // num_heads

    def lin(v, w, b):
        return v @ w.to(ct).t() + b.to(ct)

    xf = x.to(ct)
    qkv = lin(F.layer_norm(xf, (H,), ln1_weight.to(ct), ln1_bias.to(ct), eps), qkv_weight, qkv_bias)
    qkv = qkv.view(B, 3, num_heads, hs)
    attn = torch.empty(B, num_heads, hs, dtype=ct, device=x.device)
    for b, pos in enumerate(positions.tolist()):
        k_cache[b, :, pos] = qkv[b, 1].to(k_cache.dtype)
        v_cache[b, :, pos] = qkv[b, 2].to(v_cache.dtype)
        k = k_cache[b, :, : pos + 1].to(ct)  # (nh, pos+1, hs)
        v = v_cache[b, :, : pos + 1].to(ct)
        probs = (torch.einsum("hd,hsd->hs", qkv[b, 0], k) / math.sqrt(hs)).softmax(dim=-1)
        attn[b] = torch.einsum("hs,hsd->hd", probs, v)
    x1 = xf + lin(attn.reshape(B, H), attn_out_weight, attn_out_bias)
    h = F.gelu(lin(F.layer_norm(x1, (H,), ln2_weight.to(ct), ln2_bias.to(ct), eps), fc1_weight, fc1_bias),
               approximate="tanh")
    return (x1 + lin(h, fc2_weight, fc2_bias)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# micro-benchmarks (python -m ftlab.kernels.decode_block)


@triton.jit
def _barriers_kernel(sync_ptr, rounds):
    for i in range(rounds):
        _grid_barrier(sync_ptr, (i + 1) * tl.num_programs(0))
    _grid_exit(sync_ptr, rounds)


def _unfused_block(x, positions, k, v, w, num_heads, counter):
    from .decode_attention import decode_attention
    from .linear import linear

    B, H = x.shape
    qkv = linear(x, w["qkv_weight"], w["qkv_bias"], ln_weight=w["ln1_weight"], ln_bias=w["ln1_bias"])
    attn = decode_attention(qkv.view(B, 3, num_heads, H // num_heads), k, v, positions, counter=counter,
                            history_ready=True)
    x = linear(attn.view(B, H), w["attn_out_weight"], w["attn_out_bias"], residual=x)
    h = linear(x, w["fc1_weight"], w["fc1_bias"], activation="gelu", ln_weight=w["ln2_weight"],
               ln_bias=w["ln2_bias"])
    return linear(h, w["fc2_weight"], w["fc2_bias"], residual=x)


def _benchmark(splits=((8, 1), (16, 1), (4, 2)), breakdown: bool = True) -> None:
    """The grid barrier alone, then a 24-block chain (GPT-345M shapes, fp16, context 512, distinct weights per
    block so they stream from HBM) fused vs the five-kernel blocks, in CUDA graphs; us per block. At batch 1 a few
    warp counts and programs per SM, then the best at batch 2 and 4 and stage by stage (stages 1..k only)."""
    from triton.testing import do_bench_cudagraph

    from ._bench import save_rows

    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA device")
        return
    dev, dtype = torch.device("cuda"), torch.float16
    sms = _num_sms(dev)
    sync = new_sync_state(1, 1, dev)
    t = {r: do_bench_cudagraph(lambda r=r: _barriers_kernel[(sms,)](sync, r), rep=50) * 1e3 for r in (1, 201)}
    per = (t[201] - t[1]) / 200
    print(f"grid barrier, {sms} programs: {per:.2f} us each (a launch with one: {t[1]:.2f} us)")
    rows = [dict(what="grid_barrier", batch=0, num_warps=4, programs=sms, tile_bytes=0, stages=0, us=per,
                 unfused_us="")]

    H, nh, inter, layers, context, cap = 1024, 16, 4096, 24, 512, 768
    torch.manual_seed(0)
    blocks = [_random_block(H, inter, dtype, dev) for _ in range(layers)]

    def chain(B, **knobs):
        caches = [(torch.randn(B, nh, cap, H // nh, dtype=dtype, device=dev),
                   torch.randn(B, nh, cap, H // nh, dtype=dtype, device=dev)) for _ in range(layers)]
        positions = torch.full((B,), context, dtype=torch.int32, device=dev)
        x0 = torch.randn(B, H, dtype=dtype, device=dev)
        sync = new_sync_state(B, nh, dev)
        counter = torch.zeros(B, nh, dtype=torch.int32, device=dev)

        def unfused():
            x = x0
            for w, (k, v) in zip(blocks, caches):
                x = _unfused_block(x, positions, k, v, w, nh, counter)
            return x

        def fused():
            x = x0
            for w, (k, v) in zip(blocks, caches):
                x = decode_block(x, positions, k, v, num_heads=nh, sync=sync, **knobs, **w)
            return x

        err = float("nan")
        if knobs.get("stages", 5) == 5:
            ref, got = unfused(), fused()
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        base = do_bench_cudagraph(unfused, rep=100) * 1e3 / layers
        us = do_bench_cudagraph(fused, rep=100) * 1e3 / layers
        print(f"B={B} {knobs}: fused {us:.2f} us/block, five kernels {base:.2f} ({base / us:.2f}x), "
              f"rel. diff after {layers} blocks {err:.1e}", flush=True)
        rows.append(dict(what="block_chain", batch=B, num_warps=knobs["num_warps"], programs=knobs["programs"],
                         tile_bytes=knobs["tile_bytes"], stages=knobs.get("stages", 5), us=us, unfused_us=base))
        return us

    # The grid barrier needs every program resident at once. Each split is first compiled with a grid of one
    # program (safe) to read its registers; 8 warps x 2 programs per SM at 128 registers (exactly the register
    # file) hung on the H200, so a split runs only with a quarter of the register file to spare.
    results = {}
    for warps, per_sm in splits:
        probe = {}
        knobs = dict(num_warps=warps, tile_bytes=64 << 10, programs=sms * per_sm)
        decode_block(torch.randn(1, H, dtype=dtype, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
                     torch.randn(1, nh, 8, H // nh, dtype=dtype, device=dev),
                     torch.randn(1, nh, 8, H // nh, dtype=dtype, device=dev), num_heads=nh, compiled=probe, grid=1,
                     **knobs, **blocks[0])
        regs, shared = probe.get("n_regs"), probe.get("shared") or 0
        print(f"{warps} warps, {per_sm} per SM: {probe}", flush=True)
        if regs is None or per_sm > 1 and (regs * 32 * warps * per_sm > 48 << 10 or shared * per_sm > 160 << 10):
            print("    skipped: that many programs might not all be resident")
            continue
        results[tuple(knobs.items())] = chain(1, **knobs)
    best = dict(min(results, key=results.get))
    print("best at batch 1:", best)
    if breakdown:
        for stages in (1, 2, 3, 4):
            chain(1, stages=stages, **best)
        for B in (2, 4):
            chain(B, **best)
    save_rows(rows, "decode_block_bench.csv")


def _random_block(H, inter, dtype, device):
    def r(*shape, scale=0.02):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return dict(ln1_weight=1 + r(H), ln1_bias=r(H), qkv_weight=r(3 * H, H), qkv_bias=r(3 * H),
                attn_out_weight=r(H, H), attn_out_bias=r(H), ln2_weight=1 + r(H), ln2_bias=r(H),
                fc1_weight=r(inter, H), fc1_bias=r(inter), fc2_weight=r(H, inter), fc2_bias=r(H))


if __name__ == "__main__":
    import sys

    # --splits 4x2,4x4: only these (warps x programs per SM) at batch 1, no stage breakdown
    if "--splits" in sys.argv:
        chosen = sys.argv[sys.argv.index("--splits") + 1].split(",")
        _benchmark(tuple(tuple(int(v) for v in c.split("x")) for c in chosen), breakdown=False)
    else:
        _benchmark()
