"""Per-request token sampling (greedy / top-k / top-p / temperature) in one Triton kernel.

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

Algorithm: on the GPU one program per row, looping over V in chunks of BLOCK (no sort, no scratch memory);
under the CPU interpreter a program takes a tile of rows (same per-row arithmetic, fewer Python-level ops).
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


@triton.jit(do_not_specialize=["B"])  # B changes from step to step; nothing gains from specialising on it
def _sample_kernel(logits_ptr, stride_row, top_k_ptr, top_p_ptr, temperature_ptr, seeds_ptr, steps_ptr,
                   tokens_ptr, logprobs_ptr, B, V,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, FLOAT_STEPS: tl.constexpr, CUTOFF: tl.constexpr,
                   WRITE_LOGPROBS: tl.constexpr):
    rows_out = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows_out < B  # only for the stores: padding rows of the last tile recompute row B - 1
    rows = tl.minimum(rows_out, B - 1)
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # (R, 1)
    k = tl.load(top_k_ptr + rows)
    p = tl.load(top_p_ptr + rows)
    temperature = tl.load(temperature_ptr + rows)
    greedy = k == 1
    inv_t = tl.where(greedy, 1.0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), temperature))  # as torch: 1 / t

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

        seed = tl.load(seeds_ptr + rows).to(tl.uint64, bitcast=True)
        step = tl.load(steps_ptr + rows).to(tl.int64).to(tl.uint64, bitcast=True)
        stream = seed + step * _STEP_MIX  # wraps mod 2**64
        drawn = _draw(row_ptr, V, inv_t, m, thresh, n_ties, stream, argmax, ROWS, BLOCK)
        token = tl.where(greedy, argmax, drawn)
    tl.store(tokens_ptr + rows_out, token.to(tl.int64), mask=row_ok)
    if WRITE_LOGPROBS:
        s_tok = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + token).to(tl.float32) * inv_t
        tl.store(logprobs_ptr + rows_out, s_tok - m - tl.log(sumexp), mask=row_ok)


def _launch_config(B, V, device_type):
    """(ROWS, BLOCK, num_warps). BLOCK covers a small row in one chunk and caps at 2048 for V ~ 50k (25 chunks
    a pass, ~8 elements per thread). On the GPU one program per row (V is large, rows are independent); the
    CPU interpreter pays per operation, not per element, so it packs up to ~32k elements of rows per program.
    FTLAB_SAMPLE_CONFIG="BLOCK,num_warps" replaces those two (read per call; for measuring wider programs:
    a top-k / top-p row is ~10-20 passes over V, each a loop of V / BLOCK dependent chunks)."""
    block = min(max(triton.next_power_of_2(V), 16), 2048)
    num_warps = max(1, min(8, block // 256))
    block, num_warps = _config_from_env() or (block, num_warps)
    rows = 1 if device_type == "cuda" else min(triton.next_power_of_2(max(B, 1)), max(1, 32768 // block))
    return rows, block, num_warps


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


def sample(logits, top_k, top_p, temperature, seeds, steps, *, return_logprobs=False):
    """Sample one token per row. logits (B, V) fp32/fp16/bf16; per-row top_k int32, top_p float32,
    temperature float32, seeds int64 (uint64 seeds as two's complement), steps int32, all (B,).

    Returns tokens int64 (B,), and logprobs float32 (B,) when return_logprobs. Never syncs with the host;
    parameter values are the caller's to check (check_sampling_params).
    """
    params = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "seeds": seeds, "steps": steps}
    _check_inputs(logits, params)
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B if return_logprobs else 1, dtype=torch.float32, device=logits.device)
    if B > 0:
        rows, block, num_warps = _launch_config(B, V, logits.device.type)
        _sample_kernel[(triton.cdiv(B, rows),)](
            logits, logits.stride(0), top_k, top_p, temperature, seeds, steps, tokens, logprobs, B, V,
            ROWS=rows, BLOCK=block, FLOAT_STEPS=FLOAT_STEPS, CUTOFF=CUTOFF, WRITE_LOGPROBS=return_logprobs,
            num_warps=num_warps,
        )
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
    for i in range(n):
        k, p, t = ks[i], ps[i], ts[i]
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


def _benchmark():
    from ._bench import save_rows

    device = "cuda"
    V = 50257
    modes = {"greedy": (1, 1.0), "top_k=40": (40, 1.0), "top_p=0.9": (0, 0.9), "top_k=40+top_p=0.9": (40, 0.9)}
    rows = []
    for B in (1, 8, 64):
        logits = torch.randn(B, V, device=device, dtype=torch.float16) * 3
        for mode, (k, p) in modes.items():
            top_k = torch.full((B,), k, dtype=torch.int32, device=device)
            top_p = torch.full((B,), p, dtype=torch.float32, device=device)
            temperature = torch.full((B,), 0.8, dtype=torch.float32, device=device)
            seeds = torch.arange(B, dtype=torch.int64, device=device)
            steps = torch.zeros(B, dtype=torch.int32, device=device)
            # CUDA-graph replays: the kernel's GPU time, not Python's launch overhead (as inside a decode step)
            t_triton = triton.testing.do_bench_cudagraph(lambda: sample(logits, top_k, top_p, temperature, seeds,
                                                                        steps))
            t_torch = triton.testing.do_bench(lambda: _torch_baseline(logits, k, p, 0.8))
            config = os.environ.get("FTLAB_SAMPLE_CONFIG") or "default"
            rows.append({"B": B, "V": V, "mode": mode, "config": config, "triton_us": t_triton * 1e3,
                         "torch_us": t_torch * 1e3})
    # (torch's sort/cumsum/multinomial baseline is timed eagerly, launches included: not comparable one to one)
    print(f"{'B':>4} {'mode':>20} {'config':>9} {'triton us (graph)':>18} {'torch us (eager)':>17}")
    for r in rows:
        print(f"{r['B']:>4} {r['mode']:>20} {r['config']:>9} {r['triton_us']:>18.1f} {r['torch_us']:>17.1f}")
    save_rows(rows, "sampling_bench.csv")


if __name__ == "__main__":
    _benchmark()
