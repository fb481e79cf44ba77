"""Tests for kernels/beam_topk.py: exact values and columns against the stable-sort reference, the lowest-column
tie rule checked directly, -inf-heavy rows, NaN as -inf, signed zeros, fp16/bf16 inputs, strided views, forced
multi-chunk and pruning plans, argument checks and the launch plan.

The interpreter runs a program's rounds one by one (~2 ms each), so k=128 cases are few and shapes stay small; the
forced plans (`_topk_with_plan(scores, k, chunk, prune)`) put many chunks and the pruning floor on small rows.
"""
import pytest
import torch

from ftlab.kernels import beam_topk as beam_topk_module
from ftlab.kernels.beam_topk import _plan, _topk_with_plan, topk, topk_reference

NEG_INF = float("-inf")
INT64_MIN = torch.iinfo(torch.int64).min


def _topk(scores, k, chunk, prune):
    return _topk_with_plan(scores, k, chunk, prune)[:2]


def _distinct_rows(R, N, device, dtype=torch.float32):
    """Fresh random rows whose values are pairwise distinct (so the columns are unique): a random permutation
    plus jitter below the spacing, at a random scale and offset, with both signs."""
    perm = torch.stack([torch.randperm(N) for _ in range(R)]).float() if N else torch.zeros(R, 0)
    x = (perm + 0.5 * torch.rand(R, N)) * (0.01 + 3 * torch.rand(R, 1)) - 2 * N * torch.rand(R, 1)
    x = x.to(dtype)
    assert all(torch.unique(row).numel() == N for row in x), "the test rows must be distinct"
    return x.to(device)


def _assert_matches_reference(scores, k, out):
    values, indices = out
    ref_values, ref_indices = topk_reference(scores.cpu(), k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == (scores.shape[0], k) and indices.shape == (scores.shape[0], k)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0, equal_nan=False)
    assert torch.equal(indices.cpu(), ref_indices), f"columns differ:\n{indices.cpu()}\n{ref_indices}"


def _assert_contract(scores, k, out):
    """The contract checked without the reference: values are the row's entries at the returned columns (NaN read
    as -inf), sorted, the same multiset as torch.topk's, and equal values come lowest column first, the boundary
    value taking the lowest columns that hold it."""
    values, indices = (t.cpu() for t in out)
    x = scores.cpu().float()
    x = torch.where(torch.isnan(x), NEG_INF, x)
    for r in range(x.shape[0]):
        cols = indices[r]
        assert cols.min() >= 0 and cols.max() < x.shape[1], f"row {r}: column out of range {cols.tolist()}"
        assert cols.unique().numel() == k, f"row {r}: repeated columns {cols.tolist()}"
        assert torch.equal(values[r], x[r, cols]), f"row {r}: values are not the entries at the returned columns"
        assert torch.equal(values[r], torch.topk(x[r], k).values), f"row {r}: not the best k values"
        for value in values[r].unique():
            picked = cols[values[r] == value]
            holders = (x[r] == value).nonzero().flatten()
            assert torch.equal(picked, holders[:picked.numel()]), (
                f"row {r}: value {value.item()} taken at columns {picked.tolist()}, lowest are "
                f"{holders[:picked.numel()].tolist()}")


@pytest.mark.parametrize("R, N, k", [(R, N, k) for R in (1, 3, 7) for N in (1, 13, 1023, 5000) for k in (1, 2, 8)
                                     if k <= N])  # k > N is rejected (test_bad_arguments)
def test_matches_reference(device, R, N, k):
    scores = _distinct_rows(R, N, device)
    out = topk(scores, k)
    _assert_matches_reference(scores, k, out)
    ref_values, ref_indices = torch.topk(scores.cpu(), k, dim=-1)  # distinct values: torch.topk is unambiguous
    assert torch.equal(out[0].cpu(), ref_values) and torch.equal(out[1].cpu(), ref_indices)


@pytest.mark.parametrize("R, N", [(3, 1023), (2, 5000)])  # 5000: several chunks of 1024, each with k rounds
def test_k128(device, R, N):
    scores = _distinct_rows(R, N, device)
    assert N <= 1024 or _plan(R, N, 128)[0] < N, "the wide case must span several chunks"
    _assert_matches_reference(scores, 128, topk(scores, 128))


