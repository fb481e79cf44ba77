"""LayerNorm over the last dim of a (M, N) tensor, optionally fused with the residual add that precedes it.

    layernorm(x, w, b, eps)               -> y = (x - mean) * rstd * w + b
    layernorm(x, w, b, eps, residual=r)   -> (y, s) with s = x + r and y = LN(s), one pass over memory
    layernorm(x, w, b, eps, residual=r, x_bias=c) -> the same with s = x + c + r (c (N,): the bias of the GEMM
                                             that made x, so a cuBLAS GEMM without epilogue can precede it)
    layernorm(x, w, b, eps, x_bias=c)     -> LN(x + c), x + c not stored (c: biases a residual stream kept
                                             without them has yet to add, see ftlab/model.py's prefill blocks)
    layernorm(p, w, b, eps, residual=r, x_bias=c) with p (S, M, N) fp32: x = p[0] + ... + p[S-1], the split-K
                                             products of kernels/skinny_gemm.py's partials=True summed here in
                                             order (that GEMM then needs no last-program sum); y, s in r's dtype
    layernorm_stats(x, eps)               -> (mean, rstd) per row in fp32, for a GEMM that normalises in its
                                             epilogue (kernels/skinny_gemm.py ln_stats=)

Statistics are computed in fp32; y and s are stored in x.dtype. With a residual, s is summed in fp32 and rounded to
x.dtype first, and LN is applied to that rounded value: the normalised output then agrees exactly with what a later
layer reads back from s. weight/bias may be fp32 while x is fp16/bf16.

Each program owns BLOCK_M rows. When a row fits in one block (N <= max_block_n) it is held in registers and the
variance is taken as the mean of squared deviations from the mean (two-pass, in registers). Wider rows are read
twice: once to build the statistics chunk by chunk (per-chunk mean and squared deviations, merged with Chan's
formula so no large sum-of-squares cancels), once to normalise and store.
"""
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ._env import ints_from_env, is_pow2
from ._pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_for
from ._shared import chan_merge

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# widest row held in registers in one block; wider rows take the chunked path
_MAX_BLOCK_N = 16384
# a program handles several short rows at once so that tiny N does not launch one program per row
_ROW_ELEMS_PER_PROGRAM = 2048
_MAX_ROWS_PER_PROGRAM = 16


