import pytest
import torch
import triton

from ftlab.kernels.gemv_rows import GemvRowsConfig, gemv_rows, pick_gemv_rows_config
from ftlab.kernels.linear import fold_layernorm, linear, linear_reference
from tests.util import DTYPES, REL_TOL, assert_rel_close

# (M, N, K, rows, warps, block_m): rows not dividing N, K not a power of two, more rows of x than a program takes
CASES = [(1, 1, 7, 1, 1, 1), (1, 13, 1023, 4, 1, 1), (3, 7, 64, 8, 4, 4), (4, 33, 100, 2, 2, 4),
         (2, 1023, 13, 8, 1, 2), (7, 9, 40, 4, 1, 2), (1, 50, 4096, 2, 8, 1),
         (1, 21, 1024, 8, 1, 1),  # the M = 1 pick with the LN fold at K = 1024: 8 whole rows in one warp
         (1, 37, 4096, 1, 4, 1), (2, 29, 1000, 1, 1, 2)]  # the picks without it: one row, a warp per 1024


def _inputs(M, N, K, dtype, device, offset=0.5):
    x = (torch.randn(M, K) * 2 + offset).to(dtype=dtype, device=device)
    weight = (torch.randn(N, K) / K ** 0.5).to(dtype=dtype, device=device)
    bias = torch.randn(N).to(dtype=dtype, device=device)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    return x, weight, bias, residual


