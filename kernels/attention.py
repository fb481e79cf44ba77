"""Causal context (prefill) attention over ragged, packed prompts, with the KV-cache write fused in.

Layout: qkv (T, 3, nh, d) holds T tokens of B prompts packed back to back; prompt b owns rows
cu_seqlens[b]:cu_seqlens[b+1]. Each program owns one block of BLOCK_M queries of one (prompt, head) and runs a
flash-attention loop over key tiles of BLOCK_N keys: online softmax in fp32 (base 2, the scale folded with
log2(e)), fp32 accumulator, so memory stays bounded for prompts of thousands of tokens. Key tiles entirely above
the diagonal are never visited. When a KV cache is given, the same program copies its block's k/v rows into
k_cache/v_cache[b, h, 0:len_b] (cache layout (B, nh, S_max, d), last dim contiguous, other dims by stride).
With last_rows_only (a model's last block, where only each prompt's last token goes on to the logits) the programs
of the other query blocks write their cache rows and stop, in grids of more than LAST_ROWS_MIN_PROGRAMS programs.
NVIDIA H100, GPT-345M fp16, the captured prefill's timeline, 3 rounds alternating in fresh processes
(data/bench/prefill_last_rows_ab.csv): at 64 prompts of 512 tokens the last block's call 215.9-217.7 -> 166.8-167.3
us (the whole cache write stays); at one prompt of 512 (128 programs) it was slower, 7.83-7.85 -> 8.97-9.03
us, so small grids compute every row as before.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SMALL_GRID = 256  # programs (64-query blocks x heads x prompts) up to which pick_context_blocks takes 64-key tiles
LAST_ROWS_MIN_PROGRAMS = SMALL_GRID  # last_rows_only acts only on grids larger than this (see the docstring)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs must not be rounded to TF32 (tests hold fp32 to 1e-5); fp16/bf16 use the default tensor-core path
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, valid, APPLY_MASK: tl.constexpr, IEEE: tl.constexpr):
    # q (BLOCK_M, BLOCK_D), k/v (BLOCK_N, BLOCK_D); scores in log2 units so exp2 can be used
    s = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BLOCK_M, BLOCK_N)
    if APPLY_MASK:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _context_attention_kernel(
    qkv_ptr, cu_seqlens_ptr, out_ptr, k_cache_ptr, v_cache_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qkv_t, stride_qkv_part, stride_qkv_h,
    stride_out_t, stride_out_h,
    stride_kc_b, stride_kc_h, stride_kc_s,
    stride_vc_b, stride_vc_h, stride_vc_s,
    head_dim, num_m_blocks,
    WRITE_CACHE: tl.constexpr, IEEE: tl.constexpr, LAST_ROWS_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # the last query blocks see the most keys: launch them first so the tail of the grid is short work
    block_m = num_m_blocks - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    q_lo = block_m * BLOCK_M
    if q_lo >= seq_len:  # the grid is sized for the longest prompt
        return

    offs_m = q_lo + tl.arange(0, BLOCK_M)  # query positions within the prompt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    m_mask = offs_m < seq_len
    row_mask = m_mask[:, None] & d_mask[None, :]

    q_base = qkv_ptr + seq_start.to(tl.int64) * stride_qkv_t + head * stride_qkv_h
    k_base = q_base + stride_qkv_part
    v_base = q_base + 2 * stride_qkv_part
    row_offs = offs_m[:, None] * stride_qkv_t + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    if not LAST_ROWS_ONLY:
        q = tl.load(q_base + row_offs, mask=row_mask, other=0.0)

    if WRITE_CACHE:
        k_rows = tl.load(k_base + row_offs, mask=row_mask, other=0.0)
        v_rows = tl.load(v_base + row_offs, mask=row_mask, other=0.0)
        kc = k_cache_ptr + seq.to(tl.int64) * stride_kc_b + head * stride_kc_h
        vc = v_cache_ptr + seq.to(tl.int64) * stride_vc_b + head * stride_vc_h
        tl.store(kc + offs_m[:, None] * stride_kc_s + offs_d[None, :], k_rows, mask=row_mask)
        tl.store(vc + offs_m[:, None] * stride_vc_s + offs_d[None, :], v_rows, mask=row_mask)
    if LAST_ROWS_ONLY:
        if q_lo + BLOCK_M < seq_len:  # the prompt's last token is in a later block: its rows are not wanted
            return
        q = tl.load(q_base + row_offs, mask=row_mask, other=0.0)  # only the programs that go on read their queries

    # key 0 is visible to every row (padded rows included), so m_i is finite after the first tile: no NaN from -inf
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys [0, q_lo): below the diagonal for every query of the block, so only the head-dim padding is masked
    for kv_lo in range(0, q_lo, BLOCK_N):
        kv_offs = (kv_lo + offs_n)[:, None] * stride_qkv_t + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        k = tl.load(k_base + kv_offs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_base + kv_offs, mask=d_mask[None, :], other=0.0)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, True, False, IEEE)

    # keys [q_lo, min(q_lo + BLOCK_M, len)): the diagonal band, causal and length masks
    kv_hi = tl.minimum(q_lo + BLOCK_M, seq_len)
    for kv_lo in range(q_lo, kv_hi, BLOCK_N):
        offs_kv = kv_lo + offs_n
        kv_mask = offs_kv < seq_len
        kv_offs = offs_kv[:, None] * stride_qkv_t + offs_d[None, :]
        k = tl.load(k_base + kv_offs, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_base + kv_offs, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        visible = (offs_kv[None, :] <= offs_m[:, None]) & kv_mask[None, :]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, qk_scale, visible, True, IEEE)

    out = acc / l_i[:, None]
    out_ptrs = (out_ptr + seq_start.to(tl.int64) * stride_out_t + head * stride_out_h
                + offs_m[:, None] * stride_out_t + offs_d[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)


@dataclass(frozen=True)
class ContextBlocks:
    block_m: int  # queries per program
    block_n: int  # keys per inner tile; block_m must be a multiple of it
    num_warps: int
    num_stages: int


def pick_context_blocks(batch: int, num_heads: int, max_seqlen: int, head_dim: int,
                        dtype: torch.dtype) -> ContextBlocks:
    """Tile sizes from the shapes (no autotuning, so it also runs in the interpreter).

    From the H200 sweep (`python -m ftlab.kernels.attention --sweep`, fp16, prompts of 512 tokens, KV-cache write
    on; data/bench/context_attention_sweep.csv, 2026-11-30): 64-query blocks over 32-key tiles with 4 warps won
    where the timings are trustworthy (64 x 16 heads: 185.6 us vs 215.0 for the previous 128x64 choice; SDPA
    133.6; 8 x 32 heads of 128: 99.2 vs 115.7, SDPA 56.3); 3 pipeline stages for d <= 64, 2 above (the larger
    tiles). Single short prompts are launch-bound in that sweep (its timings there vary 3x between neighbours),
    so they keep the same tiles. fp32 goes through the ieee FMA path with no tensor cores and keeps 64x32 tiles
    with 2 stages to bound registers.

    Inside the model's captured prefill (2026-12-02, GPT-345M, H200): generate() with one new token, seven tiles
    alternating in one process, three rounds (data/bench/context_tiles_ab.csv): 64-key tiles took bs1 512 -> 1 in
    1.68-1.69 ms against 1.73-2.01 with 32-key tiles, equal at bs8 and bs64, where every other tile was slower
    (32-query tiles +10-14 % at bs64). The prefill graph alone, replayed back to back (prefill_tiles_ab.csv): one
    prompt of 512 1.285-1.288 -> 1.246-1.248 ms, of 128 0.920 -> 0.915, two of 512 1.739-1.746 -> 1.699-1.700. So a
    grid of at most SMALL_GRID programs (one prompt of 512: 128) takes 64-key tiles.

    Against torch's SDPA as a prefill would call it (strided q, k, v out of qkv, then the keys and values copied into
    the cache), 24 calls in one CUDA graph (`python -m ftlab.kernels.attention --graph`, 2026-12-03,
    data/bench/context_attention_graph.csv), us per call: one prompt of 512 8.8 here against 17.2 (cuDNN) / 19.8
    (flash), of 128 4.1 against 11.0 (flash), 8 x 512 31 against 49 (cuDNN), 64 x 512 192 against 317 (cuDNN); the
    do_bench numbers above time SDPA on contiguous inputs without the cache write. End to end, the model's prefill on
    SDPA was slower in every cell (bs1 512 -> 32 12.31-12.40 ms against 11.94-12.11 with this kernel).

    Tried and not kept (2026-12-03, scratch edit, the same graph chain alternating in one process, three rounds;
    data/bench/context_attention_fma_ab.csv): the softmax scale applied inside exp2's argument as one FMA (and to
    the row max) instead of to every score first, us per call: one prompt of 128 4.24-4.33 -> 4.32-4.37, one of 512
    8.94-9.00 -> 9.02-9.07, 8 x 512 31.6-31.9 -> 30.9-31.4, 64 x 512 193-214 -> 192-213 (noise of that size).
    Nor (2026-12-03, scratch kernel, the same chain, three rounds; data/bench/context_attention_tma_ab.csv) q, k and
    v loaded through TMA descriptors (host TensorDescriptor over qkv as (T, 3 nh d), the key loop left to the
    compiler's pipeliner), eight tiles: at best 64 x 512 187.1-188.9 us against 188.3-192.5 here, one prompt of 512
    10.7 against 9.1-9.2, of 128 5.6 against 4.4-4.5, 8 x 512 32.0-32.2 against 31.5-31.7.
    Nor (2026-12-04, scratch edit; data/bench/context_key_split_ab.csv) a query block's keys split over programs
    of at most 64-256 keys, the partials merged in order by the block's last program to arrive (an acquire-release
    counter, as decode attention does), us per call in the same chain: one prompt of 512 9.0 -> 10.7-16.0, two
    12.0 -> 16.2-25.0; the captured prefill of one prompt, back to back, 1172-1176 -> 1213-1364 us. The partials'
    store, counter and merge cost more than the shorter key loops save.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return ContextBlocks(64, 32, 4, 2)
    if block_d <= 64 and batch * num_heads * triton.cdiv(max_seqlen, 64) <= SMALL_GRID:
        return ContextBlocks(64, 64, 4, 3)
    return ContextBlocks(64, 32, 4, 3 if block_d <= 64 else 2)