@triton.jit
def _load_row_block(x_ptr, res_ptr, xb_ptr, s_ptr, offs, cols, mask, n_mask,
                    HAS_RES: tl.constexpr, HAS_XB: tl.constexpr, STORE_SUM: tl.constexpr,
                    NUM_PARTS: tl.constexpr, part_stride):
    # returns the LN input in fp32; with a residual that is x (+ x_bias) + r rounded to s's dtype (optionally
    # stored to s). offs (BLOCK_M, BLOCK_N) element offsets, cols (BLOCK_N,) their columns. NUM_PARTS > 0: x is
    # that many fp32 (M, N) slices part_stride apart, summed in order
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for part in tl.static_range(1, NUM_PARTS):
        x += tl.load(x_ptr + part * part_stride + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        v = x.to(tl.float32) + r.to(tl.float32)
        if HAS_XB:
            v += tl.load(xb_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        s = v.to(s_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(s_ptr + offs, s, mask=mask)
        return s.to(tl.float32)
    elif HAS_XB:  # LN(x + x_bias), the sum in fp32 and never stored
        return x.to(tl.float32) + tl.load(xb_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    else:
        return x.to(tl.float32)


@triton.jit
def _layernorm_kernel(
    x_ptr, res_ptr, xb_ptr, w_ptr, b_ptr, y_ptr, s_ptr,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_XB: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_PARTS: tl.constexpr = 0, part_stride=0,  # x as split-K slices (see _load_row_block)
):
    # with PDL (kernels/_pdl.py) the next kernel may start loading its weights while this one runs; x and the
    # residual come from the previous kernel, so nothing is read before the wait
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row_offs = offs_m.to(tl.int64)[:, None] * N  # (BLOCK_M, 1)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        n_mask = cols < N
        mask = m_mask[:, None] & n_mask[None, :]
        offs = row_offs + cols[None, :]
        v = _load_row_block(x_ptr, res_ptr, xb_ptr, s_ptr, offs, cols, mask, n_mask, HAS_RES, HAS_XB,
                            True, NUM_PARTS, part_stride)  # (BLOCK_M, BLOCK_N)
        mean = tl.sum(v, axis=1) / N
        dev = tl.where(mask, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        y = dev * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: running (count, mean, sum of squared deviations) per row, merged chunk by chunk
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_mask = (n0 + cols) < N
            mask = m_mask[:, None] & n_mask[None, :]
            v = _load_row_block(x_ptr, res_ptr, xb_ptr, s_ptr, row_offs + n0 + cols[None, :], n0 + cols, mask,
                                n_mask, HAS_RES, HAS_XB, True, NUM_PARTS, part_stride)
            mean, m2 = chan_merge(mean, m2, v, n_mask, n0)  # rows past M: never stored
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # pass 2: normalise; the sum is recomputed from x and r (not read back from s) so nothing depends on
        # this program's own stores becoming visible
        for n0 in range(0, N, BLOCK_N):
            n_mask = (n0 + cols) < N
            mask = m_mask[:, None] & n_mask[None, :]
            offs = row_offs + n0 + cols[None, :]
            v = _load_row_block(x_ptr, res_ptr, xb_ptr, s_ptr, offs, n0 + cols, mask, n_mask, HAS_RES, HAS_XB,
                                False, NUM_PARTS, part_stride)
            w = tl.load(w_ptr + n0 + cols, mask=n_mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + n0 + cols, mask=n_mask, other=0.0).to(tl.float32)
            y = (v - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_stats_kernel(x_ptr, mean_ptr, rstd_ptr, M, N, eps,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    # a LayerNorm's statistics only (mean, rstd in fp32 per row), for a GEMM that applies them in its epilogue
    # (kernels/skinny_gemm.py ln_stats=); x comes from the previous kernel, so nothing is read before the wait
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row_offs = offs_m.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    # running (mean, sum of squared deviations) per row, merged chunk by chunk: with one chunk (N <= BLOCK_N) the
    # two-pass mean of squared deviations; rows past M are never stored
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + cols) < N
        v = tl.load(x_ptr + row_offs + n0 + cols[None, :], mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0).to(tl.float32)
        mean, m2 = chan_merge(mean, m2, v, n_mask, n0)
    tl.store(mean_ptr + offs_m, mean, mask=m_mask)
    tl.store(rstd_ptr + offs_m, 1.0 / tl.sqrt(m2 / N + eps), mask=m_mask)


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, N], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def _check_affine(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    N = x.shape[1]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name} dtype {t.dtype} must be x's dtype {x.dtype} or fp32")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _pick_blocks(N: int, max_block_n: int) -> Tuple[int, int, int, bool]:
    block_n = triton.next_power_of_2(N)
    single = block_n <= max_block_n
    if not single:
        block_n = max_block_n
    block_m = max(1, min(_MAX_ROWS_PER_PROGRAM, _ROW_ELEMS_PER_PROGRAM // block_n)) if single else 1
    return block_m, block_n, _warps_for(block_m * block_n), single


def _warps_for(elements: int) -> int:
    # about 16 fp32 values per thread when a program's rows fit one block
    return max(1, min(16, elements // 512))


def _rows_from_env(block_m: int, num_warps: int, single: bool) -> Tuple[int, int]:
    """FTLAB_LN_TILE="block_m,num_warps" (powers of two) replaces the picked rows per program and warps of a
    LayerNorm whose rows fit one block (for measuring them inside a model's step; read per call)."""
    values = ints_from_env("FTLAB_LN_TILE", "block_m,num_warps")
    if values is None or not single:
        return block_m, num_warps
    if not all(is_pow2(v) for v in values):
        raise ValueError(f"FTLAB_LN_TILE={values}: block_m and num_warps must be powers of two")
    return values


def _layernorm_launch(x, weight, bias, eps, residual, max_block_n, x_bias=None):
    num_parts = x.shape[0] if x.dim() == 3 else 0  # split-K slices (residual given)
    M, N = x.shape[-2:]
    y = torch.empty((M, N), dtype=residual.dtype if num_parts else x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if M > 0 and N > 0:
        block_m, block_n, num_warps, single = _pick_blocks(N, max_block_n)
        block_m, num_warps = _rows_from_env(block_m, num_warps, single)
        grid = (triton.cdiv(M, block_m),)
        use_pdl = pdl_for(x.device)
        _layernorm_kernel[grid](
            x, residual if residual is not None else x, x_bias if x_bias is not None else weight, weight, bias, y,
            s if s is not None else y, M, N, float(eps),
            HAS_RES=residual is not None, HAS_XB=x_bias is not None, SINGLE_BLOCK=single,
            BLOCK_M=block_m, BLOCK_N=block_n, USE_PDL=use_pdl, NUM_PARTS=num_parts, part_stride=M * N,
            num_warps=num_warps, **launch_options(use_pdl),
        )
    return y if residual is None else (y, s)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
              residual: Optional[torch.Tensor] = None, x_bias: Optional[torch.Tensor] = None
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """x (M, N) -> LN(x) (M, N); with residual (M, N): (LN(s), s) for s = x + residual, or x + x_bias + residual
    with x_bias (N,); with x_bias alone LN(x + x_bias). x may also be (S, M, N) fp32 split-K products (module
    docstring): then residual is required, and y and s take its dtype."""
    parts = isinstance(x, torch.Tensor) and x.dim() == 3
    if parts:
        if x.dtype != torch.float32 or not x.is_contiguous() or x.shape[0] < 1:
            raise ValueError(f"x as split-K products must be contiguous fp32 (S >= 1, M, N), got {x.dtype} "
                             f"{tuple(x.shape)} (contiguous: {x.is_contiguous()})")
        if residual is None:
            raise ValueError("x as split-K products (S, M, N) needs the residual their sum is added to")
    else:
        _check_2d("x", x)
    if residual is not None:
        _check_2d("residual", residual)
        if residual.shape != x.shape[-2:]:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
                             + (" without its leading split dim" if parts else ""))
        if residual.dtype != x.dtype and not parts:
            raise ValueError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    rows = residual if parts else x  # (M, N) in the output dtype: what the affine checks compare with
    _check_affine("weight", weight, rows)
    _check_affine("bias", bias, rows)
    if x_bias is not None:
        _check_affine("x_bias", x_bias, rows)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _layernorm_launch(x, weight, bias, eps, residual, _MAX_BLOCK_N, x_bias)


def layernorm_stats(x: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) -> (mean, rstd), each (M,) fp32: LN(x) = (x - mean) * rstd * w + b without the normalised rows, for
    a GEMM that takes the LayerNorm into its epilogue (its gain and shift folded into the weight, see
    kernels/linear.py fold_layernorm). One program per row up to 128 rows (decode batches: the whole row in
    registers of a 1-2 warp program), in the PDL chain like layernorm()."""
    _check_2d("x", x)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _stats_launch(x, eps, _MAX_BLOCK_N)


def _stats_launch(x, eps, max_block_n):
    M, N = x.shape
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0 and N > 0:
        block_m, block_n, num_warps, _ = _pick_blocks(N, max_block_n)
        if M <= 128:  # one row per program: decode batches get a program per row
            block_m, num_warps = 1, _warps_for(block_n)
        use_pdl = pdl_for(x.device)
        _layernorm_stats_kernel[(triton.cdiv(M, block_m),)](
            x, mean, rstd, M, N, float(eps), BLOCK_M=block_m, BLOCK_N=block_n, USE_PDL=use_pdl,
            num_warps=num_warps, **launch_options(use_pdl))
    return mean, rstd


def layernorm_stats_reference(x: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (mean, 1 / sqrt(var + eps)) over the last dim in fp64, returned as fp32."""
    xd = x.double()
    mean = xd.mean(dim=-1)
    var = (xd - mean[:, None]).pow(2).mean(dim=-1)
    return mean.float(), torch.rsqrt(var + eps).float()


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                        residual: Optional[torch.Tensor] = None, x_bias: Optional[torch.Tensor] = None):
    """Plain torch: statistics in fp32 (fp64 when x is fp64), output in x.dtype; x (S, M, N) of split-K products
    (with a residual): their sum in order, output in the residual's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if residual is not None:
        if x.dim() == 3:  # split-K products, added one after the other as the kernel does
            s, out_dtype = x[0].to(compute), residual.dtype
            for part in x[1:]:
                s = s + part.to(compute)
        else:
            s, out_dtype = x.to(compute), x.dtype
        s = s + residual.to(compute)
        if x_bias is not None:
            s = s + x_bias.to(compute)
        s = s.to(out_dtype)
        return layernorm_reference(s, weight, bias, eps), s
    xc = x.to(compute) if x_bias is None else x.to(compute) + x_bias.to(compute)
    mean = xc.mean(dim=-1, keepdim=True)
    var = (xc - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps) * weight.to(compute) + bias.to(compute)
    return y.to(x.dtype)


def _benchmark() -> None:
    from ._bench import save_rows

    import torch.nn.functional as F
    from triton.testing import do_bench

    rows = []
    print(f"{'M':>6} {'N':>6} {'dtype':>6} {'res':>4} {'triton us':>10} {'torch us':>9} {'GB/s':>8} {'speedup':>8}")
    for dtype in (torch.float16, torch.bfloat16):
        for N in (1024, 2048, 4096):
            for M in (1, 64, 4096, 16384):
                x = torch.randn(M, N, device="cuda", dtype=dtype)
                r = torch.randn(M, N, device="cuda", dtype=dtype)
                w = torch.randn(N, device="cuda", dtype=dtype)
                b = torch.randn(N, device="cuda", dtype=dtype)
                for with_res in (False, True):
                    if with_res:
                        t_tri = do_bench(lambda: layernorm(x, w, b, 1e-5, residual=r)) * 1e3

                        def torch_fn():
                            s = x + r
                            return F.layer_norm(s, (N,), w, b, 1e-5), s
                        t_ref = do_bench(torch_fn) * 1e3
                        moved = 4 * M * N * x.element_size()
                    else:
                        t_tri = do_bench(lambda: layernorm(x, w, b, 1e-5)) * 1e3
                        t_ref = do_bench(lambda: F.layer_norm(x, (N,), w, b, 1e-5)) * 1e3
                        moved = 2 * M * N * x.element_size()
                    gbps = moved / (t_tri * 1e-6) / 1e9
                    dname = str(dtype)[6:]
                    print(f"{M:>6} {N:>6} {dname:>6} {int(with_res):>4} {t_tri:>10.2f} {t_ref:>9.2f} {gbps:>8.0f} "
                          f"{t_ref / t_tri:>8.2f}")
                    rows.append(dict(M=M, N=N, dtype=dname, residual=int(with_res), triton_us=t_tri,
                                     torch_us=t_ref, gbps=gbps))
    save_rows(rows, "layernorm_bench.csv")


if __name__ == "__main__":
    _benchmark()
