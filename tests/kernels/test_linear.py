import itertools

import pytest
import torch
import torch.nn.functional as F

from ftlab.kernels import linear as linear_module
from ftlab.kernels.linear import (GemmConfig, GemvConfig, fold_layernorm, gelu_tanh_reference, linear,
                                  linear_impl_for, linear_reference, pick_gemm_config, pick_gemv_config)
from tests.util import DTYPES, REL_TOL, assert_rel_close, skip_if_interpreter_bf16

# every combination of the optional parts: (bias, gelu, residual, LayerNorm prologue)
FEATURE_COMBOS = list(itertools.product((False, True), repeat=4))
# (M, N, K): single row/feature, odd sizes, tails in every dim, more rows than a gemv block
SHAPES = [(1, 1, 7), (3, 5, 100), (13, 64, 64), (1, 257, 33), (70, 5, 64), (7, 31, 130), (16, 17, 16), (2, 40, 97)]


def _make_inputs(M, N, K, dtype, device, bias=False, gelu=False, residual=False, ln=False, fp32_params=False):
    """Fresh random inputs; weights scaled so outputs are O(1) whatever K. fp32_params: bias/LN params in fp32."""
    param_dtype = torch.float32 if fp32_params else dtype
    x = (torch.randn(M, K) * 2 + 0.5).to(dtype=dtype, device=device)
    weight = (torch.randn(N, K) / K ** 0.5).to(dtype=dtype, device=device)
    kwargs = {}
    if bias:
        kwargs["bias"] = torch.randn(N).to(dtype=param_dtype, device=device)
    if gelu:
        kwargs["activation"] = "gelu"
    if residual:
        kwargs["residual"] = torch.randn(M, N).to(dtype=dtype, device=device)
    if ln:
        kwargs["ln_weight"] = (1 + 0.5 * torch.randn(K)).to(dtype=param_dtype, device=device)
        kwargs["ln_bias"] = (0.5 * torch.randn(K)).to(dtype=param_dtype, device=device)
    return x, weight, kwargs


def _reference64(x, weight, kwargs):
    as64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return linear_reference(x.double(), weight.double(), **as64)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", ["gemv", "gemm", None])
@pytest.mark.parametrize("combo", range(len(FEATURE_COMBOS)))
def test_linear_matches_reference(combo, impl, dtype_name, device):
    dtype = DTYPES[dtype_name]
    bias, gelu, residual, ln = FEATURE_COMBOS[combo]
    M, N, K = SHAPES[combo % len(SHAPES)]
    if (impl or linear_impl_for(M, N, K)) == "gemm":  # the gemv path has no tl.dot: bf16 runs in the interpreter
        skip_if_interpreter_bf16(dtype, device)
    x, weight, kwargs = _make_inputs(M, N, K, dtype, device, bias, gelu, residual, ln,
                                     fp32_params=dtype != torch.float32 and combo % 2 == 1)
    out = linear(x, weight, **kwargs, impl=impl)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_rel_close(out, _reference64(x, weight, kwargs), dtype, what=f"impl={impl} M,N,K={M},{N},{K}")


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_torch_impl_matches_reference(dtype_name, device):
    dtype = DTYPES[dtype_name]
    x, weight, kwargs = _make_inputs(9, 33, 70, dtype, device, bias=True, gelu=True, residual=True, ln=True)
    out = linear(x, weight, **kwargs, impl="torch")
    assert_rel_close(out, _reference64(x, weight, kwargs), dtype, tol=2 * REL_TOL[dtype])