def _check_cache(name: str, cache: torch.Tensor, qkv: torch.Tensor, batch: int, max_seqlen: int) -> None:
    num_heads, head_dim = qkv.shape[2], qkv.shape[3]
    if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[1] != num_heads or cache.shape[3] != head_dim:
        raise ValueError(f"{name} must be (B={batch} = len(cu_seqlens) - 1, nh={num_heads}, S_max, d={head_dim}), "
                         f"got {tuple(cache.shape)}")
    if cache.dtype != qkv.dtype:
        raise ValueError(f"{name} dtype {cache.dtype} != qkv dtype {qkv.dtype}")
    if cache.device != qkv.device:
        raise ValueError(f"{name} is on {cache.device}, qkv on {qkv.device}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, strides {cache.stride()}")
    if cache.shape[2] < max_seqlen:
        raise ValueError(f"{name} capacity S_max={cache.shape[2]} is smaller than max_seqlen={max_seqlen}")


def context_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: Optional[float] = None,
                      k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
                      blocks: Optional[ContextBlocks] = None, last_rows_only: bool = False) -> torch.Tensor:
    """Causal self-attention within each packed prompt; returns out (T, nh, d) in qkv's dtype.

    qkv (T, 3, nh, d); cu_seqlens int32 (B+1,) on qkv's device, cu_seqlens[-1] == T; max_seqlen >= every prompt
    length (host-side int; longer prompts would be truncated silently, it cannot be checked without a sync).
    If k_cache/v_cache (B, nh, S_max, d) are given, token t of prompt b is written to cache[b, :, t - cu_seqlens[b]].
    blocks: tile sizes (default: pick_context_blocks; the micro-benchmark's sweep passes its own).
    last_rows_only: only the row of each prompt's last token (cu_seqlens[1:] - 1) needs to be right; the other rows of
    out are then undefined (the caches are still written in full).
    """
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (T, 3, nh, d), got {tuple(qkv.shape)}")
    if qkv.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"qkv dtype must be float32/float16/bfloat16, got {qkv.dtype}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be contiguous in its last dim, strides {qkv.stride()}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D (B+1,) with B >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, qkv on {qkv.device}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive Python int, got {max_seqlen!r}")
    if (k_cache is None) != (v_cache is None):
        raise ValueError("k_cache and v_cache must be given together")
    total_tokens, _, num_heads, head_dim = qkv.shape
    batch = cu_seqlens.numel() - 1
    if k_cache is not None:
        _check_cache("k_cache", k_cache, qkv, batch, max_seqlen)
        _check_cache("v_cache", v_cache, qkv, batch, max_seqlen)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    out = torch.empty((total_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if total_tokens == 0:
        return out
    if blocks is None:
        blocks = pick_context_blocks(batch, num_heads, max_seqlen, head_dim, qkv.dtype)
    elif blocks.block_m % blocks.block_n:
        raise ValueError(f"blocks.block_m={blocks.block_m} must be a multiple of blocks.block_n={blocks.block_n}")
    write_cache = k_cache is not None
    kc = k_cache if write_cache else qkv  # unused pointer when not writing
    vc = v_cache if write_cache else qkv
    kc_strides = k_cache.stride()[:3] if write_cache else (0, 0, 0)
    vc_strides = v_cache.stride()[:3] if write_cache else (0, 0, 0)
    num_m_blocks = triton.cdiv(max_seqlen, blocks.block_m)
    grid = (num_m_blocks, num_heads, batch)
    last_rows_only = bool(last_rows_only) and num_m_blocks * num_heads * batch > LAST_ROWS_MIN_PROGRAMS
    _context_attention_kernel[grid](
        qkv, cu_seqlens, out, kc, vc,
        float(scale) * LOG2E,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1),
        *kc_strides, *vc_strides,
        head_dim, num_m_blocks,
        WRITE_CACHE=write_cache, IEEE=qkv.dtype == torch.float32, LAST_ROWS_ONLY=last_rows_only,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


def context_attention_reference(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                scale: Optional[float] = None, k_cache: Optional[torch.Tensor] = None,
                                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch, one prompt at a time, softmax in fp32 (fp64 if qkv is fp64). Writes the caches when given."""
    head_dim = qkv.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out = torch.empty(qkv.shape[0], qkv.shape[2], head_dim, dtype=qkv.dtype, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = (qkv[lo:hi, i].transpose(0, 1).to(compute_dtype) for i in range(3))  # (nh, L, d)
        length = hi - lo
        scores = (q @ k.transpose(1, 2)) * scale  # (nh, L, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=qkv.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[lo:hi] = (probs @ v).transpose(0, 1).to(qkv.dtype)
        if k_cache is not None:
            k_cache[b, :, :length] = qkv[lo:hi, 1].transpose(0, 1).to(k_cache.dtype)
            v_cache[b, :, :length] = qkv[lo:hi, 2].transpose(0, 1).to(v_cache.dtype)
    return out


def _benchmark() -> None:
    from ._bench import save_rows

    from triton.testing import do_bench

    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA device")
        return
    dtype, device = torch.float16, "cuda"
    rows = []
    header = (f"{'nh':>3} {'d':>4} {'B':>3} {'L':>5} | {'triton ms':>9} {'TFLOP/s':>8} | "
              f"{'sdpa ms':>8} {'TFLOP/s':>8} | speedup")
    print(header)
    print("-" * len(header))
    for num_heads, head_dim in ((16, 64), (32, 128)):
        for batch, length in ((1, 128), (1, 512), (8, 512), (64, 512), (1, 2048)):
            qkv = torch.randn(batch * length, 3, num_heads, head_dim, dtype=dtype, device=device)
            cu_seqlens = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * length
            # SDPA gets padded (B, nh, L, d) tensors, prepared outside the timed region
            q, k, v = (qkv[:, i].view(batch, length, num_heads, head_dim).transpose(1, 2).contiguous()
                       for i in range(3))
            ms_triton = do_bench(lambda: context_attention(qkv, cu_seqlens, length))
            ms_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
            # causal: half of the two (L x L x d) matmuls, 2 flops per multiply-add
            flops = 2.0 * batch * num_heads * length * length * head_dim
            tf_triton, tf_sdpa = flops / ms_triton * 1e-9, flops / ms_sdpa * 1e-9
            print(f"{num_heads:>3} {head_dim:>4} {batch:>3} {length:>5} | {ms_triton:>9.4f} {tf_triton:>8.1f} | "
                  f"{ms_sdpa:>8.4f} {tf_sdpa:>8.1f} | {ms_sdpa / ms_triton:.2f}x")
            rows.append(dict(num_heads=num_heads, head_dim=head_dim, batch=batch, prompt_len=length,
                             triton_ms=ms_triton, sdpa_ms=ms_sdpa, triton_tflops=tf_triton, sdpa_tflops=tf_sdpa))
    save_rows(rows, "context_attention_bench.csv")


def _sweep() -> None:
    """Tile sizes, warps and pipeline stages at prefill shapes (fp16, KV-cache write on, as the model runs it);
    prints the best five per shape next to the heuristic and SDPA."""
    from triton.testing import do_bench

    from ._bench import save_rows

    dtype, device, rows = torch.float16, "cuda", []
    configs = [ContextBlocks(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) if n <= m
               for w in (4, 8) for s in (2, 3, 4)]
    for num_heads, head_dim, batch, length in ((16, 64, 1, 512), (16, 64, 8, 512), (16, 64, 64, 512),
                                               (32, 128, 8, 512)):
        qkv = torch.randn(batch * length, 3, num_heads, head_dim, dtype=dtype, device=device)
        cu_seqlens = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * length
        cache = [torch.empty(batch, num_heads, length, head_dim, dtype=dtype, device=device) for _ in range(2)]
        q, k, v = (qkv[:, i].view(batch, length, num_heads, head_dim).transpose(1, 2).contiguous() for i in range(3))
        ms_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        heuristic = pick_context_blocks(batch, num_heads, length, head_dim, dtype)
        results = []
        for cfg in configs:
            try:
                ms = do_bench(lambda: context_attention(qkv, cu_seqlens, length, k_cache=cache[0], v_cache=cache[1],
                                                        blocks=cfg))
            except triton.runtime.errors.OutOfResources:
                continue
            results.append((ms, cfg))
            rows.append(dict(num_heads=num_heads, head_dim=head_dim, batch=batch, prompt_len=length,
                             block_m=cfg.block_m, block_n=cfg.block_n, warps=cfg.num_warps, stages=cfg.num_stages, ms=ms, sdpa_ms=ms_sdpa,
                             heuristic=cfg == heuristic))
        results.sort(key=lambda r: r[0])
        ms_heur = next(ms for ms, cfg in results if cfg == heuristic)
        print(f"nh={num_heads} d={head_dim} B={batch} L={length}: sdpa {ms_sdpa * 1e3:.1f} us, heuristic "
              f"{ms_heur * 1e3:.1f} us {heuristic}", flush=True)
        for ms, cfg in results[:5]:
            print(f"    {ms * 1e3:8.1f} us  {cfg}")
    save_rows(rows, "context_attention_sweep.csv")


def _sdpa_with_cache(qkv: torch.Tensor, batch: int, length: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     backend) -> torch.Tensor:
    """Equal-length prompts through torch's SDPA on `backend`, then the keys and values copied into the caches (two
    strided copies): what a prefill on SDPA would cost, for the --graph comparison."""
    from torch.nn.attention import sdpa_kernel

    num_heads, head_dim = qkv.shape[2], qkv.shape[3]
    q, k, v = (qkv[:, i].view(batch, length, num_heads, head_dim).transpose(1, 2) for i in range(3))  # (B, nh, L, d)
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    k_cache[:, :, :length].copy_(k)
    v_cache[:, :, :length].copy_(v)
    return out.transpose(1, 2).reshape(batch * length, num_heads, head_dim)


def _graph_chain() -> None:
    """Context attention as a prefill runs it: 24 calls (one per layer of GPT-345M: 16 heads x 64, its own qkv and
    KV cache each) captured in one CUDA graph, replayed back to back; us per call for tile choices and for torch's
    SDPA backends followed by the cache copies. The do_bench numbers of _benchmark / _sweep time one launch at a time,
    which at one prompt is mostly launch and idle time."""
    import datetime

    from torch.nn.attention import SDPBackend

    from ._bench import save_rows

    dtype, device, layers, rows = torch.float16, "cuda", 24, []
    num_heads, head_dim = 16, 64
    tiles = [ContextBlocks(64, 64, 4, 3), ContextBlocks(64, 32, 4, 3), ContextBlocks(32, 32, 4, 3),
             ContextBlocks(32, 32, 2, 3), ContextBlocks(16, 16, 1, 2), ContextBlocks(128, 64, 8, 3),
             ContextBlocks(128, 128, 8, 3)]
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
    for batch, length in ((1, 128), (1, 512), (2, 512), (8, 512), (64, 512)):
        qkvs = [torch.randn(batch * length, 3, num_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        caches = [[torch.empty(batch, num_heads, length + 32, head_dim, dtype=dtype, device=device) for _ in range(2)]
                  for _ in range(layers)]
        cu_seqlens = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * length
        expected = context_attention_reference(qkvs[0], cu_seqlens, length)
        variants = {f"triton {b.block_m}x{b.block_n} w{b.num_warps} s{b.num_stages}"
                    + (" (heuristic)" if b == pick_context_blocks(batch, num_heads, length, head_dim, dtype) else ""):
                    (lambda i, b=b: context_attention(qkvs[i], cu_seqlens, length, k_cache=caches[i][0],
                                                      v_cache=caches[i][1], blocks=b)) for b in tiles}
        for name, backend in backends.items():
            variants[name] = lambda i, backend=backend: _sdpa_with_cache(qkvs[i], batch, length, *caches[i], backend)
        for name, call in variants.items():
            try:
                err = (call(0).float() - expected.float()).abs().max().item()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(layers):
                        call(i)
            except Exception as exc:  # an SDPA backend this GPU or these strides do not take
                print(f"B={batch} L={length} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            times = []
            for _ in range(30):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); graph.replay(); stop.record(); stop.synchronize()
                times.append(start.elapsed_time(stop) * 1e3 / layers)
            times = sorted(times[5:])
            us, spread = times[len(times) // 2], (times[-1] - times[0]) / times[len(times) // 2]
            print(f"B={batch:>2} L={length} {name:<32} {us:7.2f} us per call (spread {spread:.1%}), max err {err:.2e}",
                  flush=True)
            rows.append(dict(gpu=torch.cuda.get_device_name(), date=str(datetime.date.today()),
                             torch=torch.__version__, triton=triton.__version__, num_heads=num_heads,
                             head_dim=head_dim, batch=batch, prompt_len=length, variant=name,
                             us_per_call=round(us, 2), spread=round(spread, 4), max_abs_err=err))
            del graph
    save_rows(rows, "context_attention_graph.csv")


if __name__ == "__main__":
    import sys

    if "--sweep" in sys.argv[1:]:
        _sweep()
    elif "--graph" in sys.argv[1:]:
        _graph_chain()
    else:
        _benchmark()