# (R, N, k, CHUNK, prune): many chunks; k > CHUNK (lists that run dry); k not a power of two (groups >= k unused);
# pruning with fewer chunks than k (empty groups: no floor); a k=128 merge over many short lists
FORCED_PLANS = [(3, 1023, 8, 32, False), (2, 100, 40, 16, False), (3, 1023, 8, 32, True), (2, 700, 5, 16, True),
                (2, 200, 20, 16, True), (1, 2000, 128, 64, True)]


@pytest.mark.parametrize("R, N, k, chunk, prune", FORCED_PLANS)
def test_forced_plans(device, R, N, k, chunk, prune):
    scores = _distinct_rows(R, N, device)
    _assert_matches_reference(scores, k, _topk(scores, k, chunk, prune))


def _candidates_written(cand):
    """(R,) number of candidates stage 1 wrote per row: each list runs until its INT64_MIN sentinel or k."""
    before_sentinel = torch.cumprod((cand != INT64_MIN).long(), dim=-1)  # 1 until the first sentinel
    return before_sentinel.sum(dim=(1, 2))


@pytest.mark.parametrize("prune", [False, True])
def test_pruning_cuts_stage_one_short(device, prune):
    # pruning must drop candidates on random rows (or it is only an extra pass) yet keep the k the merge needs
    R, N, k, chunk = 2, 1024, 8, 16
    scores = _distinct_rows(R, N, device)
    values, indices, cand = _topk_with_plan(scores, k, chunk, prune)
    _assert_matches_reference(scores, k, (values, indices))
    written = _candidates_written(cand.cpu())
    full = (N // chunk) * k
    assert (written >= k).all(), "fewer candidates than the merge needs"
    if prune:
        assert (written < full // 2).all(), f"pruning kept {written.tolist()} of {full} candidates"
    else:
        assert (written == full).all()


@pytest.mark.parametrize("k", [8, 6])
def test_pruning_floor_on_its_edge(device, k):
    # the row's best k sit one per pruning group (chunk c is in group c % KP), each its group's max, so the floor
    # is exactly the k-th best: a floor taken over fewer than k groups, or one that excludes its own value, drops it
    R, N, chunk = 2, 1024, 16
    kp = 8
    scores = _distinct_rows(R, N, "cpu") * 1e-3 - 10  # everything else far below
    n_chunks = N // chunk
    for r in range(R):
        ranks = torch.arange(k) if r == 0 else torch.randperm(k)  # row 0: group k-1 holds the k-th best
        for g in range(k):
            c = g + kp * int(torch.randint(0, n_chunks // kp, ()))
            scores[r, c * chunk + int(torch.randint(0, chunk, ()))] = 10.0 - float(ranks[g])
    scores = scores.to(device)
    _assert_matches_reference(scores, k, _topk(scores, k, chunk, True))


@pytest.mark.parametrize("R, N, k, chunk, prune", [(3, 13, 8, None, None), (4, 1023, 8, None, None),
                                                    (3, 1023, 16, 32, True), (2, 600, 40, 16, False)])
def test_ties_take_the_lowest_column(device, R, N, k, chunk, prune):
    # few distinct values: every row is full of ties, also across the top-k boundary
    scores = (torch.randint(0, 6, (R, N)).float() * 0.75 - 2).to(device)
    out = topk(scores, k) if chunk is None else _topk(scores, k, chunk, prune)
    _assert_contract(scores, k, out)
    _assert_matches_reference(scores, k, out)


@pytest.mark.parametrize("R, N, k, chunk, prune", [(4, 13, 8, None, None), (4, 1023, 8, None, None),
                                                    (3, 1023, 16, 32, True), (3, 300, 40, 16, False)])
def test_neg_inf_heavy_rows(device, R, N, k, chunk, prune):
    # masked tokens: rows with fewer finite entries than k still give k distinct valid columns
    scores = _distinct_rows(R, N, device)
    n_finite = [0, 1, k // 2, k + 3][:R]
    keep = torch.zeros(R, N, dtype=torch.bool)
    for r, n in enumerate(n_finite):
        keep[r, torch.randperm(N)[:min(n, N)]] = True
    scores = scores.masked_fill(~keep.to(device), NEG_INF)
    values, indices = out = topk(scores, k) if chunk is None else _topk(scores, k, chunk, prune)
    _assert_contract(scores, k, out)
    _assert_matches_reference(scores, k, out)
    for r, n in enumerate(n_finite):
        n = min(n, k)
        assert torch.isfinite(values[r, :n]).all() and (values[r, n:] == NEG_INF).all()
        masked_cols = (~keep[r]).nonzero().flatten()[:k - n]
        assert torch.equal(indices[r, n:].cpu(), masked_cols), f"row {r}: -inf entries not taken lowest column first"


def test_nan_counts_as_neg_inf(device):
    R, N, k = 3, 40, 20
    scores = _distinct_rows(R, N, device)
    scores[0, torch.randperm(N)[:N - 4]] = float("nan")  # 4 real values, then NaNs ranked by column
    scores[1, ::3] = float("nan")
    scores[1, 1::3] = NEG_INF  # NaN and -inf interleaved: one tie group, by column
    scores[2, 5] = float("nan")  # a lone NaN must not rank first (as it would in torch.topk)
    values, indices = out = topk(scores, k)
    assert not torch.isnan(values).any()
    _assert_contract(scores, k, out)
    _assert_matches_reference(scores, k, out)
    assert 5 not in indices[2].tolist()
    nan_or_inf = (torch.isnan(scores[1]) | (scores[1] == NEG_INF)).nonzero().flatten().cpu()
    n_real = int((~torch.isnan(scores[1]) & (scores[1] > NEG_INF)).sum())
    assert torch.equal(indices[1, n_real:].cpu(), nan_or_inf[:k - n_real])


def test_signed_zeros_tie(device):
    scores = torch.tensor([[-0.0, 0.0, -1.0, -0.0, 0.0, 2.0]], device=device)
    values, indices = topk(scores, 5)
    assert indices.tolist() == [[5, 0, 1, 3, 4]]
    assert values.tolist() == [[2.0, 0.0, 0.0, 0.0, 0.0]] and not torch.signbit(values).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R, N, k, chunk, prune", [(3, 1023, 8, None, None), (2, 700, 16, 32, True)])
def test_half_precision_inputs(device, dtype, R, N, k, chunk, prune):
    # no tl.dot here, so bf16 runs in the interpreter too; values come back as exact fp32 copies
    scores = (torch.randn(R, N) * 4).to(dtype).to(device)  # fp16/bf16 rows have ties: the tie rule matters
    out = topk(scores, k) if chunk is None else _topk(scores, k, chunk, prune)
    _assert_contract(scores, k, out)
    _assert_matches_reference(scores, k, out)


def test_strided_views(device):
    wide = _distinct_rows(6, 40, device)
    for view in (wide.t(), wide[:, 7:33], wide[::2, ::3]):  # column stride 40, row padding, both strides
        _assert_matches_reference(view, 4, topk(view, 4))


def test_no_rows(device):
    values, indices = topk(torch.randn(0, 10, device=device), 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)


@pytest.mark.parametrize("scores, k, message", [
    (torch.randn(2, 10), 0, "k must be >= 1"),
    (torch.randn(2, 10), -3, "k must be >= 1"),
    (torch.randn(2, 200), 129, "k must be <= 128"),
    (torch.randn(2, 10), 11, r"k = 11 exceeds the number of columns of scores, shape \(2, 10\)"),
    (torch.randn(2, 10), 2.0, "k must be an int"),
    (torch.randn(2, 10), True, "k must be an int"),
    (torch.randn(10), 2, r"scores must be 2-D \(R, N\), got shape \(10,\)"),
    (torch.randn(2, 3, 10), 2, "scores must be 2-D"),
    (torch.randint(0, 9, (2, 10)), 2, "scores must be float32, float16 or bfloat16, got torch.int64"),
    (torch.randn(2, 10).double(), 2, "scores must be float32, float16 or bfloat16"),
    ([[1.0, 2.0]], 1, "scores must be a torch.Tensor"),
])
def test_bad_arguments(scores, k, message):
    with pytest.raises(ValueError, match=message):
        topk(scores, k)


def test_plan():
    V = 50257
    for R, N, k in [(1, 1, 1), (7, 13, 8), (3, 1023, 128), (1, 4 * V, 8), (32, 4 * V, 8), (8, 16 * V, 32),
                    (4, 64 * V, 128), (1, beam_topk_module.MAX_COLUMNS, 128)]:
        chunk, prune = _plan(R, N, k)
        assert chunk & (chunk - 1) == 0 and 16 <= chunk <= beam_topk_module.MAX_CHUNK
        assert -(-N // chunk) <= beam_topk_module.MAX_CHUNKS
        if N <= 1024:
            assert chunk >= N and not prune
    assert _plan(32, 4 * V, 8) == (4096, False)  # many rows: big chunks; small k: no extra pass
    assert _plan(1, 4 * V, 8) == (1024, False)  # one row: small chunks to fill the GPU
    assert _plan(4, 64 * V, 128) == (4096, True)
