"""L2 prefetch (kernels/_prefetch.py): when it is on, how programs share the target, and that results never change."""
import pytest
import torch

from ftlab.kernels import _pdl, _prefetch
from ftlab.kernels.decode_attention import decode_attention, decode_attention_reference
from ftlab.kernels.linear import linear, linear_reference
from tests.util import cache_with_history


def test_never_on_the_cpu():
    t = torch.randn(1000)
    assert _prefetch.prefetch_mode(torch.device("cpu")) == 0
    assert _prefetch.prefetch_plan(t, 13, t).mode == 0


def test_hopper_or_later_unless_turned_off(monkeypatch):
    cuda0 = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
    for major, expected in ((8, 0), (9, 1), (10, 1)):
        monkeypatch.setattr(_pdl, "_capability_major", lambda index, major=major: major)
        assert _prefetch.prefetch_mode(cuda0) == expected, major
    monkeypatch.setenv("FTLAB_PREFETCH", "2")
    assert _prefetch.prefetch_mode(cuda0) == 2
    monkeypatch.setenv("FTLAB_PREFETCH", "0")
    assert _prefetch.prefetch_mode(cuda0) == 0


@pytest.mark.parametrize("numel,programs", [(7, 1), (1023, 13), (3 * 1024 * 1024, 1000), (4096, 100000)])
def test_plan_covers_the_target_in_aligned_shares(monkeypatch, numel, programs):
    monkeypatch.setattr(_prefetch, "prefetch_mode", lambda device: 1)
    target = torch.randn(numel, dtype=torch.float16)
    plan = _prefetch.prefetch_plan(target, programs, target)
    assert plan.mode == 1 and plan.target is target
    assert plan.nbytes % 16 == 0 and plan.nbytes > numel * 2 - 16  # whole 16-byte units, the tail of < 16 dropped
    assert plan.share % 128 == 0 and plan.share * programs >= plan.nbytes
    assert plan.share - 128 < plan.nbytes / programs or plan.share == 128  # shares no wider than needed


def test_plan_off_for_a_view_that_is_not_aligned(monkeypatch):
    monkeypatch.setattr(_prefetch, "prefetch_mode", lambda device: 1)
    base = torch.randn(64, dtype=torch.float16)
    assert _prefetch.prefetch_plan(base[1:], 4, base).mode == 0
    assert _prefetch.prefetch_plan(None, 4, base).mode == 0
    assert _prefetch.prefetch_plan(base.view(8, 8).t(), 4, base).mode == 0


def test_linear_rejects_a_prefetch_that_is_not_a_tensor(device):
    x, w = torch.randn(1, 16, device=device), torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="prefetch must be a torch.Tensor"):
        linear(x, w, prefetch=[w])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,target_numel", [(1, 7, 13, 1023), (1, 3072, 1024, 4 * 1024 * 1024),
                                                 (3, 1023, 4096, 17)])
def test_gemv_results_unchanged_by_prefetch(monkeypatch, mode, dtype, M, N, K, target_numel):
    monkeypatch.setenv("FTLAB_PREFETCH", mode)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) * 0.05
    b = torch.randn(N, device="cuda", dtype=dtype)
    g, beta = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dtype), torch.randn(K, device="cuda", dtype=dtype)
    target = torch.randn(target_numel, device="cuda", dtype=dtype)
    kwargs = dict(activation="gelu", ln_weight=g, ln_bias=beta)
    got = linear(x, w, b, impl="gemv", prefetch=target, **kwargs)
    plain = linear(x, w, b, impl="gemv", **kwargs)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(got.float(), linear_reference(x, w, b, **kwargs).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "2"])
def test_decode_attention_results_unchanged_by_prefetch(monkeypatch, mode):
    monkeypatch.setenv("FTLAB_PREFETCH", mode)
    B, nh, d, s_max = 3, 5, 64, 1023
    qkv = torch.randn(B, 3, nh, d, device="cuda", dtype=torch.float16)
    history = [0, 517, 1022]
    positions = torch.tensor(history, dtype=torch.int32, device="cuda")
    k_cache, v_cache = cache_with_history(history, nh, s_max, d, torch.float16, "cuda")
    target = torch.randn(8 * 1024 * 1024 + 7, device="cuda", dtype=torch.float16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = decode_attention_reference(qkv, k_ref, v_ref, positions)
    got = decode_attention(qkv, k_cache, v_cache, positions, prefetch=target)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
def test_decode_step_prefetches_each_block_weight_once_ahead_of_its_kernel(monkeypatch, ahead):
    from ftlab.checkpoint import random_ft_tensors
    from ftlab.config import GPTConfig
    from ftlab.model import GPT

    config = GPTConfig(head_num=2, size_per_head=8, num_layer=3, vocab_size=50, max_pos_seq_len=16,
                       start_id=0, end_id=49)
    model = GPT.from_ft_tensors(config, random_ft_tensors(config), dtype="fp32", device="cpu")
    monkeypatch.setenv("FTLAB_PREFETCH_AHEAD", str(ahead))
    targets = model._prefetch_targets()
    # launch order per block: QKV, attention (reads no weight), out-proj, FC1, FC2
    reads = [w for b in model.weights.blocks for w in (b.qkv_weight, None, b.attn_out_weight, b.fc1_weight,
                                                       b.fc2_weight)]
    assert len(targets) == len(reads)
    for k, target in enumerate(targets):
        expected = reads[k + ahead] if ahead and k + ahead < len(reads) else None
        assert target is expected, (k, ahead)
    prefetched = [t for t in targets if t is not None]
    assert len({id(t) for t in prefetched}) == len(prefetched)  # nothing fetched twice
    if ahead:  # every weight after the first `ahead` kernels is fetched by someone
        assert {id(w) for w in reads[ahead:] if w is not None} == {id(t) for t in prefetched}
