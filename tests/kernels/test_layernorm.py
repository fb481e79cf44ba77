import pytest
import torch
import torch.nn.functional as F

from ftlab.kernels import layernorm as layernorm_module
from ftlab.kernels.layernorm import layernorm, layernorm_reference, layernorm_stats, layernorm_stats_reference
from tests.util import DTYPES, REL_TOL, assert_rel_close


def _inputs(M, N, dtype, device, fp32_params=False, offset=0.5):
    param_dtype = torch.float32 if fp32_params else dtype
    x = (torch.randn(M, N) * 2 + offset).to(dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(N)).to(dtype=param_dtype, device=device)
    bias = (0.5 * torch.randn(N)).to(dtype=param_dtype, device=device)
    return x, weight, bias


def _assert_sum_equal(s, s_ref, device):
    # the sum is one fp32 add rounded to x.dtype: bit-exact, except that the interpreter converts fp32 -> bf16 by
    # truncation (the GPU rounds to nearest), so there it may differ by one bf16 ulp
    if s.dtype == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(s.float(), s_ref.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(s, s_ref)


def _ref64(x, weight, bias, eps, residual=None, x_bias=None):
    # statistics and affine in fp64; with a residual the LN input is the sum rounded to x.dtype, as documented
    if residual is not None:
        s = x.float() + residual.float() + (x_bias.float() if x_bias is not None else 0.0)
        s = s.to(x.dtype)
        return _ref64(s, weight, bias, eps), s
    return layernorm_reference(x.double(), weight.double(), bias.double(), eps)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("N", [1, 7, 100, 1000, 1024])
@pytest.mark.parametrize("M", [1, 13])
def test_layernorm_matches_reference(M, N, dtype_name, device):
    dtype = DTYPES[dtype_name]
    x, weight, bias = _inputs(M, N, dtype, device, fp32_params=dtype != torch.float32 and N % 2 == 0)
    y = layernorm(x, weight, bias, 1e-5)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_rel_close(y, _ref64(x, weight, bias, 1e-5), dtype)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N", [(1, 7), (13, 100), (3, 1024)])
def test_layernorm_with_residual(M, N, dtype_name, device):
    dtype = DTYPES[dtype_name]
    x, weight, bias = _inputs(M, N, dtype, device, fp32_params=dtype == torch.float16)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    y, s = layernorm(x, weight, bias, 1e-5, residual=residual)
    y_ref, s_ref = _ref64(x, weight, bias, 1e-5, residual)
    assert s.dtype == dtype
    _assert_sum_equal(s, s_ref, device)
    assert_rel_close(y, y_ref, dtype)
    # the public reference agrees with the fp64 one within the same tolerance
    y_pub, s_pub = layernorm_reference(x, weight, bias, 1e-5, residual=residual)
    assert torch.equal(s_pub, s_ref)
    assert_rel_close(y_pub, y_ref, dtype)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,max_block_n", [(1, 7, 16384), (13, 1023, 16384), (3, 1024, 16384), (5, 70, 16)])
def test_layernorm_with_x_bias_and_residual(M, N, max_block_n, dtype_name, device):
    # s = x + x_bias + residual (the bias of the GEMM that produced x, added here instead of in its epilogue);
    # max_block_n 16 takes the chunked two-pass path
    dtype = DTYPES[dtype_name]
    x, weight, bias = _inputs(M, N, dtype, device, fp32_params=dtype == torch.float16)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    x_bias = torch.randn(N).to(dtype=torch.float32 if N % 2 else dtype, device=device)
    y, s = layernorm_module._layernorm_launch(x, weight, bias, 1e-5, residual, max_block_n, x_bias)
    y_ref, s_ref = _ref64(x, weight, bias, 1e-5, residual, x_bias)
    _assert_sum_equal(s, s_ref, device)
    assert not torch.equal(s, layernorm(x, weight, bias, 1e-5, residual=residual)[1])  # the bias was added
    assert_rel_close(y, y_ref, dtype)
    y_pub, s_pub = layernorm_reference(x, weight, bias, 1e-5, residual=residual, x_bias=x_bias)
    assert torch.equal(s_pub, s_ref)
    assert_rel_close(y_pub, y_ref, dtype)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,max_block_n", [(1, 7, 16384), (13, 1023, 16384), (5, 70, 16)])
def test_layernorm_of_x_plus_bias(M, N, max_block_n, dtype_name, device):
    # LN(x + x_bias) without a residual: the sum in fp32, never rounded or stored (a residual stream kept without
    # its biases); max_block_n 16 takes the chunked two-pass path
    dtype = DTYPES[dtype_name]
    x, weight, bias = _inputs(M, N, dtype, device, fp32_params=dtype == torch.float16)
    x_bias = (3 * torch.randn(N)).to(dtype=torch.float32, device=device)
    y = layernorm_module._layernorm_launch(x, weight, bias, 1e-5, None, max_block_n, x_bias)
    y_ref = layernorm_reference(x.double() + x_bias.double(), weight.double(), bias.double(), 1e-5)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, dtype)
    assert_rel_close(layernorm_reference(x, weight, bias, 1e-5, x_bias=x_bias), y_ref, dtype)
    assert not torch.allclose(y.float(), layernorm(x, weight, bias, 1e-5).float(), atol=0.1)  # the bias counted


