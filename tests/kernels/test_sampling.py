"""Tests for kernels/sampling.py: greedy, kept sets, sampled frequencies, per-request parameters, RNG streams.

Under the CPU interpreter a launch packs many rows per program, so the statistical tests draw thousands of
tokens in one launch (one logits row replicated over rows with different seeds).

These tests were run against deliberately broken kernels (each edit made locally, then reverted); each
variant made the listed tests fail:
  * nucleus target from the full softmax instead of the renormalised top-k set (z = sumexp):
    kept-set [top_k_top_p], frequencies [top_k_top_p], ties, per-request;
  * crossing token dropped from the nucleus (n_p - 1): frequencies [top_p, top_k_top_p], ties;
  * temperature ignored (inv_t = 1): frequencies [top_k, top_p, top_k_top_p], kept-set [top_p], per-request;
  * top-k keeping k + 1 tokens: kept-set [top_k, top_k_top_p], frequencies [top_k], ties, per-request;
  * tied tokens at the top-k boundary all kept (no cut by index): ties, kept-set [top_k_top_p];
  * step left out of the Philox key: seeds/steps streams; row index mixed into the key: batch independence.
test_frequency_check_has_power re-checks the chi-square statistic on draws from such wrong distributions.
"""
import pytest
import torch

from ftlab.kernels import sampling as sampling_module
from ftlab.kernels.sampling import (check_sampling_params, kept_distribution_reference, kept_set_reference, sample,
                                    sample_reference)
from tests.util import DTYPES

P_VALUE_FLOOR = 1e-6  # a correct kernel fails the chi-square test with probability 1e-6 per case
TOP_P_SLACK = 1e-4  # fp32 sums may put the nucleus boundary on the other side of a cumulative sum this close

# Every test runs on both samplers: the pass-based one alone, and the candidate path with chunks of 16 logits and 4
# candidates each (small vocabularies then have several chunks, and rows that fall back); on the GPU also with the
# default chunks (the CPU interpreter is slow enough; test_sampling_candidates.py runs the default split there).
SAMPLERS = {"passes": {"FTLAB_SAMPLER": "passes"},
            "candidates-16x4": {"FTLAB_SAMPLER": "candidates", "FTLAB_SAMPLE_CANDIDATES": "16,4,0,0"}}
if torch.cuda.is_available():
    SAMPLERS["candidates"] = {"FTLAB_SAMPLER": "candidates"}


def _skip_tiny_chunks_on_large_vocab(sampler):
    if sampler == "candidates-16x4":  # a 50k row in chunks of 16 is a 16k-candidate sort (minutes under the
        pytest.skip("interpreter); test_sampling_candidates.py covers the candidate path on this vocabulary")