# forced configs with split-K (the heuristics only split for shapes too large for the interpreter), uneven K so the
# last split is short, and every optional part on; and unsplit gemv rows of many K chunks (LN statistics by the
# loop), of two chunks with a tail and of less than one chunk (statistics from the row held in registers)
SPLIT_CASES = [
    ("gemv", GemvConfig(block_m=4, block_n=8, lanes=8, vec=4, num_warps=1, split_k=3), (5, 19, 200)),
    ("gemv", GemvConfig(block_m=2, block_n=4, lanes=16, vec=4, num_warps=1, split_k=2), (3, 9, 256)),
    ("gemv", GemvConfig(block_m=2, block_n=4, lanes=8, vec=4, num_warps=1, split_k=1), (3, 9, 200)),
    ("gemv", GemvConfig(block_m=2, block_n=4, lanes=8, vec=4, num_warps=1, split_k=1), (3, 9, 50)),
    ("gemv", GemvConfig(block_m=2, block_n=4, lanes=8, vec=4, num_warps=1, split_k=1), (1, 9, 20)),
    ("gemm", GemmConfig(block_m=16, block_n=32, block_k=32, group_m=2, split_k=4, num_warps=4, num_stages=2),
     (21, 40, 200)),
    ("gemm", GemmConfig(block_m=16, block_n=16, block_k=64, group_m=8, split_k=2, num_warps=4, num_stages=2),
     (4, 33, 128)),
]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_split_k_matches_reference(case, dtype_name, device):
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    kind, cfg, (M, N, K) = SPLIT_CASES[case]
    run = linear_module._run_gemv if kind == "gemv" else linear_module._run_gemm
    for ln, gelu in ((True, True), (False, False)):
        x, weight, kwargs = _make_inputs(M, N, K, dtype, device, bias=True, gelu=gelu, residual=True, ln=ln)
        out = run(x, weight, kwargs["bias"], kwargs["residual"], kwargs.get("ln_weight"), kwargs.get("ln_bias"),
                  1e-5, gelu, cfg)
        assert_rel_close(out, _reference64(x, weight, kwargs), dtype, what=f"{kind} split {cfg}")


@pytest.mark.parametrize("fold", ["0", "1"])
@pytest.mark.parametrize("M,N,K,offset", [(3, 9, 50, 0.5), (1, 9, 20, 0.5), (2, 7, 60, 1000.0)])
def test_gemv_ln_prologue_folded_or_not(fold, M, N, K, offset, device, monkeypatch):
    # rows of <= 2 K chunks: LN gain/shift folded into the weight before the PDL wait and one combined reduction
    # (FTLAB_LN_FOLD=1, the default), or x normalised before the dot product (0); also with |mean| >> std
    monkeypatch.setenv("FTLAB_LN_FOLD", fold)
    cfg = GemvConfig(block_m=2, block_n=4, lanes=8, vec=4, num_warps=1, split_k=1)  # 32 columns per chunk
    x, weight, kwargs = _make_inputs(M, N, K, torch.float32, device, bias=True, gelu=True, residual=True, ln=True)
    x = x + offset
    out = linear_module._run_gemv(x, weight, kwargs["bias"], kwargs["residual"], kwargs["ln_weight"],
                                  kwargs["ln_bias"], 1e-5, True, cfg)
    assert_rel_close(out, _reference64(x, weight, kwargs), tol=1e-4, what=f"fold={fold} K={K} offset={offset}")


@pytest.mark.parametrize("impl", ["gemv", "gemm"])
def test_rows_do_not_depend_on_other_rows(impl, device):
    # row 0 must come out bit-identical when the other rows change, and repeated calls must agree bit for bit
    dtype = torch.float16
    M, N, K = 6, 24, 96
    x, weight, kwargs = _make_inputs(M, N, K, dtype, device, bias=True, gelu=True, ln=True)
    cfg = GemvConfig(4, 8, 8, 4, 1, 2) if impl == "gemv" else GemmConfig(16, 16, 32, 8, 2, 4, 2)
    run = linear_module._run_gemv if impl == "gemv" else linear_module._run_gemm
    args = (None, kwargs["ln_weight"], kwargs["ln_bias"], 1e-5, True, cfg)
    first = run(x, weight, kwargs["bias"], *args)
    again = run(x, weight, kwargs["bias"], *args)
    other = x.clone()
    other[1:] = (torch.randn(M - 1, K) * 10).to(dtype=dtype, device=device)
    changed = run(other, weight, kwargs["bias"], *args)
    assert torch.equal(first, again)
    assert torch.equal(first[0], changed[0])
    assert not torch.equal(first[1:], changed[1:])


