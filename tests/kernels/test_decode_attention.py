import pytest
import torch
import torch.nn.functional as F

from ftlab.kernels import decode_attention as decode_module
from ftlab.kernels.attention import context_attention
from ftlab.kernels.decode_attention import (DecodeBlocks, decode_attention, decode_attention_reference,
                                           pick_decode_blocks)
from tests.util import DTYPES, assert_rel_close, cache_with_history


def _assert_cache_equal(cache, ref_cache, what):
    # the new slot must hold an exact copy; NaN must remain everywhere else beyond the history
    torch.testing.assert_close(cache.double(), ref_cache.double(), rtol=0, atol=0, equal_nan=True, msg=what)


def _check_against_reference(positions, num_heads, head_dim, s_max, dtype, device, scale=None, blocks=None):
    batch = len(positions)
    qkv = torch.randn(batch, 3, num_heads, head_dim).to(dtype=dtype, device=device)
    k_cache, v_cache = cache_with_history(positions, num_heads, s_max, head_dim, dtype, device)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    positions_t = torch.tensor(positions, dtype=torch.int32, device=device)

    out = decode_attention(qkv, k_cache, v_cache, positions_t, scale=scale, blocks=blocks)
    ref = decode_attention_reference(qkv.double(), ref_k, ref_v, positions_t, scale=scale)

    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype=dtype)
    _assert_cache_equal(k_cache, ref_k, "k_cache")
    _assert_cache_equal(v_cache, ref_v, "v_cache")


# (positions, heads, head dim, S_max): first tokens (position 0), the last slot, S_max not a multiple of any tile
CASES = [
    ([0], 1, 16, 5),
    ([0, 17, 40], 2, 24, 41),
    ([31, 69, 32], 5, 64, 70),
    ([15, 0, 16], 2, 16, 37),
]


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("positions,num_heads,head_dim,s_max", CASES)
def test_decode_attention_matches_reference_and_appends(positions, num_heads, head_dim, s_max, dtype_name, device):
    dtype = DTYPES[dtype_name]  # no tl.dot in these kernels, so bf16 also runs under the interpreter
    _check_against_reference(positions, num_heads, head_dim, s_max, dtype, device)


@pytest.mark.parametrize("blocks,positions,s_max", [
    # 32-slot partitions of two 16-key tiles: new key on a partition's first slot, last slot, a tile boundary
    (DecodeBlocks(16, 2, 4), [32, 15, 47], 50),
    (DecodeBlocks(16, 2, 4), [16, 31, 49], 50),
    # 38 partitions: more than the reduction handles in one chunk
    (DecodeBlocks(16, 1, 4), [599, 0, 300], 600),
    # one warp per 32-key partition (the small-batch pick): new key on a first / last slot, 19 partitions
    (DecodeBlocks(32, 1, 1), [32, 63, 0], 600),
])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_decode_attention_partition_boundaries(blocks, positions, s_max, dtype_name, device):
    dtype = DTYPES[dtype_name]  # no tl.dot in these kernels, so bf16 also runs under the interpreter
    # passed explicitly: the interpreter's default would be one partition (the partials and combine untested)
    _check_against_reference(positions, 2, 24, s_max, dtype, device, blocks=blocks)


@pytest.mark.parametrize("blocks,positions,s_max", [
    # 10 partitions of up to 64 slots: pos + 1 keys shared out in 16-key tiles (64, 32, 16 per partition, or 1 tile)
    (DecodeBlocks(16, 4, 1), [599, 300, 37, 0], 600),
    # a share that is not a whole tile: 3 partitions of up to 256 slots, 2 of 192 and one of 145 keys at pos 528
    (DecodeBlocks(32, 8, 1), [528, 255, 256], 768),
])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("balanced", ["1", "0"])
def test_decode_attention_balanced_partitions(blocks, positions, s_max, dtype_name, balanced, device, monkeypatch):
    # the default: the partitions split the keys a sequence has; FTLAB_DECODE_BALANCED=0: the cache's slots
    monkeypatch.setenv("FTLAB_DECODE_BALANCED", balanced)
    _check_against_reference(positions, 2, 24, s_max, DTYPES[dtype_name], device, blocks=blocks)


