"""Row-wise top-k of a wide score matrix for beam search: the best 2 * beam_width of (beams x vocabulary).

topk(scores, k) -> (values (R, k) fp32, indices (R, k) int64), best first, for scores (R, N) fp32/fp16/bf16,
1 <= k <= min(N, 128), N up to MAX_COLUMNS (33.5M).

Order and ties: descending by value; equal values come out lowest column first (a stable descending sort).
NaN counts as -inf (ranked with the -inf entries, by column) and comes back as -inf; -0.0 equals +0.0 and comes
back as +0.0. -inf entries (masked tokens) are ordinary values: a row with fewer than k finite entries still yields
k distinct valid columns, its -inf ones lowest column first.

Every element becomes one int64 "packed key": the order-preserving int32 image of its fp32 value in the high half,
(2**32 - 1 - column) in the low half. Packed keys are distinct and their order is exactly the order above, so one
int64 max per round both finds the best value and breaks ties, and the candidates carry their columns with them.

Kernels (no host synchronisation: the launch depends on shapes only):
  stage 1  grid (R, chunks): a program loads CHUNK columns of a row and takes out its best k packed keys by k
           rounds of max + mask, writing them best first to a workspace (R, chunks, k); a list shorter than k
           ends with the sentinel INT64_MIN.
  stage 2  grid (R,): the chunks' lists are sorted, so it merges them: each round takes the max of the chunks'
           current heads (one per chunk, in registers), writes it out and loads that chunk's next candidate.
           That is k rounds over `chunks` heads instead of k rounds over chunks * k candidates.
  pruning  (large k only, see _plan) stage 0 writes each chunk's max; stage 1 then derives a floor T for its row:
           split the chunks into k interleaved groups (chunk c is in group c mod KP, groups 0..k-1 are used) and
           take the smallest group max. The k groups are disjoint and each holds an element >= T, so the row's
           k-th best is >= T and no element below T can be in the answer; stage 1 stops its rounds at T (an empty
           group, with fewer than k chunks, gives T = INT64_MIN: no pruning). Stage 1
           costs about k rounds over every chunk without it, about one round per chunk plus one per element >= T
           with it (random data: ~k ln k elements >= T), for one extra read of the row.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

MAX_K = 128
MAX_CHUNK = 4096  # stage 1 keeps CHUNK packed keys in registers
MAX_CHUNKS = 8192  # stage 2 keeps one head per chunk in registers
MAX_COLUMNS = MAX_CHUNK * MAX_CHUNKS
MIN_PROGRAMS = 264  # two waves over an H200's 132 SMs: below this stage 1 takes smaller chunks
PRUNE_MIN_K = 16  # below this k rounds over a chunk cost about as much as the extra read that pruning needs

# globals read inside @triton.jit code must be constexpr
INT64_MIN = tl.constexpr(-(2 ** 63))
INT64_MAX = tl.constexpr(2 ** 63 - 1)


@triton.jit
def _load_packed(row_ptr, stride_col, cols, N):
    """Packed keys of the columns `cols` of one row; INT64_MIN past the end of the row (below every element)."""
    valid = cols < N
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=valid, other=0.0).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))  # NaN ranks as -inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 must get the same key (then ties go by column)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: flip the 31 value bits, so int order == float order
    low = tl.full(cols.shape, 4294967295, tl.int64) - cols.to(tl.int64)  # lower column -> larger packed key
    packed = (key.to(tl.int64) << 32) | low
    return tl.where(valid, packed, INT64_MIN)


@triton.jit
def _unpack(packed):
    """(fp32 value, int64 column) of a packed key."""
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)  # the key transform is an involution
    low_mask = tl.full(packed.shape, 4294967295, tl.int64)
    return bits.to(tl.float32, bitcast=True), low_mask - (packed & low_mask)


@triton.jit
def _chunk_max_kernel(scores_ptr, stride_row, stride_col, chunk_max_ptr, N, n_chunks, CHUNK: tl.constexpr):
    """Stage 0 (pruning only): the best packed key of every chunk, (R, chunks)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    packed = _load_packed(scores_ptr + row.to(tl.int64) * stride_row, stride_col, cols, N)
    tl.store(chunk_max_ptr + row.to(tl.int64) * n_chunks + chunk, tl.max(packed, 0))