def test_ln_prologue_with_large_mean(device):
    # rows with |mean| >> std: a one-pass sum-of-squares variance in fp32 would lose all precision here
    M, N, K = 3, 16, 300
    x = (1000.0 + torch.randn(M, K)).to(device)
    weight = (torch.randn(N, K) / K ** 0.5).to(device)
    ln_w, ln_b = torch.randn(K).to(device), torch.randn(K).to(device)
    ref = linear_reference(x.double(), weight.double(), ln_weight=ln_w.double(), ln_bias=ln_b.double())
    for impl in ("gemv", "gemm"):
        out = linear(x, weight, ln_weight=ln_w, ln_bias=ln_b, impl=impl)
        # an fp32 mean near 1000 is only good to ~6e-5 (its ulp), i.e. ~1e-4 of the unit std; the naive
        # formula would be off by percents
        assert_rel_close(out, ref, tol=1e-3, what=impl)
    # the same with the LN folded into the weight (the model's default): the statistics come from the shifted x
    folded, bias, row_sums = fold_layernorm(weight, None, ln_w, ln_b)
    ones, zeros = torch.ones_like(ln_w), torch.zeros_like(ln_b)
    for impl in ("gemv", "gemm"):
        out = linear(x, folded, bias, ln_weight=ones, ln_bias=zeros, ln_row_sums=row_sums, impl=impl)
        assert_rel_close(out, ref, tol=1e-3, what=f"{impl}, LN folded")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter (numpy): exp -> inf is intended
def test_gelu_saturates_without_nan(device):
    # outputs far out in both tails: gelu(v) -> v for v >> 0 and -> 0 for v << 0, never NaN/Inf
    M, N, K = 2, 8, 16
    x = torch.randn(M, K).to(device)
    weight = (torch.randn(N, K) * 30).to(device)
    ref = linear_reference(x.double(), weight.double(), activation="gelu")
    for impl in ("gemv", "gemm"):
        out = linear(x, weight, activation="gelu", impl=impl)
        assert_rel_close(out, ref, torch.float32, what=impl)


def test_gelu_reference_is_tanh_approximation():
    v = torch.linspace(-8, 8, 101, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh_reference(v), F.gelu(v, approximate="tanh"))


def test_default_dispatch():
    # the measured choice (see GEMV_MAX_M): gemv for decode rows, cuBLAS for aligned N, the Triton gemm for odd N
    limit = linear_module.GEMV_MAX_M
    assert linear_impl_for(1, 1024, 1024) == "gemv"
    assert linear_impl_for(limit, 50257, 1024) == "gemv"
    assert linear_impl_for(limit + 1, 1024, 1024) == "torch"
    assert linear_impl_for(512, 4096, 1024) == "torch"
    assert linear_impl_for(limit + 1, 50257, 1024) == "gemm"
    assert linear_impl_for(4096, 50257, 1024) == "gemm"


