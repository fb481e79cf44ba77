"""One prompt's context phase in two row chunks on two CUDA streams, pipelined over the blocks.

A single prompt of a few hundred tokens leaves most of the GPU idle in each of its prefill kernels (a 512-row
out-projection is 32 cuBLAS tiles on 132 SMs) and the graph waits at every kernel boundary. Causal attention lets
the prompt be cut in two by rows: block i of the first rows [0, s) needs nothing of the later rows, and block i of
the later rows [s, T) needs, from the first rows, only block i's keys and values. So the first chunk runs on the
current stream and the second on a side stream, each through the same in-place cuBLAS layout as
`GPT._blocks_cublas`, and their kernels can overlap:

    stream A (rows 0..s-1)          stream B (rows s..T-1)
    qkv[i % 2][:s] = LN_1 x_A W^T   qkv[i % 2][s:] = LN_1 x_B W^T
      record qkv_done[i]              wait qkv_done[i]
    attention(queries < s)          attention(queries >= s, keys from qkv[i % 2][:T])
    x_A += ...; MLP                   record attn_done[i]
    wait attn_done[i - 1] before      x_B += ...; MLP
      block i + 1's QKV

Both chunks write one shared (T, 3H) QKV buffer per block parity; stream A's QKV of block i + 2 reuses block i's
buffer, so it waits until stream B's attention of block i has read it. Stream A's last block stops after its
attention (its rows are not kept: the KV cache is all it owes); stream B's last row goes on as in `_blocks_cublas`.

Single prompts on a GPU only, one process, in-place layout (see `use_two_streams`).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .kernels.attention import context_attention, pick_context_blocks
from .kernels.layernorm import layernorm
from .kernels.linear import linear

MIN_ROWS = 128  # both chunks at least one 64-query block


class Streams:
    """The current stream (chunk 0) and a side stream (chunk 1) with named events between them; on a CPU
    nothing (the work runs in issue order)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.streams = (torch.cuda.current_stream(device), torch.cuda.Stream(device))
            self.streams[1].wait_stream(self.streams[0])  # x and the buffers come from the current stream
            self.events: dict = {}

    def on(self, chunk: int):
        return torch.cuda.stream(self.streams[chunk]) if self.cuda else contextlib.nullcontext()

    def record(self, chunk: int, name) -> None:
        if self.cuda:
            self.events[name] = self.streams[chunk].record_event()

    def wait(self, chunk: int, name) -> None:
        if self.cuda:
            self.streams[chunk].wait_event(self.events[name])

    def join(self) -> None:
        if self.cuda:
            self.streams[0].wait_stream(self.streams[1])


def split_row(tokens: int, block_m: int) -> int:
    """The first row of the second chunk: half the prompt, rounded up to a whole query block."""
    return -(-tokens // (2 * block_m)) * block_m


def use_two_streams(model, x: torch.Tensor, cu_seqlens: torch.Tensor, keep_rows: torch.Tensor | None) -> bool:
    """FTLAB_PREFILL_STREAMS=2 (read per call) and one prompt of >= MIN_ROWS tokens on the in-place cuBLAS path,
    only its last row kept (generate()'s context phase)."""
    return (os.environ.get("FTLAB_PREFILL_STREAMS", "1") == "2" and x.is_cuda and cu_seqlens.numel() == 2
            and keep_rows is not None and keep_rows.numel() == 1
            and x.shape[0] >= MIN_ROWS and model.all_reduce is None and model._uses_cublas(x.shape[0])
            and model._uses_cublas(x.shape[0] // 2) and len(model.weights.blocks) > 0)


def blocks_two_streams(model, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cache,
                       keep_rows: torch.Tensor) -> torch.Tensor:
    """`GPT._blocks_cublas` for one prompt x (T, H) as two pipelined row chunks (module docstring): the kept row
    keep_rows (1,), the prompt's last, -> (1, H), as `_blocks_cublas` computes it. x is overwritten."""
    cfg, blocks = model.config, model.weights.blocks
    eps, T = cfg.layernorm_eps, x.shape[0]
    nh, hs, last = model.local_heads, cfg.size_per_head, len(blocks) - 1
    split = split_row(T, pick_context_blocks(1, nh, max_seqlen, hs, x.dtype).block_m)
    bias_sums = model._residual_bias_sums()
    qkv_bufs = [torch.empty(T, blocks[0].qkv_weight.shape[0], dtype=x.dtype, device=x.device) for _ in range(2)]
    # on a CPU (tests) the chunks run one after the other in the order issued below, a valid schedule of the same work
    streams = Streams(x.device)
    h = [None, None]
    attn_last = None
    for i, block in enumerate(blocks):
        for c, (r0, r1) in enumerate(((0, split), (split, T))):
            with streams.on(c):
                if c == 0 and i >= 2:
                    streams.wait(0, ("attn", i - 2))  # stream B has read qkv_bufs[i % 2] of block i - 2
                if i == 0:
                    h[c] = layernorm(x[r0:r1], block.ln1_weight, block.ln1_bias, eps)
                qkv = qkv_bufs[i % 2]
                torch.addmm(block.qkv_bias, h[c], block.qkv_weight.t(), out=qkv[r0:r1])  # (rows, 3*nh*hs)
                if c == 0:
                    streams.record(0, ("qkv", i))
                else:
                    streams.wait(1, ("qkv", i))
                attn = context_attention(qkv.view(T, 3, nh, hs), cu_seqlens, max_seqlen, k_cache=cache.k[i],
                                         v_cache=cache.v[i], query_rows=(r0, r1))[r0:r1]  # (rows, nh, hs)
                if c == 1:
                    streams.record(1, ("attn", i))
                if i == last:
                    attn_last = attn
                    continue  # the kept row goes on after the join; stream A's rows only owed the cache
                xc = x[r0:r1]
                xc.addmm_(attn.view(r1 - r0, -1), block.attn_out_weight.t())  # x += a W_o^T
                hc = layernorm(xc, block.ln2_weight, block.ln2_bias, eps, x_bias=bias_sums[2 * i])
                g = linear(hc, block.fc1_weight, block.fc1_bias, activation="gelu", impl="torch")  # (rows, I)
                xc.addmm_(g, block.fc2_weight.t())
                nxt = blocks[i + 1]
                h[c] = layernorm(xc, nxt.ln1_weight, nxt.ln1_bias, eps, x_bias=bias_sums[2 * i + 1])
    streams.join()
    # the last block after attention, on the kept row (the prompt's last token, one of stream B's rows)
    block = blocks[last]
    local = keep_rows - split
    attn_b, x_b = attn_last[local], x[split:][local]
    if model._tail_off_cublas(1):  # the decode block's GEMVs, on the residual with the biases it was kept without
        if last > 0:
            x_b = (x_b.float() + bias_sums[2 * last - 1]).to(x.dtype)
        return model._block_after_attention(block, x_b, attn_b)
    x_b.addmm_(attn_b.reshape(1, -1), block.attn_out_weight.t())  # else `_blocks_cublas`'s in-place layout
    h_b = layernorm(x_b, block.ln2_weight, block.ln2_bias, eps, x_bias=bias_sums[2 * last])
    g = linear(h_b, block.fc1_weight, block.fc1_bias, activation="gelu", impl="torch")
    x_b.addmm_(g, block.fc2_weight.t())
    return (x_b.float() + bias_sums[2 * last + 1]).to(x.dtype)