@triton.jit
def _chunk_topk_kernel(scores_ptr, stride_row, stride_col, chunk_max_ptr, cand_ptr, N, k, n_chunks,
                       CHUNK: tl.constexpr, KP: tl.constexpr, GROUP_ROWS: tl.constexpr, PRUNE: tl.constexpr):
    """Stage 1: the chunk's best k packed keys (those >= the row's floor when pruning), best first, into
    cand (R, chunks, k); a shorter list ends with INT64_MIN."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    packed = _load_packed(scores_ptr + row.to(tl.int64) * stride_row, stride_col, cols, N)  # (CHUNK,)
    if PRUNE:
        groups = tl.arange(0, KP)
        ids = tl.arange(0, GROUP_ROWS)[:, None] * KP + groups[None, :]  # (GROUP_ROWS, KP): chunk id, group = id % KP
        maxima = tl.load(chunk_max_ptr + row.to(tl.int64) * n_chunks + ids, mask=ids < n_chunks, other=INT64_MIN)
        group_max = tl.max(maxima, 0)  # (KP,); INT64_MIN for an empty group, which turns pruning off
        floor = tl.min(tl.where(groups < k, group_max, INT64_MAX), 0)
    else:
        floor = INT64_MIN
    out = cand_ptr + (row.to(tl.int64) * n_chunks + chunk) * k
    best = tl.max(packed, 0)
    j = 0
    # best > INT64_MIN: the chunk still has an element (padding columns are INT64_MIN)
    while (j < k) & (best >= floor) & (best > INT64_MIN):
        tl.store(out + j, best)
        packed = tl.where(packed == best, INT64_MIN, packed)  # packed keys are distinct: removes exactly one
        best = tl.max(packed, 0)
        j += 1
    tl.store(out + j, INT64_MIN, mask=j < k)


@triton.jit
def _merge_kernel(cand_ptr, values_ptr, indices_ptr, k, n_chunks, CHUNK: tl.constexpr, CP: tl.constexpr):
    """Stage 2: k-way merge of the chunks' sorted lists into the row's best k, best first."""
    row = tl.program_id(0)
    chunk_ids = tl.arange(0, CP)
    lists = cand_ptr + (row.to(tl.int64) * n_chunks + chunk_ids) * k  # (CP,) start of each chunk's list
    heads = tl.load(lists, mask=chunk_ids < n_chunks, other=INT64_MIN)
    taken = tl.zeros([CP], tl.int32)
    for j in range(0, k):
        best = tl.max(heads, 0)
        value, col = _unpack(best)
        tl.store(values_ptr + row.to(tl.int64) * k + j, value)
        tl.store(indices_ptr + row.to(tl.int64) * k + j, col)
        # k <= N guarantees k real candidates, so `best` is one and its column names the chunk it came from
        winner = chunk_ids == (col // CHUNK).to(tl.int32)
        taken += winner.to(tl.int32)
        # a list is never read past its sentinel: the sentinel loses to the real candidates still left
        following = tl.load(lists + taken, mask=winner & (taken < k), other=INT64_MIN)
        heads = tl.where(winner, following, heads)


def _plan(R: int, N: int, k: int) -> tuple[int, bool]:
    """(CHUNK, prune). CHUNK is a power of two: the whole row when N <= 1024, else the largest of 4096/2048/1024
    that still gives stage 1 at least MIN_PROGRAMS programs (fewer chunks make stage 2 shorter), raised to 4096
    if the row would need more than MAX_CHUNKS chunks. Pruning pays when k >= PRUNE_MIN_K and the row has at
    least 4k chunks (so that the k groups hold several chunks each and the floor is tight)."""
    if N <= 1024:
        chunk = max(16, triton.next_power_of_2(N))
    else:
        chunk = next((c for c in (4096, 2048) if R * triton.cdiv(N, c) >= MIN_PROGRAMS), 1024)
        if triton.cdiv(N, chunk) > MAX_CHUNKS:
            chunk = MAX_CHUNK
    prune = k >= PRUNE_MIN_K and triton.cdiv(N, chunk) >= 4 * k
    return chunk, prune


def _check_inputs(scores, k) -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (R, N), got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"scores must be float32, float16 or bfloat16, got {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K}, got {k}")
    N = scores.shape[1]
    if k > N:
        raise ValueError(f"k = {k} exceeds the number of columns of scores, shape {tuple(scores.shape)}")
    if N > MAX_COLUMNS:
        raise ValueError(f"scores has {N} columns, more than the {MAX_COLUMNS} supported, shape "
                         f"{tuple(scores.shape)}")


def topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k entries of every row of scores (R, N) fp32/fp16/bf16: values (R, k) fp32 and columns (R, k) int64,
    best first, ties lowest column first, NaN as -inf (see the module docstring). Never syncs with the host."""
    _check_inputs(scores, k)
    chunk, prune = _plan(scores.shape[0], scores.shape[1], int(k))
    values, indices, _ = _topk_with_plan(scores, int(k), chunk, prune)
    return values, indices


