"""Per-request token sampling (greedy / top-k / top-p / temperature) in Triton kernels.

Semantics follow FasterTransformer v5 for each row b of logits (B, V):
  * top_k[b] == 1: greedy argmax (lowest index among exact ties); temperature, top_p and seed are ignored.
  * otherwise scaled = logits * (1 / temperature) (fp32; equals logits / temperature up to one rounding);
    top_k <= 0 means no top-k limit; the top-k set is the k largest scaled logits, ties broken towards the
    lower vocabulary index (like a stable descending sort). Then the nucleus: inside the renormalised top-k
    distribution, sorted descending, keep the shortest prefix whose cumulative probability reaches top_p (the
    token crossing the threshold is kept); top_p >= 1 means no nucleus limit. A token is drawn with
    probability proportional to softmax(scaled) restricted to the kept set.
  * logprobs (optional) = log_softmax(scaled) at the chosen token over the full vocabulary, before any
    filtering (for greedy rows with temperature 1).

Randomness depends only on (row logits, row parameters, seed, step): the Philox key is the 64-bit seed
with the step folded in (seed + step * 0x9E3779B97F4A7C15 mod 2**64) and the counter is the vocabulary
index, so a request samples the same token whatever else shares its batch, and offsets never overflow.

Two samplers give the same token for the same (row, parameters, seed, step): both run the same exponential race
over the same kept set (below). The default on the GPU, FTLAB_SAMPLER=candidates, is two launches:
  stage 1     one program per (row, chunk of CHUNK logits): the chunk's C largest (value, index) pairs, packed into
              int64 keys that sort by value and then by lower index, in order; the chunk's max and
              sum(exp(scaled - max)); for rows with neither a top-k nor a top-p limit, the race over the chunk.
  stage 2     one program per row sorts the candidates. Every element outside them ranks below its own chunk's
              C-th candidate, so the sorted candidates down to the highest of those C-th keys are exactly the
              row's first elements in order (`exact` of them, >= C). Top-k with k <= exact, and a nucleus whose
              crossing lies among those (renormalised by the top-k mass when k is set), are decided there: the
              race runs over the kept prefix. Other rows (k > exact, or a nucleus reaching past the candidates)
              run the pass sampler below inside the same program.
FTLAB_SAMPLER=passes (the default under the interpreter) runs the pass sampler alone: on the GPU one program per
row, looping over V in chunks of BLOCK (no sort, no scratch memory); under the CPU interpreter a program takes a
tile of rows (same per-row arithmetic, fewer Python-level ops):
  pass 1      running max / argmax / sum(exp(scaled - max)) (online softmax).  Greedy rows stop here.
  top-k       bisection for the k-th largest scaled value over the order-preserving int32 image ("key")
              of the fp32 values: each step is one pass counting elements with key >= mid; the pass also
              returns the nearest element keys on both sides of mid so the bracket snaps onto real
              values. Midpoints are taken in float space for the first FLOAT_STEPS steps, then in int space
              (guaranteed halving), so a search is bounded by FLOAT_STEPS + 32 passes.
  Z pass      (top-k and top-p both active) mass of the top-k set, to renormalise the nucleus target.
  top-p       the same bisection, summing exp(scaled - max) instead of counting.
  draw        one pass: exponential race, token = argmax over kept i of (scaled_i - max) - log(E_i),
              E_i ~ Exp(1) from Philox; an exact sample from the renormalised kept distribution. Ties at
              the boundary value are resolved by index with a running count; chunks with no kept
              element skip the RNG.
Passes over the row: greedy 1; pure temperature sampling 2; top-k only 2 + S_k; top-p only 2 + S_p;
both 3 + S_k + S_p. Measured with a Python mirror of the search on V=50257 random logits (fp16, std 1-8,
temperature 0.8): S_k ~ 9-13 for k=40, S_p ~ 2-8 for p=0.9 inside that top-k, S_p ~ 13-19 for p=0.9 alone.
So "top_k=40 + top_p=0.9" reads the row ~21 times (from L2 after the first pass).

The searches start from the bracket [max - CUTOFF, max]: any element below max - CUTOFF (CUTOFF=64) has
probability < e^-64 relative to the max element and can never win the race (the noise term spans < 26),
so if the k-th largest value lies below it the top-k limit is treated as absent (it changes the top-p
normaliser by < V * e^-64, far below fp32 resolution).
"""
import numbers
import os

import torch
import triton
import triton.language as tl

from ._env import ints_from_env, is_pow2

CUTOFF = 64.0  # see module docstring: search bracket below the row max, in scaled-logit units
FLOAT_STEPS = 24  # bisection steps with a float-space midpoint before switching to int-space halving
STEP_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: seed + step * STEP_MIX keys the Philox stream

# globals read inside @triton.jit code must be constexpr
INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)
INT64_MIN = tl.constexpr(-9223372036854775808)
_STEP_MIX = tl.constexpr(STEP_MIX)


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (negatives: flip the 31 value bits). -0.0 must be normalised first."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """Inverse of _order_key (the transform is an involution)."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_scaled(row_ptr, idx, V, inv_t):
    """(R, BLOCK) tile of scaled logits, -inf past the end of the row; also the in-range mask."""
    valid = (idx < V)[None, :]  # (1, BLOCK), broadcast against the rows
    x = tl.load(row_ptr + idx[None, :], mask=valid, other=float("-inf")).to(tl.float32)
    # + 0.0 turns -0.0 into +0.0 so that equal values get equal keys
    return x * inv_t[:, None] + 0.0, valid