def test_x_bias_shape_is_checked(device):
    x, weight, bias = _inputs(4, 8, torch.float32, device)
    for residual in (None, x):
        with pytest.raises(ValueError, match="x_bias must have shape"):
            layernorm(x, weight, bias, 1e-5, residual=residual, x_bias=torch.randn(7, device=device))


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,parts,max_block_n", [(1, 1, 1, 16384), (7, 13, 4, 16384), (13, 1023, 3, 16384),
                                                   (64, 1024, 4, 16384), (5, 70, 2, 16)])
def test_layernorm_of_split_k_products(M, N, parts, max_block_n, dtype_name, device):
    # x as (S, M, N) fp32 split-K products of the GEMM before (kernels/skinny_gemm.py partials=True): summed in
    # order, then + x_bias + residual rounded to the residual's dtype; max_block_n 16 takes the chunked path
    dtype = DTYPES[dtype_name]
    _, weight, bias = _inputs(M, N, dtype, device, fp32_params=dtype == torch.float16)
    products = (torch.randn(parts, M, N) * 3 + 0.5).to(device)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    x_bias = torch.randn(N).to(dtype=dtype, device=device)
    y, s = layernorm_module._layernorm_launch(products, weight, bias, 1e-5, residual, max_block_n, x_bias)
    y_ref, s_ref = layernorm_reference(products, weight, bias, 1e-5, residual=residual, x_bias=x_bias)
    assert y.dtype == s.dtype == dtype and y.shape == s.shape == (M, N)
    _assert_sum_equal(s, s_ref, device)
    assert_rel_close(y, layernorm_reference(s.double(), weight.double(), bias.double(), 1e-5), dtype)
    assert_rel_close(y_ref, layernorm_reference(s.double(), weight.double(), bias.double(), 1e-5), dtype)
    # the products' sum counted, not just the first one
    if parts > 1:
        assert not torch.equal(s, layernorm(products[0], weight.float(), bias.float(), 1e-5,
                                            residual=residual.float(), x_bias=x_bias.float())[1].to(dtype))


