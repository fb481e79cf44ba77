import pytest
import torch
import torch.nn.functional as F

from ftlab.kernels import attention as attention_module
from ftlab.kernels.attention import ContextBlocks, context_attention, context_attention_reference
from tests.util import DTYPES, assert_rel_close, skip_if_interpreter_bf16


def _packed_qkv(lengths, num_heads, head_dim, dtype, device):
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    qkv = torch.randn(int(cu_seqlens[-1]), 3, num_heads, head_dim).to(dtype=dtype, device=device)
    return qkv, cu_seqlens.to(device)


def _nan_cache(batch, num_heads, s_max, head_dim, dtype, device):
    # poisoned beyond what the kernel writes: a read of an unwritten slot or a stray write shows up
    return torch.full((batch, num_heads, s_max, head_dim), float("nan"), dtype=dtype, device=device)


def _assert_cache_equal(cache, ref_cache, what):
    # the copy must be exact; NaN must stay exactly where the reference left it
    torch.testing.assert_close(cache.double(), ref_cache.double(), rtol=0, atol=0, equal_nan=True, msg=what)


def _check_against_reference(qkv, cu_seqlens, max_seqlen, s_max, scale=None):
    batch, num_heads, head_dim = cu_seqlens.numel() - 1, qkv.shape[2], qkv.shape[3]
    k_cache = _nan_cache(batch, num_heads, s_max, head_dim, qkv.dtype, qkv.device)
    v_cache = _nan_cache(batch, num_heads, s_max, head_dim, qkv.dtype, qkv.device)
    ref_k = _nan_cache(batch, num_heads, s_max, head_dim, torch.float64, qkv.device)
    ref_v = _nan_cache(batch, num_heads, s_max, head_dim, torch.float64, qkv.device)

    out = context_attention(qkv, cu_seqlens, max_seqlen, scale=scale, k_cache=k_cache, v_cache=v_cache)
    ref = context_attention_reference(qkv.double(), cu_seqlens, max_seqlen, scale=scale, k_cache=ref_k, v_cache=ref_v)

    assert out.dtype == qkv.dtype
    assert_rel_close(out, ref, dtype=qkv.dtype)
    _assert_cache_equal(k_cache, ref_k, "k_cache")
    _assert_cache_equal(v_cache, ref_v, "v_cache")


# (prompt lengths, heads, head dim): ragged prompts, first tokens alone, prompts longer than the 64-query tiles
CASES = [
    ([1], 1, 16),
    ([1, 7, 13], 2, 24),
    ([13, 130, 1], 5, 64),
    ([70, 3], 2, 16),
]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("lengths,num_heads,head_dim", CASES)
def test_context_attention_matches_reference_and_fills_cache(lengths, num_heads, head_dim, dtype_name, device):
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    qkv, cu_seqlens = _packed_qkv(lengths, num_heads, head_dim, dtype, device)
    max_seqlen = max(lengths)
    _check_against_reference(qkv, cu_seqlens, max_seqlen, s_max=max_seqlen + 3)


@pytest.mark.parametrize("blocks", [ContextBlocks(128, 64, 8, 2), ContextBlocks(32, 16, 4, 2),
                                    ContextBlocks(64, 32, 4, 3)])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_context_attention_other_tile_sizes(blocks, dtype_name, device, monkeypatch):
    # in fp16 / bf16 small test problems get the heuristic's small-grid tiles (64 queries x 64 keys): cover the
    # large and many-tile configurations, and the 64 x 32 tiles it gives larger grids
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    monkeypatch.setattr(attention_module, "pick_context_blocks", lambda *args, **kwargs: blocks)
    lengths = [130, 9, 64]
    qkv, cu_seqlens = _packed_qkv(lengths, 2, 32, dtype, device)
    _check_against_reference(qkv, cu_seqlens, max(lengths), s_max=131)