def _reference64(x, weight, **kwargs):
    return linear_reference(x.double(), weight.double(),
                            **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("features", ["bias", "bias+gelu+residual", "none"])
def test_gemv_rows_matches_reference(features, case, dtype_name, device):
    M, N, K, rows, warps, block_m = CASES[case]
    dtype = DTYPES[dtype_name]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device)
    bias = bias if "bias" in features else None
    residual = residual if "residual" in features else None
    gelu = "gelu" in features
    cfg = GemvRowsConfig(block_m, rows, warps, triton.next_power_of_2(K))
    out = gemv_rows(x, weight, bias, residual, None, 1e-5, gelu, cfg)
    ref = _reference64(x, weight, bias=bias, residual=residual, activation="gelu" if gelu else None)
    assert_rel_close(out, ref, dtype, what=f"{features} M={M} N={N} K={K} rows={rows}")


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_gemv_rows_with_folded_layernorm(offset, case, dtype_name, device):
    # LN folded into weight and bias, row sums given: the kernel takes x's statistics in the same reduction as
    # the dot products, shifted by x[0] (offset 300: |mean| >> std, where plain sums would cancel in fp32)
    M, N, K, rows, warps, block_m = CASES[case]
    if K < 2:
        pytest.skip("a LayerNorm over one element is constant")
    dtype = DTYPES[dtype_name]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device, offset)
    ln_w = (1 + 0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    ln_b = (0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, ln_w, ln_b)
    cfg = GemvRowsConfig(block_m, rows, warps, triton.next_power_of_2(K))
    out = gemv_rows(x, folded, folded_bias, residual, row_sums, 1e-5, True, cfg)
    ref = _reference64(x, weight, bias=bias, residual=residual, activation="gelu", ln_weight=ln_w, ln_bias=ln_b)
    # folding rounds W * g and c + W @ b once in the dtype (as in test_linear's prefolded test)
    tol = REL_TOL[dtype] * (2 if dtype != torch.float32 else 10)
    assert_rel_close(out, ref, tol=tol, what=f"M={M} N={N} K={K} offset={offset}")


def test_rows_of_x_are_independent_and_repeatable(device):
    M, N, K = 4, 40, 96
    x, weight, bias, _ = _inputs(M, N, K, torch.float16, device)
    cfg = GemvRowsConfig(2, 8, 1, 128)
    first = gemv_rows(x, weight, bias, None, None, 1e-5, True, cfg)
    other = x.clone()
    other[1:] = (torch.randn(M - 1, K) * 10).to(dtype=x.dtype, device=device)
    changed = gemv_rows(other, weight, bias, None, None, 1e-5, True, cfg)
    assert torch.equal(first, gemv_rows(x, weight, bias, None, None, 1e-5, True, cfg))
    assert torch.equal(first[0], changed[0])
    assert not torch.equal(first[1:], changed[1:])


def test_pick_config_on_gpt345m_shapes():
    # the H200 measurements in the module docstring: with the LN fold one warp and up to 8 rows (two programs per
    # SM); without it one row per program and a warp per 1024 of K while N is at most 8 programs per SM
    pick = lambda N, K, ln, M=1: pick_gemv_rows_config(M, N, K, torch.float16, ln, 132)  # noqa: E731
    assert pick(3072, 1024, True) == GemvRowsConfig(1, 8, 1, 1024)  # QKV
    assert pick(1024, 1024, False) == GemvRowsConfig(1, 1, 1, 1024)  # attention out-proj
    assert pick(4096, 1024, True) == GemvRowsConfig(1, 8, 1, 1024)  # FC1
    assert pick(1024, 4096, False) == GemvRowsConfig(1, 1, 4, 4096)  # FC2
    assert pick(50257, 1024, True) == GemvRowsConfig(1, 8, 1, 1024)  # LM head
    assert pick(1024, 4096, False, M=4) == GemvRowsConfig(4, 1, 4, 4096)  # measured at bs2 and bs4 too
    assert pick(2048, 8192, False) == GemvRowsConfig(1, 4, 8, 8192)  # above 8 per SM: rows and 4-8 warps
    # more rows of x keep 256 bytes per thread (8 rows at M = 4 measured 13 % slower)
    assert pick(3072, 1024, True, M=2) == GemvRowsConfig(2, 4, 1, 1024)
    assert pick(4096, 1024, True, M=4) == GemvRowsConfig(4, 4, 1, 1024)
    assert pick_gemv_rows_config(3, 4096, 1024, torch.float16, True, 132).block_m == 4
    # a whole row must fit 16 warps x 256 bytes per thread; the grid must give every SM a program
    assert pick_gemv_rows_config(1, 4096, 100_000, torch.float16, False, 132) is None
    assert pick_gemv_rows_config(1, 100, 1024, torch.float16, False, 132) is None
    # longer rows take more warps rather than spilling: every pick keeps <= 256 bytes of weight per thread (512 for
    # one row of x with the fold)
    for N, K, ln in [(6144, 2048, True), (2048, 8192, False), (12288, 4096, True), (1024, 1024, False)]:
        for M in (1, 2):
            cfg = pick_gemv_rows_config(M, N, K, torch.float32, ln, 132)
            budget = 512 if ln and M == 1 else 256
            assert cfg.rows * cfg.block_k * 4 <= 32 * cfg.num_warps * budget, (N, K, M, cfg)


def test_tile_override_from_env(monkeypatch):
    monkeypatch.setenv("FTLAB_GEMV_ROWS_TILE", "3072,1024,2,1;1024,4096,4,16")
    assert pick_gemv_rows_config(1, 3072, 1024, torch.float16, True, 132) == GemvRowsConfig(1, 2, 1, 1024)
    assert pick_gemv_rows_config(2, 1024, 4096, torch.float16, False, 132) == GemvRowsConfig(2, 4, 16, 4096)
    assert pick_gemv_rows_config(1, 4096, 1024, torch.float16, True, 132) == GemvRowsConfig(1, 8, 1, 1024)  # not listed
    for bad in ("3072,1024,8", "3072,1024,6,1", "3072,1024,8,32", "a,b,c,d"):
        monkeypatch.setenv("FTLAB_GEMV_ROWS_TILE", bad)
        with pytest.raises(ValueError, match="FTLAB_GEMV_ROWS_TILE"):
            pick_gemv_rows_config(1, 3072, 1024, torch.float16, True, 132)


@pytest.mark.gpu
def test_linear_dispatches_to_rows_on_the_gpu(monkeypatch):
    # impl="gemv" on a GPU takes this kernel where its config applies; FTLAB_GEMV_ROWS=0 keeps the chunked one
    from ftlab.kernels import gemv_rows as module

    calls = []
    real = module.gemv_rows
    monkeypatch.setattr("ftlab.kernels.linear.gemv_rows", lambda *a: calls.append(a) or real(*a))
    x, weight, bias, residual = _inputs(1, 2048, 1024, torch.float16, "cuda")
    ref = _reference64(x, weight, bias=bias, residual=residual)
    assert_rel_close(linear(x, weight, bias, residual=residual), ref, torch.float16)
    assert len(calls) == 1
    monkeypatch.setenv("FTLAB_GEMV_ROWS", "0")
    assert_rel_close(linear(x, weight, bias, residual=residual), ref, torch.float16)
    assert len(calls) == 1
