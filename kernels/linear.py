"""The GEMM family: y = act(LN?(x) @ weight.T + bias) + residual, fused into one launch.

(Split-K adds a small reduce launch; the gemm path with the LN prologue adds a row-statistics pre-pass.)

x (M, K), weight (N, K) in nn.Linear layout (out, in), bias (N,), residual (M, N); fp32 accumulation, output in
x.dtype. activation None or "gelu" (tanh approximation). With ln_weight/ln_bias (K,) the GEMM reads LN(x) instead
of x (row statistics over K in fp32): the LayerNorm that precedes QKV and FC1 in a GPT block costs no extra pass.

Implementations, picked by `linear_impl_for(M, N, K)` or forced with impl=:
  "gemv"  small M (decode). Streams the weight once: each program owns BLOCK_N output features (rows of
          weight, contiguous along K) for BLOCK_M rows of x and walks K in chunks of one 16-byte vector per thread
          and weight row (1024 fp16 per chunk at 4 warps), fp32 FMAs on CUDA cores (at a few rows the GEMM is
          purely bandwidth bound) into per-thread partial sums; the loop has no barriers or shuffles (4-D tiles,
          see _gemv_kernel) and the reduction across threads happens once at the end. The LN statistics of its
          rows are computed inside the program (x is tiny). When a row spans at most two K chunks (every GPT
          width up to 4096) the LN gain and shift are folded into the program's weight rows before the PDL wait,
          and after it x's sum, sum of squares and dot product share one cross-thread reduction: at batch 1 the
          step is a chain of dependent kernels whose weights are already loaded, so what follows the wait is the
          cost (a GPT-345M step's GEMV chain on the H200: 16.0-16.4 -> 14.7-14.9 us per layer). With the
          gain and shift already folded into weight and bias when the model loaded (ln_row_sums=, fold_layernorm)
          no LN parameter is loaded at all, only the weight's row sums (decode step 0.534 -> 0.422 ms). When
          N / BLOCK_N programs cannot fill the GPU, K is split over SPLIT_K programs that write fp32 partial sums
          to a workspace; a second small kernel adds the partials in a fixed order and applies the epilogue, so
          results are deterministic and never depend on other rows of the batch. On a GPU, wherever a few whole
          weight rows fit one program's registers (every GPT-345M decode GEMV and its LM head), linear() runs
          kernels/gemv_rows.py instead: a few programs per SM, one warp each with the LN fold (decode step at bs1
          0.41 -> 0.376 ms); this chunked kernel remains for longer rows, small grids (split-K), the interpreter.
  "gemm"  larger M (prefill): BLOCK_M x BLOCK_N x BLOCK_K tiles on tensor cores (tl.dot), grouped program order
          so row-blocks that run together share weight tiles in L2, the same epilogue, the LN prologue applied to
          each loaded x tile (per-row mean/rstd come from a cheap pre-pass kernel; with the LN pre-folded the
          same pre-pass feeds an epilogue correction instead), and split-K when the tiles cannot fill the GPU.
  "torch" F.layer_norm + F.linear (cuBLAS) + the epilogue in torch (on a GPU the GELU in cuBLASLt's epilogue):
          the baseline, and the default where the benchmark measured it faster (M > GEMV_MAX_M with N a multiple of
          8; see linear_impl_for). GPT's blocks at those sizes bypass it (ftlab/model.py: LayerNorm fused with the
          residual add instead of run before each GEMM).
  "skinny" kernels/skinny_gemm.py (up to 64 rows, a LayerNorm only pre-folded): GPT's blocks call it for decode
          batches of 5-64 on a GPU (ftlab/model.py), never picked by linear_impl_for; "skinny-stats" the same
          with a pre-folded LayerNorm's row statistics from a layernorm_stats launch before it (the GEMM then
          keeps its K split).
Block sizes come from small heuristics of the shapes (no autotuning, so everything also runs in the interpreter);
`python -m ftlab.kernels.linear` times all three paths (--sweep also tries other block sizes; --chain a whole
decode step's GEMVs under block policies with PDL on/off; --gemm tensor-core tiles at decode batches).
On the GPU the gemv is launched with programmatic dependent launch (kernels/_pdl.py): its weight loads go out while
the previous kernel finishes. In a GPT-345M step's GEMV chain (H200, data/bench/linear_chain_sweep.csv) that took
20.2 -> 16.9 us per layer (16.25 with the bias loaded before the wait, 14.7-14.9 with the LN fold); no other block
policy beat the heuristic by more than 1 %, and grids of a few fat programs per SM (room for the next kernel to be
resident early) were 7-25 % slower.
At M = 8..64 (data/bench/linear_gemm_sweep.csv) the best tensor-core tile (BLOCK_N 32, BLOCK_K 128, 5 stages)
beats cuBLAS only without the LN prologue, and clearly only at K = N = 1024 (4.7 vs 6.2 us); with it, the
in-loop normalisation of every x tile costs ~9 us, so the torch path stays the default there.
"""
import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._shared import add3 as _add3, bias_act_residual, chan_merge, shifted_ln_stats
from ._env import ints_from_env
from .gemv_rows import gemv_rows, gemv_rows_on, pick_gemv_rows_config
from .layernorm import layernorm_stats
from .skinny_gemm import skinny_gemm
from ._pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_for
from ._prefetch import l2_prefetch, prefetch_plan

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = (None, "gelu")
_IMPLS = (None, "gemv", "gemm", "torch", "skinny", "skinny-stats")

# Default dispatch, measured with `python -m ftlab.kernels.linear` on an H200 (fp16, CUDA-graph timings, weights
# streamed from HBM; 2026-11-29, data/bench/linear_bench.csv), GPT-345M shapes:
#  - M = 1: the gemv beats cuBLAS 1.2-3.5x (2.9-6.3 us per decode GEMM); by M = 8 cuBLAS is as fast or faster
#    (the gemv spends one fp32 FMA per weight element and row on CUDA cores), so the gemv stops at M = 4;
#  - above that, cuBLAS beats the Triton gemm 1.3-2x when N is a multiple of 8, even with the epilogue as separate
#    torch ops; but cuBLAS is slow for odd N, e.g. the 50257-row LM head (M = 64: 135 us vs 33 us for the gemm;
#    M = 512: 562 vs 129 us), where the gemm (with its LN prologue) wins.
GEMV_MAX_M = 4
# Split-K aims for at least this many programs per SM before it splits (gemv) / fills one wave (gemm).
_GEMV_PROGRAMS_PER_SM = 2
_DEFAULT_SM_COUNT = 132  # H200; used where no CUDA device is visible (interpreter)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


# ----------------------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _ln_row_stats(x_rows, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean and rstd over K of BLOCK_M rows; x_rows (BLOCK_M, 1) points at each row's start (all rows valid).

    One pass over the rows: each chunk's mean and sum of squared deviations are merged into the running ones with
    Chan's formula, which avoids the cancellation of a plain sum-of-squares."""
    cols = tl.arange(0, BLOCK_K)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + cols) < K
        v = tl.load(x_rows + k0 + cols[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)  # (BM, BK)
        mean, m2 = chan_merge(mean, m2, v, k_ok, k0)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    return mean, rstd


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
                    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr):
    # acc (BM, BN) fp32 = x @ W^T for rows offs_m, features offs_n
    bias = _load_bias(bias_ptr, offs_n, N, HAS_BIAS)
    res = _load_residual(res_ptr, offs_m, offs_n, M, N, HAS_RES)
    _finish_store(acc, offs_m, offs_n, M, N, bias, res, out_ptr, ACT_GELU, HAS_BIAS, HAS_RES)