@pytest.mark.parametrize("setting,single", [("64,2,4", "1"), ("16,1,2", "1"), ("16,2,4", "0")])
def test_decode_attention_blocks_from_env(setting, single, device, monkeypatch):
    # FTLAB_DECODE_BLOCKS replaces the heuristic; one partition per head (64 x 2 slots >= S_max = 70) writes its
    # output directly when FTLAB_DECODE_SINGLE_PART allows it (always under the interpreter)
    monkeypatch.setenv("FTLAB_DECODE_BLOCKS", setting)
    monkeypatch.setenv("FTLAB_DECODE_SINGLE_PART", single)
    used = []
    kernel = decode_module._decode_partition_kernel
    monkeypatch.setattr(decode_module, "_decode_partition_kernel", _Spy(kernel, used))
    _check_against_reference([31, 69, 5], 3, 32, 70, torch.float32, device)
    block_s, tiles, warps = (int(v) for v in setting.split(","))
    one_partition = block_s * tiles >= 70  # S_max
    assert used == [(block_s, tiles, warps, one_partition and (single == "1" or device == "cpu"))]


class _Spy:
    """Stands in for the @triton.jit kernel: records the launch's blocks and whether it ran single-partition."""

    def __init__(self, kernel, used):
        self.kernel, self.used = kernel, used

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.used.append((kwargs["BLOCK_S"], kwargs["TILES_PER_PART"], kwargs["num_warps"],
                              kwargs["SINGLE_PART"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("setting", ["64,2", "48,1,2", "64,1,3", "a,b,c"])
def test_decode_blocks_env_is_checked(setting, monkeypatch):
    monkeypatch.setenv("FTLAB_DECODE_BLOCKS", setting)
    with pytest.raises(ValueError, match="FTLAB_DECODE_BLOCKS"):
        decode_module._blocks_from_env()


@pytest.mark.parametrize("policy", ["", "evict_first", "evict_last"])
def test_decode_attention_kv_eviction_policies(policy, device, monkeypatch):
    # FTLAB_DECODE_KV_EVICT (default evict_first) only changes how L2 keeps the cache lines, never the result
    monkeypatch.setenv("FTLAB_DECODE_KV_EVICT", policy)
    _check_against_reference([31, 69, 5], 3, 32, 70, torch.float16, device)


def test_decode_attention_kv_eviction_policy_is_checked(device, monkeypatch):
    monkeypatch.setenv("FTLAB_DECODE_KV_EVICT", "evict_never")
    with pytest.raises(ValueError, match="FTLAB_DECODE_KV_EVICT='evict_never'"):
        _check_against_reference([3], 1, 16, 8, torch.float32, device)


def test_decode_attention_custom_scale(device):
    _check_against_reference([3, 9], 2, 16, 12, torch.float32, device, scale=0.7)


def test_decode_attention_strided_views(device):
    # qkv as a slice of a wider tensor, caches as one layer of a (L, B, nh, S_max, d) buffer
    positions, num_heads, head_dim, s_max = [6, 0, 13], 2, 16, 14
    qkv = torch.randn(3, 3, num_heads + 2, head_dim, device=device)[:, :, 1:-1]
    assert not qkv.is_contiguous()
    k_all = torch.full((2, 3, num_heads, s_max, head_dim), float("nan"), device=device)
    v_all = torch.full_like(k_all, float("nan"))
    k_all[1], v_all[1] = cache_with_history(positions, num_heads, s_max, head_dim, torch.float32, device)
    ref_k, ref_v = k_all[1].double(), v_all[1].double()
    positions_t = torch.tensor(positions, dtype=torch.int32, device=device)

    out = decode_attention(qkv, k_all[1], v_all[1], positions_t)
    ref = decode_attention_reference(qkv.double(), ref_k, ref_v, positions_t)

    assert_rel_close(out, ref, dtype=torch.float32)
    _assert_cache_equal(k_all[1], ref_k, "k_cache layer 1")
    _assert_cache_equal(v_all[1], ref_v, "v_cache layer 1")
    assert torch.isnan(k_all[0]).all() and torch.isnan(v_all[0]).all(), "layer 0 was written"


@pytest.mark.parametrize("shared_counter", [False, True])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_prefill_then_decode_reproduces_causal_attention(dtype_name, shared_counter, device):
    # context_attention fills the cache for a prompt, decode steps extend it; every output row must equal causal
    # attention over the whole sequence (torch SDPA as an independent oracle), so both kernels agree on the layout.
    # With one counter for all steps (as the model passes it), each launch must leave it zero for the next one.
    dtype = DTYPES[dtype_name]
    prompt_lens, steps, num_heads, head_dim, s_max = [5, 9], 4, 2, 24, 15
    total = [n + steps for n in prompt_lens]
    seqs = [torch.randn(n, 3, num_heads, head_dim).to(dtype=dtype, device=device) for n in total]
    k_cache = torch.full((2, num_heads, s_max, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))

    cu_seqlens = torch.tensor([0, prompt_lens[0], sum(prompt_lens)], dtype=torch.int32, device=device)
    prompt_qkv = torch.cat([seq[:n] for seq, n in zip(seqs, prompt_lens)])
    prefill_out = context_attention(prompt_qkv, cu_seqlens, max(prompt_lens), k_cache=k_cache, v_cache=v_cache)
    outs = [[prefill_out[:prompt_lens[0]]], [prefill_out[prompt_lens[0]:]]]
    counter = torch.zeros((2, num_heads), dtype=torch.int32, device=device)
    for step in range(steps):
        positions = torch.tensor([n + step for n in prompt_lens], dtype=torch.int32, device=device)
        step_qkv = torch.stack([seq[n + step] for seq, n in zip(seqs, prompt_lens)])
        if shared_counter:
            step_out = decode_attention(step_qkv, k_cache, v_cache, positions, counter=counter, history_ready=True)
            assert not counter.any(), "the counter was not left zero"
        else:
            step_out = decode_attention(step_qkv, k_cache, v_cache, positions)
        for b in range(2):
            outs[b].append(step_out[b:b + 1])

    for b, seq in enumerate(seqs):
        q, k, v = (seq[:, i].transpose(0, 1).double() for i in range(3))  # (nh, L, d)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        assert_rel_close(torch.cat(outs[b]), ref, dtype=dtype, what=f"sequence {b}")
        torch.testing.assert_close(k_cache[b, :, :total[b]], seq[:, 1].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, :, :total[b]], seq[:, 2].transpose(0, 1), rtol=0, atol=0)
        assert torch.isnan(k_cache[b, :, total[b]:]).all() and torch.isnan(v_cache[b, :, total[b]:]).all()


def _replay_at_positions(replay, out, qkv, k_cache, v_cache, positions, history, dtype):
    # each row of history: new q/k/v and positions in the captured inputs, one replay, output and cache checked
    for pos in history:
        qkv.copy_(torch.randn_like(qkv))
        positions.copy_(torch.tensor(pos, dtype=torch.int32))
        ref_k, ref_v = k_cache.double(), v_cache.double()
        ref = decode_attention_reference(qkv.double(), ref_k, ref_v, positions)
        replay()
        torch.cuda.synchronize()
        assert_rel_close(out, ref, dtype=dtype, what=f"positions {pos}")
        _assert_cache_equal(k_cache, ref_k, "k_cache")
        _assert_cache_equal(v_cache, ref_v, "v_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_decode_attention_replays_in_cuda_graph(dtype_name):
    # captured once, replayed with new positions and tokens: the launcher must not depend on positions' values
    dtype, device = DTYPES[dtype_name], "cuda"
    batch, num_heads, head_dim, s_max = 3, 4, 64, 300
    history = [[0, 100, 250], [1, 260, 299]]
    k_cache, v_cache = cache_with_history([s_max] * batch, num_heads, s_max, head_dim, dtype, device)
    qkv = torch.randn(batch, 3, num_heads, head_dim, dtype=dtype, device=device)
    positions = torch.tensor(history[0], dtype=torch.int32, device=device)
    counter = torch.zeros((batch, num_heads), dtype=torch.int32, device=device)  # reused by every replay
    decode_attention(qkv, k_cache, v_cache, positions, counter=counter)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(qkv, k_cache, v_cache, positions, counter=counter, history_ready=True)
    _replay_at_positions(graph.replay, out, qkv, k_cache, v_cache, positions, history, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_decode_attention_single_part_pick_replays_in_cuda_graph(dtype_name, monkeypatch):
    # a batch the heuristic gives one partition per (sequence, head) on this GPU, replayed in a CUDA graph at
    # ragged, changing positions; the launch must take the single-partition path (no partials, no combine)
    dtype, device = DTYPES[dtype_name], "cuda"
    num_heads, head_dim, s_max = 16, 64, 300
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = -(-6 * num_sms // num_heads)  # ~6 pairs per SM
    assert pick_decode_blocks(batch, num_heads, s_max, head_dim, num_sms).part_size >= s_max
    gen = torch.Generator().manual_seed(5)
    history = [torch.randint(0, s_max - 1, (batch,), generator=gen).tolist() for _ in range(2)]
    history[0][:3] = [0, 31, s_max - 2]  # the first key, a tile boundary, the cache's end
    k_cache, v_cache = cache_with_history([s_max] * batch, num_heads, s_max, head_dim, dtype, device)
    qkv = torch.randn(batch, 3, num_heads, head_dim, dtype=dtype, device=device)
    positions = torch.tensor(history[0], dtype=torch.int32, device=device)
    used = []
    monkeypatch.setattr(decode_module, "_decode_partition_kernel", _Spy(decode_module._decode_partition_kernel, used))
    decode_attention(qkv, k_cache, v_cache, positions)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(qkv, k_cache, v_cache, positions, history_ready=True)
    assert all(single for *_, single in used)
    _replay_at_positions(graph.replay, out, qkv, k_cache, v_cache, positions, history, dtype)


def _good_args(device):
    qkv = torch.randn(2, 3, 2, 16, device=device)
    k_cache = torch.zeros(2, 2, 8, 16, device=device)
    positions = torch.tensor([0, 5], dtype=torch.int32, device=device)
    return dict(qkv=qkv, k_cache=k_cache, v_cache=k_cache.clone(), positions=positions)


BAD_INPUTS = [
    ("qkv 3-D", lambda a: a.update(qkv=a["qkv"][:, 0]), "qkv"),
    ("qkv not 3 parts", lambda a: a.update(qkv=a["qkv"][:, :2]), "qkv"),
    ("qkv integer", lambda a: a.update(qkv=a["qkv"].to(torch.int32)), "qkv dtype"),
    ("qkv strided head dim", lambda a: a.update(qkv=a["qkv"].repeat_interleave(2, dim=3)[..., ::2]), "qkv"),
    ("k_cache batch", lambda a: a.update(k_cache=a["k_cache"][:1]), "k_cache"),
    ("v_cache heads", lambda a: a.update(v_cache=a["v_cache"][:, :1]), "v_cache"),
    ("k_cache head dim", lambda a: a.update(k_cache=a["k_cache"][..., :8]), "k_cache"),
    ("v_cache dtype", lambda a: a.update(v_cache=a["v_cache"].half()), "v_cache dtype"),
    ("cache lengths differ", lambda a: a.update(v_cache=a["v_cache"][:, :, :7]), "S_max"),
    ("cache empty", lambda a: a.update(k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]), "S_max"),
    ("positions int64", lambda a: a.update(positions=a["positions"].long()), "positions"),
    ("positions length", lambda a: a.update(positions=a["positions"][:1]), "positions"),
    ("counter shape", lambda a: a.update(counter=torch.zeros(2, 3, dtype=torch.int32, device=a["qkv"].device)),
     "counter"),
    ("counter int64", lambda a: a.update(counter=torch.zeros(2, 2, dtype=torch.int64, device=a["qkv"].device)),
     "counter"),
]


@pytest.mark.parametrize("what,mutate,match", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_decode_attention_rejects_bad_inputs(what, mutate, match, device):
    args = _good_args(device)
    decode_attention(**args)  # the unmodified arguments are accepted
    mutate(args)
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


def test_pick_decode_blocks():
    # d <= 64: one warp on ~2K-element tiles (the decode step's best on the H200), one tile per partition up to 64
    # (sequence, head) pairs, then more while 8 programs per SM remain; d = 128: 2 warps, ~4K elements
    assert pick_decode_blocks(1, 16, 576, 64) == DecodeBlocks(32, 1, 1)
    assert pick_decode_blocks(4, 16, 576, 64) == DecodeBlocks(32, 1, 1)
    assert pick_decode_blocks(8, 16, 576, 64) == DecodeBlocks(32, 2, 1)
    assert pick_decode_blocks(32, 16, 576, 64) == DecodeBlocks(32, 8, 1)
    # ~4.3-12 pairs per SM (132 SMs: 568-1584 pairs) take one partition per pair, whatever the cache's length
    assert pick_decode_blocks(35, 16, 576, 64) == DecodeBlocks(32, 8, 1)
    assert pick_decode_blocks(36, 16, 576, 64) == DecodeBlocks(32, 18, 1)
    assert pick_decode_blocks(64, 16, 576, 64) == DecodeBlocks(32, 18, 1)
    assert pick_decode_blocks(64, 16, 4000, 64) == DecodeBlocks(32, 125, 1)
    assert pick_decode_blocks(99, 16, 576, 64) == DecodeBlocks(32, 18, 1)
    assert pick_decode_blocks(100, 16, 576, 64) == DecodeBlocks(32, 8, 1)
    assert pick_decode_blocks(64, 16, 576, 64, num_sms=264) == DecodeBlocks(32, 8, 1)
    assert pick_decode_blocks(64, 16, 576, 128) == DecodeBlocks(32, 8, 2)
    assert pick_decode_blocks(1, 32, 576, 128) == DecodeBlocks(32, 2, 2)
    assert pick_decode_blocks(1, 16, 40, 64) == DecodeBlocks(16, 1, 1)  # short caches: smaller tiles fill the GPU