@pytest.mark.parametrize("blocks", [None, ContextBlocks(32, 16, 4, 2)])
@pytest.mark.parametrize("with_cache", [True, False])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_last_rows_only_computes_each_prompts_last_row_and_the_whole_cache(blocks, with_cache, dtype_name, device,
                                                                           monkeypatch):
    # lengths ending just before, on and just after a block boundary (32 / 64 queries), and a lone first token;
    # the grid-size threshold lowered so that these small grids take the last-rows path
    dtype = DTYPES[dtype_name]
    skip_if_interpreter_bf16(dtype, device)
    monkeypatch.setattr(attention_module, "LAST_ROWS_MIN_PROGRAMS", 0)
    lengths = [65, 1, 64, 130, 31, 33]
    qkv, cu_seqlens = _packed_qkv(lengths, 3, 32, dtype, device)
    batch, max_seqlen = len(lengths), max(lengths)
    caches = [_nan_cache(batch, 3, max_seqlen + 2, 32, dtype, device) for _ in range(2)] if with_cache else [None] * 2
    refs = [_nan_cache(batch, 3, max_seqlen + 2, 32, torch.float64, device) for _ in range(2)]
    out = context_attention(qkv, cu_seqlens, max_seqlen, k_cache=caches[0], v_cache=caches[1], blocks=blocks,
                            last_rows_only=True)
    ref = context_attention_reference(qkv.double(), cu_seqlens, max_seqlen, k_cache=refs[0], v_cache=refs[1])
    last = cu_seqlens[1:].long() - 1
    assert_rel_close(out[last], ref[last], dtype=dtype)
    if with_cache:
        _assert_cache_equal(caches[0], refs[0], "k_cache")
        _assert_cache_equal(caches[1], refs[1], "v_cache")


def test_context_attention_custom_scale_and_loose_max_seqlen(device):
    # max_seqlen is only an upper bound; S_max may exceed it
    qkv, cu_seqlens = _packed_qkv([5, 9], 2, 16, torch.float32, device)
    _check_against_reference(qkv, cu_seqlens, max_seqlen=20, s_max=23, scale=0.3)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_context_attention_without_cache_matches_sdpa(dtype_name, device):
    # an independent oracle: torch's causal SDPA on each prompt separately
    dtype = DTYPES[dtype_name]
    lengths = [7, 70]
    qkv, cu_seqlens = _packed_qkv(lengths, 3, 24, dtype, device)
    out = context_attention(qkv, cu_seqlens, max(lengths))
    for lo, hi in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        q, k, v = (qkv[lo:hi, i].transpose(0, 1).double() for i in range(3))  # (nh, L, d)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        assert_rel_close(out[lo:hi], ref, dtype=dtype, what=f"tokens {lo}:{hi}")


def test_context_attention_strided_views(device):
    # qkv as a column slice of a wider projection output, caches as one layer of a (L, B, nh, S_max, d) buffer
    lengths, num_heads, head_dim, s_max = [4, 11, 1], 2, 16, 17
    total = sum(lengths)
    wide = torch.randn(total, 3, num_heads + 1, head_dim, device=device)
    qkv = wide[:, :, 1:]
    assert not qkv.is_contiguous()
    _, cu_seqlens = _packed_qkv(lengths, num_heads, head_dim, torch.float32, device)
    k_all = torch.full((3, len(lengths), num_heads, s_max, head_dim), float("nan"), device=device)
    v_all = torch.full_like(k_all, float("nan"))
    ref_k = torch.full_like(k_all[1], float("nan"), dtype=torch.float64)
    ref_v = torch.full_like(ref_k, float("nan"))

    out = context_attention(qkv, cu_seqlens, max(lengths), k_cache=k_all[1], v_cache=v_all[1])
    ref = context_attention_reference(qkv.double(), cu_seqlens, max(lengths), k_cache=ref_k, v_cache=ref_v)

    assert_rel_close(out, ref, dtype=torch.float32)
    _assert_cache_equal(k_all[1], ref_k, "k_cache layer 1")
    _assert_cache_equal(v_all[1], ref_v, "v_cache layer 1")
    for layer in (0, 2):
        assert torch.isnan(k_all[layer]).all() and torch.isnan(v_all[layer]).all(), f"layer {layer} was written"


