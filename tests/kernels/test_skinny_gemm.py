import pytest
import torch
import triton

from ftlab.kernels.skinny_gemm import (SkinnyConfig, TileRowStats, pick_skinny_config, skinny_gemm, skinny_gemm_on,
                                      skinny_splits)
from ftlab.kernels.linear import fold_layernorm, linear_reference
from tests.util import DTYPES, REL_TOL, assert_rel_close, skip_if_interpreter_bf16

# (M, N, K, block_n, k_split, warps): N not a multiple of block_n, K not a multiple of k_split (masked tails),
# one split and several (the last-arriving program sums the partials), 1 and 64 rows of x
CASES = [(1, 7, 13, 16, 16, 4), (7, 33, 100, 16, 32, 4), (13, 50, 300, 32, 128, 4), (5, 96, 1023, 32, 256, 8),
         (64, 40, 64, 16, 64, 4), (33, 17, 257, 16, 64, 4), (2, 64, 128, 64, 128, 4)]


def _inputs(M, N, K, dtype, device):
    x = (torch.randn(M, K) + 0.3).to(dtype=dtype, device=device)
    weight = (torch.randn(N, K) / K ** 0.5).to(dtype=dtype, device=device)
    bias = torch.randn(N).to(dtype=dtype, device=device)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    return x, weight, bias, residual


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("features", ["none", "bias", "bias+gelu+residual"])
def test_skinny_gemm_matches_reference(features, case, dtype_name, device):
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    M, N, K, block_n, k_split, warps = CASES[case]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device)
    bias = bias if "bias" in features else None
    residual = residual if "residual" in features else None
    act = "gelu" if "gelu" in features else None
    counter = torch.zeros(64, dtype=torch.int32, device=device)
    out = skinny_gemm(x, weight, bias, activation=act, residual=residual,
                      config=SkinnyConfig(block_n, k_split, warps), counter=counter)
    ref = linear_reference(x.double(), weight.double(), bias=None if bias is None else bias.double(),
                           residual=None if residual is None else residual.double(), activation=act)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, what=f"{features} M={M} N={N} K={K} cfg={block_n},{k_split},{warps}")
    assert int(counter.abs().sum()) == 0, "the split-K counters must be left zero for the next launch"


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_skinny_gemm_split_k_products(case, dtype_name, device):
    # partials=True: each split's fp32 product, unsummed, in split order (kernels/layernorm.py sums them); their
    # sum is the product, and the default counter is never touched
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    M, N, K, block_n, k_split, warps = CASES[case]
    x, weight, _, _ = _inputs(M, N, K, dtype, device)
    counter = torch.zeros(64, dtype=torch.int32, device=device)
    parts = skinny_gemm(x, weight, config=SkinnyConfig(block_n, k_split, warps), counter=counter, partials=True)
    splits = triton.cdiv(K, k_split)
    assert parts.dtype == torch.float32 and parts.shape == (splits, M, N)
    for split in range(splits):  # each slice is the product over its own K range
        cols = slice(split * k_split, (split + 1) * k_split)
        ref = linear_reference(x[:, cols].double(), weight[:, cols].double())
        assert_rel_close(parts[split], ref, dtype, what=f"split {split} of M={M} N={N} K={K}")
    assert_rel_close(parts.sum(0), linear_reference(x.double(), weight.double()), dtype)
    assert int(counter.abs().sum()) == 0


def test_skinny_gemm_split_k_products_take_no_epilogue(device):
    x, weight = torch.randn(3, 64, device=device), torch.randn(5, 64, device=device)
    assert skinny_splits(3, 5, 64) == 1 and skinny_gemm(x, weight, partials=True).shape == (1, 3, 5)
    for bad in (dict(bias=torch.randn(5, device=device)), dict(activation="gelu"),
                dict(residual=torch.randn(3, 5, device=device))):
        with pytest.raises(ValueError, match="partials=True"):
            skinny_gemm(x, weight, partials=True, **bad)


