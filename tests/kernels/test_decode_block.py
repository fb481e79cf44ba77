"""The fused decode block (one persistent launch per GPT block) against its torch reference and the unfused path."""
import pytest
import torch

from ftlab.config import GPTConfig
from ftlab.checkpoint import random_ft_tensors
from ftlab.generate import generate
from ftlab.kernels.decode_block import (MAX_BATCH, decode_block, decode_block_reference, new_sync_state,
                                        split_attention, split_gemv)
from ftlab.model import GPT
from tests.util import DTYPES, assert_rel_close, cache_with_history


def _block_weights(H, inter, dtype, device):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype=dtype, device=device)

    return dict(ln1_weight=1 + r(H, scale=0.2), ln1_bias=r(H, scale=0.2),
                qkv_weight=r(3 * H, H, scale=H ** -0.5), qkv_bias=r(3 * H, scale=0.2),
                attn_out_weight=r(H, H, scale=H ** -0.5), attn_out_bias=r(H, scale=0.2),
                ln2_weight=1 + r(H, scale=0.2), ln2_bias=r(H, scale=0.2),
                fc1_weight=r(inter, H, scale=H ** -0.5), fc1_bias=r(inter, scale=0.2),
                fc2_weight=r(H, inter, scale=inter ** -0.5), fc2_bias=r(H, scale=0.2))


def _check_block(B, H, nh, inter, cap, positions, dtype, device, programs, sync=None, **knobs):
    weights = _block_weights(H, inter, dtype, device)
    x = torch.randn(B, H).to(dtype=dtype, device=device)
    k, v = cache_with_history(positions, nh, cap, H // nh, dtype, device)
    ref_k, ref_v = k.double(), v.double()
    pos = torch.tensor(positions, dtype=torch.int32, device=device)
    out = decode_block(x, pos, k, v, num_heads=nh, programs=programs, sync=sync, **knobs, **weights)
    ref = decode_block_reference(x.double(), pos, ref_k, ref_v, num_heads=nh,
                                 **{n: w.double() for n, w in weights.items()})
    assert out.dtype == dtype and out.shape == (B, H)
    assert_rel_close(out, ref, dtype=dtype, what="block output")
    # the new slot holds the new key/value (rounded to the cache dtype); every other slot is untouched
    for name, got, want in (("k_cache", k, ref_k), ("v_cache", v, ref_v)):
        for b, p in enumerate(positions):
            assert_rel_close(got[b, :, p], want[b, :, p], dtype=dtype, what=f"{name} slot {p} of sequence {b}")
            got[b, :, p], want[b, :, p] = 0.0, 0.0
        torch.testing.assert_close(got.double(), want, rtol=0, atol=0, equal_nan=True, msg=f"{name} elsewhere")


# (B, H, nh, I, capacity, positions, work split): first tokens, the cache's last slot, ragged batches, sizes that
# are no powers of two, splits that leave programs without work and items with a ragged last tile
CASES = [
    (1, 64, 4, 256, 13, [5], None),
    (3, 48, 3, 192, 13, [0, 6, 12], 5),
    (2, 48, 3, 200, 37, [36, 17], 7),
    (4, 64, 2, 256, 50, [49, 0, 3, 31], 3),
    (1, 32, 1, 96, 1023, [1022], 13),
]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])  # no tl.dot: bf16 is exact in the interpreter too
@pytest.mark.parametrize("B,H,nh,inter,cap,positions,programs", CASES)
def test_decode_block_matches_reference(B, H, nh, inter, cap, positions, programs, dtype_name, device):
    _check_block(B, H, nh, inter, cap, positions, DTYPES[dtype_name], device, programs)


def test_decode_block_k_in_chunks(device):
    # one program's share of every weight spans several K chunks (the pipelined chunk loop, LN statistics merged
    # over chunks); on the GPU the real grid splits the same way
    split = split_gemv(3 * 256, 256, 1, 4)
    assert not split.one_chunk
    _check_block(2, 256, 4, 1024, 9, [8, 3], torch.float32, device, programs=1)


def test_sync_state_is_left_ready_for_the_next_launch(device):
    nh, B = 2, 3
    sync = new_sync_state(B, nh, device)
    for layer in range(3):  # layers of a step share one buffer
        _check_block(B, 32, nh, 64, 11, [10, 2, 5], torch.float32, device, programs=4, sync=sync)
        assert (sync == 0).all(), f"sync after launch {layer + 1}: {sync.tolist()}"


def test_splits_cover_every_feature_and_slot():
    for N, K, programs in ((3072, 1024, 132), (1024, 4096, 132), (50, 7, 13), (1, 1, 5)):
        s = split_gemv(N, K, programs, 2)
        assert s.items <= programs and s.items * s.rows_per_item >= N > (s.items - 1) * s.rows_per_item
        assert s.block_r >= s.rows_per_item and (s.block_r * s.lanes * 16 <= 64 * 1024 or s.lanes == 1)
    for B, nh, cap, programs in ((1, 16, 768, 132), (4, 16, 37, 132), (3, 5, 1, 7)):
        a = split_attention(B, nh, cap, 64, programs)
        assert a.part_size % a.block_s == 0 and a.parts * a.part_size >= cap > (a.parts - 1) * a.part_size


def test_bad_inputs_name_the_tensor(device):
    H, nh, inter = 32, 2, 64
    w = _block_weights(H, inter, torch.float32, device)
    k, v = cache_with_history([1], nh, 4, H // nh, torch.float32, device)
    pos = torch.tensor([1], dtype=torch.int32, device=device)
    x = torch.randn(1, H, device=device)
    with pytest.raises(ValueError, match="x must be"):
        decode_block(torch.randn(MAX_BATCH + 1, H, device=device), pos, k, v, num_heads=nh, **w)
    with pytest.raises(ValueError, match="attn_out_weight"):
        decode_block(x, pos, k, v, num_heads=nh, **{**w, "attn_out_weight": w["attn_out_weight"][:, :-1]})
    with pytest.raises(ValueError, match="fc2_bias is required"):
        decode_block(x, pos, k, v, num_heads=nh, **{**w, "fc2_bias": None})
    with pytest.raises(ValueError, match="positions"):
        decode_block(x, pos.long(), k, v, num_heads=nh, **w)
    with pytest.raises(ValueError, match="k_cache"):
        decode_block(x, pos, k[:, :1], v, num_heads=nh, **w)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_model_decodes_the_same_fused_or_not(dtype_name, device, monkeypatch):
    # the whole model: greedy tokens and the logits of a ragged batch, fused blocks vs the five-kernel blocks
    config = GPTConfig(head_num=3, size_per_head=16, inter_size=200, num_layer=2, vocab_size=97, max_pos_seq_len=64,
                       start_id=96, end_id=96)
    model = GPT.from_ft_tensors(config, random_ft_tensors(config, seed=3), dtype=dtype_name, device=device)
    prompts = [[5, 9, 2, 44], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("FTLAB_FUSED_BLOCK", fused)
        results[fused] = generate(model, prompts, max_new_tokens=6, top_k=1, return_log_probs=True)
    assert results["1"].output_ids == results["0"].output_ids
    for a, b in zip(results["1"].output_log_probs, results["0"].output_log_probs):
        assert_rel_close(torch.tensor(a), torch.tensor(b), dtype=DTYPES[dtype_name],
                         what="log probs of the generated tokens")