@triton.jit
def _row_stats(row_ptr, V, inv_t, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1, per row: max of the scaled row, its lowest index, and sum(exp(scaled - max))."""
    offs = tl.arange(0, BLOCK)
    acc_max = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    acc_idx = tl.zeros([ROWS, BLOCK], tl.int32) + offs[None, :]  # first index where the lane's max was reached
    acc_sum = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        s, _ = _load_scaled(row_ptr, idx, V, inv_t)
        new_max = tl.maximum(acc_max, s)
        # a lane that has seen only -inf keeps sum 0: shift by 0 there instead of computing -inf - (-inf)
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        acc_sum = acc_sum * tl.exp(acc_max - shift) + tl.exp(s - shift)
        acc_idx = tl.where(s > acc_max, idx[None, :], acc_idx)
        acc_max = new_max
    m = tl.max(acc_max, 1)
    argmax = tl.min(tl.where(acc_max == m[:, None], acc_idx, V), 1)
    shift = tl.where(m > float("-inf"), m, 0.0)
    sumexp = tl.sum(acc_sum * tl.exp(acc_max - shift[:, None]), 1)
    return m, argmax, sumexp


@triton.jit
def _weight_at_or_above(row_ptr, V, inv_t, m, mid, lo, USE_MASS: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """One pass, per row: W(key >= mid) (a count, or the mass exp(scaled - m)), the smallest key >= mid
    (INT32_MAX if none) and the largest key in [lo, mid) (lo if none)."""
    offs = tl.arange(0, BLOCK)
    acc_w = tl.zeros([ROWS, BLOCK], tl.float32)
    acc_min = tl.full([ROWS, BLOCK], INT32_MAX, tl.int32)
    acc_max = tl.zeros([ROWS, BLOCK], tl.int32) + lo[:, None]
    for start in range(0, V, BLOCK):
        idx = start + offs
        s, valid = _load_scaled(row_ptr, idx, V, inv_t)
        key = tl.where(valid, _order_key(s), INT32_MIN)
        ge = key >= mid[:, None]
        if USE_MASS:
            acc_w += tl.where(ge, tl.exp(s - m[:, None]), 0.0)
        else:
            acc_w += ge.to(tl.float32)
        acc_min = tl.minimum(acc_min, tl.where(ge, key, INT32_MAX))
        acc_max = tl.maximum(acc_max, tl.where(ge, lo[:, None], key))
    return tl.sum(acc_w, 1), tl.min(acc_min, 1), tl.max(acc_max, 1)


@triton.jit
def _search(row_ptr, V, inv_t, m, active, lo, hi, target, USE_MASS: tl.constexpr, ROWS: tl.constexpr,
            BLOCK: tl.constexpr, FLOAT_STEPS: tl.constexpr):
    """Per active row: the largest key t in [lo, hi) with W(key >= t) >= target, given W(lo) >= target and
    W(hi) < target, where hi lies above every element. Returns (t, W(key > t)); inactive rows return (lo, 0).

    Each iteration is one pass over the rows; a row whose bracket has closed no longer changes, so its result
    does not depend on the other rows of the tile.
    """
    w_hi = target * 0.0  # W(key >= hi)
    it = 0
    searching = active & (hi > lo + 1)
    while tl.max(searching.to(tl.int32), 0) > 0:
        int_mid = ((lo.to(tl.int64) + hi.to(tl.int64)) >> 1).to(tl.int32)
        float_mid = _order_key(_key_value(lo) * 0.5 + _key_value(hi) * 0.5 + 0.0)
        use_float = (it < FLOAT_STEPS) & (float_mid > lo) & (float_mid < hi)
        mid = tl.where(use_float, float_mid, int_mid)
        w_ge, min_ge, max_lt = _weight_at_or_above(row_ptr, V, inv_t, m, mid, lo, USE_MASS, ROWS, BLOCK)
        found = w_ge >= target
        # no element lies in [mid, min_ge) nor in [max_lt + 1, mid): snap the bracket onto element keys
        lo = tl.where(searching & found, tl.where(min_ge == INT32_MAX, mid, min_ge), lo)
        hi = tl.where(searching & ~found, max_lt + 1, hi)
        w_hi = tl.where(searching & ~found, w_ge, w_hi)
        searching = searching & (hi > lo + 1)
        it += 1
    return lo, w_hi


@triton.jit
def _exponential(seed, idx):
    """Exp(1) variates from Philox(seed, idx), accurate near 0 (where rare tokens win the race)."""
    r = tl.randint(seed, idx).to(tl.uint32, bitcast=True)
    u = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (r + 1/2) / 2**32, fine-grained near 0
    # -log(1 - u): a short series where 1 - u would lose the low bits of u, the log elsewhere
    series = u * (1.0 + u * (0.5 + u * (0.3333333432674408 + u * 0.25)))
    direct = -tl.log(tl.maximum(1.0 - u, 2.9802322387695312e-08))
    return tl.where(u < 0.03125, series, direct)


@triton.jit
def _draw(row_ptr, V, inv_t, m, thresh, n_ties, stream, fallback, ROWS: tl.constexpr,
          BLOCK: tl.constexpr):
    """Exponential race per row over the kept set: {key > thresh} + the first n_ties (by index) of {key == thresh}."""
    offs = tl.arange(0, BLOCK)
    acc_score = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    acc_idx = tl.zeros([ROWS, BLOCK], tl.int32) + V
    ties_before = n_ties * 0
    for start in range(0, V, BLOCK):
        idx = start + offs
        s, valid = _load_scaled(row_ptr, idx, V, inv_t)
        key = tl.where(valid, _order_key(s), INT32_MIN)
        is_tie = (valid & (key == thresh[:, None])).to(tl.int32)
        tie_rank = ties_before[:, None] + tl.cumsum(is_tie, 1) - 1
        kept = valid & ((key > thresh[:, None]) | ((is_tie != 0) & (tie_rank < n_ties[:, None])))
        ties_before += tl.sum(is_tie, 1)
        if tl.max(tl.max(kept.to(tl.int32), 1), 0) > 0:  # the RNG is the costly part: skip chunks with nothing kept
            # one Philox stream per row; the counter is the vocabulary index
            noise = tl.log(_exponential(stream[:, None], idx[None, :]))
            score = tl.where(kept, (s - m[:, None]) - noise, float("-inf"))
            better = score > acc_score  # strict: a lane keeps its lowest index on equal scores
            acc_score = tl.where(better, score, acc_score)
            acc_idx = tl.where(better, idx[None, :], acc_idx)
    best = tl.max(acc_score, 1)
    token = tl.min(tl.where(acc_score == best[:, None], acc_idx, V), 1)
    # all kept scores are -inf only if every draw hit the far tail; the row max is always kept
    return tl.where(best > float("-inf"), token, fallback)


@triton.jit
def _sample_rows(row_ptr, rows, V, k, p, inv_t, greedy, seeds_ptr, steps_ptr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, FLOAT_STEPS: tl.constexpr, CUTOFF: tl.constexpr):
    """The pass-based sampler for a tile of rows: (token, row max m, sum(exp(scaled - m))). Rows marked greedy
    stop after pass 1 (their token is the argmax)."""
    m, argmax, sumexp = _row_stats(row_ptr, V, inv_t, ROWS, BLOCK)
    token = argmax
    if tl.max((~greedy).to(tl.int32), 0) > 0:
        lo_init = _order_key(m - CUTOFF + 0.0)
        top = _order_key(m) + 1  # above every element
        # kept set, per row: {key > thresh} + the first n_ties (by index) of {key == thresh}
        thresh = tl.full([ROWS], INT32_MIN, tl.int32)
        n_ties = tl.zeros([ROWS], tl.int32) + V

        search_k = ~greedy & (k > 1) & (k < V)
        kth, n_above = _search(row_ptr, V, inv_t, m, search_k, lo_init, top, k.to(tl.float32), False,
                               ROWS, BLOCK, FLOAT_STEPS)
        use_k = search_k & (kth > lo_init)  # else the k-th value is below the cutoff: the limit has no effect
        thresh = tl.where(use_k, kth, thresh)
        n_ties = tl.where(use_k, k - n_above.to(tl.int32), n_ties)

        search_p = ~greedy & (p < 1.0)
        z = sumexp  # normaliser of the top-k set, relative to exp(m)
        need_z = search_p & use_k
        if tl.max(need_z.to(tl.int32), 0) > 0:
            mass_above, _, _ = _weight_at_or_above(row_ptr, V, inv_t, m, thresh + 1, thresh, True, ROWS,
                                                   BLOCK)
            z_k = mass_above + n_ties.to(tl.float32) * tl.exp(_key_value(thresh) - m)
            z = tl.where(need_z, z_k, z)
        target = p * z
        pth, mass_above_p = _search(row_ptr, V, inv_t, m, search_p, tl.maximum(thresh, lo_init), top,
                                    target, True, ROWS, BLOCK, FLOAT_STEPS)
        # ties at the nucleus boundary: as many as needed to reach the target, in index order
        boundary_mass = tl.where(search_p, tl.exp(_key_value(pth) - m), 1.0)  # > 0: pth >= max - CUTOFF
        need = tl.ceil((target - mass_above_p) / boundary_mass)
        n_p = tl.minimum(tl.maximum(need, 1.0), V * 1.0).to(tl.int32)
        n_ties = tl.where(search_p, tl.where(pth == thresh, tl.minimum(n_ties, n_p), n_p), n_ties)
        thresh = tl.where(search_p, pth, thresh)

        drawn = _draw(row_ptr, V, inv_t, m, thresh, n_ties, _stream(seeds_ptr, steps_ptr, rows), argmax, ROWS,
                      BLOCK)
        token = tl.where(greedy, argmax, drawn)
    return token, m, sumexp


@triton.jit
def _stream(seeds_ptr, steps_ptr, rows):
    """Per-row Philox key: the seed with the step folded in (wraps mod 2**64)."""
    seed = tl.load(seeds_ptr + rows).to(tl.uint64, bitcast=True)
    step = tl.load(steps_ptr + rows).to(tl.int64).to(tl.uint64, bitcast=True)
    return seed + step * _STEP_MIX


@triton.jit
def _row_params(top_k_ptr, top_p_ptr, temperature_ptr, B, ROWS: tl.constexpr):
    """A program's tile of rows: (rows to store, in range, rows to read (padding repeats row B - 1), k, p,
    greedy, 1 / temperature (1 for greedy rows, as torch computes it otherwise))."""
    rows_out = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows_out < B  # only for the stores: padding rows of the last tile recompute row B - 1
    rows = tl.minimum(rows_out, B - 1)
    k = tl.load(top_k_ptr + rows)
    p = tl.load(top_p_ptr + rows)
    temperature = tl.load(temperature_ptr + rows)
    greedy = k == 1
    inv_t = tl.where(greedy, 1.0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), temperature))
    return rows_out, row_ok, rows, k, p, greedy, inv_t


@triton.jit
def _store_outputs(logits_ptr, stride_row, rows, rows_out, row_ok, token, inv_t, m, sumexp, tokens_ptr,
                   logprobs_ptr, WRITE_LOGPROBS: tl.constexpr):
    tl.store(tokens_ptr + rows_out, token.to(tl.int64), mask=row_ok)
    if WRITE_LOGPROBS:
        s_tok = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + token).to(tl.float32) * inv_t
        tl.store(logprobs_ptr + rows_out, s_tok - m - tl.log(sumexp), mask=row_ok)


@triton.jit(do_not_specialize=["B"])  # B changes from step to step; nothing gains from specialising on it
def _sample_kernel(logits_ptr, stride_row, top_k_ptr, top_p_ptr, temperature_ptr, seeds_ptr, steps_ptr,
                   tokens_ptr, logprobs_ptr, B, V,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, FLOAT_STEPS: tl.constexpr, CUTOFF: tl.constexpr,
                   WRITE_LOGPROBS: tl.constexpr):
    """The pass-based sampler alone (FTLAB_SAMPLER=passes): every row read 1 to ~25 times by one program."""
    rows_out, row_ok, rows, k, p, greedy, inv_t = _row_params(top_k_ptr, top_p_ptr, temperature_ptr, B, ROWS)
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # (R, 1)
    token, m, sumexp = _sample_rows(row_ptr, rows, V, k, p, inv_t, greedy, seeds_ptr, steps_ptr, ROWS, BLOCK,
                                    FLOAT_STEPS, CUTOFF)
    _store_outputs(logits_ptr, stride_row, rows, rows_out, row_ok, token, inv_t, m, sumexp, tokens_ptr,
                   logprobs_ptr, WRITE_LOGPROBS)


@triton.jit
def _bit_mask(ND: tl.constexpr, BIT: tl.constexpr):
    """0/1 = bit BIT of the flat index, shaped to broadcast over a hypercube of ND axes of 2 (BIT 0 innermost)."""
    return tl.reshape(tl.arange(0, 2), [1] * (ND - 1 - BIT) + [2] + [1] * BIT)


@triton.jit
def _compare_swap(h, ND: tl.constexpr, BIT: tl.constexpr, desc):
    """Order each pair of elements whose flat indices differ in bit BIT: the larger first where desc is 1."""
    hi = tl.max(h, axis=ND - 1 - BIT, keep_dims=True)
    lo = tl.min(h, axis=ND - 1 - BIT, keep_dims=True)
    return tl.where((_bit_mask(ND, BIT) ^ desc) != 0, hi, lo)


@triton.jit
def _bitonic_merge(h, ND: tl.constexpr, S: tl.constexpr, desc):
    """Sort every bitonic run of 2**S elements (ascending, or descending where desc is 1)."""
    for i in tl.static_range(S):
        h = _compare_swap(h, ND, S - 1 - i, desc)
    return h


@triton.jit
def _fold_runs(h, ND: tl.constexpr, LOG_C: tl.constexpr, LAST: tl.constexpr):
    """Element-wise max of each adjacent pair of sorted runs of 2**LOG_C (one descending, one ascending: a bitonic
    run holding the pair's largest), then a merge: descending where the new run index is even, or LAST."""
    h = tl.max(h, axis=ND - 1 - LOG_C, keep_dims=False)
    if LAST:
        h = _bitonic_merge(h, ND - 1, LOG_C, 1)
    else:
        h = _bitonic_merge(h, ND - 1, LOG_C, 1 - _bit_mask(ND - 1, LOG_C))
    return h


@triton.jit
def _top_desc(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, LOG_C: tl.constexpr):
    """The 2**LOG_C largest of each row of x (2**LOG_R, 2**LOG_N), largest first (LOG_C == LOG_N: a sort).

    A bitonic network on the hypercube view of x, built from max/min over axes of size 2 only: runs of 2**LOG_C
    are sorted in alternating directions; then, while a row holds more than one run, the element-wise max of
    each adjacent (descending, ascending) pair of runs is a bitonic run holding the pair's 2**LOG_C largest, and
    one merge sorts it again. (The interpreter runs these as whole-array numpy operations; tl.sort's swaps go
    through a custom-combine reduction that it runs element by element, ~50x slower.)
    """
    ND: tl.constexpr = LOG_R + LOG_N
    h = tl.reshape(x, [2] * ND)
    for s in tl.static_range(1, LOG_C + 1):
        if s == LOG_N:
            h = _bitonic_merge(h, ND, s, 1)
        else:  # runs of 2**s alternate: descending where bit s is 0
            h = _bitonic_merge(h, ND, s, 1 - _bit_mask(ND, s))
    for level in tl.static_range(LOG_C, LOG_N):  # the hypercube loses one axis per fold
        h = _fold_runs(h, ND - (level - LOG_C), LOG_C, level == LOG_N - 1)
    return tl.reshape(h, [2 ** LOG_R, 2 ** LOG_C])


@triton.jit
def _top(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, LOG_C: tl.constexpr, STDLIB_SORT: tl.constexpr):
    """_top_desc, or on the GPU triton's own tl.topk (same result: packed keys are distinct, padding aside; ~2x
    faster there: a full sort of 2048 keys in one program 31 vs 60 us on the H200)."""
    if STDLIB_SORT:
        return tl.topk(x, 2 ** LOG_C)
    else:
        return _top_desc(x, LOG_R, LOG_N, LOG_C)


@triton.jit
def _whole_row_race(greedy, k, p, V):
    """Rows with neither a top-k nor a top-p limit: their draw is the race over the whole row, which stage 1 runs
    chunk by chunk and stage 2 finishes."""
    return ~greedy & ((k <= 0) | (k >= V)) & (p >= 1.0)


@triton.jit
def _pack(s, idx, valid):
    """int64 sort keys of (scaled value, index): larger value first, then lower index (a stable descending order);
    INT64_MIN for lanes past the end of the row."""
    low = (~idx).to(tl.uint32, bitcast=True).to(tl.int64)  # 2**32 - 1 - idx: lower index, larger key
    packed = (_order_key(s).to(tl.int64) << 32) | low
    return tl.where(valid, packed, INT64_MIN)


@triton.jit
def _unpack(packed):
    """(scaled value, vocabulary index) of packed keys (not of INT64_MIN padding)."""
    return _key_value((packed >> 32).to(tl.int32)), ~(packed.to(tl.int32))


@triton.jit(do_not_specialize=["B"])
def _candidates_kernel(logits_ptr, stride_row, top_k_ptr, top_p_ptr, temperature_ptr, seeds_ptr, steps_ptr,
                       cand_ptr, stats_ptr, B, V, NCHUNK,
                       ROWS: tl.constexpr, CHUNK: tl.constexpr, C: tl.constexpr, LOG_ROWS: tl.constexpr,
                       LOG_CHUNK: tl.constexpr, LOG_C: tl.constexpr, STDLIB_SORT: tl.constexpr):
    """Stage 1, one program per (tile of rows, chunk of CHUNK logits): the chunk's C largest packed keys, sorted
    (cand[row, chunk*C:(chunk+1)*C]; greedy rows: only the largest), and stats[row, :, chunk] = (max, sum(exp(
    scaled - max)), the exponential race's best score and index over the whole chunk: the draw of rows with no
    top-k or top-p limit)."""
    rows_out, row_ok, rows, k, p, greedy, inv_t = _row_params(top_k_ptr, top_p_ptr, temperature_ptr, B, ROWS)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    s, valid = _load_scaled(row_ptr, idx, V, inv_t)  # (R, CHUNK)
    packed = _pack(s, idx[None, :], valid)

    m_c = tl.max(s, 1)
    shift = tl.where(m_c > float("-inf"), m_c, 0.0)
    z_c = tl.sum(tl.exp(s - shift[:, None]), 1)
    race_score = tl.full([ROWS], float("-inf"), tl.float32)
    race_idx = tl.zeros([ROWS], tl.int32) + V
    full_race = _whole_row_race(greedy, k, p, V)
    if tl.max(full_race.to(tl.int32), 0) > 0:
        noise = tl.log(_exponential(_stream(seeds_ptr, steps_ptr, rows)[:, None], idx[None, :]))
        score = tl.where(valid, s - noise, float("-inf"))
        race_score = tl.max(score, 1)
        race_idx = tl.min(tl.where(score == race_score[:, None], idx[None, :], V), 1)

    lanes = tl.arange(0, C)
    if tl.max((~greedy).to(tl.int32), 0) > 0:
        top = _top(packed, LOG_ROWS, LOG_CHUNK, LOG_C, STDLIB_SORT)  # (R, C), largest first
    else:
        top = tl.where(lanes[None, :] == 0, tl.max(packed, 1)[:, None], INT64_MIN)
    out_rows = rows_out.to(tl.int64)[:, None]
    tl.store(cand_ptr + out_rows * (NCHUNK * C) + c * C + lanes[None, :], top, mask=row_ok[:, None])
    stat_ptr = stats_ptr + rows_out.to(tl.int64) * (4 * NCHUNK) + c
    tl.store(stat_ptr, m_c, mask=row_ok)
    tl.store(stat_ptr + NCHUNK, z_c, mask=row_ok)
    tl.store(stat_ptr + 2 * NCHUNK, race_score, mask=row_ok)
    tl.store(stat_ptr + 3 * NCHUNK, race_idx.to(tl.float32), mask=row_ok)  # exact: V < 2**24


@triton.jit(do_not_specialize=["B"])
def _select_kernel(logits_ptr, stride_row, top_k_ptr, top_p_ptr, temperature_ptr, seeds_ptr, steps_ptr,
                   cand_ptr, stats_ptr, tokens_ptr, logprobs_ptr, B, V, NCHUNK,
                   ROWS: tl.constexpr, C: tl.constexpr, NC: tl.constexpr, NCHUNK_P2: tl.constexpr,
                   LOG_ROWS: tl.constexpr, LOG_NC: tl.constexpr, STDLIB_SORT: tl.constexpr,
                   BLOCK: tl.constexpr, FLOAT_STEPS: tl.constexpr, CUTOFF: tl.constexpr,
                   WRITE_LOGPROBS: tl.constexpr):
    """Stage 2, one program per tile of rows: merge the chunks' candidates, keep the top-k / top-p prefix of the
    sorted candidates and run the exponential race over it; rows whose kept set may reach past the candidates go
    through the pass-based sampler (_sample_rows) instead."""
    rows_out, row_ok, rows, k, p, greedy, inv_t = _row_params(top_k_ptr, top_p_ptr, temperature_ptr, B, ROWS)
    ch = tl.arange(0, NCHUNK_P2)
    ch_ok = (ch < NCHUNK)[None, :]
    stat_ptr = stats_ptr + rows.to(tl.int64)[:, None] * (4 * NCHUNK) + ch[None, :]
    m_c = tl.load(stat_ptr, mask=ch_ok, other=float("-inf"))
    z_c = tl.load(stat_ptr + NCHUNK, mask=ch_ok, other=0.0)
    m = tl.max(m_c, 1)
    shift = tl.where(m > float("-inf"), m, 0.0)
    sumexp = tl.sum(z_c * tl.exp(m_c - shift[:, None]), 1)
    race_score = tl.load(stat_ptr + 2 * NCHUNK, mask=ch_ok, other=float("-inf"))
    race_idx = tl.load(stat_ptr + 3 * NCHUNK, mask=ch_ok, other=V * 1.0).to(tl.int32)
    race_best = tl.max(race_score, 1)
    race_token = tl.min(tl.where(race_score == race_best[:, None], race_idx, V), 1)

    j = tl.arange(0, NC)
    cand = tl.load(cand_ptr + rows.to(tl.int64)[:, None] * (NCHUNK * C) + j[None, :], mask=(j < NCHUNK * C)[None, :],
                   other=INT64_MIN)
    _, argmax = _unpack(tl.max(cand, 1))  # largest value, lowest index among equals
    token = argmax
    unresolved = greedy & ~greedy
    if tl.max((~greedy).to(tl.int32), 0) > 0:
        # Every element outside the candidates ranks below its chunk's C-th candidate, so all elements ranking
        # at or above the highest of those (bound) are candidates: the first `exact` sorted candidates are the
        # row's first `exact` elements in the global order.
        bound = tl.max(tl.where((j % C == C - 1)[None, :], cand, INT64_MIN), 1)
        srt = _top(cand, LOG_ROWS, LOG_NC, LOG_NC, STDLIB_SORT)  # sorted, largest first
        real = srt != INT64_MIN
        exact = tl.sum((real & (srt >= bound[:, None])).to(tl.int32), 1)
        s_j, idx_j = _unpack(srt)
        w_j = tl.where(real, tl.exp(s_j - m[:, None]), 0.0)  # probability relative to exp(m)
        rank = j[None, :]

        limit_k = ~greedy & (k > 1) & (k < V)
        use_k = limit_k & (k <= exact)  # else the top-k set's mass (the nucleus' normaliser) is unknown here
        n_k = tl.where(use_k, k, V)
        in_k = rank < n_k[:, None]
        z = tl.where(use_k, tl.sum(tl.where(in_k, w_j, 0.0), 1), sumexp)
        target = p * z
        incl = tl.cumsum(tl.where(in_k, w_j, 0.0), 1)  # non-decreasing
        # nucleus: the ranks before the first whose cumulative mass reaches the target, and that one
        n_p = tl.minimum(tl.sum((incl < target[:, None]).to(tl.int32), 1) + 1, n_k)
        last = tl.minimum(exact, n_k) - 1  # the last rank known to be in order
        mass_known = tl.sum(tl.where(rank == last[:, None], incl, 0.0), 1)
        use_p = ~greedy & (p < 1.0)
        p_found = use_k | (~limit_k & (mass_known >= target))  # the crossing lies among the exact ranks
        full_race = _whole_row_race(greedy, k, p, V)
        n_keep = tl.where(use_p, n_p, n_k)
        race_here = ~greedy & tl.where(use_p, p_found, use_k)  # (never a whole-row race: no limit is used there)
        unresolved = ~greedy & ~full_race & ~race_here

        if tl.max(race_here.to(tl.int32), 0) > 0:
            noise = tl.log(_exponential(_stream(seeds_ptr, steps_ptr, rows)[:, None], idx_j))
            score = tl.where(real & (rank < n_keep[:, None]), (s_j - m[:, None]) - noise, float("-inf"))
            best = tl.max(score, 1)
            drawn = tl.min(tl.where(score == best[:, None], idx_j, V), 1)
            drawn = tl.where(best > float("-inf"), drawn, argmax)
            token = tl.where(race_here, drawn, token)
        token = tl.where(full_race, tl.where(race_best > float("-inf"), race_token, argmax), token)

    if tl.max(unresolved.to(tl.int32), 0) > 0:
        row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
        slow, _, _ = _sample_rows(row_ptr, rows, V, k, p, inv_t, ~unresolved, seeds_ptr, steps_ptr, ROWS, BLOCK,
                                  FLOAT_STEPS, CUTOFF)
        token = tl.where(unresolved, slow, token)
    _store_outputs(logits_ptr, stride_row, rows, rows_out, row_ok, token, inv_t, m, sumexp, tokens_ptr,
                   logprobs_ptr, WRITE_LOGPROBS)


def _launch_config(B, V, device_type):
    """The pass sampler's launch (alone, and as stage 2's fallback, whose program also takes num_warps):
    (ROWS, BLOCK, num_warps). BLOCK covers a small row in one chunk and on the GPU caps at 2048 for V ~ 50k (25
    chunks a pass, ~8 elements per thread). On the GPU one program per row (V is large, rows are independent); the
    CPU interpreter pays per operation, not per element, so there BLOCK goes up to INTERPRETER_BLOCK and a program
    packs rows up to INTERPRETER_ELEMENTS (see there).
    FTLAB_SAMPLE_CONFIG="BLOCK,num_warps" replaces those two (read per call; for measuring wider programs:
    a top-k / top-p row is ~10-20 passes over V, each a loop of V / BLOCK dependent chunks; H200: 4096 logits x
    16 warps 156-226 us against 209-297 us per call, data/bench/sampling_bench_graph.txt)."""
    block = min(max(triton.next_power_of_2(V), 16), 2048 if device_type == "cuda" else INTERPRETER_BLOCK)
    num_warps = max(1, min(8, block // 256))
    block, num_warps = _config_from_env() or (block, num_warps)
    return (1 if device_type == "cuda" else _interpreter_rows(B, block)), block, num_warps


# Under the interpreter every tl operation costs ~the same whatever its size, so a pass over V in few wide chunks
# and many rows per program is what makes it fast: CPU, V = 50257, top_k 40 / top_p 0.9 at temperature 0.8, s per
# call, BLOCK 2048 and 32k elements per program -> 16384 and 256k: batch 1 2.32 / 3.13 -> 0.53 / 0.63, batch 4
# 2.94 / 3.69 -> 0.78 / 1.06 (tokens unchanged; wider still was slower at batch 4-16).
INTERPRETER_BLOCK = 16384
INTERPRETER_ELEMENTS = 262144


def _interpreter_rows(B, width):
    """Rows per program under the interpreter: up to INTERPRETER_ELEMENTS elements of rows."""
    return min(triton.next_power_of_2(max(B, 1)), max(1, INTERPRETER_ELEMENTS // width))


def _config_from_env():
    values = ints_from_env("FTLAB_SAMPLE_CONFIG", "BLOCK,num_warps")
    if values is not None:
        block, num_warps = values
        if not (block >= 16 and is_pow2(block) and is_pow2(num_warps) and num_warps <= 32):
            raise ValueError(f"FTLAB_SAMPLE_CONFIG={values}: BLOCK must be a power of two >= 16 and num_warps a "
                             f"power of two up to 32")
    return values


_PARAM_DTYPES = {
    "top_k": torch.int32,
    "top_p": torch.float32,
    "temperature": torch.float32,
    "seeds": torch.int64,
    "steps": torch.int32,
}


def _check_inputs(logits, params):
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary, got strides {logits.stride()}")
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape ({B},), got {type(t).__name__}")
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},) (one per row of logits), got {tuple(t.shape)}")
        if t.dtype != _PARAM_DTYPES[name]:
            raise ValueError(f"{name} must be {_PARAM_DTYPES[name]}, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
        if B > 0 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _log2(n):
    return n.bit_length() - 1


def _candidate_config(B, V, device_type):
    """Two-stage sampler launch: (CHUNK, C, rows per stage-1 program, rows per stage-2 program, warps of stage 1,
    warps of stage 2 or None for _launch_config's). Chunks of 2048 logits (more for vocabularies over 64k, so that
    there are at most ~32 chunks), 32 candidates each: exact top-k up to k = 32 (and usually several hundred),
    top-p whenever the nucleus lies among the candidates known to be in order (usually a few hundred tokens).
    Stage 1 runs 4 warps per program at small batch (latency) and 1 from batch 16 up (throughput: at batch 64
    there are 1600 programs). H200, V = 50257, fp16, bs1 (kernels/sampling.py `_benchmark`): the stage-2 sort of
    all candidates dominates, ~65 us for 64 per chunk, ~20 for 16; 16 per chunk left random top-p=0.9 rows
    (nucleus > 400 tokens) to the pass sampler.
    FTLAB_SAMPLE_CANDIDATES="CHUNK,C,warps_1,warps_2" replaces all but the rows (read per call; warps 0 = default)."""
    chunk = min(max(triton.next_power_of_2(V), 16), max(2048, triton.next_power_of_2(triton.cdiv(V, 32))))
    c = min(32, chunk)
    warps_1, warps_2 = 0, 0
    values = ints_from_env("FTLAB_SAMPLE_CANDIDATES", "CHUNK,C,warps_1,warps_2")
    if values is not None:
        chunk, c, warps_1, warps_2 = values
        if not (is_pow2(chunk) and chunk >= 16 and is_pow2(c) and 2 <= c <= chunk
                and all(w == 0 or (is_pow2(w) and w <= 32) for w in (warps_1, warps_2))):
            raise ValueError(f"FTLAB_SAMPLE_CANDIDATES={values}: CHUNK must be a power of two >= 16, C a power "
                             f"of two in [2, CHUNK], warps 0 (default) or a power of two up to 32")
    warps_1 = warps_1 or (4 if chunk >= 1024 and B < 16 else 1)
    if device_type == "cuda":
        return chunk, c, 1, 1, warps_1, warps_2 or None
    nc = triton.next_power_of_2(triton.cdiv(V, chunk) * c)
    rows_2 = _interpreter_rows(B, max(nc, min(triton.next_power_of_2(V), INTERPRETER_BLOCK)))  # the fallback's too
    return chunk, c, _interpreter_rows(B, chunk), rows_2, warps_1, warps_2 or None


def sample(logits, top_k, top_p, temperature, seeds, steps, *, return_logprobs=False):
    """Sample one token per row. logits (B, V) fp32/fp16/bf16; per-row top_k int32, top_p float32,
    temperature float32, seeds int64 (uint64 seeds as two's complement), steps int32, all (B,).

    Returns tokens int64 (B,), and logprobs float32 (B,) when return_logprobs. Never syncs with the host;
    parameter values are the caller's to check (check_sampling_params). On the GPU two launches (candidates per
    chunk, then the selection; see the module docstring), under the interpreter the pass sampler alone;
    FTLAB_SAMPLER=candidates / passes chooses.
    """
    params = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "seeds": seeds, "steps": steps}
    _check_inputs(logits, params)
    B, V = logits.shape
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B if return_logprobs else 1, dtype=torch.float32, device=dev)
    if B == 0:
        return (tokens, logprobs) if return_logprobs else tokens
    rows, block, num_warps = _launch_config(B, V, dev.type)
    common = dict(FLOAT_STEPS=FLOAT_STEPS, CUTOFF=CUTOFF, WRITE_LOGPROBS=return_logprobs)
    # The interpreter pays per operation, not per element: there the pass sampler is several times faster (CPU,
    # V = 50257, batch 1: greedy 0.08 vs 0.45 s, top_k 40 + top_p 0.9 2.5 vs 6.6 s) and draws the same tokens.
    mode = os.environ.get("FTLAB_SAMPLER") or ("candidates" if dev.type == "cuda" else "passes")
    if mode == "candidates" and V >= 2 ** 24:
        mode = "passes"  # stage 1 hands race indices over as fp32, exact below 2**24
    if mode == "passes":
        _sample_kernel[(triton.cdiv(B, rows),)](
            logits, logits.stride(0), top_k, top_p, temperature, seeds, steps, tokens, logprobs, B, V,
            ROWS=rows, BLOCK=block, num_warps=num_warps, **common)
    elif mode == "candidates":
        chunk, c, rows_1, rows_2, warps_1, warps_2 = _candidate_config(B, V, dev.type)
        nchunk = triton.cdiv(V, chunk)
        stdlib_sort = dev.type == "cuda" and hasattr(tl, "topk")
        cand = torch.empty(B, nchunk * c, dtype=torch.int64, device=dev)
        stats = torch.empty(B, 4, nchunk, dtype=torch.float32, device=dev)
        _candidates_kernel[(triton.cdiv(B, rows_1), nchunk)](
            logits, logits.stride(0), top_k, top_p, temperature, seeds, steps, cand, stats, B, V, nchunk,
            ROWS=rows_1, CHUNK=chunk, C=c, LOG_ROWS=_log2(rows_1), LOG_CHUNK=_log2(chunk), LOG_C=_log2(c),
            STDLIB_SORT=stdlib_sort, num_warps=warps_1)
        nc = triton.next_power_of_2(nchunk * c)
        _select_kernel[(triton.cdiv(B, rows_2),)](
            logits, logits.stride(0), top_k, top_p, temperature, seeds, steps, cand, stats, tokens, logprobs, B, V,
            nchunk, ROWS=rows_2, C=c, NC=nc, NCHUNK_P2=triton.next_power_of_2(nchunk), LOG_ROWS=_log2(rows_2),
            LOG_NC=_log2(nc), STDLIB_SORT=stdlib_sort, BLOCK=block, num_warps=warps_2 or num_warps, **common)
    else:
        raise ValueError(f"FTLAB_SAMPLER={mode!r}: expected 'candidates' or 'passes'")
    return (tokens, logprobs) if return_logprobs else tokens


def _as_list(name, value, n):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected {n} (one per request)")
        return list(value)
    return [value] * n


def check_sampling_params(top_k, top_p, temperature, vocab_size):
    """Host-side value checks (Python numbers or per-request lists); raises ValueError naming the parameter
    and request index. Valid: 0 <= top_k <= vocab_size (0 = no limit), 0 < top_p <= 1, temperature > 0."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    lengths = [len(v) for v in (top_k, top_p, temperature) if isinstance(v, (list, tuple))]
    n = max(lengths) if lengths else 1
    ks = _as_list("top_k", top_k, n)
    ps = _as_list("top_p", top_p, n)
    ts = _as_list("temperature", temperature, n)
    seen = set()  # a batch sharing its parameters is checked once (types in the key: True == 1)
    for i in range(n):
        k, p, t = ks[i], ps[i], ts[i]
        key = (type(k), k, type(p), p, type(t), t)
        try:
            if key in seen:
                continue
            seen.add(key)
        except TypeError:  # unhashable (a list where a number belongs): rejected below
            pass
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f"top_k[{i}] must be an int, got {k!r}")
        if k < 0:
            raise ValueError(f"top_k[{i}] = {k} is negative (use 0 for no top-k limit)")
        if k > vocab_size:
            raise ValueError(f"top_k[{i}] = {k} exceeds the vocabulary size {vocab_size}")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:  # NaN fails too
            raise ValueError(f"top_p[{i}] = {p!r} is outside (0, 1]")
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 < t < float("inf"):
            raise ValueError(f"temperature[{i}] = {t!r} must be a finite number > 0")


# ----------------------------------------------------------------------------------------------
# Plain-torch reference (sort + cumsum). It cannot reproduce the kernel's random stream; it defines
# the kept set and the distribution that tests compare against.


def _scaled_row(logits_row, temperature):
    inv_t = 1.0 / torch.tensor(float(temperature), dtype=torch.float32)
    return logits_row.float() * inv_t


def kept_set_reference(logits_row, k, p, temperature):
    """Bool mask (V,) of the tokens the sampler may return for one row (greedy: the argmax only)."""
    k, p = int(k), float(torch.tensor(float(p), dtype=torch.float32))
    V = logits_row.numel()
    mask = torch.zeros(V, dtype=torch.bool, device=logits_row.device)
    if k == 1:
        mask[torch.argmax(logits_row.float())] = True
        return mask
    scaled = _scaled_row(logits_row, temperature)
    order = torch.sort(scaled, descending=True, stable=True).indices  # ties: lower index first
    n_keep = k if 0 < k < V else V
    top = order[:n_keep]
    if p < 1.0:
        probs = torch.softmax(scaled[top].double(), 0)
        reached = torch.cumsum(probs, 0) >= p
        n_keep = int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else n_keep
        top = top[:n_keep]
    mask[top] = True
    return mask


def kept_distribution_reference(logits_row, k, p, temperature):
    """float64 (V,) probabilities of each token: softmax(scaled) renormalised over the kept set."""
    mask = kept_set_reference(logits_row, k, p, temperature)
    if int(k) == 1:
        return mask.double()
    scaled = _scaled_row(logits_row, temperature).double()
    return torch.softmax(scaled.masked_fill(~mask, float("-inf")), 0)


def sample_reference(logits, top_k, top_p, temperature, seeds, steps, *, return_logprobs=False):
    """Same semantics as sample() with sort/cumsum and torch.multinomial (its own random stream)."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float32)
    ks, ps, ts = top_k.tolist(), top_p.tolist(), temperature.tolist()
    for b, (seed, step) in enumerate(zip(seeds.tolist(), steps.tolist())):
        probs = kept_distribution_reference(logits[b].cpu(), ks[b], ps[b], ts[b])
        gen = torch.Generator().manual_seed((seed + step * STEP_MIX) % 2**64)
        tokens[b] = torch.multinomial(probs, 1, generator=gen)[0]
        t = 1.0 if ks[b] == 1 else ts[b]
        logprobs[b] = torch.log_softmax(_scaled_row(logits[b].cpu(), t), 0)[tokens[b]]
    tokens, logprobs = tokens.to(logits.device), logprobs.to(logits.device)
    return (tokens, logprobs) if return_logprobs else tokens


# ----------------------------------------------------------------------------------------------


def _torch_baseline(logits, k, p, temperature):
    """Typical eager-PyTorch sampler with uniform parameters (topk / sort + multinomial)."""
    if k == 1:
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / temperature
    if k > 0:
        scaled, idx = torch.topk(scaled, k, dim=-1)  # sorted descending
    else:
        scaled, idx = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(scaled, dim=-1)
    if p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        probs = probs.masked_fill(cum - probs >= p, 0.0)  # drop tokens after the crossing one
    choice = torch.multinomial(probs, 1)
    return torch.gather(idx, -1, choice).squeeze(-1)


def _benchmark(splits):
    """Both samplers per batch and mode, CUDA-graph timed on random fp16 logits of GPT-2's vocabulary: the pass
    sampler, and the candidate sampler for each FTLAB_SAMPLE_CANDIDATES split ("" = default), beside an eager
    torch sort/topk + multinomial sampler; tidy rows -> $OUT/sampling_bench.csv."""
    from ._bench import save_rows

    device = "cuda"
    V = 50257
    modes = {"greedy": (1, 1.0), "top_k=40": (40, 1.0), "top_p=0.9": (0, 0.9), "top_k=40+top_p=0.9": (40, 0.9),
             "temperature": (0, 1.0)}
    variants = [("passes", "")] + [("candidates", split) for split in splits]
    rows, table = [], []
    for B in (1, 8, 64):
        logits = torch.randn(B, V, device=device, dtype=torch.float16) * 3
        for mode, (k, p) in modes.items():
            top_k = torch.full((B,), k, dtype=torch.int32, device=device)
            top_p = torch.full((B,), p, dtype=torch.float32, device=device)
            temperature = torch.full((B,), 0.8, dtype=torch.float32, device=device)
            seeds = torch.arange(B, dtype=torch.int64, device=device)
            steps = torch.zeros(B, dtype=torch.int32, device=device)
            line = [B, mode]
            for sampler, split in variants:
                os.environ["FTLAB_SAMPLER"], os.environ["FTLAB_SAMPLE_CANDIDATES"] = sampler, split
                # CUDA-graph replays: the kernels' GPU time, not Python's launch overhead (as inside a decode step)
                us = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: sample(logits, top_k, top_p, temperature, seeds, steps, return_logprobs=True))
                rows.append({"B": B, "V": V, "mode": mode, "sampler": sampler, "split": split or "default",
                             "us": us})
                line.append(us)
            for name in ("FTLAB_SAMPLER", "FTLAB_SAMPLE_CANDIDATES"):
                os.environ.pop(name)
            us = 1e3 * triton.testing.do_bench(lambda: _torch_baseline(logits, k, p, 0.8))
            rows.append({"B": B, "V": V, "mode": mode, "sampler": "torch eager", "split": "", "us": us})
            table.append(line + [us])
    # (torch's sort/cumsum/multinomial baseline is timed eagerly, launches included: not comparable one to one)
    names = ["passes"] + [f"cand {split or 'default'}" for split in splits] + ["torch eager"]
    print(f"{'B':>4} {'mode':>20} " + " ".join(f"{n:>16}" for n in names) + "   (us)")
    for line in table:
        print(f"{line[0]:>4} {line[1]:>20} " + " ".join(f"{v:>16.1f}" for v in line[2:]))
    save_rows(rows, "sampling_bench.csv")


@triton.jit
def _top_bench_kernel(x_ptr, o_ptr, LOG_N: tl.constexpr, LOG_C: tl.constexpr, STDLIB: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * (2 ** LOG_N) + tl.arange(0, 2 ** LOG_N)[None, :])  # (1, N)
    if STDLIB:
        y = tl.topk(x, 2 ** LOG_C)
    else:
        y = _top_desc(x, 0, LOG_N, LOG_C)
    tl.store(o_ptr + row * (2 ** LOG_C) + tl.arange(0, 2 ** LOG_C)[None, :], y)


def _sort_benchmark():
    """_top_desc against tl.topk on int64 keys: one program (a row's latency) and 1600 programs (stage 1 at batch
    64), per size and warps, CUDA-graph timed."""
    print(f"{'N':>5} {'C':>5} {'warps':>5} {'impl':>7} {'1 prog us':>10} {'1600 progs us':>14} {'ok':>3}")
    for log_n, log_c in ((11, 6), (11, 11), (9, 4)):
        x = torch.randint(-2**62, 2**62, (1600, 2 ** log_n), dtype=torch.int64, device="cuda")
        ref = torch.sort(x, dim=1, descending=True).values[:, :2 ** log_c]
        for warps in (1, 4, 8):
            for stdlib in (False, True):
                out = torch.empty(1600, 2 ** log_c, dtype=torch.int64, device="cuda")
                times = []
                for grid in (1, 1600):
                    def launch():
                        _top_bench_kernel[(grid,)](x, out, LOG_N=log_n, LOG_C=log_c, STDLIB=stdlib, num_warps=warps)
                    try:
                        times.append(1e3 * triton.testing.do_bench_cudagraph(launch))
                    except Exception as exc:  # noqa: BLE001  (a config that does not compile: say so, go on)
                        print(f"{2 ** log_n} {2 ** log_c} {warps} {'tl.topk' if stdlib else 'ours'}: {exc!r:.200}")
                        break
                if len(times) == 2:
                    ok = torch.equal(out, ref)
                    print(f"{2 ** log_n:>5} {2 ** log_c:>5} {warps:>5} {'tl.topk' if stdlib else 'ours':>7} "
                          f"{times[0]:>10.1f} {times[1]:>14.1f} {'yes' if ok else 'NO':>3}", flush=True)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--sort"]:
        _sort_benchmark()
    else:  # optional: FTLAB_SAMPLE_CANDIDATES splits to compare, separated by ";"
        _benchmark((sys.argv[1].split(";") if len(sys.argv) > 1 else [""]))