def _folded_layernorm_case(case, dtype, device, offset):
    """CASES[case] with x shifted by `offset` and a LayerNorm folded into weight and bias: (config, x, folded
    weight, folded bias, row sums, residual, fp64 reference of gelu(LN(x) W^T + b) + residual)."""
    M, N, K, block_n, k_split, warps = CASES[case]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device)
    x = x + offset
    ln_w = (1 + 0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    ln_b = (0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, ln_w, ln_b)
    ref = linear_reference(x.double(), weight.double(), bias=bias.double(), residual=residual.double(),
                           activation="gelu", ln_weight=ln_w.double(), ln_bias=ln_b.double())
    return SkinnyConfig(block_n, k_split, warps), x, folded, folded_bias, row_sums, residual, ref


# folding rounds W * g and c + W @ b once in the dtype, and at offset 300 x @ W'^T - mean * rowsum(W') loses
# ~log2(300 / std) bits of fp32 (the same allowance as test_gemv_rows' folded test)
_FOLD_TOL = {dtype: REL_TOL[dtype] * (2 if dtype != torch.float32 else 10) for dtype in REL_TOL}


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_skinny_gemm_with_folded_layernorm(offset, case, dtype_name, device):
    # LN folded into weight and bias, row sums given: each program takes whole rows (the config's K split is
    # widened to one) and their statistics relative to x[:, 0] (offset 300: |mean| >> std would cancel in fp32)
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    cfg, x, folded, folded_bias, row_sums, residual, ref = _folded_layernorm_case(case, dtype, device, offset)
    out = skinny_gemm(x, folded, folded_bias, activation="gelu", residual=residual, config=cfg, ln_row_sums=row_sums)
    assert_rel_close(out, ref, tol=_FOLD_TOL[dtype], what=f"LN fold, offset {offset}, {tuple(x.shape)} {cfg}")


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_skinny_gemm_with_given_layernorm_stats(offset, case, dtype_name, device):
    # LN folded into weight and bias, its row statistics from layernorm_stats (ln_stats=): the config's K split
    # stands (several splits in most CASES), the correction comes after the split-K sum
    from ftlab.kernels.layernorm import layernorm_stats

    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    cfg, x, folded, folded_bias, row_sums, residual, ref = _folded_layernorm_case(case, dtype, device, offset)
    counter = torch.zeros(64, dtype=torch.int32, device=device)
    out = skinny_gemm(x, folded, folded_bias, activation="gelu", residual=residual, config=cfg, counter=counter,
                      ln_row_sums=row_sums, ln_stats=layernorm_stats(x, 1e-5))
    assert_rel_close(out, ref, tol=_FOLD_TOL[dtype], what=f"LN stats given, offset {offset}, {tuple(x.shape)} {cfg}")
    assert int(counter.abs().sum()) == 0


def test_skinny_gemm_given_stats_lift_the_width_limit_and_are_checked(device):
    # with ln_stats the kernel need not hold whole rows: K above LN_MAX_K is fine
    from ftlab.kernels.layernorm import layernorm_stats

    x, weight, bias, _ = _inputs(3, 20, 1500, torch.float32, device)
    ln_w, ln_b = 1 + 0.3 * torch.randn(1500, device=device), 0.3 * torch.randn(1500, device=device)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, ln_w, ln_b)
    out = skinny_gemm(x, folded, folded_bias, ln_row_sums=row_sums, ln_stats=layernorm_stats(x),
                      config=SkinnyConfig(16, 512, 4))
    ref = linear_reference(x.double(), weight.double(), bias=bias.double(), ln_weight=ln_w.double(),
                           ln_bias=ln_b.double())
    assert_rel_close(out, ref, tol=1e-4, what="K = 1500 with given statistics")
    mean, rstd = layernorm_stats(x)
    with pytest.raises(ValueError, match="needs ln_row_sums"):
        skinny_gemm(x, weight, bias, ln_stats=(mean, rstd))
    with pytest.raises(ValueError, match="ln_stats rstd must be contiguous fp32"):
        skinny_gemm(x, folded, folded_bias, ln_row_sums=row_sums, ln_stats=(mean, rstd[:2]))


# (M, N, K, block_n, k_split, warps) of a producer whose N its block_n divides: 1, 2, 4 and 32 output tiles,
# one split and several
ROW_STATS_CASES = [(1, 16, 13, 16, 16, 4), (7, 64, 100, 32, 32, 4), (13, 96, 300, 16, 128, 8),
                   (64, 128, 64, 64, 64, 4), (33, 512, 40, 16, 64, 4)]
