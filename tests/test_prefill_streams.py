"""ftlab/prefill_streams.py: one prompt's context phase as two pipelined row chunks gives what the one-stream cuBLAS
path gives (the kept row's hidden state and every key and value in the cache), and generate() the same tokens."""
import pytest
import torch

from ftlab.generate import generate
from ftlab.model import pack_prompts
from ftlab.prefill_streams import blocks_two_streams, split_row, use_two_streams
from tests.test_model_hf import CONFIGS, ftlab_model, random_hf_model, random_prompts
from tests.util import assert_rel_close

HALF = [pytest.param("fp16", 5e-3, marks=pytest.mark.gpu), pytest.param("bf16", 3e-2, marks=pytest.mark.gpu)]


def test_split_row_is_half_the_prompt_on_query_blocks():
    assert [split_row(n, 64) for n in (128, 130, 200, 256, 257, 512, 1000)] == [64, 128, 128, 128, 192, 256, 512]


@pytest.mark.parametrize("length", [130, 200, 257])  # second chunk of 2, 72 and 65 rows
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5)] + HALF)
def test_two_streams_match_one_stream(length, dtype, tol, device):
    cfg = CONFIGS[2]  # 3 blocks, 2 heads of 32, MLP width 72
    model = ftlab_model(random_hf_model(n_positions=300, **cfg), dtype, device)
    batch = pack_prompts(random_prompts(cfg["vocab_size"], [length]), model.device)
    assert model._uses_cublas(length)
    keep = batch.cu_seqlens[1:].long() - 1
    x = model.embed(batch.token_ids, batch.positions)
    caches = [model.new_kv_cache(1, length + 5) for _ in range(2)]
    # slots past the prompt are never written: equal in both caches and not zero
    caches[0].k.copy_(torch.randn_like(caches[0].k)), caches[0].v.copy_(torch.randn_like(caches[0].v))
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    one = model.run_blocks_prefill(x.clone(), batch.cu_seqlens, batch.max_seqlen, caches[0], keep_rows=keep)
    two = blocks_two_streams(model, x.clone(), batch.cu_seqlens, batch.max_seqlen, caches[1], keep)
    assert two.shape == one.shape == (1, cfg["n_embd"])
    assert_rel_close(two.float().cpu(), one.float().cpu(), tol=tol, what=f"{dtype} kept row, two streams vs one")
    for name in ("k", "v"):
        got, ref = getattr(caches[1], name), getattr(caches[0], name)
        assert torch.equal(got[:, :, :, length:], ref[:, :, :, length:]), f"{name} cache past the prompt"
        assert_rel_close(got.float().cpu(), ref.float().cpu(), tol=tol, what=f"{dtype} {name} cache")


def test_two_streams_are_opt_in_for_single_prompts_on_a_gpu(device, monkeypatch):
    cfg = CONFIGS[2]
    model = ftlab_model(random_hf_model(n_positions=300, **cfg), "fp32", device)
    x = torch.randn(200, cfg["n_embd"], device=model.device)
    one = torch.tensor([0, 200], dtype=torch.int32, device=model.device)
    keep = torch.tensor([199], device=model.device)
    assert not use_two_streams(model, x, one, keep)  # off unless asked
    monkeypatch.setenv("FTLAB_PREFILL_STREAMS", "2")
    assert use_two_streams(model, x, one, keep) == (device == "cuda")
    two = torch.tensor([0, 100, 200], dtype=torch.int32, device=model.device)
    assert not use_two_streams(model, x, two, torch.tensor([99, 199], device=model.device))
    assert not use_two_streams(model, x, one, None)  # every row's logits: not pipelined
    assert not use_two_streams(model, x[:100], torch.tensor([0, 100], dtype=torch.int32, device=model.device),
                               keep)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_generate_with_two_stream_prefill_gives_the_same_tokens(dtype, device, monkeypatch):
    """Through generate() on CUDA graphs (the context phase captured with its side stream) and eagerly."""
    cfg = dict(n_embd=256, n_head=4, n_layer=4, vocab_size=1031)
    model = ftlab_model(random_hf_model(n_positions=1024, **cfg), dtype, device)
    for length in (300, 513):
        prompt = random_prompts(cfg["vocab_size"], [length])
        for graph in (True, False):
            monkeypatch.delenv("FTLAB_PREFILL_STREAMS", raising=False)
            ref = generate(model, prompt, max_new_tokens=12, use_cuda_graph=graph, return_log_probs=True)
            monkeypatch.setenv("FTLAB_PREFILL_STREAMS", "2")
            for _ in range(2):  # the graph is captured on the first call and replayed on the second
                got = generate(model, prompt, max_new_tokens=12, use_cuda_graph=graph, return_log_probs=True)
                assert got.output_ids == ref.output_ids, f"{dtype} prompt of {length}, graph={graph}"