@pytest.fixture(autouse=True, params=list(SAMPLERS))
def sampler(request, monkeypatch):
    for name in ("FTLAB_SAMPLER", "FTLAB_SAMPLE_CANDIDATES", "FTLAB_SAMPLE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SAMPLERS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _params(B, device, top_k=0, top_p=1.0, temperature=1.0, seeds=None, steps=0):
    """Per-row parameter tensors; scalars are broadcast, seeds default to fresh random 64-bit values."""
    def full(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(dtype=dtype, device=device)
        if isinstance(value, (list, tuple)):
            return torch.tensor(value, dtype=dtype, device=device)
        return torch.full((B,), value, dtype=dtype, device=device)

    if seeds is None:
        seeds = torch.randint(-2**63, 2**63 - 1, (B,), dtype=torch.int64)
    return (full(top_k, torch.int32), full(top_p, torch.float32), full(temperature, torch.float32),
            full(seeds, torch.int64), full(steps, torch.int32))


def _loose_kept_set(row, k, p, t):
    """Reference kept set allowing for fp32 rounding at the nucleus boundary (a superset of the exact one)."""
    return kept_set_reference(row, k, min(p + TOP_P_SLACK, 1.0), t) if p < 1.0 else kept_set_reference(row, k, p, t)


def _assert_in_kept_sets(logits, tokens, params, what=""):
    top_k, top_p, temperature = (t.tolist() for t in params[:3])
    logits, tokens = logits.cpu(), tokens.cpu()
    for b in range(logits.shape[0]):
        kept = _loose_kept_set(logits[b], top_k[b], top_p[b], temperature[b])
        assert kept[tokens[b]], (f"{what} row {b}: token {int(tokens[b])} outside the kept set "
                                 f"{kept.nonzero().flatten().tolist()} (k={top_k[b]}, p={top_p[b]:.4f}, "
                                 f"t={temperature[b]:.3f})")


def _chi_square_p_value(tokens, probs):
    """(p-value of Pearson's chi-square test of tokens against probs, tokens outside the support).
    Cells expecting fewer than 5 draws are pooled so the chi-square approximation holds."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    support = probs > 0
    outside = int(counts[~support].sum())
    expected, observed = probs[support] * n, counts[support]
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    df = expected.numel() - 1
    if df == 0:
        return 1.0, outside
    chi2 = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2)), outside


def _sorted_kept_cumsum(row, k, t):
    scaled = torch.sort(row.float() / t, descending=True).values
    if 0 < k < row.numel():
        scaled = scaled[:k]
    return torch.cumsum(torch.softmax(scaled.double(), 0), 0)


def _nucleus_p_keeping(row, k, t, n):
    """top_p half-way between the cumulative probabilities of the n-1 and n most likely tokens of the
    renormalised top-k set: the nucleus keeps exactly n tokens and no rounding can move the boundary."""
    cum = _sorted_kept_cumsum(row, k, t)
    return float((cum[n - 2] + cum[n - 1]) / 2)


def _nucleus_p(row, k, t, near):
    """top_p for the nucleus whose boundary is the first crossing of `near` (keeping at least 2 tokens)."""
    cum = _sorted_kept_cumsum(row, k, t)
    return _nucleus_p_keeping(row, k, t, max(int(torch.nonzero(cum >= near)[0]) + 1, 2))


def _replicated_draws(row, k, p, t, n, device, steps=0):
    logits = row.reshape(1, -1).repeat(n, 1).to(device)
    return sample(logits, *_params(n, device, top_k=k, top_p=p, temperature=t, steps=steps))


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,V", [(1, 1), (7, 7), (13, 13), (3, 1023), (2, 50257)])
def test_greedy_equals_argmax(B, V, dtype_name, device, sampler):
    if V > 2048:
        _skip_tiny_chunks_on_large_vocab(sampler)
    dtype = DTYPES[dtype_name]
    logits = (torch.randn(B, V) * 3 + torch.randn(B, 1)).to(dtype=dtype, device=device)
    # temperature, top_p and seed must be ignored by greedy rows
    params = _params(B, device, top_k=1, top_p=torch.rand(B) * 0.9 + 0.05, temperature=torch.rand(B) * 2 + 0.1)
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    assert tokens.dtype == torch.int64 and tokens.shape == (B,)
    assert torch.equal(tokens, torch.argmax(logits.float(), dim=-1))
    ref = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, ref, rtol=1e-5, atol=1e-5)


def test_greedy_ties_pick_lowest_index(device, monkeypatch):
    V = 5000  # wider than one chunk: tied maxima in the same lane of different chunks and in different lanes
    monkeypatch.setenv("FTLAB_SAMPLE_CONFIG", "2048,8")  # the GPU's chunk (the interpreter's would hold the row)
    logits = torch.randn(4, V) - 5
    tie_positions = [[4097, 2049, 1, 3000], [4999, 2048], [17, 17 + 2048, 17 + 4096], [4096, 4095]]
    for row, positions in enumerate(tie_positions):
        logits[row, positions] = 7.25
    params = _params(4, device, top_k=1)
    tokens = sample(logits.to(device), *params)
    assert tokens.tolist() == [min(p) for p in tie_positions]
    assert torch.equal(tokens.cpu(), torch.argmax(logits, dim=-1))


# ---------------------------------------------------------------------------------------------- kept sets


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["temperature", "top_k", "top_p", "top_k_top_p"])
def test_tokens_inside_kept_set(mode, dtype_name, device):
    dtype = DTYPES[dtype_name]
    rows, draws, V = 24, 16, 53  # 24 distinct rows, each drawn 16 times with different seeds
    base = (torch.randn(rows, V) * 2.5).to(dtype)
    logits = base.repeat_interleave(draws, 0).to(device)
    B = rows * draws
    k = torch.randint(2, 12, (rows,)).repeat_interleave(draws) if "top_k" in mode else torch.zeros(B)
    p = (torch.rand(rows) * 0.8 + 0.1).repeat_interleave(draws) if "top_p" in mode else torch.ones(B)
    t = (torch.rand(rows) * 1.5 + 0.3).repeat_interleave(draws)
    params = _params(B, device, top_k=k, top_p=p, temperature=t)
    tokens = sample(logits, *params)
    _assert_in_kept_sets(logits, tokens, params, what=mode)
    # the draws are not degenerate: rows with several kept tokens produce several distinct tokens
    distinct = [len(set(tokens[r * draws:(r + 1) * draws].tolist())) for r in range(rows)]
    assert max(distinct) >= 3, distinct


def test_ties_resolved_by_index(device):
    """fp16 logits made of 7 tied levels: the top-k and nucleus boundaries cut through tie groups, and the kept
    tied tokens must be the lowest-indexed ones (a stable descending sort)."""
    counts = torch.randint(5, 8, (7,))
    levels = torch.arange(7) * -0.5 + 1.0
    row = levels.repeat_interleave(counts)[torch.randperm(int(counts.sum()))].to(torch.float16)
    t, draws, g0 = 0.8, 500, int(counts[0])
    cases = [  # (top_k, number of tokens the nucleus keeps or None)
        (g0 + 2, None),  # top-k cut inside the second group
        (0, g0 + 2),  # nucleus cut inside the second group
        (g0 + 4, g0 + 2),  # both inside the second group: the nucleus is the tighter
        (g0 + 2, 3),  # nucleus inside the first group, top-k inside the second
    ]
    for k, n_nucleus in cases:
        p = 1.0 if n_nucleus is None else _nucleus_p_keeping(row, k, t, n_nucleus)
        kept = kept_set_reference(row, k, p, t)
        kept_values = row[kept].float()
        assert (row[~kept].float() == kept_values.min()).any(), "the cut should split a tie group"
        tokens = _replicated_draws(row, k, p, t, draws, device)
        outside = [int(x) for x in tokens.cpu() if not kept[x]]
        kept_tokens = kept.nonzero().flatten().tolist()
        assert not outside, f"k={k} p={p:.4f}: tokens {sorted(set(outside))} outside {kept_tokens}"
        # every kept token is drawn (each has probability >= ~4%): the cut drops no kept token either
        assert set(tokens.tolist()) == set(kept_tokens), (k, p)


def test_masked_logits_never_sampled(device):
    """-inf logits (banned tokens) are never drawn, whatever the parameters."""
    B, V = 64, 97
    logits = torch.randn(B, V) * 2
    banned = torch.rand(B, V) < 0.7
    banned[:, 0] = False  # every row keeps at least one finite logit
    logits[banned] = float("-inf")
    params = _params(B, device, top_k=torch.randint(0, 5, (B,)), top_p=torch.rand(B) * 0.5 + 0.5,
                     temperature=torch.rand(B) + 0.5)
    tokens, logprobs = sample(logits.to(device), *params, return_logprobs=True)
    assert not banned.gather(1, tokens.cpu()[:, None]).any()
    assert torch.isfinite(logprobs).all()
    _assert_in_kept_sets(logits, tokens, params)


# ---------------------------------------------------------------------------------------------- frequencies


FREQUENCY_CASES = {  # (top_k, top_p or None for "a nucleus boundary near 0.8", temperature)
    "temperature": (0, 1.0, 1.0),
    "top_k": (8, 1.0, 0.7),
    "top_p": (0, None, 1.3),
    "top_k_top_p": (5, None, 0.8),
}


def _frequency_row(V=24):
    return torch.randn(V) * 1.5


@pytest.mark.parametrize("case", list(FREQUENCY_CASES))
def test_frequencies_match_renormalised_distribution(case, device):
    k, p, t = FREQUENCY_CASES[case]
    row = _frequency_row()
    if p is None:
        p = _nucleus_p(row, k, t, near=0.8)
    n = 6000
    tokens = _replicated_draws(row, k, p, t, n, device, steps=11)
    probs = kept_distribution_reference(row, k, p, t)
    p_value, outside = _chi_square_p_value(tokens, probs)
    assert outside == 0, f"{case}: {outside} draws outside the kept set"
    assert p_value > P_VALUE_FLOOR, f"{case}: chi-square p-value {p_value:.3g} (k={k}, p={p:.4f}, t={t})"


def test_frequencies_over_steps(device):
    """One seed, consecutive steps: the per-step streams are as good as independent draws."""
    row = _frequency_row()
    k, t = 0, 1.1
    p = _nucleus_p(row, k, t, near=0.9)
    n = 6000
    logits = row.reshape(1, -1).repeat(n, 1).to(device)
    params = _params(n, device, top_k=k, top_p=p, temperature=t, seeds=[-7] * n, steps=torch.arange(n))
    tokens = sample(logits, *params)
    p_value, outside = _chi_square_p_value(tokens, kept_distribution_reference(row, k, p, t))
    assert outside == 0 and p_value > P_VALUE_FLOOR, (outside, p_value)


def _wrong_distributions(row, k, p, t):
    """Distributions a plausibly buggy sampler would draw from, for the case (k, p, t)."""
    right = kept_distribution_reference(row, k, p, t)
    scaled = (row.float() / t).double()
    order = torch.sort(scaled, descending=True).indices
    n_kept = int((right > 0).sum())
    n_top_k = k if 0 < k < row.numel() else row.numel()

    def restricted(n_tokens, logits=scaled):
        mask = torch.zeros(row.numel(), dtype=torch.bool)
        mask[order[:n_tokens]] = True
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), 0)

    wrong = {"one token too many": restricted(n_kept + 1), "temperature ignored": restricted(n_kept, row.double())}
    if p < 1.0:
        # nucleus measured with the full softmax instead of the renormalised top-k distribution
        reached = torch.nonzero(torch.cumsum(torch.softmax(scaled, 0)[order[:n_top_k]], 0) >= p)
        wrong["nucleus not renormalised to top-k"] = restricted(int(reached[0]) + 1 if reached.numel() else n_top_k)
        wrong["crossing token dropped"] = restricted(n_kept - 1)
        wrong["top-p ignored"] = restricted(n_top_k)
    if n_top_k < row.numel():
        wrong["top-k ignored"] = kept_distribution_reference(row, 0, p, t)
    return right, wrong


def test_frequency_check_has_power():
    """The frequency test's check rejects draws from each plausible wrong distribution, at the same sample size,
    whenever the bug is big enough to matter: a total variation >= 0.06 with the same support (chi-square), or
    >= 0.003 of mass outside the kept set (the outside count). Several random rows per case, so that every
    kind of bug is met at least once."""
    n, detected = 6000, set()
    for k, p, t in FREQUENCY_CASES.values():
        for _ in range(4):
            row = _frequency_row()
            p_row = _nucleus_p(row, k, t, near=0.8) if p is None else p
            right, wrong = _wrong_distributions(row, k, p_row, t)
            for name, probs in wrong.items():
                tv = 0.5 * float((probs - right).abs().sum())
                same_support = torch.equal(probs > 0, right > 0)
                if tv < (0.06 if same_support else 0.003):
                    continue  # too close to the right distribution for this row to be a fair test
                draws = torch.multinomial(probs.float(), n, replacement=True)
                p_value, outside = _chi_square_p_value(draws, right)
                assert outside > 0 or p_value < P_VALUE_FLOOR, f"{name} (k={k}, t={t}): not detected, p={p_value:.3g}"
                detected.add(name)
            # draws from the right distribution pass
            p_value, outside = _chi_square_p_value(torch.multinomial(right.float(), n, replacement=True), right)
            assert outside == 0 and p_value > P_VALUE_FLOOR
    assert detected == {"one token too many", "temperature ignored", "nucleus not renormalised to top-k",
                        "crossing token dropped", "top-p ignored", "top-k ignored"}, detected


# ---------------------------------------------------------------------------------------------- per-request


def test_per_request_parameters_in_one_batch(device):
    configs, draws, V = 40, 12, 61
    base = torch.randn(configs, V) * 2
    k = torch.randint(0, 9, (configs,))
    k[::5] = 1  # some greedy rows among sampling rows
    k[1::7] = V  # k == V: no limit
    p = torch.where(torch.rand(configs) < 0.3, torch.ones(configs), torch.rand(configs) * 0.9 + 0.05)
    t = torch.rand(configs) * 2 + 0.2
    logits = base.repeat_interleave(draws, 0).to(device)
    params = _params(configs * draws, device, top_k=k.repeat_interleave(draws), top_p=p.repeat_interleave(draws),
                     temperature=t.repeat_interleave(draws))
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    _assert_in_kept_sets(logits, tokens, params, what="mixed batch")
    greedy = params[0] == 1
    assert torch.equal(tokens[greedy], torch.argmax(logits[greedy], dim=-1))
    t_eff = torch.where(greedy, torch.ones_like(params[2]), params[2])
    ref = torch.log_softmax(logits.float() / t_eff[:, None], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, ref, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------- randomness


def test_same_request_same_token_whatever_the_batch(device, monkeypatch):
    V = 45
    rows = 10
    logits = torch.randn(rows, V) * 1.5
    k = torch.tensor([0, 3, 1, 0, 5, 0, 2, 9, 0, 4])
    p = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.7, 0.95, 1.0, 0.5, 1.0, 0.99])
    t = torch.rand(rows) + 0.5
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,))
    steps = torch.randint(0, 40000, (rows,))
    params = _params(rows, device, top_k=k, top_p=p, temperature=t, seeds=seeds, steps=steps)
    tokens = sample(logits.to(device), *params)
    assert torch.equal(sample(logits.to(device), *params), tokens)  # same seed + step -> same token

    # the same requests scattered through a larger batch of unrelated rows
    B = 37
    positions = torch.randperm(B)[:rows]
    big_logits = torch.randn(B, V) * 3
    big_logits[positions] = logits
    big = _params(B, device, top_k=torch.randint(0, 6, (B,)), top_p=torch.rand(B) * 0.5 + 0.5,
                  temperature=torch.rand(B) + 0.3, steps=torch.randint(0, 100, (B,)))
    for mine, theirs in zip(params, big):
        theirs[positions.to(device)] = mine
    assert torch.equal(sample(big_logits.to(device), *big)[positions.to(device)], tokens)

    # one row alone, and one program per row (the GPU layout) instead of a packed tile
    one = sample(logits[3:4].to(device), *(x[3:4] for x in params))
    assert int(one) == int(tokens[3])
    launch_config, candidate_config = sampling_module._launch_config, sampling_module._candidate_config
    monkeypatch.setattr(sampling_module, "_launch_config", lambda B, V, dev: (1,) + launch_config(B, V, dev)[1:])
    monkeypatch.setattr(sampling_module, "_candidate_config",
                        lambda B, V, dev: candidate_config(B, V, dev)[:2] + (1, 1) + candidate_config(B, V, dev)[4:])
    assert torch.equal(sample(logits.to(device), *params), tokens)


def test_strided_rows(device):
    """Rows of a wider buffer (stride(0) != V) sample exactly like a contiguous copy."""
    B, V = 9, 70
    wide = torch.randn(B, V + 13, device=device) * 2
    logits = wide[:, 5:5 + V]
    params = _params(B, device, top_k=torch.randint(0, 6, (B,)), top_p=torch.rand(B) * 0.5 + 0.5,
                     temperature=torch.rand(B) + 0.5)
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    expected_tokens, expected_logprobs = sample(logits.contiguous(), *params, return_logprobs=True)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(logprobs, expected_logprobs)


def test_seeds_and_steps_give_different_streams(device):
    V, n = 64, 256
    row = torch.randn(V) * 0.2  # nearly uniform: independent draws hit ~63 distinct tokens
    logits = row.reshape(1, -1).repeat(n, 1).to(device)
    by_seed = sample(logits, *_params(n, device, seeds=torch.randint(-2**63, 2**63 - 1, (n,)), steps=5))
    by_step = sample(logits, *_params(n, device, seeds=[12345] * n, steps=torch.arange(n) * 157))
    high_bits = sample(logits, *_params(n, device, seeds=(torch.arange(n) << 32) | 7, steps=3))
    for name, tokens in [("seeds", by_seed), ("steps", by_step), ("seed high bits", high_bits)]:
        assert len(set(tokens.tolist())) >= 40, f"different {name} give too few distinct tokens"
    # two seed sets with the same steps agree only by chance (~1/64 of rows)
    other = sample(logits, *_params(n, device, seeds=torch.randint(-2**63, 2**63 - 1, (n,)), steps=5))
    assert (other == by_seed).float().mean() < 0.15
    # uint64 seeds >= 2**63 arrive as negative int64 and are distinct streams from their low bits
    big = sample(logits, *_params(n, device, seeds=torch.arange(n) - 2**63, steps=0))
    small = sample(logits, *_params(n, device, seeds=torch.arange(n), steps=0))
    assert (big == small).float().mean() < 0.15


# ---------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
def test_logprobs_are_full_vocab_log_softmax(dtype_name, device):
    dtype = DTYPES[dtype_name]
    B, V = 32, 300
    logits = (torch.randn(B, V) * 3).to(dtype=dtype, device=device)
    params = _params(B, device, top_k=torch.randint(0, 20, (B,)), top_p=torch.rand(B) * 0.7 + 0.3,
                     temperature=torch.rand(B) * 1.5 + 0.25)
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    assert logprobs.dtype == torch.float32 and logprobs.shape == (B,)
    t_eff = torch.where(params[0] == 1, torch.ones_like(params[2]), params[2])
    ref = torch.log_softmax(logits.double() / t_eff.double()[:, None], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), ref, rtol=1e-5, atol=2e-5)
    assert torch.equal(sample(logits, *params), tokens)  # return_logprobs does not change the draw


def test_large_vocab_top_k_top_p(device, sampler):
    _skip_tiny_chunks_on_large_vocab(sampler)
    B, V = 2, 50257
    logits = (torch.randn(B, V) * 3).to(dtype=torch.float16, device=device)
    params = _params(B, device, top_k=[40, 0], top_p=[0.9, 0.6], temperature=[0.8, 1.1], steps=[0, 39999])
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    _assert_in_kept_sets(logits, tokens, params, what="V=50257")
    ref = torch.log_softmax(logits.float() / params[2][:, None], -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, ref, rtol=1e-5, atol=2e-5)


def test_single_token_vocab(device):
    logits = torch.randn(5, 1, device=device)
    params = _params(5, device, top_k=[0, 1, 0, 1, 0], top_p=[1.0, 1.0, 0.5, 0.3, 0.01], temperature=0.7)
    tokens, logprobs = sample(logits, *params, return_logprobs=True)
    assert tokens.tolist() == [0] * 5
    torch.testing.assert_close(logprobs, torch.zeros(5, device=device), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- references


def test_sample_reference_semantics():
    B, V = 400, 20
    row = torch.randn(V) * 1.5
    logits = row.repeat(B, 1)
    params = _params(B, "cpu", top_k=6, top_p=_nucleus_p(row, 6, 0.9, near=0.7), temperature=0.9)
    tokens, logprobs = sample_reference(logits, *params, return_logprobs=True)
    assert torch.equal(sample_reference(logits, *params), tokens)
    probs = kept_distribution_reference(row, 6, float(params[1][0]), 0.9)
    p_value, outside = _chi_square_p_value(tokens, probs)
    assert outside == 0 and p_value > P_VALUE_FLOOR
    ref = torch.log_softmax(row / 0.9, 0)[tokens]
    torch.testing.assert_close(logprobs, ref, rtol=1e-5, atol=1e-5)
    greedy = sample_reference(logits[:3], *(x[:3] for x in _params(3, "cpu", top_k=1)))
    assert greedy.tolist() == [int(torch.argmax(row))] * 3
    # kept_set_reference: top-k then the nucleus inside the renormalised top-k set
    mask = kept_set_reference(row, 6, 1.0, 0.9)
    assert int(mask.sum()) == 6 and mask[torch.topk(row, 6).indices].all()


# ---------------------------------------------------------------------------------------------- validation


def test_launcher_rejects_bad_tensors(device):
    B, V = 3, 11
    logits = torch.randn(B, V, device=device)
    good = dict(zip(["top_k", "top_p", "temperature", "seeds", "steps"], _params(B, device)))

    def call(logits=logits, **overrides):
        args = {**good, **overrides}
        return sample(logits, args["top_k"], args["top_p"], args["temperature"], args["seeds"], args["steps"])

    with pytest.raises(ValueError, match="logits"):
        call(logits=torch.randn(B, V, 2, device=device))
    with pytest.raises(ValueError, match="logits"):
        call(logits=logits.to(torch.float64))
    with pytest.raises(ValueError, match="logits"):
        call(logits=torch.randn(V, B, device=device).t())
    with pytest.raises(ValueError, match="logits"):
        call(logits=torch.randn(B, 0, device=device))
    for name, tensor in good.items():
        wrong_dtype = tensor.to(torch.float64 if not tensor.is_floating_point() else torch.int32)
        with pytest.raises(ValueError, match=name):
            call(**{name: wrong_dtype})
        with pytest.raises(ValueError, match=name):
            call(**{name: torch.cat([tensor, tensor[:1]])})
        with pytest.raises(ValueError, match=name):
            call(**{name: tensor.reshape(B, 1)})
    assert call().shape == (B,)


def test_check_sampling_params():
    check_sampling_params(0, 1.0, 1.0, 10)
    check_sampling_params([1, 0, 10], [0.5, 1.0, 1e-3], [0.7, 1.0, 3.0], 10)
    cases = [
        (dict(top_k=[0, -1]), r"top_k\[1\]"),
        (dict(top_k=[0, 11]), r"top_k\[1\]"),
        (dict(top_p=[1.0, 0.5, 0.0]), r"top_p\[2\]"),
        (dict(top_p=[1.5]), r"top_p\[0\]"),
        (dict(top_p=[float("nan")]), r"top_p\[0\]"),
        (dict(temperature=[1.0, 0.0]), r"temperature\[1\]"),
        (dict(temperature=[-2.0]), r"temperature\[0\]"),
        (dict(top_k=[0, 1], top_p=[1.0, 1.0, 1.0]), r"top_[kp]"),
    ]
    for overrides, pattern in cases:
        args = {"top_k": 0, "top_p": 1.0, "temperature": 1.0, **overrides}
        with pytest.raises(ValueError, match=pattern):
            check_sampling_params(args["top_k"], args["top_p"], args["temperature"], 10)


@pytest.mark.parametrize("config", ["64,2", "16,1"])
def test_config_from_env_keeps_the_semantics(config, device, monkeypatch):
    # FTLAB_SAMPLE_CONFIG (wider or narrower programs, for measuring) changes no token: same seeds, same draws
    B, V = 3, 300
    logits = (torch.randn(B, V) * 3).to(device)
    params = dict(top_k=torch.tensor([1, 40, 0], dtype=torch.int32, device=device),
                  top_p=torch.tensor([1.0, 0.9, 0.8], dtype=torch.float32, device=device),
                  temperature=torch.tensor([1.0, 0.8, 1.3], dtype=torch.float32, device=device),
                  seeds=torch.tensor([5, 6, 7], dtype=torch.int64, device=device),
                  steps=torch.tensor([0, 3, 9], dtype=torch.int32, device=device))
    default = sample(logits, *params.values(), return_logprobs=True)
    monkeypatch.setenv("FTLAB_SAMPLE_CONFIG", config)
    assert sampling_module._launch_config(B, V, device)[1:] == tuple(int(v) for v in config.split(","))
    configured = sample(logits, *params.values(), return_logprobs=True)
    assert torch.equal(default[0], configured[0])
    torch.testing.assert_close(default[1], configured[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", ["2048", "100,4", "64,3", "x,y"])
def test_config_from_env_is_checked(config, monkeypatch):
    monkeypatch.setenv("FTLAB_SAMPLE_CONFIG", config)
    with pytest.raises(ValueError, match="FTLAB_SAMPLE_CONFIG"):
        sampling_module._launch_config(1, 50257, "cuda")