def test_heuristic_configs():
    # the H200 sweep's winners: half a row per K chunk, 2 rows per program when that leaves ~8 programs per SM
    assert pick_gemv_config(1, 1024, 4096, torch.float16, 132) == GemvConfig(1, 1, 256, 8, 4, 1)
    assert pick_gemv_config(1, 3072, 1024, torch.float16, 132) == GemvConfig(1, 2, 64, 8, 2, 1)
    assert pick_gemv_config(1, 50257, 1024, torch.float16, 132) == GemvConfig(1, 2, 64, 8, 2, 1)
    assert pick_gemv_config(1, 1024, 1024, torch.float16, 132).split_k == 1
    # a grid that cannot give every SM a program splits K (a tensor-parallel shard of a small layer)
    assert pick_gemv_config(1, 64, 8192, torch.float16, 132).split_k > 1
    for M, N, K in ((1, 1, 1), (5, 3, 7), (8, 50257, 1024), (4096, 50257, 1024), (64, 1024, 4096)):
        for dtype in (torch.float32, torch.float16):
            g = pick_gemm_config(M, N, K, dtype, 132)
            assert min(g.block_m, g.block_n, g.block_k) >= 16  # tl.dot minimum
            v = pick_gemv_config(M, N, K, dtype, 132)
            assert v.split_k >= 1 and v.vec * (torch.finfo(dtype).bits // 8) == 16  # 16-byte vectors
            if K >= 1024:  # model sizes: a whole vector per thread and lane (no layout conversion in the loop)
                assert v.lanes >= 32 * v.num_warps
    assert pick_gemm_config(64, 1024, 4096, torch.float16, 132).split_k > 1
    assert pick_gemm_config(4096, 50257, 1024, torch.float16, 132).split_k == 1


def test_empty_batch(device):
    x = torch.randn(0, 32).to(device)
    weight = torch.randn(8, 32).to(device)
    assert linear(x, weight).shape == (0, 8)


def test_argument_errors(device):
    x = torch.randn(4, 32).to(device)
    w = torch.randn(8, 32).to(device)
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.randn(8, 31).to(device))
    with pytest.raises(ValueError, match="weight"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="weight"):
        linear(x, torch.randn(32, 8).to(device).t())  # right shape, not contiguous
    with pytest.raises(ValueError, match="x must be contiguous"):
        linear(torch.randn(32, 4).to(device).t(), w)
    with pytest.raises(ValueError, match="x"):
        linear(torch.randn(4, 32, dtype=torch.float64).to(device), w.double())
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, torch.randn(7).to(device))
    with pytest.raises(ValueError, match="bias"):
        linear(x.half(), w.half(), torch.randn(8, dtype=torch.float64).to(device))
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, residual=torch.randn(4, 9).to(device))
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, residual=torch.randn(4, 8).to(device).half())
    with pytest.raises(ValueError, match="ln_weight and ln_bias"):
        linear(x, w, ln_weight=torch.randn(32).to(device))
    with pytest.raises(ValueError, match="ln_bias"):
        linear(x, w, ln_weight=torch.randn(32).to(device), ln_bias=torch.randn(31).to(device))
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, activation="relu")
    with pytest.raises(ValueError, match="impl"):
        linear(x, w, impl="cublas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(7, 1023, 13), (64, 4096, 1024), (513, 128, 1000)])
def test_cublas_gelu_epilogue_is_the_tanh_gelu(dtype, M, N, K):
    from ftlab.kernels.linear import linear_gelu_cublas

    # pre-activations spread over [-4, 4], where tanh and erf GELU differ by up to ~5e-4 (fp32 holds 1e-5)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda") * (2.0 / K ** 0.5)).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    pre = F.linear(x.double(), w.double(), b.double())
    got = linear_gelu_cublas(x, w, b)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), F.gelu(pre, approximate="tanh"), rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert (got.double() - F.gelu(pre)).abs().max() > 1e-4  # not the erf GELU
    torch.testing.assert_close(linear(x, w, b, activation="gelu", impl="torch"), got, rtol=0, atol=0)


@pytest.mark.parametrize("step", ["1", "7", "13", "1023"])
def test_cublas_gelu_in_row_chunks_equals_one_call(step, device, monkeypatch):
    from ftlab.kernels.linear import linear_gelu_cublas

    # the same op either way (erf GELU on a CPU, cuBLASLt's tanh epilogue on a GPU); chunks may end ragged. A
    # library may pick another kernel for fewer rows, so the rows agree to rounding, not always bit for bit
    dtype = torch.float32 if device == "cpu" else torch.float16
    x = torch.randn(1023, 64, device=device, dtype=dtype)
    w = (torch.randn(96, 64, device=device) / 8).to(dtype)
    b = torch.randn(96, device=device, dtype=dtype)
    monkeypatch.setenv("FTLAB_GELU_ROWS_PER_CALL", "0")
    whole = linear_gelu_cublas(x, w, b)
    monkeypatch.setenv("FTLAB_GELU_ROWS_PER_CALL", step)
    got = linear_gelu_cublas(x, w, b)
    assert got.shape == (1023, 96) and got.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, whole, rtol=tol, atol=tol)


