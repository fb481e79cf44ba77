"""Row-tile GEMV: each program holds a few WHOLE weight rows in registers (decode at batch <= 4).

y = act(LN?(x) @ weight.T + bias) + residual, the same function as kernels/linear.py's gemv (its torch reference,
`linear_reference`, is this kernel's too), for the shapes where one program's share of the weight fits in
registers as whole rows: program p owns output features [p*ROWS, (p+1)*ROWS) and loads their (ROWS, K) tile in one
go, before its PDL wait (kernels/_pdl.py), with its bias and row sums. After the wait it reads each row of x, and
one reduction over K gives the dot products; with the LayerNorm folded into the weight (ln_row_sums, see
linear.fold_layernorm) the same reduction also sums x and x*x (shifted by x[0], so a large mean does not cancel),
and the epilogue normalises: LN(x) . w' = rstd * (x . w' - mean * rowsum(w')).

Why a second GEMV: at batch 1 a decode step is a chain of dependent kernels, and what counts is what each one
still has to do after its wait, and how soon the next one's programs are resident to issue their weight loads.
The chunked gemv (linear.py) splits rows over many small programs (two rows, two K chunks, 2-4 warps); here the
grid is a few programs per SM, and with the LayerNorm fold a single warp per program, so the reduction is warp
shuffles only (no shared memory, no barrier). Measured on the H200 (GPT-345M, fp16, context 512, this file's
picks vs the chunked gemv in the same process, alternating, 2 rounds; data/bench/gemv_rows_ab.csv): decode step
bs1 0.412-0.417 -> 0.376 ms, bs2 0.558-0.562 -> 0.465-0.471, bs4 0.973-0.979 -> 0.770-0.773; generate() bs1
512 -> 32 14.6-14.8 -> 13.2-13.8 ms, bs4 33.5-33.8 -> 27.2-27.9; the 50257-row LM head alone at M = 1 32.3 ->
24.3 us (its 103 MB at ~4.3 TB/s: ~24 us). The picks then (rows, warps): QKV (4, 1), out-proj (2, 4), FC1 (4, 1),
FC2 (2, 8). A model-level search (decode step, one slot at a time) found QKV (8, 1) and out-proj (4, 4) as good
(0.374-0.381 ms) and 2 warps with the LN fold 3-8 % worse; in a chain of the block's GEMVs alone (no attention
between them) other picks won and the gains were different: tune in the model, not in the chain.
At M = 1 with the fold a warp holds up to 512 bytes per thread (8 rows of 1024 fp16): `bash .ci/gpu-check
gemv-rows-search` found QKV and FC1 at (8, 1) (0.384-0.389 -> 0.362-0.367 ms, data/bench/gemv_rows_search.csv),
and alternating in one process (data/bench/gemv_rows_m1_ab.csv) the bs1 step went 0.377-0.388 -> 0.366-0.372 ms
with QKV and FC1 at 8 rows, 0.364-0.374 with the LM head at 8 rows too; at M = 4 the same tiles were 13 % slower
(0.730-0.737 -> 0.831-0.843), so M > 1 keeps 256 bytes.
Session 24 (data/bench/gemv_rows_one_row_ab.csv): the GEMVs without the fold had been searched only at 2-16 warps.
One row per program with a warp per 1024 of K (out-projection (1, 1), FC2 (1, 4): 1024 programs, 32 elements per
thread) against (2, 4) and (2, 8), the bs1 step alternating in one process: 353.7-354.6 -> 344.4-344.8 us on one
machine, 358.4-359.8 -> 347.4-349.7 and 353.9-355.1 -> 343.7-345.2 in two processes on another; bs2 512.6-519.7 ->
499.9-504.6, bs4 815.0-823.0 -> 800.9-807.0. Neither change alone gained more than ~4 us; their neighbours (FC2
(2, 8), (1, 2), (1, 8), out (1, 2), (2, 1), QKV or FC1 at 2-4 rows) were slower. `ftlab bench` in alternating
processes: decode step 0.354-0.355 -> 0.342-0.345 ms on both machines. But once a process has run generate(), the
step measures 359-364 us with these tiles and 360-367 with the old ones, also inside generate()'s own calls
(data/bench/decode_step_state_probe.csv). Session 25 found the cause outside this kernel: graph captures warmed up on a
side stream (ftlab/generate.py capture_cuda_graph; data/bench/capture_warmup_state.csv).

Tried (2026-12-02, scratch code): FC1 and FC2 in one launch at M = 1, each program taking R of the hidden
features and adding its share of FC2 into a per-layer accumulator with atomics (no grid barrier): chained over 24
layers 7.9-12.8 us per layer (fp32 atomics, R 8-32, 1-8 warps) or 11.4-25.6 (int64, deterministic) against 6.04
for these two launches (data/bench/fused_mlp_chain.csv): the 128-512 atomic adds per output cost more than a launch.

Not for: rows too long to hold one in registers (K * element size > 16 warps x 256 bytes per thread), and grids
too small to give every SM a program (then the chunked gemv splits K). `pick_gemv_rows_config` returns None there,
and linear() falls back. FTLAB_GEMV_ROWS=0 turns this path off, FTLAB_GEMV_ROWS_TILE forces (rows, warps) for
given weight shapes (both read per call, for comparing).
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._env import is_pow2
from ._pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_for
from ._shared import add3, bias_act_residual, shifted_ln_stats

# weight bytes each thread holds (128 fp16 = 64 registers): the measured picks above sit at or below it; twice that
# for one row of x with the LayerNorm fold (one warp: see the module docstring)
_THREAD_TILE_BYTES = 256
_MAX_ROWS = 8
_MAX_WARPS = 16
MAX_M = 4  # rows of x per program (each reuses the weight tile in registers)
# without the LayerNorm fold, up to this many programs per SM: one weight row each, 32 elements per thread
_ONE_ROW_MAX_PER_SM = 8
_ONE_ROW_ELEMENTS_PER_THREAD = 32


@triton.jit
def _gemv_rows_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, row_sums_ptr, out_ptr,
    M, N, K, ln_eps,
    HAS_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, HAS_RES: tl.constexpr, LN_PREFOLDED: tl.constexpr,
    USE_PDL: tl.constexpr, COMBINED_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n_ok = offs_n < N
    w_rows = tl.minimum(offs_n, N - 1)  # tail features clamped onto the last one; their results are not stored
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if USE_PDL:
        gdc_launch_dependents()
    # everything that no kernel of the chain writes goes out before the wait
    w = tl.load(w_ptr + w_rows.to(tl.int64)[:, None] * K + offs_k[None, :], mask=k_ok[None, :], other=0.0,
                eviction_policy="evict_first")  # (ROWS, BLOCK_K)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + w_rows).to(tl.float32)
    if LN_PREFOLDED:
        row_sums = tl.load(row_sums_ptr + w_rows)  # (ROWS,) fp32
    if USE_PDL:
        gdc_wait()  # x, the residual and out belong to the kernel chain
    for m in tl.static_range(BLOCK_M):
        row = tl.program_id(1) * BLOCK_M + m
        x_row = x_ptr + tl.minimum(row, M - 1).to(tl.int64) * K
        x = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
        res = 0.0
        if HAS_RES:
            res = tl.load(res_ptr + tl.minimum(row, M - 1).to(tl.int64) * N + w_rows).to(tl.float32)
        if LN_PREFOLDED:
            d = tl.where(k_ok, x - tl.load(x_row).to(tl.float32), 0.0)[None, :]  # x - x[0]
            prod = d * w.to(tl.float32)  # (ROWS, BLOCK_K)
            d_b = tl.broadcast_to(d, prod.shape)
            if COMBINED_REDUCE:  # one pass of shuffles for all three sums
                dot, s1, s2 = tl.reduce((prod, d_b, d_b * d_b), 1, add3)
            else:  # the interpreter runs a tuple reduce element by element in Python: three plain sums
                dot, s1, s2 = tl.sum(prod, axis=1), tl.sum(d_b, axis=1), tl.sum(d_b * d_b, axis=1)
            shift, rstd = shifted_ln_stats(s1, s2, K, ln_eps)  # shift = mean - x[0]
            acc = rstd * (dot - shift * row_sums)
        else:
            acc = tl.sum(x[None, :] * w.to(tl.float32), axis=1)  # (ROWS,)
        acc = bias_act_residual(acc, bias, res, ACT_GELU, HAS_BIAS, HAS_RES)
        tl.store(out_ptr + row.to(tl.int64) * N + offs_n, acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok & (offs_n * 0 + row < M))


class GemvRowsConfig(NamedTuple):
    block_m: int  # rows of x per program
    rows: int  # weight rows (output features) per program
    num_warps: int
    block_k: int  # K padded to a power of two: the whole row


def gemv_rows_on() -> bool:
    return os.environ.get("FTLAB_GEMV_ROWS", "1") != "0"


def _tiles_from_env() -> dict:
    """FTLAB_GEMV_ROWS_TILE="N,K,rows,warps;..." overrides the pick for weights of those shapes (for tuning inside a
    running model, `bash .ci/gpu-check gemv-rows-search`; read per call)."""
    text = os.environ.get("FTLAB_GEMV_ROWS_TILE", "")
    tiles = {}
    for entry in filter(None, text.split(";")):
        try:
            N, K, rows, warps = (int(v) for v in entry.split(","))
        except ValueError:
            raise ValueError(f"FTLAB_GEMV_ROWS_TILE entry {entry!r}: expected four integers N,K,rows,warps") from None
        if not (is_pow2(rows) and is_pow2(warps) and warps <= _MAX_WARPS):
            raise ValueError(f"FTLAB_GEMV_ROWS_TILE entry {entry!r}: rows and warps must be powers of two, warps <= "
                             f"{_MAX_WARPS}")
        tiles[(N, K)] = (rows, warps)
    return tiles


def pick_gemv_rows_config(M: int, N: int, K: int, dtype: torch.dtype, has_ln: bool,
                          num_sms: int) -> Optional[GemvRowsConfig]:
    """(rows, warps) from the shapes (module docstring), or None where this kernel does not apply.

    Without the LayerNorm fold, while one program per row makes at most _ONE_ROW_MAX_PER_SM per SM (GPT-345M's
    out-projection and FC2, N = 1024): one row per program, a warp per 1024 elements of it. Otherwise, with the fold
    one warp (shuffle-only reductions) unless a row needs more threads to stay within _THREAD_TILE_BYTES per thread;
    without it 4-8 warps (K / 512). Then the most rows (up to 8) that keep the per-thread budget (doubled for one
    row of x with the fold) and still give the grid two programs per SM."""
    block_k = triton.next_power_of_2(K)
    block_m = min(triton.next_power_of_2(M), MAX_M)
    forced = _tiles_from_env().get((N, K))
    if forced is not None:
        return GemvRowsConfig(block_m, forced[0], forced[1], block_k)
    row_bytes = block_k * torch.finfo(dtype).bits // 8
    if not has_ln and num_sms <= N <= _ONE_ROW_MAX_PER_SM * num_sms:
        warps = triton.next_power_of_2(triton.cdiv(block_k, 32 * _ONE_ROW_ELEMENTS_PER_THREAD))
        if warps <= _MAX_WARPS:  # one row per program, 32 of its elements per thread (docstring)
            return GemvRowsConfig(block_m, 1, warps, block_k)
    warps = 1 if has_ln else max(4, min(8, K // 512))
    warps = max(warps, triton.next_power_of_2(triton.cdiv(row_bytes, 32 * _THREAD_TILE_BYTES)))
    if warps > _MAX_WARPS:
        return None
    budget = _THREAD_TILE_BYTES * (2 if has_ln and block_m == 1 else 1)
    rows = _MAX_ROWS
    while rows > 1 and (rows * row_bytes > 32 * warps * budget or triton.cdiv(N, rows) < 2 * num_sms):
        rows //= 2
    if triton.cdiv(N, rows) < num_sms:
        return None
    return GemvRowsConfig(block_m, rows, warps, block_k)


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
              ln_row_sums: Optional[torch.Tensor], ln_eps: float, act_gelu: bool, cfg: GemvRowsConfig) -> torch.Tensor:
    """The launch (arguments checked by linear()): ln_row_sums given means weight/bias carry a folded LayerNorm."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    use_pdl = pdl_for(x.device)
    _gemv_rows_kernel[(triton.cdiv(N, cfg.rows), triton.cdiv(M, cfg.block_m))](
        x, weight, bias if bias is not None else out, residual if residual is not None else out,
        ln_row_sums if ln_row_sums is not None else out, out, M, N, K, float(ln_eps),
        HAS_BIAS=bias is not None, ACT_GELU=act_gelu, HAS_RES=residual is not None,
        LN_PREFOLDED=ln_row_sums is not None, USE_PDL=use_pdl, COMBINED_REDUCE=x.is_cuda,
        BLOCK_M=cfg.block_m, ROWS=cfg.rows, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **launch_options(use_pdl),
    )
    return out
