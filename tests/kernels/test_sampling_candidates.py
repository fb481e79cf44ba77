"""The two-launch candidate sampler against the pass-based one (kernels/sampling.py).

Both key the race's Philox stream by (seed, step, vocabulary index), so on the same kept set they draw the same
token: the candidate path must return the pass path's token for every row, whether the row is decided among the
candidates or falls back to the passes. The chunk splits make small vocabularies span many chunks; the parameter
mix guarantees both kinds of rows (see _mixed_params). Both samplers' semantics against the torch reference are
tested in test_sampling.py.
"""
import pytest
import torch

from ftlab.kernels import sampling as sampling_module
from ftlab.kernels.sampling import sample


def _mixed_params(B, V, device):
    """Per-row parameters cycling through: greedy; k = 2 and 3 (always decided among the candidates: every split
    has C >= 2, and the first C candidates are always in order); k = V - 1 (beyond the candidates of every split
    once V > 64: falls back); no limit (the per-chunk race); nuclei on peaked rows (usually decided among the
    candidates); a 0.999 nucleus on flat rows (hundreds of tokens: falls back); top-k + top-p; every 13th row
    random. Returns (logit scale per row, parameter tensors)."""
    ks = [1, 2, V - 1, 0, 0, 0, 3, 5, 0, 17]
    ps = [1.0, 1.0, 1.0, 1.0, 0.5, 0.999, 0.9, 0.95, 0.3, 0.8]
    k = torch.tensor([min(ks[b % len(ks)], V) for b in range(B)], dtype=torch.int32)
    p = torch.tensor([ps[b % len(ps)] for b in range(B)], dtype=torch.float32)
    random_rows = torch.arange(B) % 13 == 12
    k[random_rows] = torch.randint(0, min(V, 70) + 1, (int(random_rows.sum()),), dtype=torch.int32)
    p[random_rows] = torch.rand(int(random_rows.sum())) * 0.9 + 0.1
    scale = torch.where(torch.tensor(ps)[torch.arange(B) % len(ps)] == 0.999, 0.3, 4.0)  # flat / peaked rows
    params = (k, p, torch.rand(B) * 1.2 + 0.4,
              torch.randint(-2**63, 2**63 - 1, (B,)), torch.randint(0, 999, (B,), dtype=torch.int32))
    return scale, [x.to(device) for x in params]


def _draw(logits, params, monkeypatch, sampler, split=None):
    monkeypatch.setenv("FTLAB_SAMPLER", sampler)
    if split:
        monkeypatch.setenv("FTLAB_SAMPLE_CANDIDATES", split)
    else:
        monkeypatch.delenv("FTLAB_SAMPLE_CANDIDATES", raising=False)
    return sample(logits, *params, return_logprobs=True)


@pytest.mark.parametrize("split", [None, "16,4,0,0", "32,2,1,1", "64,16,2,4"])
@pytest.mark.parametrize("V", [13, 200, 1023])
def test_candidate_path_draws_what_the_pass_path_draws(V, split, device, monkeypatch):
    B = 52
    scale, params = _mixed_params(B, V, device)
    logits = (torch.randn(B, V) * scale[:, None]).to(device)
    expected = _draw(logits, params, monkeypatch, "passes")
    got = _draw(logits, params, monkeypatch, "candidates", split)
    assert torch.equal(got[0], expected[0]), (got[0] != expected[0]).nonzero().flatten().tolist()
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ties_across_chunks(dtype, device, monkeypatch):
    """Logits with few distinct values (ties in every chunk): the top-k boundary and the greedy argmax break ties
    by index across chunks exactly as the passes do."""
    B, V = 40, 301
    scale, params = _mixed_params(B, V, device)
    logits = torch.randint(-3, 4, (B, V)).to(dtype=dtype, device=device)
    expected = _draw(logits, params, monkeypatch, "passes")
    for split in ("16,4,0,0", "32,8,0,0"):
        got = _draw(logits, params, monkeypatch, "candidates", split)
        assert torch.equal(got[0], expected[0]), (split, (got[0] != expected[0]).nonzero().flatten().tolist())


def test_large_vocab_matches_pass_path(device, monkeypatch):
    """The default split on a GPT-2-sized row (25 chunks of 2048, 64 candidates each)."""
    B, V = 10, 50257
    _, params = _mixed_params(B, V, device)
    logits = (torch.randn(B, V) * 3).to(dtype=torch.float16, device=device)
    expected = _draw(logits, params, monkeypatch, "passes")
    got = _draw(logits, params, monkeypatch, "candidates")
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text", ["2048,64", "100,4,0,0", "64,128,0,0", "64,1,0,0", "64,16,3,0", "x,y,z,w"])
def test_candidate_split_from_env_is_checked(text, monkeypatch):
    monkeypatch.setenv("FTLAB_SAMPLE_CANDIDATES", text)
    with pytest.raises(ValueError, match="FTLAB_SAMPLE_CANDIDATES"):
        sampling_module._candidate_config(1, 50257, "cuda")


def test_unknown_sampler_is_refused(device, monkeypatch):
    monkeypatch.setenv("FTLAB_SAMPLER", "sorted")
    with pytest.raises(ValueError, match="FTLAB_SAMPLER"):
        sample(torch.randn(1, 5, device=device), *_mixed_params(1, 5, device)[1])


def test_default_split():
    """Chunks of 2048 logits with 32 candidates for GPT-2's vocabulary; at most ~32 chunks for larger ones."""
    assert sampling_module._candidate_config(1, 50257, "cuda") == (2048, 32, 1, 1, 4, None)
    chunk, c = sampling_module._candidate_config(1, 256000, "cuda")[:2]
    assert (chunk, c) == (8192, 32) and -(-256000 // chunk) <= 32
    assert sampling_module._candidate_config(1, 13, "cuda")[:2] == (16, 16)
    assert sampling_module._candidate_config(64, 50257, "cuda")[4] == 1  # stage 1: throughput at large batch


@pytest.mark.parametrize("log_n,log_c", [(4, 4), (4, 1), (7, 3), (9, 9), (11, 5)])
def test_top_network_is_a_sort(log_n, log_c, device):
    """_top_desc (the interpreter's sort; the GPU uses tl.topk) returns each row's 2**log_c largest int64 keys,
    largest first: random keys, duplicates and extremes included."""
    rows = 3
    x = torch.randint(-2**62, 2**62, (rows, 2 ** log_n), dtype=torch.int64)
    x[0, : 2 ** log_n // 2] = x[0, 0]  # half the first row equal
    x[1, 0], x[1, -1] = -2**63, 2**63 - 1
    x = x.to(device)
    out = torch.empty(rows, 2 ** log_c, dtype=torch.int64, device=device)
    sampling_module._top_bench_kernel[(rows,)](x, out, LOG_N=log_n, LOG_C=log_c, STDLIB=False)
    assert torch.equal(out, torch.sort(x, dim=1, descending=True).values[:, : 2 ** log_c])