def test_gelu_rows_per_call_from_env(monkeypatch):
    from ftlab.kernels.linear import gelu_rows_per_call

    monkeypatch.delenv("FTLAB_GELU_ROWS_PER_CALL", raising=False)
    assert gelu_rows_per_call() == 16384
    monkeypatch.setenv("FTLAB_GELU_ROWS_PER_CALL", "0")
    assert gelu_rows_per_call() == 0
    for bad in ("-1", "many"):
        monkeypatch.setenv("FTLAB_GELU_ROWS_PER_CALL", bad)
        with pytest.raises(ValueError, match="FTLAB_GELU_ROWS_PER_CALL"):
            gelu_rows_per_call()


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", ["gemv", "gemm", "torch"])
@pytest.mark.parametrize("M,N,K,offset", [(1, 13, 1023, 0.5), (3, 7, 64, 0.5), (2, 33, 100, 300.0), (7, 1, 13, 0.5)])
def test_prefolded_ln_matches_the_layernorm(dtype_name, impl, M, N, K, offset, device):
    # the LN's gain folded into the weight and its shift into the bias (fold_layernorm), the row sums given: every
    # path computes LN(x) @ W.T + c; the gemv loads no LN parameter (LN_PREFOLDED), the others apply ones / zeros
    dtype = DTYPES[dtype_name]
    if impl == "gemm":  # the gemv path has no tl.dot: bf16 runs in the interpreter
        skip_if_interpreter_bf16(dtype, device)
    x, weight, kwargs = _make_inputs(M, N, K, dtype, device, bias=True, gelu=True, residual=True, ln=True)
    x = (x.float() + offset).to(dtype)
    folded, bias, row_sums = fold_layernorm(weight, kwargs["bias"], kwargs["ln_weight"], kwargs["ln_bias"])
    assert row_sums.dtype == torch.float32 and folded.dtype == dtype and bias.dtype == dtype
    ones, zeros = torch.ones(K, dtype=dtype, device=device), torch.zeros(K, dtype=dtype, device=device)
    out = linear(x, folded, bias, activation="gelu", residual=kwargs["residual"], ln_weight=ones, ln_bias=zeros,
                 ln_row_sums=row_sums, impl=impl)
    unfolded = linear(x, weight, kwargs["bias"], activation="gelu", residual=kwargs["residual"],
                      ln_weight=kwargs["ln_weight"], ln_bias=kwargs["ln_bias"], impl=impl)
    ref = _reference64(x, weight, kwargs)
    # folding rounds W * g and c + W @ b once in the dtype: within the unfolded path's own tolerance of the truth
    tol = REL_TOL[dtype] * (2 if dtype != torch.float32 else 10)
    assert_rel_close(out, ref, tol=tol, what=f"{impl} {dtype_name} M={M} N={N} K={K}")
    assert_rel_close(unfolded, ref, tol=tol, what=f"unfolded {impl}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefolded_gemm_is_right_and_repeatable_at_every_tile(dtype):
    # GPT-2's LM head shape at row counts that take each of pick_gemm_config's tiles, padded or not. The LayerNorm
    # statistics once summed inside the pipelined loop raced on the H200 (64-row tiles): wrong by ~0.5 and different
    # from run to run (data/bench/gemm_prefold_race.csv), so each case runs three times and must repeat exactly
    torch.manual_seed(0)
    N, K = 50257, 1024
    weight = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    bias = (torch.randn(N, device="cuda") * 0.1).to(dtype)
    g = (1 + 0.1 * torch.randn(K, device="cuda")).to(dtype)
    b = (0.1 * torch.randn(K, device="cuda")).to(dtype)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, g, b)
    ones, zeros = torch.ones_like(g), torch.zeros_like(b)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # absolute, on logits of size ~3
    for M in (5, 16, 17, 32, 33, 40, 48, 56, 63, 64, 65, 100, 128):
        x = (torch.randn(M, K, device="cuda") * 2 + 0.5).to(dtype)
        ref = linear_reference(x.float(), weight.float(), bias.float(), ln_weight=g.float(), ln_bias=b.float())
        runs = [linear(x, folded, folded_bias, ln_weight=ones, ln_bias=zeros, ln_row_sums=row_sums, impl="gemm")
                for _ in range(3)]
        for out in runs:
            err = (out.float() - ref).abs().max().item()
            assert err <= tol, f"M={M} (tile {pick_gemm_config(M, N, K, dtype).block_m} rows): max error {err}"
            assert torch.equal(out, runs[0]), f"M={M}: two runs of the same inputs differ"


def test_ln_row_sums_errors(device):
    x, w = torch.randn(2, 32).to(device), torch.randn(8, 32).to(device)
    ones, zeros = torch.ones(32).to(device), torch.zeros(32).to(device)
    with pytest.raises(ValueError, match="ln_row_sums needs ln_weight"):
        linear(x, w, ln_row_sums=w.sum(1))
    with pytest.raises(ValueError, match="ln_row_sums"):
        linear(x, w, ln_weight=ones, ln_bias=zeros, ln_row_sums=torch.zeros(7).to(device))
    with pytest.raises(ValueError, match="ln_row_sums"):
        linear(x, w, ln_weight=ones, ln_bias=zeros, ln_row_sums=w.sum(1).half())