@triton.jit
def _load_bias(bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr):
    # (1, BN) fp32; tail features clamped onto the last one (their results are never stored)
    if HAS_BIAS:
        return tl.load(bias_ptr + tl.minimum(offs_n, N - 1)).to(tl.float32)[None, :]
    else:
        return 0.0


@triton.jit
def _load_residual(res_ptr, offs_m, offs_n, M, N, HAS_RES: tl.constexpr):
    # (BM, BN) fp32
    if HAS_RES:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        return tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _finish_store(acc, offs_m, offs_n, M, N, bias, res, out_ptr,
                  ACT_GELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    # out = act(acc + bias) + res, bias/res from _load_bias/_load_residual (loaded early by the gemv)
    acc = bias_act_residual(acc, bias, res, ACT_GELU, HAS_BIAS, HAS_RES)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial(acc, offs_m, offs_n, M, N, part_ptr, split):
    # split-K: fp32 partial sums go to workspace[split] (SPLIT_K, M, N); the reduce kernel finishes them
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(part_ptr + offs, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, split_k,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    plane = M * N  # int32 is enough for one plane: the launcher only splits when M * N is small
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, split_k):  # fixed order: deterministic
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += plane
    _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr, HAS_BIAS, ACT_GELU, HAS_RES)


@triton.jit
def _ln_stats_kernel(x_ptr, mean_ptr, rstd_ptr, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # pre-pass of the gemm LN prologue: per-row mean and rstd in fp32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * K
    mean, rstd = _ln_row_stats(x_rows, K, eps, BLOCK_M, BLOCK_K)
    tl.store(mean_ptr + offs_m, mean, mask=offs_m < M)
    tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < M)


# ----------------------------------------------------------------------------------------------------------------
# (a) skinny GEMV