def _good_args(device):
    qkv, cu_seqlens = _packed_qkv([3, 5], 2, 16, torch.float32, device)
    k_cache = torch.zeros(2, 2, 8, 16, device=device)
    return dict(qkv=qkv, cu_seqlens=cu_seqlens, max_seqlen=5, k_cache=k_cache, v_cache=k_cache.clone())


BAD_INPUTS = [
    ("qkv 3-D", lambda a: a.update(qkv=a["qkv"][:, 0]), "qkv"),
    ("qkv not 3 parts", lambda a: a.update(qkv=a["qkv"][:, :2]), "qkv"),
    ("qkv integer", lambda a: a.update(qkv=a["qkv"].to(torch.int32)), "qkv dtype"),
    ("qkv strided head dim", lambda a: a.update(qkv=a["qkv"].repeat_interleave(2, dim=3)[..., ::2]), "qkv"),
    ("cu_seqlens int64", lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), "cu_seqlens"),
    ("cu_seqlens 2-D", lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), "cu_seqlens"),
    ("cu_seqlens too long for the cache batch", lambda a: a.update(cu_seqlens=torch.cat(
        [a["cu_seqlens"], a["cu_seqlens"][-1:]])), "k_cache"),
    ("max_seqlen zero", lambda a: a.update(max_seqlen=0), "max_seqlen"),
    ("max_seqlen float", lambda a: a.update(max_seqlen=5.0), "max_seqlen"),
    ("k_cache alone", lambda a: a.update(v_cache=None), "k_cache and v_cache"),
    ("cache too small", lambda a: a.update(max_seqlen=9), "k_cache capacity"),
    ("v_cache dtype", lambda a: a.update(v_cache=a["v_cache"].half()), "v_cache dtype"),
    ("k_cache heads", lambda a: a.update(k_cache=a["k_cache"][:, :1]), "k_cache"),
    ("v_cache head dim", lambda a: a.update(v_cache=a["v_cache"][..., :8]), "v_cache"),
]


@pytest.mark.parametrize("what,mutate,match", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_context_attention_rejects_bad_inputs(what, mutate, match, device):
    args = _good_args(device)
    context_attention(**args)  # the unmodified arguments are accepted
    mutate(args)
    with pytest.raises(ValueError, match=match):
        context_attention(**args)



def test_blocks_must_tile_the_query_block(device):
    qkv = torch.randn(5, 3, 2, 8, device=device)
    cu_seqlens = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block_m=64 must be a multiple of blocks.block_n=128"):
        context_attention(qkv, cu_seqlens, 5, blocks=ContextBlocks(64, 128, 4, 2))


def test_sdpa_comparison_computes_the_same_attention_and_cache(device):
    # the --graph benchmark's SDPA variant must do the model's work, or its timings compare different things
    from torch.nn.attention import SDPBackend

    backend = SDPBackend.MATH if device == "cpu" else SDPBackend.FLASH_ATTENTION
    dtype = torch.float32 if device == "cpu" else torch.float16
    batch, length, num_heads, head_dim = 3, 13, 2, 16
    qkv, cu_seqlens = _packed_qkv([length] * batch, num_heads, head_dim, dtype, device)
    caches = [_nan_cache(batch, num_heads, length + 4, head_dim, dtype, device) for _ in range(4)]
    out = attention_module._sdpa_with_cache(qkv, batch, length, caches[0], caches[1], backend)
    expected = context_attention_reference(qkv, cu_seqlens, length, k_cache=caches[2], v_cache=caches[3])
    assert_rel_close(out, expected, dtype, what="sdpa output")
    _assert_cache_equal(caches[0], caches[2], "k cache")
    _assert_cache_equal(caches[1], caches[3], "v cache")