# consumers of a producer with 16-column tiles (K = its N: 1, 3, 6 and 64 tiles, masked to a power of two), one K
# split and several
TILE_STATS_CASES = [(1, 7, 16, 16, 16, 4), (7, 33, 48, 16, 16, 4), (13, 50, 96, 32, 32, 4),
                    (64, 40, 1024, 16, 256, 4), (5, 20, 96, 16, 128, 8)]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(ROW_STATS_CASES)))
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_skinny_gemm_row_stats_merge_to_the_rows_statistics(offset, case, dtype_name, device):
    # row_stats=True: the output is the same as without, and its tiles' (mean, squared deviations), merged as the
    # consumer does, give each stored row's mean and variance (offset 300: |mean| >> std)
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    M, N, K, block_n, k_split, warps = ROW_STATS_CASES[case]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device)
    residual = residual + offset
    cfg = SkinnyConfig(block_n, k_split, warps)
    plain = skinny_gemm(x, weight, bias, residual=residual, config=cfg)
    out, stats = skinny_gemm(x, weight, bias, residual=residual, config=cfg, row_stats=True)
    assert torch.equal(out, plain)
    assert stats.parts.shape == (2, N // block_n, M) and stats.columns == block_n
    means, m2 = stats.parts.double()
    mean = means.mean(0)
    var = (m2.sum(0) + block_n * ((means - mean) ** 2).sum(0)) / N
    ref = out.double()
    assert torch.allclose(mean, ref.mean(1), rtol=1e-5, atol=1e-5 * (1 + offset))
    assert torch.allclose(var, ref.var(1, unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(TILE_STATS_CASES)))
@pytest.mark.parametrize("offset", [0.5, 300.0])
def test_skinny_gemm_with_tile_row_stats(offset, case, dtype_name, device):
    # a residual GEMM hands its tiles' row statistics to the LayerNorm-folded GEMM after it (ln_stats=TileRowStats,
    # the config's K split standing): the pair against the fp64 reference of gelu(LN(y) W^T + b) + residual, where
    # y (M, K) is the first GEMM's stored output (the statistics are those of y as stored)
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    M, N, K, block_n, k_split, warps = TILE_STATS_CASES[case]
    x, weight, bias, residual = _inputs(M, N, K, dtype, device)
    x0, w0, b0, r0 = _inputs(M, K, 24, dtype, device)  # the producer: (M, 24) x (K, 24)^T -> (M, K)
    y, stats = skinny_gemm(x0, w0, b0, residual=r0 + offset, config=SkinnyConfig(16, 16, 4), row_stats=True)
    assert stats.parts.shape == (2, K // 16, M)
    ln_w = (1 + 0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    ln_b = (0.5 * torch.randn(K)).to(dtype=dtype, device=device)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, ln_w, ln_b)
    counter = torch.zeros(64, dtype=torch.int32, device=device)
    out = skinny_gemm(y, folded, folded_bias, activation="gelu", residual=residual,
                      config=SkinnyConfig(block_n, k_split, warps), counter=counter, ln_row_sums=row_sums,
                      ln_stats=stats)
    ref = linear_reference(y.double(), weight.double(), bias=bias.double(), residual=residual.double(),
                           activation="gelu", ln_weight=ln_w.double(), ln_bias=ln_b.double())
    assert_rel_close(out, ref, tol=_FOLD_TOL[dtype], what=f"LN stats from tiles, offset {offset}, {tuple(y.shape)}")
    assert int(counter.abs().sum()) == 0


def test_skinny_gemm_tile_row_stats_are_checked(device):
    x, weight, bias, residual = _inputs(3, 32, 8, torch.float32, device)
    with pytest.raises(ValueError, match="no row_stats"):
        skinny_gemm(x, weight, partials=True, row_stats=True)
    with pytest.raises(ValueError, match=r"block_n \(64\) to divide N \(32\)"):
        skinny_gemm(x, weight, config=SkinnyConfig(64, 16, 4), row_stats=True)
    y, stats = skinny_gemm(x, weight, bias, residual=residual, config=SkinnyConfig(16, 16, 4), row_stats=True)
    w2, b2 = torch.randn(5, 32, device=device), torch.randn(5, device=device)
    row_sums = torch.zeros(5, device=device)
    with pytest.raises(ValueError, match="needs ln_row_sums"):
        skinny_gemm(y, w2, b2, ln_stats=stats)
    with pytest.raises(ValueError, match="tiles x columns = K = 32"):
        skinny_gemm(y, w2, b2, ln_row_sums=row_sums, ln_stats=TileRowStats(stats.parts, 8))
    with pytest.raises(ValueError, match=r"\(2, tiles, 3\)"):
        skinny_gemm(y, w2, b2, ln_row_sums=row_sums, ln_stats=TileRowStats(stats.parts[:, :, :2].contiguous(), 16))


def test_skinny_gemm_layernorm_fold_limits(device):
    x = torch.randn(3, 1025, device=device)
    with pytest.raises(ValueError, match="at most 1024 features"):
        skinny_gemm(x, torch.randn(4, 1025, device=device), ln_row_sums=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="ln_row_sums must be contiguous fp32"):
        skinny_gemm(x[:, :8].contiguous(), torch.randn(4, 8, device=device),
                    ln_row_sums=torch.zeros(5, device=device))


@pytest.mark.parametrize("policy", ["", "evict_first", "evict_last"])
def test_skinny_gemm_weight_eviction_policies(policy, device, monkeypatch):
    # FTLAB_SKINNY_W_EVICT (default evict_first) changes only how L2 keeps the weight, never the result
    monkeypatch.setenv("FTLAB_SKINNY_W_EVICT", policy)
    x, weight, bias, residual = _inputs(13, 50, 300, torch.float16, device)
    out = skinny_gemm(x, weight, bias, residual=residual, config=SkinnyConfig(32, 128, 4))
    ref = linear_reference(x.double(), weight.double(), bias=bias.double(), residual=residual.double())
    assert_rel_close(out, ref, torch.float16)
    monkeypatch.setenv("FTLAB_SKINNY_W_EVICT", "first")
    with pytest.raises(ValueError, match="FTLAB_SKINNY_W_EVICT='first'"):
        skinny_gemm(x, weight, bias)


def test_skinny_gemm_repeated_calls_share_the_default_counter(device):
    # split-K with the per-device counter: a second and third call must see it zero again, with other shapes between
    x, weight, bias, _ = _inputs(6, 40, 200, torch.float32, device)
    cfg = SkinnyConfig(16, 64, 4)
    first = skinny_gemm(x, weight, bias, config=cfg)
    skinny_gemm(x[:3], weight[:17], config=SkinnyConfig(16, 32, 4))
    again = skinny_gemm(x, weight, bias, config=cfg)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert_rel_close(first, linear_reference(x.double(), weight.double(), bias=bias.double()), torch.float32)


def test_outgrown_counters_stay_alive(device):
    # a CUDA graph captured with the per-device counter keeps its address: a later call that needs a longer one
    # must not free it (and a call with one split needs none at all)
    from ftlab.kernels import skinny_gemm as module

    small = module._counter(torch.device(device), 8)
    large = module._counter(torch.device(device), small.numel() + 1)
    assert large.numel() > small.numel() and any(t is small for t in module._OUTGROWN)
    assert module._counter(torch.device(device), 8) is large
    x, weight, bias, _ = _inputs(5, 24, 70, torch.float32, device)  # K = 24 <= k_split: one split, no counter
    out = skinny_gemm(x, weight, bias, config=SkinnyConfig(16, 32, 4))
    assert module._counter(torch.device(device), 8) is large and int(large.abs().sum()) == 0
    assert_rel_close(out, linear_reference(x.double(), weight.double(), bias=bias.double()), torch.float32)


@pytest.mark.parametrize("M", [5, 8, 16, 32, 33, 64])
def test_pick_skinny_config_for_gpt_shapes(M):
    for N, K in ((3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (50, 13)):
        cfg = pick_skinny_config(M, N, K)
        assert cfg.block_n in (32, 64) and cfg.num_warps in (4, 8)
        assert cfg.k_split & (cfg.k_split - 1) == 0 and 16 <= cfg.k_split <= 1024
        # whole K up to 1024 per program (one split for GPT-345M's K = 1024 GEMMs), halves of it at 17-32 rows
        assert cfg.k_split >= min(triton.next_power_of_2(K), 512 if 16 < M <= 32 else 1024)


def test_skinny_gemm_on_only_for_gpu_half_precision():
    x = torch.randn(8, 16)
    assert not skinny_gemm_on(x, torch.randn(4, 16))  # a CPU tensor: cuBLAS / torch stays
    if torch.cuda.is_available():
        xc = x.cuda().half()
        assert skinny_gemm_on(xc, torch.randn(4, 16, device="cuda").half())
        assert not skinny_gemm_on(torch.randn(65, 16, device="cuda").half(),
                                  torch.randn(4, 16, device="cuda").half())


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(65, 8)), "1..64 rows"),
    (dict(x=torch.randn(0, 8)), "1..64 rows"),
    (dict(weight=torch.randn(4, 9)), "does not match x"),
    (dict(weight=torch.randn(4, 8).half()), "share a float dtype"),
    (dict(bias=torch.randn(5)), "bias must be contiguous"),
    (dict(residual=torch.randn(3, 5)), "residual must be contiguous"),
    (dict(activation="relu"), "activation"),
    (dict(config=SkinnyConfig(24, 64, 4)), "powers of two"),
    (dict(counter=torch.zeros(1, dtype=torch.int64)), "counter must be int32"),
])
def test_skinny_gemm_rejects_bad_input(bad, match):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(4, 8), bias=None, activation=None, residual=None,
                config=None, counter=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        skinny_gemm(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_skinny_tile_from_env(monkeypatch, device):
    x, weight, bias, _ = _inputs(4, 24, 40, torch.float32, device)
    monkeypatch.setenv("FTLAB_SKINNY_TILE", "16,16,4")  # three splits of K, two output tiles
    out = skinny_gemm(x, weight, bias)
    assert_rel_close(out, linear_reference(x.double(), weight.double(), bias=bias.double()), torch.float32)
    assert skinny_splits(4, 24, 40) == 3 and skinny_gemm(x, weight, partials=True).shape == (3, 4, 24)
    monkeypatch.setenv("FTLAB_SKINNY_TILE", "16,16")
    with pytest.raises(ValueError, match="FTLAB_SKINNY_TILE"):
        skinny_gemm(x, weight, bias)


def test_skinny_tile_per_weight_shape_from_env(monkeypatch, device):
    # FTLAB_SKINNY_TILE_<N>_<K> takes the (N, K) weights only, before FTLAB_SKINNY_TILE
    x, weight, bias, _ = _inputs(4, 24, 40, torch.float32, device)
    monkeypatch.setenv("FTLAB_SKINNY_TILE", "16,64,4")  # one split of K
    monkeypatch.setenv("FTLAB_SKINNY_TILE_24_40", "16,16,4")  # three
    assert skinny_splits(4, 24, 40) == 3 and skinny_splits(4, 40, 24) == 1
    out = skinny_gemm(x, weight, bias)
    assert_rel_close(out, linear_reference(x.double(), weight.double(), bias=bias.double()), torch.float32)
    assert skinny_gemm(x, weight, partials=True).shape == (3, 4, 24)
    monkeypatch.setenv("FTLAB_SKINNY_TILE_24_40", "16")
    with pytest.raises(ValueError, match="FTLAB_SKINNY_TILE_24_40"):
        skinny_gemm(x, weight, bias)


def test_linear_dispatches_impl_skinny(device):
    from ftlab.kernels.linear import linear

    x, weight, bias, residual = _inputs(6, 20, 48, torch.float32, device)
    ln_w, ln_b = 1 + 0.3 * torch.randn(48, device=device), 0.3 * torch.randn(48, device=device)
    folded, folded_bias, row_sums = fold_layernorm(weight, bias, ln_w, ln_b)
    out = linear(x, folded, folded_bias, residual=residual, ln_weight=torch.ones_like(ln_w),
                 ln_bias=torch.zeros_like(ln_b), ln_row_sums=row_sums, impl="skinny")
    ref = linear_reference(x.double(), weight.double(), bias=bias.double(), residual=residual.double(),
                           ln_weight=ln_w.double(), ln_bias=ln_b.double())
    assert_rel_close(out, ref, tol=1e-4, what="linear(impl='skinny') with a folded LayerNorm")
    stats_out = linear(x, folded, folded_bias, residual=residual, ln_weight=torch.ones_like(ln_w),
                       ln_bias=torch.zeros_like(ln_b), ln_row_sums=row_sums, impl="skinny-stats")
    assert_rel_close(stats_out, ref, tol=1e-4, what="linear(impl='skinny-stats') with a folded LayerNorm")
    with pytest.raises(ValueError, match="only folded"):
        linear(x, weight, bias, ln_weight=ln_w, ln_bias=ln_b, impl="skinny")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams and graphs")
def test_graph_capture_reuses_the_warm_up_counter():
    # capture_cuda_graph warms up on the current stream and captures on another: the capture must find the counter the
    # warm-up made, or its torch.zeros would be recorded into the graph and zero it again on every replay
    from ftlab.generate import capture_cuda_graph
    from ftlab.kernels import skinny_gemm as module

    x, weight, bias, _ = _inputs(9, 48, 300, torch.float16, "cuda")
    cfg = SkinnyConfig(16, 64, 4)  # 5 splits: the counter is used
    module._COUNTERS.clear()
    graph, out = capture_cuda_graph(lambda: skinny_gemm(x, weight, bias, config=cfg), torch.device("cuda"))
    assert len(module._COUNTERS) == 1  # made once, outside the capture
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert_rel_close(out, linear_reference(x.double(), weight.double(), bias=bias.double()), torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA descriptors (sm_90+)")
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("M, N, K", [(64, 3072, 1024), (33, 1000, 1000), (48, 1024, 4096), (64, 40, 64)])
def test_skinny_gemm_tma_loads_match_pointer_loads(M, N, K, dtype_name, monkeypatch):
    # x and the weight through TMA descriptors (zero-filled past M, N and K) must give the pointer loads' products:
    # every epilogue, the split-K sum, the folded LayerNorm and its row statistics
    dtype = DTYPES[dtype_name]
    x, weight, bias, residual = _inputs(M, N, K, dtype, "cuda")
    row_sums = torch.randn(N, dtype=torch.float32, device="cuda")
    calls = [dict(), dict(bias=bias, activation="gelu", residual=residual), dict(partials=True)]
    if K <= 1024:
        calls.append(dict(bias=bias, ln_row_sums=row_sums))
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("FTLAB_SKINNY_TMA", setting)
        results[setting] = [skinny_gemm(x, weight, **kw) for kw in calls]
    for kw, on, off in zip(calls, results["1"], results["0"]):
        torch.testing.assert_close(on, off, rtol=0, atol=0, msg=f"TMA against pointer loads, {sorted(kw)}")
    ref = linear_reference(x.double(), weight.double(), bias=bias.double(), residual=residual.double(),
                           activation="gelu")
    assert_rel_close(results["1"][1], ref, dtype=dtype)


class _FakeCudaTensor:
    """What _tma_on looks at, on a machine without a GPU: a CUDA tensor's device, dtype, shape and layout."""

    def __init__(self, rows, cols, dtype=torch.float16, row_stride=None, address=1 << 20):
        self.is_cuda, self.dtype, self.shape = True, dtype, (rows, cols)
        self.device = torch.device("cuda", 0)
        self._strides, self._address = (row_stride or cols, 1), address

    def stride(self, dim):
        return self._strides[dim]

    def element_size(self):
        return torch.tensor([], dtype=self.dtype).element_size()

    def data_ptr(self):
        return self._address


def test_tma_is_taken_from_56_rows_on_sm90_unless_turned_off(monkeypatch):
    from ftlab.kernels import skinny_gemm as module

    if module.TensorDescriptor is None:
        pytest.skip("this triton has no host-side tensor descriptors")
    monkeypatch.setattr(module, "hopper_or_later", lambda device: device.type == "cuda")
    monkeypatch.delenv("FTLAB_SKINNY_TMA", raising=False)
    weight = _FakeCudaTensor(3072, 1024)
    assert module._tma_on(_FakeCudaTensor(64, 1024), weight)
    assert module._tma_on(_FakeCudaTensor(module.TMA_MIN_ROWS, 1024), weight)
    assert not module._tma_on(_FakeCudaTensor(module.TMA_MIN_ROWS - 1, 1024), weight)
    assert module._tma_on(_FakeCudaTensor(64, 1024, torch.bfloat16), _FakeCudaTensor(3072, 1024, torch.bfloat16))
    assert not module._tma_on(_FakeCudaTensor(64, 1024, torch.float32), _FakeCudaTensor(3072, 1024, torch.float32))
    assert not module._tma_on(_FakeCudaTensor(64, 1000, row_stride=1001), weight)  # rows not 16-byte aligned
    assert not module._tma_on(_FakeCudaTensor(64, 1024, address=(1 << 20) + 8), weight)
    monkeypatch.setenv("FTLAB_SKINNY_TMA", "1")
    assert module._tma_on(_FakeCudaTensor(17, 1024), weight)
    monkeypatch.setenv("FTLAB_SKINNY_TMA", "0")
    assert not module._tma_on(_FakeCudaTensor(64, 1024), weight)
    monkeypatch.delenv("FTLAB_SKINNY_TMA")
    monkeypatch.setattr(module, "hopper_or_later", lambda device: False)
    assert not module._tma_on(_FakeCudaTensor(64, 1024), weight)
