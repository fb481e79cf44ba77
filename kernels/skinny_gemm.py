"""Skinny GEMM on tensor cores for decode batches (5 to 64 rows): y = act(x @ weight.T + bias) + residual.

Between the GEMV sizes (kernels/gemv_rows.py, M <= 4) and prefill, a decode step's GEMMs move a layer's weights (25
MB at GPT-345M) for at most 64 rows of x: bandwidth-bound work that cuBLAS does at ~1 TB/s on the H200 (its kernels
for M = 8..64 use few programs and cannot start before the previous kernel ends). Here each program owns a BLOCK_N x
K_SPLIT slice of the weight and loads it before its PDL wait (kernels/_pdl.py: while the previous kernel finishes),
then multiplies all rows of x by it with one tl.dot. At 56-64 rows on sm_90+ both come through TMA descriptors into
shared memory instead of pointer loads through registers (`_tma_on`, FTLAB_SKINNY_TMA). Split-K programs store fp32
partials; the last of an output tile's programs to finish (an acquire-release counter, as in
kernels/decode_attention.py) adds them in a fixed order and applies the epilogue: no reduce launch, and results that
do not depend on arrival order. With partials=True the programs store their fp32 products and stop: a consumer that
reads them anyway sums them in the same order (kernels/layernorm.py with the residual add; the model's FC2 where
LayerNorm launches run between the skinny GEMMs: FTLAB_SKINNY_LN=0, or hidden > 1024), and no program waits on a
counter. Its torch reference is kernels/linear.py's linear_reference (the same function, LayerNorm included).

H200, fp16, a block's four GEMMs chained over 24 layers of distinct weights in one CUDA graph (`python -m
ftlab.kernels.skinny_gemm`, data/bench/skinny_gemm_chain.csv), us per layer against cuBLAS (+ two adds):
M = 8 12.4 vs 23.8, M = 32 20.3 vs 25.1, M = 64 21.3 vs 26.2. GPT's decode blocks use it at 4 < B <= 64 on a GPU
(ftlab/model.py; FTLAB_SKINNY=0 goes back to cuBLAS).

With ln_row_sums a LayerNorm folded into weight and bias is applied in the epilogue (one split of whole rows; the
statistics from a chunked second pass over x), so a block needs no LayerNorm launch: the model's `_skinny_blocks`
path, its default at 5-16 rows (H200 decode step bs8 0.636 -> 0.573 ms, bs16 0.776 -> 0.722; slower at 32 and 64
rows, see there). With ln_stats the statistics come from kernels/layernorm.py's layernorm_stats launched just
before, and the correction follows any split-K sum (the model's default at 17-40 rows from 2026-12-03: bs32 step
1.049-1.064 -> 0.981-0.983 ms against LayerNorm launches). With row_stats=True a GEMM (the out-projection, FC2)
also writes each output tile's per-row mean and squared deviations, and a next LN-folded call given them as
ln_stats (TileRowStats) merges them beside its load of x (Chan's merge of equal counts) and corrects after the
split-K sum like ln_stats: no statistics launch between them, and the K split stands. The model's default at
17-64 rows ("skinny-rowstats", ftlab/model.py `_skinny_ln_mode`): decode step at context 512, alternating in one
process (`ftlab bench --ab-decode`, data/bench/decode_step_ab.csv, 2026-12-04), ms, LayerNorm launches / statistics
launches / row statistics: bs17 0.820 / 0.779 / 0.757, bs32 1.024 / 0.980 / 0.962, bs48 1.349 / 1.335 / 1.337,
bs64 1.539 / 1.543 / 1.505. An earlier try (2026-12-02, before ln_stats existed) passed row statistics the same
way and was slower at every batch (ms, three rounds alternating in one process: bs8 0.566-0.571 -> 0.573-0.576,
bs16 0.671-0.681 -> 0.733-0.736, bs32 1.105-1.114 -> 1.135-1.141, bs64 1.70-1.76 -> 2.27-2.28;
data/bench/row_stats_step_ab.csv); its code did not land, so how its consumer split K is not known, but its bs64
step is the 2.30 ms that whole-row tiles take.
Also tried (2026-12-02, scratch code): x and the weight through TMA descriptors in a K loop pipelined by the compiler
(2-4 stages, K steps of 64 or 128, the weight prefetched into L2 before the PDL wait): slower for every GEMM of the
chain, us at M = 64 QKV 5.55 vs 4.99, out 4.56 vs 3.95, FC1 6.25 vs 5.86, FC2 8.88 vs 7.19, a block 27.7-28.0 vs
21.3, and worse at M = 32 (data/bench/skinny_tma_chain.csv); this kernel holds its weight slice in registers
before the wait, that one only had it in L2. And the folded LayerNorm's statistics pass as a loop that is not
unrolled: the bs64 step with the fold 2.16-2.19 -> 1.89-1.90 ms, still above the LayerNorm launches' 1.69-1.70, and
slower at 8-32 rows (bs8 0.557 -> 0.638; data/bench/skinny_ln_stats_loop_ab.csv). Alone under Nsight Compute
(data/bench/ncu_decode_bs64.txt) a 64-row program is one 4-warp block per SM that waits on its loads most of the
time (DRAM 6-20 %). Session 20: the weight slice is loaded with L2 policy evict_first (each program reads its slice
once; FTLAB_SKINNY_W_EVICT="" restores the default): decode step (KV loads evict_first in both) alternating in one
process (data/bench/eviction_policy_ab.csv) bs64 1.670-1.681 -> 1.650-1.669 ms, bs32 1.095-1.096 -> 1.084-1.085,
bs16 0.671-0.676 -> 0.666-0.667, bs8 0.557-0.558 -> 0.555-0.556.
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a triton without host-side tensor descriptors: no TMA path
    TensorDescriptor = None

from ._env import eviction_policy_from_env, ints_from_env
from ._pdl import gdc_launch_dependents, gdc_wait, hopper_or_later, launch_options, pdl_for
from ._shared import bias_act_residual, shifted_ln_stats


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, x_desc, w_desc,  # TMA descriptors: x in (BLOCK_M, K_SPLIT) boxes, weight in (BLOCK_N, K_SPLIT)
    bias_ptr, res_ptr, out_ptr, part_ptr, counter_ptr, row_sums_ptr, mean_ptr, rstd_ptr,
    stats_in_ptr, stats_out_ptr,  # TileRowStats parts (2, tiles, M) fp32: in (STATS_TILES), out (ROW_STATS_OUT)
    M, N, K, stride_xm, ln_eps, stats_parts, stats_cols,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr, IEEE: tl.constexpr,
    LN_PREFOLDED: tl.constexpr,  # the LayerNorm's affine folded into weight / bias (kernels/linear.py fold_layernorm)
    STATS_GIVEN: tl.constexpr,  # with LN_PREFOLDED: the rows' mean / rstd come from mean_ptr / rstd_ptr
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
    STAT_K: tl.constexpr,  # columns of x per step of the LayerNorm statistics pass
    W_EVICT: tl.constexpr,  # L2 eviction policy of the weight's loads
    PARTIALS_ONLY: tl.constexpr = False,  # store each split's fp32 product to part_ptr and stop (no epilogue)
    STATS_TILES: tl.constexpr = 0,  # with LN_PREFOLDED, > 0: merge stats_parts tiles' row statistics (pow2 >= that)
    ROW_STATS_OUT: tl.constexpr = False,  # each output tile's per-row mean and squared deviations to stats_out_ptr
    TMA: tl.constexpr = False,  # x and the weight slice through x_desc / w_desc: one bulk copy each, no registers
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    if USE_PDL:
        gdc_launch_dependents()
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * K_SPLIT + tl.arange(0, K_SPLIT)
    k_ok = offs_k < K
    rows_n = tl.minimum(offs_n, N - 1)  # tail features clamped (never stored)
    # the weight slice is independent of the previous kernel: it streams in before the wait
    if TMA:  # into shared memory (rows past N and columns past K read as zeros)
        w = w_desc.load([pid_n * BLOCK_N, split * K_SPLIT])
    else:
        w = tl.load(w_ptr + rows_n.to(tl.int64)[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0,
                    eviction_policy=W_EVICT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    else:
        bias = 0.0
    if LN_PREFOLDED:
        row_sums = tl.load(row_sums_ptr + rows_n)  # (BLOCK_N,) fp32: the folded weight's row sums
    if USE_PDL:
        gdc_wait()
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if TMA:
        x = x_desc.load([0, split * K_SPLIT])
    else:
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if LN_PREFOLDED and STATS_TILES > 0:
        # the rows' statistics from the producer's tiles (Chan's merge of equal counts), loaded beside x
        t = tl.arange(0, STATS_TILES)
        t_ok = t < stats_parts
        at = stats_in_ptr + t[None, :] * M + offs_m[:, None]
        both = m_ok[:, None] & t_ok[None, :]
        tile_means = tl.load(at, mask=both, other=0.0)
        tile_m2 = tl.load(at + stats_parts * M, mask=both, other=0.0)
        row_mean = tl.sum(tile_means, axis=1) / stats_parts
        spread = tl.where(t_ok[None, :], tile_means - row_mean[:, None], 0.0)
        row_var = (tl.sum(tile_m2, axis=1) + stats_cols * tl.sum(spread * spread, axis=1)) / K
        row_rstd = 1.0 / tl.sqrt(tl.maximum(row_var, 0.0) + ln_eps)
    if IEEE:  # fp32: no TF32 rounding
        acc = tl.dot(x, tl.trans(w), input_precision="ieee")  # (BLOCK_M, BLOCK_N) fp32
    else:
        acc = tl.dot(x, tl.trans(w))
    if LN_PREFOLDED and not STATS_GIVEN:
        # one split holds whole rows of x: LN(x) @ W'^T = rstd * (x @ W'^T - mean * rowsum(W'))
        # x's statistics from a second, chunked pass over it (L1/L2-hot): the whole tile in fp32 would spill
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        x0 = tl.load(x_ptr + offs_m.to(tl.int64) * stride_xm, mask=m_ok, other=0.0).to(tl.float32)  # (BLOCK_M,)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in tl.static_range(0, K_SPLIT, STAT_K):
            cols = k0 + tl.arange(0, STAT_K)
            xc = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            xf = tl.where((cols < K)[None, :], xc.to(tl.float32) - x0[:, None], 0.0)  # relative to x0: no cancellation
            x_sum += tl.sum(xf, axis=1)
            x_sq += tl.sum(xf * xf, axis=1)
        shift, rstd = shifted_ln_stats(x_sum, x_sq, K, ln_eps)
        acc = rstd[:, None] * (acc - (x0 + shift)[:, None] * row_sums[None, :])
    out_mask = m_ok[:, None] & (offs_n < N)[None, :]
    tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K > 1 or PARTIALS_ONLY:
        tl.store(part_ptr + split.to(tl.int64) * M * N + tile, acc, mask=out_mask)
        if PARTIALS_ONLY:  # the consumer sums the splits (kernels/layernorm.py): no counter, no last program
            return
        tl.debug_barrier()  # every thread's partial stores are issued before the (single-thread) release below
        arrived_before = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived_before != SPLIT_K - 1:
            return
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: the sum does not depend on which program finished last
            acc += tl.load(part_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.store(counter_ptr + pid_n, 0)  # leave the counter zero for the next launch
    if LN_PREFOLDED and STATS_TILES > 0:  # after any split-K sum, like STATS_GIVEN
        acc = row_rstd[:, None] * (acc - row_mean[:, None] * row_sums[None, :])
    elif LN_PREFOLDED and STATS_GIVEN:  # statistics of a pre-pass (kernels/layernorm.py layernorm_stats), any split
        mean = tl.load(mean_ptr + offs_m, mask=m_ok, other=0.0)
        rstd = tl.load(rstd_ptr + offs_m, mask=m_ok, other=0.0)
        acc = rstd[:, None] * (acc - mean[:, None] * row_sums[None, :])
    if HAS_RES:
        res = tl.load(res_ptr + tile, mask=out_mask, other=0.0).to(tl.float32)
    else:
        res = 0.0
    acc = bias_act_residual(acc, bias, res, ACT_GELU, HAS_BIAS, HAS_RES)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tile, y, mask=out_mask)
    if ROW_STATS_OUT:  # statistics of the rows as stored (the launcher asks N % BLOCK_N == 0: full tiles)
        yf = y.to(tl.float32)
        tile_mean = tl.sum(yf, axis=1) / BLOCK_N
        dev = yf - tile_mean[:, None]
        stats_at = stats_out_ptr + pid_n * M + offs_m
        tl.store(stats_at, tile_mean, mask=m_ok)
        tl.store(stats_at + tl.num_programs(0) * M, tl.sum(dev * dev, axis=1), mask=m_ok)


MAX_M = 64  # rows of x held by one program (tl.dot tiles of up to 64 x K_SPLIT)
TMA_MIN_ROWS = 56  # from this many rows of x on a GPU, x and the weight come through TMA descriptors (_tma_on)
LN_MAX_K = 1024  # widest row whose LayerNorm a program takes in (it holds whole rows of x)


class TileRowStats(NamedTuple):
    """Row statistics of a skinny_gemm output as its tiles saw them (skinny_gemm(row_stats=True)), for the next
    LayerNorm-folded skinny_gemm (ln_stats=) to merge instead of a layernorm_stats launch."""
    parts: torch.Tensor  # (2, tiles, M) fp32: per output tile and row, the mean and the sum of squared deviations
    columns: int  # output columns per tile (every tile full)


class SkinnyConfig(NamedTuple):
    block_n: int  # output features per program
    k_split: int  # K elements per program (a power of two); SPLIT_K = cdiv(K, k_split)
    num_warps: int


def pick_skinny_config(M: int, N: int, K: int, ln: bool = False) -> SkinnyConfig:
    """From the H200 chain sweep (fp16, GPT-345M's four block GEMMs, M = 8 / 32 / 64; data/bench/
    skinny_gemm_chain.csv), then the decode step (data/bench/skinny_gemm_tiles_step.csv). Up to 16 rows: whole K
    up to 1024 per program (FC2's 4096 split in four), 64 features on 8 warps, but 32 on 4 warps for square
    1024 x 1024 weights; chosen vs best in the chain (us per GEMM, qkv / out / fc1 / fc2) at M = 8: 3.15 / 2.36 /
    3.48 / 4.01 vs 3.15 / 2.36 / 3.48 / 3.90. 17-32 rows: 64 features, 512 of K, 8 warps for every GEMM (the
    chain's per-GEMM bests, mostly whole K, made a slower step: bs32 1.210-1.212 vs 1.119-1.122 ms). 33-64 rows:
    32 features and whole K up to 1024 on one warpgroup (wgmma; wider tiles ran out of shared memory), the best in
    the chain for each GEMM and in the bs64 step (1.745-1.750 ms; five other tiles 1.91-2.15). Its 196 KiB of
    shared memory keep it from starting beside the kernel before; a variant with little shared memory (a pipelined
    loop over K in 64-256 steps, the weight slice prefetched into L2 before the PDL wait instead of loaded) was
    slower in the step: bs64 1.86-2.14 vs 1.76-1.78 ms, bs32 1.49-1.71 vs 1.12 (2026-12-01, rows with five-field
    tiles in data/bench/skinny_gemm_tiles_step.csv; not kept). So was splitting the rows of x over programs (16 or
    32 per program, less to load after the wait): bs64 1.93-2.19 vs 1.78-1.82, bs32 1.18-1.25 vs 1.115 (four-field
    tiles; with the LayerNorms folded, bs64 2.13-2.18 vs that path's 2.43-2.49; not kept).
    ln (a folded LayerNorm: one split of whole rows): at 17-32 rows 32 features on 8 warps, the tile that compiles
    for sm_90 without spilling (64 features spill 352 bytes per thread); in the bs32 step it measured 1.15 ms
    against 1.13 for LayerNorm launches + the plain tile, so the model folds the LayerNorm only up to 16 rows."""
    k_split = max(16, min(triton.next_power_of_2(K), 1024))  # tl.dot takes K tiles of >= 16
    block_m = max(16, triton.next_power_of_2(M))
    if block_m >= 64:
        return SkinnyConfig(32, k_split, 4)
    if block_m == 32:
        return SkinnyConfig(32, k_split, 8) if ln else SkinnyConfig(64, max(16, min(k_split, 512)), 8)
    square = N <= 1024 and K <= 1024
    return SkinnyConfig(32 if square else 64, k_split, 4 if square else 8)


def _config_from_env(N: int, K: int) -> Optional[SkinnyConfig]:
    """FTLAB_SKINNY_TILE_<N>_<K>="block_n,k_split,num_warps": calls without config= of an (N, K) weight use it, else
    FTLAB_SKINNY_TILE: every call without config= (for measuring tiles inside a model's step; read per call)."""
    fields = "block_n,k_split,num_warps"
    values = ints_from_env(f"FTLAB_SKINNY_TILE_{N}_{K}", fields) or ints_from_env("FTLAB_SKINNY_TILE", fields)
    return SkinnyConfig(*values) if values is not None else None


def skinny_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` in `dtype` uses skinny_gemm at all: on a GPU, fp16 / bf16 (FTLAB_SKINNY=0:
    never; read per call)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("FTLAB_SKINNY", "1") != "0")


def skinny_gemm_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_gemm should take this product in a model: skinny_enabled, 1..MAX_M rows."""
    return 1 <= x.shape[0] <= MAX_M and weight.dtype == x.dtype and skinny_enabled(x.device, x.dtype)


_COUNTERS: dict = {}
_OUTGROWN: list = []  # counters replaced by larger ones, kept alive for the graphs that captured them


def _counter(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 counter per output tile that every launch leaves zero again, one per device: calls in one
    stream run one after another (with PDL a kernel touches it only after its wait), so they can share it, and so
    can a CUDA graph's warm-up and its capture, which run on different streams (ftlab.generate.capture_cuda_graph:
    the warm-up on the current stream, the capture on torch's capture stream): the warm-up creates the counter,
    outside the graph. (Keyed by stream, the capture made its own, and the graph then zeroed it on every replay: a
    fill kernel and a lost PDL overlap in each decode step.) Two calls must therefore not run at the same time on
    different streams of one device; ftlab runs its kernels and graphs from one stream (decode attention's
    counters, kept per KV cache, would allow more)."""
    key = str(device)
    counter = _COUNTERS.get(key)
    if counter is None or counter.numel() < tiles:
        if counter is not None:  # a captured graph may hold its address: never free it
            _OUTGROWN.append(counter)
        counter = _COUNTERS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return counter


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                config: Optional[SkinnyConfig] = None, counter: Optional[torch.Tensor] = None,
                ln_row_sums: Optional[torch.Tensor] = None, ln_eps: float = 1e-5,
                ln_stats: Optional[tuple[torch.Tensor, torch.Tensor] | TileRowStats] = None, partials: bool = False,
                row_stats: bool = False) -> torch.Tensor | tuple[torch.Tensor, TileRowStats]:
    """x (M, K) with 1 <= M <= MAX_M, weight (N, K), bias (N,), residual (M, N) -> (M, N) in x.dtype; activation
    None or "gelu" (tanh). fp32 inputs multiply exactly (no TF32). counter: int32, at least cdiv(N, block_n) long,
    zero before the call and left zero after it (default: one shared by the calls on this device).
    ln_row_sums (N,) fp32: x is LayerNorm-ed first, its gain and shift already folded into weight and bias
    (kernels/linear.py fold_layernorm); each program then takes whole rows of K (at most LN_MAX_K) and computes
    their statistics itself, so no LayerNorm launch precedes it. ln_stats (mean, rstd), each (M,) fp32 (kernels/
    layernorm.py layernorm_stats, launched just before): with ln_row_sums, the epilogue takes these statistics
    instead, after any split-K sum, so the config's K split stands and K is not limited.
    partials: return the split-K products unsummed, (SPLIT_K, M, N) fp32 with SPLIT_K = skinny_splits(...), for a
    consumer that sums them in order (kernels/layernorm.py takes them with the residual add): the last-program sum
    and its counter are left out; no bias, activation, residual or LayerNorm then.
    row_stats: also return each output tile's row statistics, (out, TileRowStats), which a next LayerNorm-folded
    call takes as ln_stats= (it merges them beside its load of x: no layernorm_stats launch between the two); the
    config's block_n must divide N."""
    _check_args(x, weight, bias, activation, residual)
    if partials and (bias is not None or activation is not None or residual is not None or ln_row_sums is not None
                     or ln_stats is not None):
        raise ValueError("skinny_gemm(partials=True) returns the bare split-K products: no bias, activation, "
                         "residual, ln_row_sums or ln_stats")
    M, K = x.shape
    N = weight.shape[0]
    whole_rows = ln_row_sums is not None and ln_stats is None  # the kernel takes the LayerNorm's statistics itself
    cfg = config or _config_from_env(N, K) or pick_skinny_config(M, N, K, ln=whole_rows)
    if partials and row_stats:
        raise ValueError("skinny_gemm(partials=True) stores no output, so it has no row_stats")
    tile_stats = ln_stats if isinstance(ln_stats, TileRowStats) else None
    if tile_stats is not None:
        if ln_row_sums is None:
            raise ValueError("ln_stats (TileRowStats) needs ln_row_sums: the LayerNorm folded into weight and bias")
        parts = tile_stats.parts
        if (parts.dim() != 3 or parts.shape[0] != 2 or parts.shape[2] != M or parts.dtype != torch.float32
                or parts.device != x.device or not parts.is_contiguous()
                or parts.shape[1] * tile_stats.columns != K):
            raise ValueError(f"ln_stats TileRowStats must hold contiguous fp32 (2, tiles, {M}) on {x.device} with "
                             f"tiles x columns = K = {K}, got {parts.dtype} {tuple(parts.shape)} x "
                             f"{tile_stats.columns} columns on {parts.device}")
    elif ln_stats is not None:
        if ln_row_sums is None:
            raise ValueError("ln_stats (mean, rstd) needs ln_row_sums: the LayerNorm folded into weight and bias")
        for name, t in zip(("mean", "rstd"), ln_stats):
            if t.shape != (M,) or t.dtype != torch.float32 or t.device != x.device or not t.is_contiguous():
                raise ValueError(f"ln_stats {name} must be contiguous fp32 ({M},) on {x.device}, got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
    if ln_row_sums is not None:
        if K > LN_MAX_K and whole_rows:
            raise ValueError(f"skinny_gemm folds a LayerNorm over at most {LN_MAX_K} features, got K = {K}")
        if (ln_row_sums.shape != (N,) or ln_row_sums.dtype != torch.float32 or ln_row_sums.device != x.device
                or not ln_row_sums.is_contiguous()):
            raise ValueError(f"ln_row_sums must be contiguous fp32 ({N},) on {x.device}, got {ln_row_sums.dtype} "
                             f"{tuple(ln_row_sums.shape)} on {ln_row_sums.device}")
        if whole_rows:  # one split
            cfg = cfg._replace(k_split=max(cfg.k_split, triton.next_power_of_2(K)))
    if cfg.block_n < 16 or cfg.k_split < 16 or cfg.k_split & (cfg.k_split - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"skinny_gemm config {cfg}: block_n and k_split must be powers of two >= 16")
    split_k = triton.cdiv(K, cfg.k_split)
    tiles_n = triton.cdiv(N, cfg.block_n)
    if row_stats and N % cfg.block_n:
        raise ValueError(f"skinny_gemm(row_stats=True) needs block_n ({cfg.block_n}) to divide N ({N})")
    stats_out = torch.empty((2, tiles_n, M), dtype=torch.float32, device=x.device) if row_stats else None
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 or partials else None
    out = part if partials else torch.empty((M, N), dtype=x.dtype, device=x.device)  # partials: never stored to
    part = out if part is None else part
    if N == 0:
        return (out, TileRowStats(stats_out, cfg.block_n)) if row_stats else out
    if counter is not None:
        if counter.dtype != torch.int32 or counter.numel() < tiles_n or counter.device != x.device:
            raise ValueError(f"counter must be int32 on {x.device} with >= {tiles_n} elements, got {counter.dtype} "
                             f"({counter.numel()},) on {counter.device}")
    else:  # only split-K programs that sum count (the kernel never touches it otherwise)
        counter = _counter(x.device, tiles_n) if split_k > 1 and not partials else out
    use_pdl = pdl_for(x.device)
    block_m = max(16, triton.next_power_of_2(M))
    tma = _tma_on(x, weight)
    if tma:
        descs = (TensorDescriptor.from_tensor(x, [block_m, cfg.k_split]),
                 TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.k_split]))
    else:
        descs = (x, weight)  # unused
    _skinny_gemm_kernel[(tiles_n, split_k)](
        x, weight, *descs,
        bias if bias is not None else out, residual if residual is not None else out, out, part, counter,
        ln_row_sums if ln_row_sums is not None else part,
        *(ln_stats if ln_stats is not None and tile_stats is None else (part, part)),
        tile_stats.parts if tile_stats is not None else part, stats_out if stats_out is not None else part,
        M, N, K, x.stride(0), float(ln_eps),
        *((tile_stats.parts.shape[1], tile_stats.columns) if tile_stats is not None else (0, 0)),
        HAS_BIAS=bias is not None, ACT_GELU=activation == "gelu", HAS_RES=residual is not None, USE_PDL=use_pdl,
        IEEE=x.dtype == torch.float32, LN_PREFOLDED=ln_row_sums is not None, STATS_GIVEN=ln_stats is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, K_SPLIT=cfg.k_split, SPLIT_K=split_k, TMA=tma,
        STAT_K=min(cfg.k_split, 128), W_EVICT=eviction_policy_from_env("FTLAB_SKINNY_W_EVICT", "evict_first"),
        PARTIALS_ONLY=partials,
        STATS_TILES=triton.next_power_of_2(tile_stats.parts.shape[1]) if tile_stats is not None else 0,
        ROW_STATS_OUT=row_stats, num_warps=cfg.num_warps, **launch_options(use_pdl),
    )
    return (out, TileRowStats(stats_out, cfg.block_n)) if row_stats else out


def _tma_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x and the weight go through TMA descriptors (one bulk copy each into shared memory, no registers):
    on a GPU with them (sm_90+), fp16 / bf16, rows 16-byte aligned, and TMA_MIN_ROWS-64 rows of x, where it was
    faster. FTLAB_SKINNY_TMA=0 never, =1 at any row count (read per call).

    The pointer loads hold the 64 KB weight slice in registers across the PDL wait (128 per thread at 4 warps), so
    few of x's 128 KB of loads are in flight after it. H200, GPT-345M, M = 64, QKV + out + FC1 chained over 24
    layers with PDL in one CUDA graph (scratch probe, data/bench/skinny_tma_ab.csv): 13.35 -> 11.04 us per layer.
    Decode step at context 512, alternating in one process, three rounds (`ftlab bench --ab-decode`, same CSV):
    bs64 1.445 -> 1.401 ms (on a second machine 1.434 -> 1.395), bs56 1.329 -> 1.295; slower at fewer rows: bs48
    1.247 -> 1.252, bs33 1.039 -> 1.094, bs32 0.965 -> 1.095, bs17 0.756 -> 0.819. Taking the weight and x in
    four K chunks instead (each copy waited for before the next: 15.0 us in the chain) or as (chunks, rows, keys)
    boxes multiplied by a batched dot (20-41 us) was slower. End to end, alternating processes, two rounds: bs64
    512 -> 32 82.43 / 81.99 -> 80.36 / 81.72 ms."""
    setting = os.environ.get("FTLAB_SKINNY_TMA", "")
    if (setting == "0" or TensorDescriptor is None or x.dtype not in (torch.float16, torch.bfloat16)
            or (x.shape[0] < TMA_MIN_ROWS and setting != "1") or not hopper_or_later(x.device)):
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (x, weight))


def skinny_splits(M: int, N: int, K: int) -> int:
    """How many K splits skinny_gemm makes of an (M, K) x (N, K)^T product without config= (FTLAB_SKINNY_TILE
    and FTLAB_SKINNY_TILE_<N>_<K> included): the leading dim of what partials=True returns."""
    cfg = _config_from_env(N, K) or pick_skinny_config(M, N, K)
    return triton.cdiv(K, cfg.k_split)


def _check_args(x, weight, bias, activation, residual) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    M, K = x.shape
    if not 1 <= M <= MAX_M:
        raise ValueError(f"skinny_gemm takes 1..{MAX_M} rows of x, got x {tuple(x.shape)}")
    if weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)} (K = {K})")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a float dtype (fp32/fp16/bf16), got {x.dtype} and {weight.dtype}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x must be contiguous along K (strides {x.stride()}) and weight contiguous")
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    N = weight.shape[0]
    for name, t, shape in (("bias", bias, (N,)), ("residual", residual, (M, N))):
        if t is None:
            continue
        if tuple(t.shape) != shape or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be contiguous {shape} on {x.device}, got {tuple(t.shape)} on {t.device}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")


# ----------------------------------------------------------------------------------------------------------------
# micro-benchmark (`python -m ftlab.kernels.skinny_gemm`): a decode step's block GEMMs, 24 layers of distinct
# weights (streamed from HBM) in one CUDA graph, cuBLAS against this kernel under a few tiles


def _graph_us(fn, reps: int = 20) -> float:
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def _chain_benchmark() -> None:
    import datetime
    import itertools

    from ._bench import save_rows
    from .linear import linear_gelu_cublas

    F = torch.nn.functional
    layers, H, I = 24, 1024, 4096
    dt, dev = torch.float16, "cuda"
    shapes = {"qkv": (3 * H, H), "out": (H, H), "fc1": (I, H), "fc2": (H, I)}
    weights = [{k: torch.randn(n, kk, dtype=dt, device=dev) / kk ** 0.5 for k, (n, kk) in shapes.items()}
               for _ in range(layers)]
    biases = {k: torch.randn(n, dtype=dt, device=dev) for k, (n, _) in shapes.items()}
    counters = torch.zeros(4096, dtype=torch.int32, device=dev)
    info = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, dtype="fp16", layers=layers)
    rows = []
    only_m = [int(m) for m in os.environ.get("SKINNY_M", "8,32,64").split(",")]
    for M in only_m:
        xs = {k: torch.randn(M, kk, dtype=dt, device=dev) for k, (_, kk) in shapes.items()}
        res = torch.randn(M, H, dtype=dt, device=dev)

        def cublas_one(name):
            def run():
                for w in weights:
                    if name == "fc1":
                        linear_gelu_cublas(xs[name], w[name], biases[name])
                    else:
                        F.linear(xs[name], w[name], biases[name])
            return run

        def skinny_one(name, cfg):
            def run():
                for w in weights:
                    skinny_gemm(xs[name], w[name], biases[name], activation="gelu" if name == "fc1" else None,
                                residual=res if name in ("out", "fc2") else None, config=cfg, counter=counters)
            return run

        best = {}
        for name, (N, K) in shapes.items():
            t_cublas = _graph_us(cublas_one(name)) / layers
            rows.append(dict(info, M=M, gemm=name, N=N, K=K, impl="cublas", cfg="", us=round(t_cublas, 3)))
            print(rows[-1], flush=True)
            results = []
            for block_n, k_split, warps in itertools.product((32, 64, 128), (128, 256, 512, 1024), (4, 8)):
                if block_n * k_split > 64 * 1024 or k_split > K or triton.cdiv(N, block_n) * triton.cdiv(K, k_split) < 32:
                    continue
                cfg = SkinnyConfig(block_n, k_split, warps)
                try:
                    t = _graph_us(skinny_one(name, cfg)) / layers
                except Exception as e:  # out of resources etc.
                    print("skip", cfg, type(e).__name__, str(e)[:100], flush=True)
                    continue
                results.append((t, cfg))
                rows.append(dict(info, M=M, gemm=name, N=N, K=K, impl="skinny", cfg=f"{block_n},{k_split},{warps}",
                                 us=round(t, 3)))
            results.sort(key=lambda r: r[0])
            best[name] = results[0][1]
            print(f"M={M} {name}: cublas {t_cublas:.2f} us, skinny best " +
                  ", ".join(f"{t:.2f} {c.block_n},{c.k_split},{c.num_warps}" for t, c in results[:4]), flush=True)

        # a block's four GEMMs chained as in the model (out-proj reads attention-shaped rows, FC2 reads FC1's output)
        def block_chain(skinny: bool):
            def run():
                x = xs["qkv"]
                for w in weights:
                    if skinny:
                        qkv = skinny_gemm(x, w["qkv"], biases["qkv"], config=best["qkv"], counter=counters)
                        h = skinny_gemm(qkv[:, :H], w["out"], biases["out"], residual=x, config=best["out"],
                                        counter=counters)
                        g = skinny_gemm(h, w["fc1"], biases["fc1"], activation="gelu", config=best["fc1"],
                                        counter=counters)
                        x = skinny_gemm(g, w["fc2"], biases["fc2"], residual=h, config=best["fc2"], counter=counters)
                    else:
                        qkv = F.linear(x, w["qkv"], biases["qkv"])
                        h = F.linear(qkv[:, :H], w["out"], biases["out"]) + x
                        g = linear_gelu_cublas(h, w["fc1"], biases["fc1"])
                        x = F.linear(g, w["fc2"], biases["fc2"]) + h
            return run

        for skinny in (False, True, False, True):
            t = _graph_us(block_chain(skinny)) / layers
            rows.append(dict(info, M=M, gemm="block chain", N=0, K=0, impl="skinny" if skinny else "cublas (+2 adds)",
                             cfg=";".join(f"{k}={c.block_n},{c.k_split},{c.num_warps}" for k, c in best.items())
                             if skinny else "", us=round(t, 3)))
            print(rows[-1], flush=True)
        save_rows(rows, "skinny_gemm_chain.csv")  # after each M: a run cut off by a time limit keeps its rows


if __name__ == "__main__":
    _chain_benchmark()