@triton.jit
def _load_weight_chunk(w_tile, k, k_hi, chunk4):
    # chunk [k, k + BLOCK_K) of the program's weight rows, nothing at or beyond the split's end k_hi (k_hi is a
    # chunk boundary or K, so this one compare also masks the K tail)
    return tl.load(w_tile + k, mask=(k + chunk4) < k_hi, other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_x_chunk(x_tile, k, k_hi, chunk4):
    # chunk [k, k + BLOCK_K) of the program's rows of x in fp32, zero at and beyond the split's end k_hi (<= K)
    return tl.load(x_tile + k, mask=(k + chunk4) < k_hi, other=0.0).to(tl.float32)


@triton.jit
def _sum_chunk(v):
    # (BM, 1, LANES, VEC) -> (BM,)
    return tl.sum(tl.sum(tl.sum(v, axis=3), axis=2), axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, ln_w_ptr, ln_b_ptr, out_ptr, part_ptr, pf_ptr,
    M, N, K, k_per_split, ln_eps, pf_bytes, pf_share,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_LN: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, USE_PDL: tl.constexpr, ROW_IN_REGS: tl.constexpr, LN_FOLD: tl.constexpr,
    COMBINED_REDUCE: tl.constexpr, PREFETCH: tl.constexpr, LN_PREFOLDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    BLOCK_K: tl.constexpr,  # = LANES * VEC
):
    # A K chunk is LANES vectors of VEC contiguous elements (16 bytes each), so tiles are 4-D:
    # x (BM, 1, LANES, VEC), weight (1, BN, LANES, VEC). With LANES >= the program's thread count, Triton gives
    # both loads the same layout (each thread owns whole vectors, all threads spread along LANES): the broadcast
    # product needs no shared-memory layout conversion, and summing over VEC is register-local. The loop thus
    # has no barriers and no shuffles; the cross-thread reduction over LANES happens once, after it.
    # N-blocks on grid axis 0 (up to 2**31 programs; axes 1 and 2 are limited to 65535)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    # tail rows/features are clamped onto the last valid one instead of masked: the loads in the loop carry no
    # row predicate, and the duplicated results are dropped by the masked store
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * K  # (BM,)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * K  # (BN,)
    chunk = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # (LANES, VEC) offsets in a chunk
    chunk4 = chunk[None, None, :, :]
    x_tile = x_rows[:, None, None, None] + chunk4  # (BM, 1, LANES, VEC)
    w_tile = w_rows[None, :, None, None] + chunk4  # (1, BN, LANES, VEC)
    # k_per_split is a multiple of BLOCK_K: saying so keeps the K-chunk loads provably aligned (vectorised)
    # even when the launch did not specialise it
    k_lo = tl.multiple_of(split * k_per_split, BLOCK_K)
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # software pipelining in registers: each iteration issues the weight load two chunks ahead before it consumes
    # the current one, and the first two loads go out before anything else. With PDL they go out even before the
    # previous kernel has finished (weights are never written by it): at GPT sizes K spans at most two chunks, so
    # a program's whole share of the weight is in flight while it waits for its input x.
    if USE_PDL:
        gdc_launch_dependents()
    w_next = _load_weight_chunk(w_tile, k_lo, k_hi, chunk4)
    w_after = _load_weight_chunk(w_tile, k_lo + BLOCK_K, k_hi, chunk4)
    # the bias is requested before the wait too, and the residual together with x right after it, so that the
    # epilogue waits on no memory (the post-wait path is what a chain of small GEMVs is made of). Not the LN
    # gain/shift: held in registers across the wait (4 chunks in fp32) they cost more than they save (a GPT-345M
    # step's GEMV chain 16.4 -> 21.0 us per layer on the H200; bias + residual alone: 16.44 -> 16.25). Likely
    # the registers: fewer programs of the next kernel then fit beside this one's to load their weights early.
    if not WRITE_PARTIAL:
        bias = _load_bias(bias_ptr, offs_n, N, HAS_BIAS)
    if LN_FOLD:
        # LN(x) . w = rstd * (x . gw - mean * sum(gw)) + b . w with gw = g * w: the gain and shift are constants, so
        # everything but x . gw is done before the wait, and after it x feeds the dot product and its own
        # statistics at once, which then share one cross-thread reduction (instead of mean, then variance, then the
        # dot product, one after another). Only with the whole row in one program (ROW_IN_REGS: k_lo = 0).
        if LN_PREFOLDED:
            # the model folded g into the weight and b . w into the bias when it loaded them (ftlab/model.py
            # fold_layernorms): ln_w_ptr holds the rows' sums sum_k(gw), and no LN parameter is loaded at all (at
            # two rows per program they were as many bytes as the weight, and gw in fp32 twice its registers)
            gw_lo = w_next  # (1, BN, LANES, VEC), converted where it is used
            gw_hi = w_after
            gw_sum = tl.load(ln_w_ptr + tl.minimum(offs_n, N - 1))  # (BN,) fp32
            bw_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            g_lo = _load_x_chunk(ln_w_ptr + chunk4, 0, K, chunk4)  # (1, 1, LANES, VEC), 0 beyond K
            g_hi = _load_x_chunk(ln_w_ptr + chunk4, BLOCK_K, K, chunk4)
            gw_lo = w_next.to(tl.float32) * g_lo  # (1, BN, LANES, VEC)
            gw_hi = w_after.to(tl.float32) * g_hi
            gw_sum = tl.sum(tl.sum(tl.sum(gw_lo + gw_hi, axis=3), axis=2), axis=0)  # (BN,)
            b_lo = _load_x_chunk(ln_b_ptr + chunk4, 0, K, chunk4)
            b_hi = _load_x_chunk(ln_b_ptr + chunk4, BLOCK_K, K, chunk4)
            bw = w_next.to(tl.float32) * b_lo + w_after.to(tl.float32) * b_hi
            bw_sum = tl.sum(tl.sum(tl.sum(bw, axis=3), axis=2), axis=0)  # (BN,)
    if PREFETCH:  # the next kernel's weight into L2 (kernels/_prefetch.py), behind this program's own loads
        l2_prefetch(pf_ptr, pf_bytes, pf_share, PREFETCH, 128)
    if USE_PDL:
        gdc_wait()  # x, the residual and the output buffer belong to the kernel chain: touched only after this
    # x is pipelined the same way; its first two chunks are requested together, right after the wait
    x_next = _load_x_chunk(x_tile, k_lo, k_hi, chunk4)
    x_after = _load_x_chunk(x_tile, k_lo + BLOCK_K, k_hi, chunk4)
    if not WRITE_PARTIAL:
        res = _load_residual(res_ptr, offs_m, offs_n, M, N, HAS_RES)
    if LN_FOLD:
        # one pass over x for its sum, sum of squares and dot product, all taken relative to the row's first element
        # x0 (requested with the chunks, so no extra wait): with |mean| >> std the plain sums would cancel in fp32,
        # the shifted ones do not (tests: test_ln_prologue_with_large_mean)
        x0 = tl.load(x_rows).to(tl.float32)[:, None, None, None]  # (BM, 1, 1, 1)
        d_lo = tl.where(chunk4 < K, x_next - x0, 0.0)
        d_hi = tl.where(BLOCK_K + chunk4 < K, x_after - x0, 0.0)
        dot = tl.sum(d_lo * gw_lo.to(tl.float32) + d_hi * gw_hi.to(tl.float32), axis=3)  # (BM, BN, LANES)
        s1 = tl.broadcast_to(tl.sum(d_lo + d_hi, axis=3), dot.shape)
        s2 = tl.broadcast_to(tl.sum(d_lo * d_lo + d_hi * d_hi, axis=3), dot.shape)
        if COMBINED_REDUCE:
            dot, s1, s2 = tl.reduce((dot, s1, s2), 2, _add3)  # (BM, BN) each
        else:  # the interpreter runs a tuple reduce element by element in Python (100x slower): three sums
            dot, s1, s2 = tl.sum(dot, axis=2), tl.sum(s1, axis=2), tl.sum(s2, axis=2)
        shift, rstd = shifted_ln_stats(s1, s2, K, ln_eps)  # shift = mean - x0
        out = rstd * (dot - shift * gw_sum[None, :]) + bw_sum[None, :]
    elif HAS_LN:
        if ROW_IN_REGS:  # no split and K <= 2 chunks: the whole row is in x_next/x_after already (zero past K)
            mean = (_sum_chunk(x_next) + _sum_chunk(x_after)) / K  # (BM,)
            mean4 = mean[:, None, None, None]
            dev_next = tl.where(chunk4 < K, x_next - mean4, 0.0)
            dev_after = tl.where(BLOCK_K + chunk4 < K, x_after - mean4, 0.0)
            rstd = 1.0 / tl.sqrt((_sum_chunk(dev_next * dev_next) + _sum_chunk(dev_after * dev_after)) / K + ln_eps)
        else:
            mean, rstd = _ln_row_stats(x_rows[:, None], K, ln_eps, BLOCK_M, BLOCK_K)
            mean4 = mean[:, None, None, None]
        rstd4 = rstd[:, None, None, None]

    if not LN_FOLD:
        acc = tl.zeros((BLOCK_M, BLOCK_N, LANES), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w = w_next
            w_next = w_after
            w_after = _load_weight_chunk(w_tile, k0 + 2 * BLOCK_K, k_hi, chunk4)
            xk = x_next
            x_next = x_after
            x_after = _load_x_chunk(x_tile, k0 + 2 * BLOCK_K, k_hi, chunk4)
            if HAS_LN:  # g = b = 0 beyond the split's end, so the padded columns stay exactly 0
                g = _load_x_chunk(ln_w_ptr + chunk4, k0, k_hi, chunk4)
                b = _load_x_chunk(ln_b_ptr + chunk4, k0, k_hi, chunk4)
                xk = (xk - mean4) * rstd4 * g + b
            acc += tl.sum(xk * w.to(tl.float32), axis=3)  # (BM, BN, LANES)
        out = tl.sum(acc, axis=2)  # (BM, BN)

    if WRITE_PARTIAL:
        _store_partial(out, offs_m, offs_n, M, N, part_ptr, split)
    else:
        _finish_store(out, offs_m, offs_n, M, N, bias, res, out_ptr, ACT_GELU, HAS_BIAS, HAS_RES)


class GemvConfig(NamedTuple):
    block_m: int  # rows of x per program (all rows share each weight load)
    block_n: int  # output features (weight rows) per program
    lanes: int  # 16-byte vectors per K chunk; >= 32 * num_warps so no layout conversion is needed (see kernel)
    vec: int  # elements per vector (16 bytes: 8 for fp16/bf16, 4 for fp32)
    num_warps: int
    split_k: int

    @property
    def block_k(self) -> int:
        return self.lanes * self.vec


def pick_gemv_config(M: int, N: int, K: int, dtype: torch.dtype, num_sms: int = _DEFAULT_SM_COUNT) -> GemvConfig:
    """Heuristic blocks for the skinny kernel, from the H200 sweep (`python -m ftlab.kernels.linear --sweep`,
    fp16, M = 1, data/bench/linear_sweep.csv, 2026-11-29).

    The fastest configs give each program a K chunk of about half a weight row (16-byte vectors, so two loop
    iterations: one chunk's load in flight while the other is summed; at most 256 lanes) and enough programs for
    ~8 per SM: two weight rows per program when that still gives them, else one. Split-K lost at every GPT-345M
    shape (K=4096, N=1024: 4.15 us unsplit, 6.32 us split in two plus its reduce), so it is kept only for grids
    that cannot give every SM a program (tensor-parallel shards of small layers). Chosen vs best measured
    (us): K=1024 x N=1024 2.61/2.57, N=3072 3.76/3.76, N=4096 4.44/4.44, N=50257 29.6/29.6; K=4096 x N=1024
    4.15/4.15. Up to 8 rows of x share each weight load.
    """
    vec = 16 // (torch.finfo(dtype).bits // 8)
    lanes = max(4, min(256, triton.next_power_of_2(K) // (2 * vec)))
    num_warps = max(1, min(4, lanes // 32))  # lanes >= 32 * num_warps: no layout conversion in the loop
    block_m = min(triton.next_power_of_2(M), 8)
    m_blocks = triton.cdiv(M, block_m)
    block_n = 2 if triton.cdiv(N, 2) * m_blocks >= 8 * num_sms else 1
    programs = triton.cdiv(N, block_n) * m_blocks
    chunks = triton.cdiv(K, lanes * vec)
    split_k = 1
    if programs < num_sms:
        split_k = _pow2_floor(max(1, min(triton.cdiv(_GEMV_PROGRAMS_PER_SM * num_sms, programs), chunks // 2)))
    return GemvConfig(block_m, block_n, lanes, vec, num_warps, split_k)


# ----------------------------------------------------------------------------------------------------------------
# (b) tiled GEMM


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, ln_w_ptr, ln_b_ptr, mean_ptr, rstd_ptr, out_ptr, part_ptr, row_sums_ptr,
    M, N, K, k_per_split,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_LN: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    LN_PREFOLDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # LN_PREFOLDED (no split-K): the LayerNorm's gain and shift are folded into weight and bias
    # (ln_row_sums, see `linear`), so LN(x) @ W'^T = rstd * (x @ W'^T - mean * rowsum(W')): the loop multiplies
    # x as loaded, and the epilogue applies the rows' mean / rstd from the _ln_stats pre-pass. (Summing x and its
    # square inside the pipelined loop instead raced on the H200: see pick_gemm_config.)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # grouped order: GROUP_M row-blocks walk the column-blocks together, so a weight tile fetched for one of
    # them is still in L2 for the others
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    rows_m = tl.minimum(offs_m, M - 1)  # clamped, see _gemv_kernel
    rows_n = tl.minimum(offs_n, N - 1)
    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * K + cols[None, :]  # (BM, BK)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[None, :] * K + cols[:, None]  # (BK, BN): a tile of W^T
    # k_per_split is a multiple of BLOCK_K: saying so keeps the K-chunk loads provably aligned (vectorised, and
    # in the gemm pipelined through shared memory) even when the launch did not specialise it
    k_lo = tl.multiple_of(split * k_per_split, BLOCK_K)
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if HAS_LN:
        mean = tl.load(mean_ptr + rows_m)
        rstd = tl.load(rstd_ptr + rows_m)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0)
            wt = tl.load(w_ptrs + k0)
        else:
            k_ok = (k0 + cols) < K
            xt = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=k_ok[:, None], other=0.0)
        if HAS_LN:
            if EVEN_K:
                g = tl.load(ln_w_ptr + k0 + cols).to(tl.float32)
                b = tl.load(ln_b_ptr + k0 + cols).to(tl.float32)
            else:
                g = tl.load(ln_w_ptr + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
                b = tl.load(ln_b_ptr + k0 + cols, mask=k_ok, other=0.0).to(tl.float32)
            xn = (xt.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
            xt = xn.to(wt.dtype)  # tensor cores take both operands in the weight's dtype
        if IEEE:  # fp32: no TF32 rounding (fp32 results are held to 1e-5)
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)

    if LN_PREFOLDED:  # acc = x @ W'^T; LN(x) @ W'^T = rstd * (acc - mean * rowsum(W'))
        mean_x = tl.load(mean_ptr + rows_m)
        rstd_x = tl.load(rstd_ptr + rows_m)
        row_sums = tl.load(row_sums_ptr + rows_n)
        acc = rstd_x[:, None] * (acc - mean_x[:, None] * row_sums[None, :])
    if WRITE_PARTIAL:
        _store_partial(acc, offs_m, offs_n, M, N, part_ptr, split)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr, HAS_BIAS, ACT_GELU, HAS_RES)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    split_k: int
    num_warps: int
    num_stages: int


def pick_gemm_config(M: int, N: int, K: int, dtype: torch.dtype, num_sms: int = _DEFAULT_SM_COUNT) -> GemmConfig:
    """Heuristic tiles for the tensor-core kernel (tl.dot needs every tile dim >= 16).

    fp16/bf16: 128x128x64, 8 warps, 4 stages (128 KiB of shared memory) for M > 64; 64-row tiles up to M = 64
    and 16-row tiles below (decode batches forced onto this path). fp32 (ieee dot, FMA units) keeps 64x64x32.
    (M x 32 x 128 tiles, 5 stages, won the isolated sweep at M <= 64 (data/bench/linear_gemm_sweep.csv), but a
    decode step with every block GEMM on this kernel was still 12-24 % slower than LayerNorm + cuBLAS
    (FTLAB_SMALL_M_GEMM in ftlab/model.py), and for the LM head (N = 50257, the main user of these tiles) that
    tile took 80.5 us at M = 8 against these tiles' 46.7 (data/bench/small_m_gemm_ab.csv).)
    Split-K when the tiles do not fill one wave, bounded so every split gets >= 2 K chunks and the fp32 partial
    traffic (write + read) stays under half the weight bytes.
    A folded LayerNorm's row statistics come from the _ln_stats pre-pass. Summed inside the pipelined loop instead
    (until 2026-12-01), they raced on the H200 (triton 3.6) with the 64-row tiles: results wrong by up to ~0.5 and
    different from run to run, at M = 33, 40, 56, 63 with 4 warps and at M = 48, 64 with 8 warps, every seed
    (data/bench/gemm_prefold_race.csv; the 16-, 32- and 128-row tiles and the interpreter were right). With the
    pre-pass no run of any tile was wrong, and the LM head got faster at every M (CUDA-graph timing,
    data/bench/lm_head_graph.csv: M = 16 45.3 -> 32.5 us, 32 43.9 -> 35.0, 64 38.2 -> 38.0, 256 106 -> 76).
    """
    elem = torch.finfo(dtype).bits // 8
    if dtype == torch.float32:
        block_m, block_n, block_k, warps, stages = 64, 64, 32, 4, 3
    elif M > 64:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 4
    elif M > 16:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 4, 4
    else:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    block_m = max(16, min(block_m, triton.next_power_of_2(M)))
    block_n = max(16, min(block_n, triton.next_power_of_2(N)))
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = 1
    if tiles < num_sms:
        chunks = triton.cdiv(K, block_k)
        by_traffic = (K * elem) // (16 * M)
        split_k = _pow2_floor(max(1, min(num_sms // tiles, chunks // 2, by_traffic)))
    return GemmConfig(block_m, block_n, block_k, 8, split_k, warps, stages)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _gemm_config_from_env(M: int) -> Optional[GemmConfig]:
    """FTLAB_GEMM_TILE="block_n,block_k,num_warps,num_stages" (rows: M rounded up to a power of two, 16..64; no
    split-K): every gemm call uses this tile instead of pick_gemm_config (for measuring tiles inside a model's
    step; read per call)."""
    values = ints_from_env("FTLAB_GEMM_TILE", "block_n,block_k,num_warps,num_stages")
    if values is None:
        return None
    block_n, block_k, warps, stages = values
    return GemmConfig(max(16, min(64, triton.next_power_of_2(M))), block_n, block_k, 8, 1, warps, stages)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _split_bounds(K: int, block_k: int, split_k: int):
    # each split covers a whole number of K chunks; returns (k_per_split, number of non-empty splits)
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), split_k) * block_k
    return k_per_split, triton.cdiv(K, k_per_split)


def _workspace_or_out(out, split_k, M, N):
    if split_k == 1:
        return out
    return torch.empty((split_k, M, N), dtype=torch.float32, device=out.device)


def _finish_split(part, out, bias, residual, act_gelu, split_k):
    M, N = out.shape
    block_m = min(16, triton.next_power_of_2(M))
    block_n = 256
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _splitk_reduce_kernel[grid](
        part, bias if bias is not None else out, residual if residual is not None else out, out,
        M, N, split_k,
        HAS_BIAS=bias is not None, ACT_GELU=act_gelu, HAS_RES=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )


def _ln_fold_on() -> bool:
    # FTLAB_LN_FOLD=0: the gemv's LN prologue normalises x before the dot product (for comparing; read per call)
    return os.environ.get("FTLAB_LN_FOLD", "1") != "0"


def _run_gemv(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu, cfg: GemvConfig, prefetch=None,
              ln_row_sums=None):
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    k_per_split, split_k = _split_bounds(K, cfg.block_k, cfg.split_k)
    part = _workspace_or_out(out, split_k, M, N)
    has_ln = ln_weight is not None
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split_k)
    use_pdl = pdl_for(x.device)
    row_in_regs = split_k == 1 and K <= 2 * cfg.block_k
    pf = prefetch_plan(prefetch, grid[0] * grid[1] * grid[2], weight)
    ln_fold = has_ln and row_in_regs and _ln_fold_on()
    prefolded = ln_fold and ln_row_sums is not None  # else ln_weight / ln_bias (then 1 and 0) are applied as given
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        ln_row_sums if prefolded else ln_weight if has_ln else out, ln_bias if has_ln else out, out, part, pf.target,
        M, N, K, k_per_split, float(ln_eps), pf.nbytes, pf.share,
        HAS_BIAS=bias is not None, ACT_GELU=act_gelu, HAS_RES=residual is not None, HAS_LN=has_ln,
        WRITE_PARTIAL=split_k > 1, USE_PDL=use_pdl, ROW_IN_REGS=row_in_regs,
        LN_FOLD=ln_fold, COMBINED_REDUCE=x.is_cuda, PREFETCH=pf.mode, LN_PREFOLDED=prefolded,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, LANES=cfg.lanes, VEC=cfg.vec, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, **launch_options(use_pdl),
    )
    if split_k > 1:
        _finish_split(part, out, bias, residual, act_gelu, split_k)
    return out


def _ln_stats(x, eps):
    M, K = x.shape
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_k = min(1024, triton.next_power_of_2(K))
    block_m = max(1, min(16, 4096 // block_k))
    _ln_stats_kernel[(triton.cdiv(M, block_m),)](x, mean, rstd, M, K, float(eps),
                                                  BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return mean, rstd


def _run_gemm(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu, cfg: GemmConfig, ln_row_sums=None):
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    prefolded = ln_row_sums is not None  # the epilogue's correction takes whole sums: no split-K
    k_per_split, split_k = _split_bounds(K, cfg.block_k, 1 if prefolded else cfg.split_k)
    part = _workspace_or_out(out, split_k, M, N)
    has_ln = ln_weight is not None and not prefolded
    mean, rstd = _ln_stats(x, ln_eps) if has_ln or prefolded else (out, out)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split_k)
    _gemm_kernel[grid](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        ln_weight if has_ln else out, ln_bias if has_ln else out, mean, rstd, out, part,
        ln_row_sums if prefolded else out, M, N, K, k_per_split,
        HAS_BIAS=bias is not None, ACT_GELU=act_gelu, HAS_RES=residual is not None, HAS_LN=has_ln,
        WRITE_PARTIAL=split_k > 1, EVEN_K=K % cfg.block_k == 0, IEEE=x.dtype == torch.float32,
        LN_PREFOLDED=prefolded,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split_k > 1:
        _finish_split(part, out, bias, residual, act_gelu, split_k)
    return out


def _run_torch(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu):
    K = x.shape[1]
    if ln_weight is not None:
        x = F.layer_norm(x, (K,), ln_weight.to(x.dtype), ln_bias.to(x.dtype), ln_eps)
    bias = bias.to(x.dtype) if bias is not None else None
    if act_gelu and bias is not None and x.is_cuda:
        y = linear_gelu_cublas(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
        if act_gelu:
            y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def linear_gelu_cublas(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) on a CUDA device, the GELU in cuBLASLt's epilogue (the tanh approximation,
    GPT-2's: tests/kernels/test_linear.py tells it from the erf GELU in fp32 on the GPU): one pass over the (M, N)
    output fewer than F.linear + F.gelu. On the H200, K 1024, N 4096, fp16, M = 512 / 32768: 11.9 -> 10.0 us /
    612 -> 520 us. Not on a CPU, where torch's version of this op applies the exact (erf) GELU.

    Rows beyond gelu_rows_per_call() go in several calls, each writing its rows of one output: a 64 x 512 prompt's
    FC1 (32768 rows) as two of 16384. H200, GPT-345M fp16, `ftlab bench` in fresh processes alternating, 4 rounds
    (data/bench/gelu_row_chunks_ab.csv): bs64 512 -> 1 39.06-39.31 -> 38.37-38.67 ms, 512 -> 32 86.07-86.46 ->
    85.27-85.92, every pair faster; the GEMM alone, 6 rounds: 531 -> 504 us (median), 520 in four calls. The other
    prefill GEMMs (QKV, out-projection, FC2: no GELU epilogue) gained nothing from such calls
    (data/bench/gemm_row_chunks.txt). In that FC1 the output was bit for bit the one call's; in general a library
    may pick another kernel for fewer rows, which can change the last bit."""
    rows, step = x.shape[0], gelu_rows_per_call()
    if not step or rows <= step:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype, device=x.device)
    for lo in range(0, rows, step):
        torch._addmm_activation(bias, x[lo:lo + step], weight.t(), use_gelu=True, out=out[lo:lo + step])
    return out


def gelu_rows_per_call() -> int:
    """The most rows linear_gelu_cublas hands cuBLAS in one call: FTLAB_GELU_ROWS_PER_CALL (read per call; 0 = all
    rows in one call), by default 16384."""
    value = ints_from_env("FTLAB_GELU_ROWS_PER_CALL", "rows")
    if value is None:
        return 16384
    if value[0] < 0:
        raise ValueError(f"FTLAB_GELU_ROWS_PER_CALL={value[0]}: expected a row count >= 0 (0: one call)")
    return value[0]


def _check_tensor(name, t, shape, dtypes, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype {t.dtype} must be one of {[str(d)[6:] for d in dtypes]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def _check_linear_args(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, impl, prefetch):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be fp32/fp16/bf16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (shape {tuple(x.shape)}, stride {x.stride()})")
    M, K = x.shape
    if K < 1:
        raise ValueError(f"x must have K >= 1 columns, got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}] (nn.Linear layout), got {getattr(weight, 'shape', None)}")
    N = weight.shape[0]
    _check_tensor("weight", weight, (N, K), (x.dtype,), x.device)
    if bias is not None:
        _check_tensor("bias", bias, (N,), (x.dtype, torch.float32), x.device)
    if residual is not None:
        _check_tensor("residual", residual, (M, N), (x.dtype,), x.device)
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together")
    if ln_weight is not None:
        _check_tensor("ln_weight", ln_weight, (K,), (x.dtype, torch.float32), x.device)
        _check_tensor("ln_bias", ln_bias, (K,), (x.dtype, torch.float32), x.device)
        if not ln_eps >= 0:
            raise ValueError(f"ln_eps must be >= 0, got {ln_eps}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if prefetch is not None and not isinstance(prefetch, torch.Tensor):
        raise ValueError(f"prefetch must be a torch.Tensor or None, got {type(prefetch).__name__}")


def linear_impl_for(M: int, N: int, K: int) -> str:
    """The default dispatch (see GEMV_MAX_M): "gemv" for M <= GEMV_MAX_M; else "gemm" when N is not a multiple of 8
    (cuBLAS's slow case), "torch" (cuBLAS) otherwise."""
    if M <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if N % 8 else "torch"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
           ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
           ln_eps: float = 1e-5, impl: Optional[str] = None, prefetch: Optional[torch.Tensor] = None,
           ln_row_sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = act(LN?(x) @ weight.T + bias) + residual -> (M, N) in x.dtype. See the module docstring.

    ln_row_sums (N,) fp32: the LayerNorm's gain is already folded into weight's columns and its shift into bias
    (ln_weight all ones, ln_bias all zeros: see ftlab/model.py fold_layernorms), and these are weight's row sums
    in fp32. The gemv then loads no LN parameter; the other paths apply ln_weight / ln_bias as usual.

    prefetch: a tensor the next kernel will read (its weight); the chunked gemv asks L2 to fetch it while it runs
    (kernels/_prefetch.py). A hint only: ignored by the other paths (gemv_rows included), off the GPU, and with
    FTLAB_PREFETCH=0."""
    _check_linear_args(x, weight, bias, activation, residual, ln_weight, ln_bias, ln_eps, impl, prefetch)
    if ln_row_sums is not None:
        if ln_weight is None:
            raise ValueError("ln_row_sums needs ln_weight / ln_bias (ones and zeros: the affine folded into weight)")
        _check_tensor("ln_row_sums", ln_row_sums, (weight.shape[0],), (torch.float32,), x.device)
    M, K = x.shape
    N = weight.shape[0]
    act_gelu = activation == "gelu"
    if impl is None:
        impl = linear_impl_for(M, N, K)
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x.dtype, device=x.device)
    if impl == "torch":
        return _run_torch(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu)
    if impl in ("skinny", "skinny-stats"):  # kernels/skinny_gemm.py: up to 64 rows, a LayerNorm only folded
        if ln_weight is not None and ln_row_sums is None:
            raise ValueError(f"impl={impl!r} takes a LayerNorm only folded into the weight (ln_row_sums=)")
        stats = layernorm_stats(x, ln_eps) if impl == "skinny-stats" and ln_row_sums is not None else None
        return skinny_gemm(x, weight, bias, activation=activation, residual=residual, ln_row_sums=ln_row_sums,
                           ln_eps=ln_eps, ln_stats=stats)
    num_sms = _num_sms(x.device)
    if impl == "gemv":
        # whole weight rows per program where they fit (kernels/gemv_rows.py); on a GPU only: under the
        # interpreter the chunked kernel below runs with few wide programs (gemv_rows is tested on its own)
        if x.is_cuda and (ln_weight is None or ln_row_sums is not None) and gemv_rows_on():
            rows_cfg = pick_gemv_rows_config(M, N, K, x.dtype, ln_weight is not None, num_sms)
            if rows_cfg is not None:
                return gemv_rows(x, weight, bias, residual, ln_row_sums, ln_eps, act_gelu, rows_cfg)
        cfg = pick_gemv_config(M, N, K, x.dtype, num_sms)
        if x.device.type == "cpu":
            # Triton's interpreter pays Python overhead per program and per op, not per element: few wide programs
            # (a block may hold at most 2**20 elements)
            lanes = max(4, min(256, triton.next_power_of_2(K) // cfg.vec))  # whole rows per chunk
            widest = max(4, (1 << 20) // (cfg.block_m * lanes * cfg.vec))
            cfg = cfg._replace(lanes=lanes, num_warps=max(1, min(4, lanes // 32)),
                               block_n=min(triton.next_power_of_2(N), widest), split_k=1)
        return _run_gemv(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu, cfg, prefetch, ln_row_sums)
    cfg = _gemm_config_from_env(M) or pick_gemm_config(M, N, K, x.dtype, num_sms)
    if x.device.type == "cpu":  # as above: fewer, larger tiles under the interpreter
        cfg = cfg._replace(block_m=min(triton.next_power_of_2(M), 64), block_n=min(triton.next_power_of_2(N), 64),
                           split_k=1)
    return _run_gemm(x, weight, bias, residual, ln_weight, ln_bias, ln_eps, act_gelu, cfg, ln_row_sums)


def fold_layernorm(weight: torch.Tensor, bias: Optional[torch.Tensor], ln_weight: torch.Tensor,
                   ln_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments of `linear(..., ln_row_sums=)`: LN(x) @ W.T + c == norm(x) @ (W * g).T + (c + W @ b) with
    norm(x) = (x - mean) * rstd. Returns (W * g, c + W @ b, the fp32 row sums of W * g as stored), the first two in
    the weight's dtype, all computed in fp32; then call linear with ln_weight = 1 and ln_bias = 0."""
    w32 = weight.float()
    folded = (w32 * ln_weight.float()).to(weight.dtype).contiguous()
    new_bias = (w32 * ln_bias.float()).sum(1)  # row by row: a tensor-parallel shard gets its rows' exact values
    if bias is not None:
        new_bias += bias.float()
    return folded, new_bias.to(weight.dtype), folded.float().sum(1)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def linear_reference(x, weight, bias=None, *, activation=None, residual=None, ln_weight=None, ln_bias=None,
                     ln_eps=1e-5, impl=None):
    """Plain torch in fp32 (fp64 when x is fp64); returns x.dtype. `impl` is accepted and ignored."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute)
    if ln_weight is not None:
        mean = h.mean(dim=-1, keepdim=True)
        var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + ln_eps) * ln_weight.to(compute) + ln_bias.to(compute)
    y = h @ weight.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    if activation == "gelu":
        y = gelu_tanh_reference(y)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# micro-benchmark (GPU): python -m ftlab.kernels.linear [--sweep]

_BENCH_SHAPES = ((1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024), (1024, 50257))  # (K, N), GPT-345M
_BENCH_MS = (1, 8, 64, 512, 4096)
_BENCH_VARIANTS = ("bias", "ln+bias+gelu", "bias+res")
# Weights rotate over copies totalling more than the 50 MiB L2 of an H200, so each call streams its weight from
# HBM as in a real decode step (24 layers of weights never stay in L2). Timings replay a CUDA graph: no host
# launch overhead, which would otherwise swamp the few-microsecond decode GEMVs.
_ROTATE_BYTES = 160 * 2 ** 20
_BENCH_DEVICE = "cuda"


def _bench_inputs(M, N, K, dtype, variant):
    """(weight copies, kwargs for linear() without the weight)."""
    dev = _BENCH_DEVICE
    weight_bytes = N * K * torch.finfo(dtype).bits // 8
    copies = max(1, min(64, -(-_ROTATE_BYTES // weight_bytes)))
    weights = [torch.randn(N, K, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
    kwargs = dict(x=torch.randn(M, K, device=dev, dtype=dtype), bias=torch.randn(N, device=dev, dtype=dtype))
    if "ln" in variant:
        kwargs.update(ln_weight=torch.randn(K, device=dev, dtype=dtype),
                      ln_bias=torch.randn(K, device=dev, dtype=dtype))
    if "gelu" in variant:
        kwargs.update(activation="gelu")
    if "res" in variant:
        kwargs.update(residual=torch.randn(M, N, device=dev, dtype=dtype))
    return weights, kwargs


def _benchmark() -> None:
    from ._bench import time_us_rotating

    dtype = torch.float16
    num_sms = _num_sms(torch.device(_BENCH_DEVICE))
    rows = []
    print(f"fp16, CUDA-graph timings, weights streamed from HBM; GEMV_MAX_M={GEMV_MAX_M}")
    print(f"{'K':>5} {'N':>6} {'M':>5} {'variant':<13} {'pick':<5} {'gemv us':>8} {'gemm us':>8} {'torch us':>9} "
          f"{'best':<5} {'pick GB/s':>9} {'pick TF/s':>9} {'torch/pick':>10}")
    for K, N in _BENCH_SHAPES:
        for M in _BENCH_MS:
            for variant in _BENCH_VARIANTS:
                weights, kwargs = _bench_inputs(M, N, K, dtype, variant)
                times = {name: time_us_rotating(lambda w, name=name: linear(weight=w, **kwargs, impl=name), weights)
                         for name in ("torch", "gemm") + (("gemv",) if M <= 64 else ())}
                times.setdefault("gemv", float("nan"))
                pick = linear_impl_for(M, N, K)
                best = min((t, name) for name, t in times.items() if not math.isnan(t))[1]
                t_pick = times[pick]
                gbps = N * K * 2 / (t_pick * 1e-6) / 1e9
                tflops = 2 * M * N * K / (t_pick * 1e-6) / 1e12
                print(f"{K:>5} {N:>6} {M:>5} {variant:<13} {pick:<5} {times['gemv']:>8.2f} {times['gemm']:>8.2f} "
                      f"{times['torch']:>9.2f} {best:<5} {gbps:>9.0f} {tflops:>9.1f} {times['torch'] / t_pick:>10.2f}",
                      flush=True)
                rows.append(dict(K=K, N=N, M=M, variant=variant, pick=pick, gemv_us=times["gemv"],
                                 gemm_us=times["gemm"], torch_us=times["torch"], best=best,
                                 pick_gbps=gbps, pick_tflops=tflops,
                                 gemv_cfg=str(tuple(pick_gemv_config(M, N, K, dtype, num_sms))),
                                 gemm_cfg=str(tuple(pick_gemm_config(M, N, K, dtype, num_sms)))))
                del weights, kwargs
    from ._bench import save_rows

    save_rows(rows, "linear_bench.csv")


def _sweep() -> None:
    """Block sizes around the heuristics at decode sizes (bias-only epilogue, fp16); prints the best per shape."""
    from ._bench import time_us_rotating

    dtype = torch.float16
    num_sms = _num_sms(torch.device(_BENCH_DEVICE))
    rows = []
    for K, N in _BENCH_SHAPES:
        for M in (1, 8):
            weights, kwargs = _bench_inputs(M, N, K, dtype, "bias")
            x, b = kwargs["x"], kwargs["bias"]
            block_m = min(triton.next_power_of_2(M), 8)
            candidates = []
            vec = 8
            for block_n in (n for n in (1, 2, 4, 8) if n * block_m <= 32):  # larger spills registers
                for num_warps, lanes in ((2, 64), (4, 128), (4, 256), (8, 256)):
                    max_split = max(1, triton.cdiv(K, lanes * vec) // 2)
                    for split_k in (s for s in (1, 2, 4) if s <= max_split):
                        candidates.append(("gemv", GemvConfig(block_m, block_n, lanes, vec, num_warps, split_k)))
            if M > 1:
                for block_n, block_k in ((32, 256), (64, 128), (128, 64)):
                    for split_k in (1, 2, 4, 8):
                        candidates.append(("gemm", GemmConfig(16, block_n, block_k, 8, split_k, 4, 4)))
            results = []
            for kind, cfg in candidates:
                run = _run_gemv if kind == "gemv" else _run_gemm
                t = time_us_rotating(lambda w, run=run, cfg=cfg: run(x, w, b, None, None, None, 1e-5, False, cfg), weights,
                             rep=10)
                results.append((t, kind, cfg))
            results.sort(key=lambda r: r[0])
            heur = pick_gemv_config(M, N, K, dtype, num_sms)
            t_heur = time_us_rotating(lambda w: _run_gemv(x, w, b, None, None, None, 1e-5, False, heur), weights)
            t_torch = time_us_rotating(lambda w: linear(x, w, b, impl="torch"), weights)
            print(f"K={K} N={N} M={M}: torch {t_torch:.2f} us; gemv heuristic {t_heur:.2f} us "
                  f"({N * K * 2 / (t_heur * 1e-6) / 1e9:.0f} GB/s) {tuple(heur)}", flush=True)
            for t, kind, cfg in results[:5]:
                print(f"    {t:8.2f} us {N * K * 2 / (t * 1e-6) / 1e9:6.0f} GB/s  {kind} {tuple(cfg)}")
            for t, kind, cfg in results:
                rows.append(dict(K=K, N=N, M=M, kind=kind, cfg=str(tuple(cfg)), us=t,
                                 gbps=N * K * 2 / (t * 1e-6) / 1e9, torch_us=t_torch, heuristic_us=t_heur))
            del weights, kwargs
    from ._bench import save_rows

    save_rows(rows, "linear_sweep.csv")


def _chain_sweep(prefetch_only: bool = False, fold_only: bool = False, policies_only: bool = False) -> None:
    """The decode GEMVs of a whole GPT-345M step (24 layers x QKV+LN, out+residual, FC1+LN+GELU, FC2+residual,
    M = 1, fp16, distinct weights per layer so every one streams from HBM) captured as one CUDA graph, under
    block-size policies applied to every shape, with PDL on and off. In a chain what matters is how consecutive
    kernels overlap (PDL: the next one's programs load weights while the last ones of this one finish), which
    the one-kernel sweep cannot see. First the heuristic with L2 prefetch of a later GEMV's weight (off, bulk,
    per line; 1 or 2 GEMVs ahead), then (unless prefetch_only) the block policies (policies_only: those alone, PDL
    on). The LN GEMVs get their LayerNorm folded into the weight, as the model loads them (fold_layernorm;
    fold_only compares that with the in-kernel fold and with no fold). Prints us per layer, best first."""
    from triton.testing import do_bench_cudagraph

    from ._bench import save_rows

    dtype, device, H, layers = torch.float16, torch.device(_BENCH_DEVICE), 1024, 24
    num_sms = _num_sms(device)

    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype) * 0.02

    x = torch.randn(1, H, device=device).to(dtype)
    ln_w, ln_b = 1 + rand(H), rand(H)
    ones, zeros = torch.ones_like(ln_w), torch.zeros_like(ln_b)
    chain = []  # (weight, bias, LN prologue, residual, GELU) of QKV, attention output, FC1, FC2
    for _ in range(layers):
        chain += [(rand(3 * H, H), rand(3 * H), True, False, False), (rand(H, H), rand(H), False, True, False),
                  (rand(4 * H, H), rand(4 * H), True, False, True), (rand(H, 4 * H), rand(H), False, True, False)]
    folded = [fold_layernorm(w, b, ln_w, ln_b) if has_ln else None for w, b, has_ln, _, _ in chain]

    def policies():
        yield "heuristic", lambda N, K: pick_gemv_config(1, N, K, dtype, num_sms)
        # uniform blocks (K chunk = a whole, half or quarter row), and grids of a few fat programs per SM, which
        # leave room for the next kernel's programs to be resident (and loading) before this one ends
        for div in (1, 2, 4):
            for warps in (1, 2, 4, 8):
                for block_n in (1, 2, 4):
                    def pick(N, K, div=div, warps=warps, block_n=block_n):
                        lanes = max(32 * warps, min(512, triton.next_power_of_2(K) // (div * 8)))
                        return GemvConfig(1, block_n, lanes, 8, warps, 1)
                    yield f"row/{div} warps={warps} block_n={block_n}", pick
        for per_sm in (1, 2, 4):
            for warps_cap in (2, 4, 8):
                for div in (1, 2):
                    def pick(N, K, per_sm=per_sm, warps_cap=warps_cap, div=div):
                        block_n = max(1, min(16, triton.next_power_of_2(triton.cdiv(N, per_sm * num_sms))))
                        lanes = max(4, min(512, triton.next_power_of_2(K) // (div * 8)))
                        return GemvConfig(1, block_n, lanes, 8, max(1, min(warps_cap, lanes // 32)), 1)
                    yield f"{per_sm}/SM warps<={warps_cap} row/{div}", pick

    def run_chain(pick, ahead=0, prefold=True):
        h, h4 = x, None
        for i, (w, b, has_ln, has_res, gelu) in enumerate(chain):
            N, K = w.shape
            src = h if K == H else h4
            j = i + ahead  # the GEMV whose weight this one asks L2 for: the tensor that GEMV will read
            prefetch = ((folded[j] or chain[j])[0] if prefold else chain[j][0]) if ahead and j < len(chain) else None
            g, s, sums = (ln_w, ln_b, None) if has_ln else (None, None, None)
            if has_ln and prefold:
                (w, b, sums), g, s = folded[i], ones, zeros
            out = _run_gemv(src, w, b, h if has_res else None, g, s, 1e-5, gelu, pick(N, K), prefetch, sums)
            if N == 4 * H:
                h4 = out
            else:
                h = out if N == H else h
        return h

    def time_chain(pick, ahead=0, prefold=True):
        return do_bench_cudagraph(lambda: run_chain(pick, ahead, prefold), rep=20, return_mode="median") * 1e3 / layers

    rows = []
    heuristic = next(policies())[1]
    if fold_only:  # LN folded at load time; in the kernel (gain/shift applied to the weight before the wait); not
        for _ in range(2):
            for fold, prefold in (("1", True), ("1", False), ("0", False)):
                os.environ["FTLAB_LN_FOLD"] = fold
                us = time_chain(heuristic, prefold=prefold)
                name = "prefolded" if prefold else f"ln_fold={fold}"
                rows.append(dict(pdl="1", policy=f"heuristic {name}", us_per_layer=us))
                print(f"PDL=1 heuristic, LN {name}: {us:7.2f} us/layer", flush=True)
        os.environ.pop("FTLAB_LN_FOLD")
        save_rows(rows, "linear_chain_ln_fold.csv")
        return
    # L2 prefetch (kernels/_prefetch.py): each GEMV fetches the weight `ahead` GEMVs later, bulk or per line
    for mode in (() if policies_only else ("0", "1", "2")):
        os.environ["FTLAB_PREFETCH"] = mode
        for ahead in ((0,) if mode == "0" else (1, 2)):
            us = time_chain(heuristic, ahead)
            rows.append(dict(pdl="1", policy=f"heuristic prefetch={mode} ahead={ahead}", us_per_layer=us))
            print(f"PDL=1 heuristic, prefetch mode {mode}, {ahead} ahead: {us:7.2f} us/layer", flush=True)
    os.environ.pop("FTLAB_PREFETCH", None)
    for pdl in (() if prefetch_only else ("1",) if policies_only else ("1", "0")):
        os.environ["FTLAB_PDL"] = pdl
        for name, pick in policies():
            us = time_chain(pick)
            rows.append(dict(pdl=pdl, policy=name, us_per_layer=us))
            print(f"PDL={pdl} {name:32s} {us:7.2f} us/layer", flush=True)
        os.environ.pop("FTLAB_PDL")
    rows.sort(key=lambda r: r["us_per_layer"])
    print("best:", *(f"{r['policy']} PDL={r['pdl']} {r['us_per_layer']:.2f}" for r in rows[:8]), sep="\n  ")
    save_rows(rows, "linear_chain_sweep.csv")


def _gemm_sweep() -> None:
    """Tensor-core tiles for decode batches (M = 8, 64) at the GPT-345M layer shapes, bias-only epilogue (one
    compiled variant per tile), then the best tile on the layer's real fusion (LN prologue, GELU, residual)
    against torch (cuBLAS + separate LayerNorm/elementwise kernels), as a model step runs them."""
    from ._bench import save_rows, time_us_rotating

    dtype, rows = torch.float16, []
    layer_variants = {(1024, 3072): "ln+bias", (1024, 1024): "bias+res", (1024, 4096): "ln+bias+gelu",
                      (4096, 1024): "bias+res"}
    for (K, N), variant in layer_variants.items():
        for M in (8, 64):
            weights, kwargs = _bench_inputs(M, N, K, dtype, "bias")
            x, b = kwargs["x"], kwargs["bias"]
            results = []
            for block_n in (32, 64, 128):
                for block_k in (64, 128):
                    for stages in (3, 5):
                        for split_k in (1, 2, 4):
                            cfg = GemmConfig(max(16, min(64, triton.next_power_of_2(M))), block_n, block_k, 8,
                                             split_k, 4, stages)
                            try:
                                t = time_us_rotating(lambda w, cfg=cfg: _run_gemm(x, w, b, None, None, None, 1e-5,
                                                                                  False, cfg), weights, rep=10)
                            except triton.runtime.errors.OutOfResources:  # too many stages of large tiles
                                continue
                            results.append((t, cfg))
            results.sort(key=lambda r: r[0])
            best = results[0][1]
            real_w, real_kwargs = _bench_inputs(M, N, K, dtype, variant)
            t_best = time_us_rotating(lambda w: _run_gemm_kwargs(w, real_kwargs, best), real_w)
            t_heur = time_us_rotating(lambda w: linear(weight=w, **real_kwargs, impl="gemm"), real_w)
            t_torch = time_us_rotating(lambda w: linear(weight=w, **real_kwargs, impl="torch"), real_w)
            print(f"K={K} N={N} M={M} {variant}: torch {t_torch:.2f} us, gemm heuristic {t_heur:.2f}, best tile "
                  f"{tuple(best)} {t_best:.2f} (bias only: {results[0][0]:.2f})", flush=True)
            rows += [dict(K=K, N=N, M=M, variant="bias", cfg=str(tuple(c)), us=t) for t, c in results]
            rows += [dict(K=K, N=N, M=M, variant=variant, cfg=name, us=t)
                     for name, t in (("torch", t_torch), ("heuristic", t_heur), (str(tuple(best)), t_best))]
            del weights, real_w
    save_rows(rows, "linear_gemm_sweep.csv")


def _run_gemm_kwargs(weight, kwargs, cfg):
    return _run_gemm(kwargs["x"], weight, kwargs.get("bias"), kwargs.get("residual"), kwargs.get("ln_weight"),
                     kwargs.get("ln_bias"), 1e-5, kwargs.get("activation") == "gelu", cfg)


if __name__ == "__main__":
    import sys

    if "--sweep" in sys.argv[1:]:
        _sweep()
    elif "--chain" in sys.argv[1:]:
        _chain_sweep(prefetch_only="--prefetch-only" in sys.argv[1:], fold_only="--ln-fold" in sys.argv[1:],
                     policies_only="--policies-only" in sys.argv[1:])
    elif "--gemm" in sys.argv[1:]:
        _gemm_sweep()
    else:
        _benchmark()