def test_split_k_products_are_checked(device):
    _, weight, bias = _inputs(4, 8, torch.float16, device)
    residual = torch.randn(4, 8).to(dtype=torch.float16, device=device)
    products = torch.randn(3, 4, 8, device=device)
    with pytest.raises(ValueError, match="needs the residual"):
        layernorm(products, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        layernorm(products.half(), weight, bias, 1e-5, residual=residual)
    with pytest.raises(ValueError, match="contiguous fp32"):
        layernorm(products.transpose(1, 2), weight, bias, 1e-5, residual=residual)
    with pytest.raises(ValueError, match="without its leading split dim"):
        layernorm(torch.randn(3, 4, 9, device=device), weight, bias, 1e-5, residual=residual)
    with pytest.raises(ValueError, match="weight"):
        layernorm(products, weight[:7], bias, 1e-5, residual=residual)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("M,N", [(5, 70), (2, 33)])
def test_chunked_path_for_wide_rows(M, N, with_residual, dtype_name, device):
    # rows wider than the register block (shrunk here to 16) take the two-pass chunked path, tail chunk included
    dtype = DTYPES[dtype_name]
    x, weight, bias = _inputs(M, N, dtype, device)
    residual = torch.randn(M, N).to(dtype=dtype, device=device) if with_residual else None
    out = layernorm_module._layernorm_launch(x, weight, bias, 1e-5, residual, 16)
    ref = _ref64(x, weight, bias, 1e-5, residual)
    if with_residual:
        _assert_sum_equal(out[1], ref[1], device)
        out, ref = out[0], ref[0]
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("max_block_n", [16384, 64])
def test_large_mean_keeps_precision(max_block_n, device):
    # |mean| >> std: E[x^2] - E[x]^2 in fp32 would be off by percents; an fp32 mean near 1000 itself is only
    # good to its ulp (~6e-5), hence 1e-4 here instead of 1e-5
    x, weight, bias = _inputs(4, 300, torch.float32, device, offset=1000.0)
    y = layernorm_module._layernorm_launch(x, weight, bias, 1e-5, None, max_block_n)
    assert_rel_close(y, _ref64(x, weight, bias, 1e-5), tol=1e-4)


def test_matches_torch_layer_norm(device):
    x, weight, bias = _inputs(6, 257, torch.float32, device)
    torch.testing.assert_close(layernorm(x, weight, bias, 1e-5), F.layer_norm(x, (257,), weight, bias, 1e-5),
                               rtol=REL_TOL[torch.float32], atol=1e-5)


def test_eps_is_used(device):
    # constant rows: variance 0, so the deviations are exactly 0 and y = bias (no 0/0)
    x = torch.full((2, 9), 3.0, device=device) + torch.arange(2, device=device)[:, None]
    weight, bias = torch.randn(9, device=device), torch.randn(9, device=device)
    # (the mean is sum * (1/N): 1/9 is inexact, leaving deviations ~1e-7 that rstd = 316 scales to ~1e-5 on the GPU)
    torch.testing.assert_close(layernorm(x, weight, bias, 1e-5), bias.expand(2, 9), rtol=0, atol=1e-4)
    # a large eps visibly shrinks the normalised values (std ~2: rstd changes by ~6%)
    x, weight, bias = _inputs(3, 16, torch.float32, device)
    assert_rel_close(layernorm(x, weight, bias, 0.5), _ref64(x, weight, bias, 0.5), torch.float32)


def test_empty_rows(device):
    x, weight, bias = _inputs(0, 8, torch.float32, device)
    assert layernorm(x, weight, bias, 1e-5).shape == (0, 8)


def test_argument_errors(device):
    x, weight, bias = _inputs(4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="weight"):
        layernorm(x, torch.randn(7, device=device), bias, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        layernorm(x, weight.half(), bias, 1e-5)  # fp16 params with fp32 x
    with pytest.raises(ValueError, match="bias"):
        layernorm(x, weight, torch.randn(8, 1, device=device), 1e-5)
    with pytest.raises(ValueError, match="x must be contiguous"):
        layernorm(torch.randn(8, 4, device=device).t(), weight, bias, 1e-5)
    with pytest.raises(ValueError, match="x must be 2-D"):
        layernorm(torch.randn(8, device=device), weight, bias, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        layernorm(x, weight, bias, 1e-5, residual=torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="residual"):
        layernorm(x, weight, bias, 1e-5, residual=torch.randn(4, 8, device=device).half())
    with pytest.raises(ValueError, match="eps"):
        layernorm(x, weight, bias, -1.0)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,N,max_block_n", [(1, 1, 16384), (7, 13, 16384), (13, 1023, 16384), (64, 1024, 16384),
                                             (130, 100, 16384), (5, 70, 16)])
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_layernorm_stats_match_reference(M, N, max_block_n, offset, dtype_name, device):
    # (mean, rstd) per row in fp32; offset 300: |mean| >> std, where a sum of squares would cancel; 130 rows take
    # several rows per program, max_block_n 16 the chunked merge (Chan's formula)
    dtype = DTYPES[dtype_name]
    x = (torch.randn(M, N) * 2 + offset).to(dtype=dtype, device=device)
    mean, rstd = layernorm_module._stats_launch(x, 1e-5, max_block_n)
    ref_mean, ref_rstd = layernorm_stats_reference(x, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (M,)
    assert_rel_close(mean, ref_mean, tol=1e-6, what=f"mean, {M}x{N}")
    assert_rel_close(rstd, ref_rstd, tol=1e-5 if N > 1 else 1e-6, what=f"rstd, {M}x{N}")
    # the statistics normalise as layernorm() does
    w, b = torch.ones(N, device=device), torch.zeros(N, device=device)
    y = ((x.float() - mean[:, None]) * rstd[:, None]).to(dtype)
    assert_rel_close(y, _ref64(x, w, b, 1e-5), dtype)


def test_layernorm_stats_public_entry_and_errors(device):
    x = torch.randn(3, 40, device=device) + 2
    mean, rstd = layernorm_stats(x, 1e-3)
    ref_mean, ref_rstd = layernorm_stats_reference(x, 1e-3)
    assert_rel_close(mean, ref_mean, tol=1e-6, what="mean")
    assert_rel_close(rstd, ref_rstd, tol=1e-5, what="rstd (eps 1e-3)")
    assert layernorm_stats(torch.empty(0, 8, device=device))[0].shape == (0,)
    with pytest.raises(ValueError, match="x must be 2-D"):
        layernorm_stats(torch.randn(8, device=device))
    with pytest.raises(ValueError, match="eps"):
        layernorm_stats(x, -1.0)


def test_layernorm_rows_per_program_from_env(device, monkeypatch):
    # FTLAB_LN_TILE="block_m,num_warps" changes how rows are spread over programs, never the result
    x, weight, bias = _inputs(13, 100, torch.float32, device)
    residual = torch.randn(13, 100, device=device)
    want_y, want_s = layernorm(x, weight, bias, 1e-5, residual=residual)
    for tile in ("1,1", "4,2", "16,4"):
        monkeypatch.setenv("FTLAB_LN_TILE", tile)
        y, s = layernorm(x, weight, bias, 1e-5, residual=residual)
        assert torch.equal(s, want_s), tile
        assert_rel_close(y, want_y, torch.float32, what=f"FTLAB_LN_TILE={tile}")
    monkeypatch.setenv("FTLAB_LN_TILE", "3,2")
    with pytest.raises(ValueError, match="FTLAB_LN_TILE"):
        layernorm(x, weight, bias, 1e-5)