def _topk_with_plan(scores, k, chunk, prune):
    """topk with an explicit plan; also returns stage 1's candidate lists (R, chunks, k). Tests use it to force
    small chunks and pruning on small shapes and to count the candidates."""
    R, N = scores.shape
    device = scores.device
    values = torch.empty((R, k), dtype=torch.float32, device=device)
    indices = torch.empty((R, k), dtype=torch.int64, device=device)
    if R == 0:
        return values, indices, None
    n_chunks = triton.cdiv(N, chunk)
    kp = triton.next_power_of_2(k)
    cand = torch.empty((R, n_chunks, k), dtype=torch.int64, device=device)  # (R, chunks, k) packed keys
    chunk_max = torch.empty((R, n_chunks), dtype=torch.int64, device=device) if prune else cand
    warps_chunk = max(1, min(8, chunk // 512))
    if prune:
        _chunk_max_kernel[(R, n_chunks)](scores, scores.stride(0), scores.stride(1), chunk_max, N, n_chunks,
                                         CHUNK=chunk, num_warps=warps_chunk)
    group_rows = triton.cdiv(triton.next_power_of_2(n_chunks), kp) if prune else 1
    _chunk_topk_kernel[(R, n_chunks)](scores, scores.stride(0), scores.stride(1), chunk_max, cand, N, k, n_chunks,
                                      CHUNK=chunk, KP=kp, GROUP_ROWS=group_rows, PRUNE=prune,
                                      num_warps=warps_chunk)
    cp = max(16, triton.next_power_of_2(n_chunks))
    _merge_kernel[(R,)](cand, values, indices, k, n_chunks, CHUNK=chunk, CP=cp, num_warps=max(1, min(8, cp // 256)))
    return values, indices, cand


def topk_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same contract as topk: a stable descending sort (torch.topk(sorted=True) leaves the order of
    equal values unspecified) after mapping NaN to -inf and -0.0 to +0.0."""
    x = scores.float()
    x = torch.where(torch.isnan(x), float("-inf"), x)
    x = torch.where(x == 0, 0.0, x)
    order = torch.sort(x, dim=-1, descending=True, stable=True)
    return order.values[:, :k].contiguous(), order.indices[:, :k].contiguous()


# ----------------------------------------------------------------------------------------------


def _beam_like_scores(R, N, device, beam_span=50257):
    """Rows shaped like beam search's scores: log-softmax over each beam's vocabulary plus per-beam offsets."""
    beams = triton.cdiv(N, beam_span)
    logits = torch.randn(R, beams, beam_span, device=device) * 3
    offsets = -0.7 * torch.arange(beams, device=device, dtype=torch.float32)
    scores = torch.log_softmax(logits, dim=-1) + offsets[None, :, None]
    return scores.view(R, beams * beam_span)[:, :N].contiguous()


BENCH_SHAPES = [(1, 4 * 50257, 8), (8, 4 * 50257, 8), (32, 4 * 50257, 8), (8, 16 * 50257, 32), (4, 64 * 50257, 128)]


def _benchmark(shapes=BENCH_SHAPES, device="cuda"):
    """(rows, columns, k) = (requests, beams x vocabulary, 2 x beam_width); two kinds of data: i.i.d. normal
    values (pruning's best case) and beam-search-like rows (log-softmax per beam plus per-beam offsets)."""
    from ._bench import save_rows

    rows = []
    for R, N, k in shapes:
        for data in ("randn", "beam-like"):
            scores = torch.randn(R, N, device=device) if data == "randn" else _beam_like_scores(R, N, device)
            ours, ref = topk(scores, k), torch.topk(scores, k, dim=-1)
            assert torch.equal(ours[0], ref.values), f"values differ from torch.topk at {(R, N, k)} {data}"
            chunk, prune = _plan(R, N, k)
            t_triton = triton.testing.do_bench(lambda: topk(scores, k))
            t_torch = triton.testing.do_bench(lambda: torch.topk(scores, k, dim=-1))
            rows.append({"R": R, "N": N, "k": k, "data": data, "chunk": chunk, "prune": prune,
                         "triton_us": t_triton * 1e3, "torch_us": t_torch * 1e3})
    print(f"{'R':>4} {'N':>9} {'k':>4} {'data':>10} {'chunk':>6} {'prune':>6} {'triton us':>10} {'torch us':>10} "
          f"{'speedup':>8}")
    for r in rows:
        print(f"{r['R']:>4} {r['N']:>9} {r['k']:>4} {r['data']:>10} {r['chunk']:>6} {str(r['prune']):>6} "
              f"{r['triton_us']:>10.1f} {r['torch_us']:>10.1f} {r['torch_us'] / r['triton_us']:>8.2f}")
    save_rows(rows, "beam_topk_bench.csv")


if __name__ == "__main__":
    _benchmark()
