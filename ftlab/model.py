"""The GPT decoder (GPT-2 / Megatron architecture) on ftlab's Triton kernels.

Per block (pre-LayerNorm) at up to GEMV_MAX_M tokens (batch-1..4 decode), five launches, each LayerNorm folded
into the GEMV that follows it:

    qkv  = linear(x, W_qkv, b_qkv, ln=ln_1)                  # (T, 3*nh*hs)  LN prologue + bias epilogue
    a    = attention(qkv, kv cache)                          # (T, nh*hs)    also appends k, v to the cache
    x    = linear(a, W_o, b_o, residual=x)                   # (T, H)        bias + residual epilogue
    h    = linear(x, W_fc1, b_fc1, ln=ln_2, activation=gelu) # (T, I)
    x    = linear(h, W_fc2, b_fc2, residual=x)               # (T, H)

With more tokens (prefill, larger decode batches) the GEMMs take no LayerNorm prologue: cuBLAS's, or up to 64 rows
on a GPU kernels/skinny_gemm.py (`_dense`). There each LayerNorm is fused with the residual add and the bias of the
GEMM before it, FasterTransformer's layout:

    qkv  = cublas(h, W_qkv) + b_qkv                          # h = LN_1(x), from the previous block's last kernel
    a    = attention(qkv, kv cache)
    h, x = layernorm(cublas(a, W_o), ln_2, x_bias=b_o, residual=x)     # x += a W_o^T + b_o;  h = LN_2(x)
    g    = cublas(h, W_fc1) + b_fc1, GELU in cuBLASLt's epilogue
    h, x = layernorm(cublas(g, W_fc2), ln_1', x_bias=b_fc2, residual=x) # ln_1' of the next block

In one process at prefill sizes the products go into the residual stream in place instead (x += a W^T inside the
GEMM) and the stream is kept without the biases, which the LayerNorms add (`_blocks_cublas`). On the skinny GEMM FC2
(K = 4H, split in four) hands its split-K products to that LayerNorm unsummed (`_fc2_partials`).

Except at 5-64 rows on a GPU (decode batches 8-64), where the five-launch layout above runs on the skinny GEMM
with the LayerNorms folded in (`_skinny_ln_mode`): at 5-16 rows each GEMM program takes its rows' statistics
itself, at 17-64 the out-projection and FC2 hand the next folded GEMM their output tiles' row statistics
(`_blocks_row_stats`; with tensor parallelism a small statistics launch before each folded GEMM at 17-40 rows).

Two phases share the weights: `prefill` runs packed ragged prompts (T = sum of prompt lengths) through causal
context attention; `decode` runs one token per sequence (T = B) through decode attention over the KV cache.

Tensor parallelism (ftlab.parallel) gives each rank nh/N heads and I/N MLP columns, and an `all_reduce` that sums
the row-parallel outputs (attention output projection and fc2). In the GEMV path only rank 0 adds those layers' bias
and the residual in its epilogue, so the all-reduced sum is exactly x + bias + sum of partial products; in the cuBLAS
path every rank adds them to the all-reduced sum. Layer (pipeline) parallelism gives each stage a contiguous range of
blocks; `embed`, `run_blocks_*` and `lm_logits` are the stage-sized pieces.
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import LM_HEAD, layer_prefix, load_cmodel, split_tensor, tensor_specs
from .config import GPTConfig, compute_dtype
from .kernels.attention import context_attention
from .kernels.decode_attention import decode_attention
from .kernels.decode_block import MAX_BATCH as FUSED_MAX_BATCH, decode_block, new_sync_state
from .kernels.embedding import embedding
from .kernels.layernorm import layernorm, layernorm_stats
from .kernels.linear import GEMV_MAX_M, fold_layernorm, linear
from .kernels.skinny_gemm import (LN_MAX_K as SKINNY_LN_MAX_K, MAX_M as SKINNY_MAX_M, skinny_enabled, skinny_gemm,
                                  skinny_gemm_on, skinny_splits)

SMALL_M_MAX = 64  # up to this many rows (decode batches, short prompts) see GPT._small_m_gemm
SKINNY_LN_AUTO_MAX_M = 16  # up to this many rows take GPT._skinny_blocks by default on a GPU (in-GEMM statistics)
SKINNY_STATS_AUTO_MAX_M = 40  # and up to this many with layernorm_stats launches where row statistics can't pass


@dataclass
class BlockWeights:
    """One decoder block on the device, Linear weights in (out, in) layout, this rank's shard."""
    ln1_weight: torch.Tensor  # (H,)
    ln1_bias: torch.Tensor  # (H,)
    qkv_weight: torch.Tensor  # (3*nh_local*hs, H), rows ordered [3, nh_local, hs]
    qkv_bias: torch.Tensor  # (3*nh_local*hs,)
    attn_out_weight: torch.Tensor  # (H, nh_local*hs)
    attn_out_bias: torch.Tensor  # (H,), the same on every tensor-parallel rank
    ln2_weight: torch.Tensor  # (H,)
    ln2_bias: torch.Tensor  # (H,)
    fc1_weight: torch.Tensor  # (I_local, H)
    fc1_bias: torch.Tensor  # (I_local,)
    fc2_weight: torch.Tensor  # (H, I_local)
    fc2_bias: torch.Tensor  # (H,), the same on every tensor-parallel rank
    # after fold_layernorms: fp32 row sums of qkv_weight / fc1_weight, into which ln1 / ln2 were folded
    qkv_ln_row_sums: torch.Tensor | None = None
    fc1_ln_row_sums: torch.Tensor | None = None


@dataclass
class GPTWeights:
    blocks: list[BlockWeights]  # this stage's blocks, global indices first_layer .. first_layer+len-1
    first_layer: int = 0
    wte: torch.Tensor | None = None  # (V, H); needed by the first stage (embedding)
    wpe: torch.Tensor | None = None  # (P, H)
    lnf_weight: torch.Tensor | None = None  # (H,); needed by the last stage
    lnf_bias: torch.Tensor | None = None
    lm_head: torch.Tensor | None = None  # (V, H); the same tensor as wte when tied (and not folded)
    lm_head_bias: torch.Tensor | None = None  # (V,): the final LayerNorm's shift . lm_head, once folded
    lm_head_ln_row_sums: torch.Tensor | None = None  # (V,) fp32, once the final LayerNorm is folded in


@dataclass
class KVCache:
    """Keys and values of every sequence, written in place by the attention kernels."""
    k: torch.Tensor  # (L_local, B, nh_local, capacity, hs)
    v: torch.Tensor  # (L_local, B, nh_local, capacity, hs)
    # (B, nh_local) int32, zero between launches: decode attention's combine counters, shared by the layers (they run
    # one after another) so no step spends a memset launch per layer on them
    counters: torch.Tensor | None = None
    # int32 (1 + B*nh_local,), zero between launches: the fused decode block's grid barrier and combine counters
    sync: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Views of sequences start..stop-1 (micro-batches of the layer-parallel context phase)."""
        counters = None if self.counters is None else self.counters[start:stop]
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], counters)


def _device_block(ft: dict, layer: int, *, dtype, device, rank: int, tp: int, is_shard: bool, config: GPTConfig):
    """FT file layout ([in, out], full or this rank's shard) -> BlockWeights on the device."""
    prefix = layer_prefix(layer)
    specs = {s.name: s for s in tensor_specs(config, layers=[layer], embeddings=False)}

    def get(suffix: str) -> torch.Tensor:
        name = prefix + suffix
        tensor = ft[name]
        if not is_shard and specs[name].split_axis is not None:
            tensor = split_tensor(specs[name], tensor, tp)[rank]
        return tensor.to(device=device, dtype=dtype)

    def out_in(t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous()  # FT stores Linear weights [in, out]; the kernels stream rows of (out, in)

    H = config.hidden
    return BlockWeights(
        ln1_weight=get("input_layernorm.weight"), ln1_bias=get("input_layernorm.bias"),
        qkv_weight=out_in(get("attention.query_key_value.weight").reshape(H, -1)),
        qkv_bias=get("attention.query_key_value.bias").reshape(-1).contiguous(),
        attn_out_weight=out_in(get("attention.dense.weight")),
        attn_out_bias=get("attention.dense.bias"),
        ln2_weight=get("post_attention_layernorm.weight"), ln2_bias=get("post_attention_layernorm.bias"),
        fc1_weight=out_in(get("mlp.dense_h_to_4h.weight")), fc1_bias=get("mlp.dense_h_to_4h.bias"),
        fc2_weight=out_in(get("mlp.dense_4h_to_h.weight")),
        fc2_bias=get("mlp.dense_4h_to_h.bias"),
    )


def device_weights(config: GPTConfig, ft: dict[str, torch.Tensor], *, dtype: torch.dtype, device,
                   tp_rank: int = 0, tp_size: int = 1, is_shard: bool = False, layers: range | None = None,
                   first_stage: bool = True, last_stage: bool = True) -> GPTWeights:
    """Cast and lay out FT-layout tensors for this rank/stage. `ft` holds full tensors (is_shard False: split here)
    or rank `tp_rank`'s shards of files split for tp_size (is_shard True)."""
    layers = range(config.num_layer) if layers is None else layers
    blocks = [_device_block(ft, i, dtype=dtype, device=device, rank=tp_rank, tp=tp_size, is_shard=is_shard,
                            config=config) for i in layers]
    weights = GPTWeights(blocks=blocks, first_layer=layers.start)

    def get(name):
        return ft[name].to(device=device, dtype=dtype).contiguous()

    if first_stage or (last_stage and LM_HEAD not in ft):
        weights.wte = get("model.wte")
    if first_stage:
        weights.wpe = get("model.wpe")
    if last_stage:
        weights.lnf_weight = get("model.final_layernorm.weight")
        weights.lnf_bias = get("model.final_layernorm.bias")
        weights.lm_head = get(LM_HEAD) if LM_HEAD in ft else weights.wte
    if os.environ.get("FTLAB_LN_PREFOLD", "1") != "0":
        fold_layernorms(weights)
        if not first_stage:
            weights.wte = None  # only the LM head read it, and that now has its own folded copy
    return weights


def fold_layernorms(weights: GPTWeights) -> None:
    """Fold every LayerNorm's gain and shift into the Linear that reads it (QKV, FC1, the LM head), in place.

    The LayerNorms are left with gain 1 and shift 0, so every path (cuBLAS prefill, GEMV decode, the fused block,
    torch on a CPU) computes the same function as before; the decode GEMVs, given the row sums, then load no LN
    parameter at all (kernels/linear.py LN_PREFOLDED): on the H200 a GPT-345M step's GEMV chain 14.5-14.7 ->
    12.0-12.3 us per layer (data/bench/linear_chain_ln_fold.csv), the 50257-row LM head 45.1 -> 31.3 us (no LN at
    all, the bound: data/bench/ln_prefold.txt); the decode step 0.534 -> 0.422 ms, bs1 512 -> 32 19.8 -> 16.2
    ms (data/bench/ln_prefold_ab.csv). A tied LM head gets its own folded copy (the embedding keeps reading wte).
    Rounding: W * g is stored in the weight's dtype, one rounding of the size the LN output's own rounding has in
    the unfolded model. FTLAB_LN_PREFOLD=0 (read when weights are loaded) keeps the checkpoint's tensors as they
    are."""
    for b in weights.blocks:
        ones, zeros = torch.ones_like(b.ln1_weight), torch.zeros_like(b.ln1_bias)
        b.qkv_weight, b.qkv_bias, b.qkv_ln_row_sums = fold_layernorm(b.qkv_weight, b.qkv_bias, b.ln1_weight,
                                                                     b.ln1_bias)
        b.fc1_weight, b.fc1_bias, b.fc1_ln_row_sums = fold_layernorm(b.fc1_weight, b.fc1_bias, b.ln2_weight,
                                                                     b.ln2_bias)
        b.ln1_weight, b.ln1_bias, b.ln2_weight, b.ln2_bias = ones, zeros, ones.clone(), zeros.clone()
    if weights.lm_head is not None and weights.lnf_weight is not None:
        weights.lm_head, weights.lm_head_bias, weights.lm_head_ln_row_sums = fold_layernorm(
            weights.lm_head, weights.lm_head_bias, weights.lnf_weight, weights.lnf_bias)
        weights.lnf_weight = torch.ones_like(weights.lnf_weight)
        weights.lnf_bias = torch.zeros_like(weights.lnf_bias)


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias, GELU) for the blocks' LayerNorm + GEMM path: at decode batches (up to 64 rows on a
    GPU) kernels/skinny_gemm.py (it loads its weight slice while the previous kernel finishes; H200, a block's four
    GEMMs at 8 / 64 rows: 12.4 / 21.3 us vs cuBLAS's 23.8 / 26.2), else cuBLAS (GELU in cuBLASLt's epilogue). At
    prefill sizes kernels/linear.py's tiled Triton GEMM (LayerNorms folded, bias / residual epilogues) measured
    slower than cuBLAS: a block's GEMMs 41.8 vs 28.2 us at 128 rows, 53.4 vs 38.6 at 512 (data/bench/
    prefill_gemm_ab.csv); swept over 11 tiles and split-K 1-8 at 512 rows, its best per GEMM was still slower (QKV
    9.88 vs 8.22 us, out-projection 6.21 vs 5.19, FC1 11.86 vs 10.83, FC2 14.01 vs 11.06; 2026-12-03,
    data/bench/prefill_gemm_512_sweep.csv). So were persistent Triton GEMMs at 8192 and 32768 rows (bs16 / bs64
    prompts of 512; the same epilogues; pointer loads or TMA descriptors, 128-256 x 128-256 tiles): best at 32768
    rows QKV 337 vs 298 us, out-projection 129 vs 119, FC1 522 vs 502, FC2 456 vs 420 (data/bench/
    prefill_gemm_large_m.csv, cfg = BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, group, flatten[, epilogue split in
    two]; scratch code, not kept).
    Nor did other ways of calling cuBLAS pay (2026-12-02, data/bench/prefill_gemm_forms.csv, us per GEMM at 512 /
    4096 / 32768 rows): cuBLASLt preferred for every matmul (QKV 8.03 / 44.8 / 350 vs 8.05 / 40.8 / 317), the weights
    pre-transposed to (in, out) (within 3 %, QKV 344 at 32768), a 128 MiB workspace (the same), or FC1's GELU as its
    own kernel (12.6 / 76.8 / 627 vs 10.8 / 57.0 / 523 in cuBLASLt's epilogue, which costs 5-15 % over no GELU).
    Nor, end to end, did cuBLASLt's other heuristic candidates chosen by timing each shape (session 24, scratch
    code): faster alone at 32768 rows for the out-projection and FC1 (data/bench/cublaslt_algos.csv), the bench's
    cells within their noise (cublaslt_e2e_ab.csv)."""
    if skinny_gemm_on(x, weight):
        return skinny_gemm(x, weight, bias, activation="gelu" if gelu else None)
    if gelu:
        return linear(x, weight, bias, activation="gelu", impl="torch")
    return F.linear(x, weight, bias)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GPT:
    """A GPT decoder on the device. Holds no per-request state: the KV cache belongs to each generate() call."""

    def __init__(self, config: GPTConfig, weights: GPTWeights, *, tp_size: int = 1, tp_rank: int = 0,
                 all_reduce: Callable[[torch.Tensor], None] | None = None, fused_decode: bool = True):
        if config.head_num % tp_size:
            raise ValueError(f"head_num={config.head_num} is not divisible by tensor_para_size={tp_size}")
        self.config = config
        self.weights = weights
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.all_reduce = all_reduce  # in-place sum over the tensor-parallel group; None when tp_size == 1
        # FTLAB_FUSED_BLOCK=1: decode steps of <= FUSED_MAX_BATCH sequences run each block as one persistent launch
        # (kernels/decode_block.py; off by default: measured slower than the five kernels, see there). Only in a
        # single process: its grid barrier must never wait on SMs held by a peer's communication kernels.
        self.fused_decode = fused_decode and tp_size == 1
        self.local_heads = config.head_num // tp_size
        some = weights.blocks[0].qkv_weight if weights.blocks else (weights.wte if weights.wte is not None
                                                                      else weights.lm_head)
        self.dtype, self.device = some.dtype, some.device
        self.graph_cache: dict = {}  # ftlab.generate's captured decode steps, by (batch, KV capacity)
        self._bias_sums: torch.Tensor | None = None  # _residual_bias_sums, once computed

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_ft_tensors(cls, config: GPTConfig, ft: dict[str, torch.Tensor], *, dtype="fp32", device=None) -> "GPT":
        """Single-process model from full FT-layout tensors (a joined c-model, or a converter's output)."""
        device = torch.device(device) if device is not None else default_device()
        weights = device_weights(config, ft, dtype=compute_dtype(dtype), device=device)
        return cls(config, weights)

    @classmethod
    def from_cmodel(cls, model_dir: str | Path, *, dtype="fp16", device=None) -> "GPT":
        """Load a c-model directory in one process (all tensor-parallel shards joined)."""
        config, ft = load_cmodel(model_dir)
        return cls.from_ft_tensors(config, ft, dtype=dtype, device=device)

    @property
    def num_local_layers(self) -> int:
        return len(self.weights.blocks)

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        shape = (self.num_local_layers, batch_size, self.local_heads, capacity, self.config.size_per_head)
        return KVCache(torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.zeros((batch_size, self.local_heads), dtype=torch.int32, device=self.device),
                       new_sync_state(batch_size, self.local_heads, self.device))

    # --- stage pieces -------------------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T,) token ids and positions -> (T, H) residual stream."""
        return embedding(token_ids, positions, self.weights.wte, self.weights.wpe, out_dtype=self.dtype)

    def _row_parallel(self, x_local: torch.Tensor, weight, bias, residual: torch.Tensor, prefetch=None,
                      impl=None) -> torch.Tensor:
        if self.all_reduce is None:
            return linear(x_local, weight, bias, residual=residual, prefetch=prefetch, impl=impl)
        lead = self.tp_rank == 0  # the lead rank adds bias + residual once; the others contribute partial sums
        out = linear(x_local, weight, bias if lead else None, residual=residual if lead else None, prefetch=prefetch,
                     impl=impl)
        self.all_reduce(out)
        return out

    def _block(self, block: BlockWeights, x: torch.Tensor, attend: Callable,
               prefetch: tuple = (None, None, None, None), keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """prefetch: for the QKV, out-proj, FC1 and FC2 GEMVs, a later kernel's weight to pull into L2 (decode).
        keep_rows: after attention only these rows go on (run_blocks_prefill's last block)."""
        eps = self.config.layernorm_eps
        T = x.shape[0]
        impl = self._block_impl(T)
        qkv = linear(x, block.qkv_weight, block.qkv_bias, ln_weight=block.ln1_weight, ln_bias=block.ln1_bias,
                     ln_eps=eps, prefetch=prefetch[0], ln_row_sums=block.qkv_ln_row_sums, impl=impl)  # (T, 3*nh*hs)
        attn = attend(qkv.view(T, 3, self.local_heads, self.config.size_per_head))  # (T, nh, hs)
        if keep_rows is not None:
            attn, x = attn[keep_rows], x[keep_rows]
            impl = None
        return self._block_after_attention(block, x, attn, prefetch, impl)

    def _block_after_attention(self, block: BlockWeights, x: torch.Tensor, attn: torch.Tensor,
                               prefetch: tuple = (None, None, None, None), impl: str | None = None) -> torch.Tensor:
        """x (T, H) the residual stream, attn (T, nh, hs) its rows' attention -> (T, H) after the out-projection and
        the MLP, on `_block`'s GEMMs (impl: linear()'s, default `_block_impl(T)`; "skinny-rowstats" takes
        "skinny-stats" here, where no producer hands on row statistics)."""
        T = x.shape[0]
        if impl is None:
            impl = self._block_impl(T)
            impl = "skinny-stats" if impl == "skinny-rowstats" else impl
        x = self._row_parallel(attn.reshape(T, -1), block.attn_out_weight, block.attn_out_bias, x, prefetch[1],
                               impl)
        h = linear(x, block.fc1_weight, block.fc1_bias, activation="gelu", ln_weight=block.ln2_weight,
                   ln_bias=block.ln2_bias, ln_eps=self.config.layernorm_eps, prefetch=prefetch[2],
                   ln_row_sums=block.fc1_ln_row_sums, impl=impl)  # (T, I_local)
        return self._row_parallel(h, block.fc2_weight, block.fc2_bias, x, prefetch[3], impl)

    def _tail_off_cublas(self, kept: int) -> bool:
        """Whether the prefill's last block takes its `kept` rows (one per prompt) through the decode block's GEMMs
        after attention (`_block_after_attention`: GEMVs up to GEMV_MAX_M rows, skinny GEMMs to 64) instead of
        cuBLAS, LayerNorm and bias launches. FTLAB_PREFILL_TAIL=0 keeps cuBLAS (read per call). H200, GPT-345M,
        the captured context phase of 512-token prompts replayed back to back, two rounds in fresh processes
        (`.ci/gpu-check ab-prefill`, data/bench/prefill_tail_ab.csv): one prompt 1212.4 / 1214.9 -> 1199.1 /
        1194.5 us; 64 prompts within the noise of the power cap (38.3-39.0 ms either way)."""
        return not self._uses_cublas(kept) and os.environ.get("FTLAB_PREFILL_TAIL", "1") != "0"

    def _block_impl(self, tokens: int) -> str | None:
        """linear()'s impl for `_block`'s GEMMs at `tokens` rows: the skinny or tiled Triton GEMM when those paths
        are on, else linear()'s own dispatch."""
        return self._skinny_ln_mode(tokens) or ("gemm" if self._small_m_gemm(tokens) else None)

    def _reduced(self, partial: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(partial)
        return partial

    def _uses_cublas(self, tokens: int) -> bool:
        """Whether `tokens` rows take the cuBLAS-GEMM path (module docstring): above the GEMV sizes, for layer
        widths that cuBLAS handles well (multiples of 8, see kernels/linear.py's dispatch)."""
        b = self.weights.blocks[0] if self.weights.blocks else None
        return (tokens > GEMV_MAX_M and b is not None and not self._small_m_gemm(tokens)
                and not self._skinny_blocks(tokens)
                and all(w.shape[0] % 8 == 0 for w in (b.qkv_weight, b.attn_out_weight, b.fc1_weight, b.fc2_weight)))

    def _small_m_gemm(self, tokens: int) -> bool:
        """Whether `tokens` rows (GEMV_MAX_M < tokens <= SMALL_M_MAX) run every block GEMM on the Triton tensor-core
        kernel instead of LayerNorm launches + cuBLAS: with the LayerNorms folded into the weights (ln_row_sums) the
        kernel takes the normalisation into its epilogue and the residual adds into its own, so a block is five
        launches plus two split-K reduces instead of eight. Off unless FTLAB_SMALL_M_GEMM=1 (read per call): on the
        H200 (GPT-345M, fp16, context 512) the decode step measured 0.99 -> 1.23 ms at bs8 and 1.85 -> 2.08 ms at
        bs64 with the best tile (FTLAB_GEMM_TILE=32,128,4,5), worse with PDL (data/bench/small_m_gemm_ab.csv; in a
        timeline of the PDL variant at bs8 the QKV / FC1 GEMMs took ~13.5 us where LayerNorm + cuBLAS take ~7)."""
        b = self.weights.blocks[0] if self.weights.blocks else None
        return (GEMV_MAX_M < tokens <= SMALL_M_MAX and b is not None and b.qkv_ln_row_sums is not None
                and os.environ.get("FTLAB_SMALL_M_GEMM", "0") == "1")

    def _skinny_blocks(self, tokens: int) -> bool:
        """Whether `tokens` rows run the five-launch block of the GEMV path on kernels/skinny_gemm.py with the
        LayerNorms folded into QKV and FC1 (see `_skinny_ln_mode`)."""
        return self._skinny_ln_mode(tokens) is not None

    def _skinny_ln_mode(self, tokens: int) -> str | None:
        """linear()'s impl when `tokens` rows (GEMV_MAX_M < tokens <= 64) run the five-launch block of the GEMV
        path with every GEMM on kernels/skinny_gemm.py, the LayerNorms folded into QKV and FC1 and the residual
        adds in the out-projection's and FC2's epilogues, else None (`_blocks_cublas`: LayerNorm launches between
        the GEMMs). "skinny": each program of a folded GEMM takes whole rows of x and their statistics itself (no
        launch for the LayerNorm); "skinny-stats": the statistics come from a small launch before the GEMM
        (kernels/layernorm.py layernorm_stats), whose K split then stands.

        Defaults on a GPU in fp16 / bf16 (H200, GPT-345M, decode step at context 512): "skinny" up to
        SKINNY_LN_AUTO_MAX_M rows (data/bench/skinny_gemm_step_ab.csv, 2026-12-01: bs8 0.636 -> 0.573 ms, bs16
        0.776 -> 0.722 against LayerNorm launches; but bs32 1.126 -> 1.154 and bs64 1.76 -> 2.30, its whole-row
        tiles are slower there), "skinny-stats" up to SKINNY_STATS_AUTO_MAX_M (data/bench/skinny_stats_step_ab.csv,
        2026-12-03, alternating in one process, against LayerNorm launches: bs17 0.864 / 0.878 -> 0.818 / 0.827 ms,
        bs24 0.972 / 0.984 -> 0.945 / 0.938, bs32 1.049-1.064 -> 0.981-0.983, bs40 1.265 / 1.281 -> 1.240 / 1.241,
        but bs48 1.406 / 1.419 -> 1.412 / 1.429 and bs64 1.580-1.601 -> 1.601-1.609; and at bs8 / bs16 slower than
        the in-GEMM statistics, 0.554-0.560 / 0.650-0.655 -> 0.591-0.601 / 0.687-0.689), LayerNorm launches above.
        "skinny-rowstats" (`_blocks_row_stats`): "skinny-stats" without the statistics launches after the first,
        each residual GEMM handing its tiles' row statistics to the next folded GEMM (one process, tensor_para_size
        1, hidden a multiple of 64). The default at 17..64 rows where it can run (2026-12-04, `ftlab bench
        --ab-decode`, data/bench/decode_step_ab.csv, ms, LayerNorm launches / "skinny-stats" / "skinny-rowstats":
        bs17 0.820 / 0.779 / 0.757, bs24 0.954 / 0.920 / 0.883, bs32 1.024 / 0.980 / 0.962, bs40 1.234 / 1.210 /
        1.207, bs48 1.349 / 1.335 / 1.337, bs56 1.466 / 1.443 / 1.417, bs64 1.539 / 1.543 / 1.505; end to end
        512 -> 32 in fresh processes, bs64 84.51 / 84.62 -> 83.64 / 84.03, bs24 against "skinny-stats" 42.35 /
        42.30 -> 41.10 / 41.42, data/bench/skinny_rowstats_e2e_ab.csv); with tensor parallelism the rows change
        in the all-reduce after the statistics were taken: "skinny-stats" up to SKINNY_STATS_AUTO_MAX_M there.
        FTLAB_SKINNY_LN=1 forces "skinny" for 5..64 rows, =stats "skinny-stats", =rowstats "skinny-rowstats", =0
        turns them off (read per call)."""
        b = self.weights.blocks[0] if self.weights.blocks else None
        if not (GEMV_MAX_M < tokens <= SKINNY_MAX_M and b is not None and b.qkv_ln_row_sums is not None):
            return None
        whole_rows_fit = self.config.hidden <= SKINNY_LN_MAX_K
        flag = os.environ.get("FTLAB_SKINNY_LN")
        row_stats_fit = self.all_reduce is None and self.config.hidden % 64 == 0
        if flag is not None:
            return {"1": "skinny" if whole_rows_fit else None, "stats": "skinny-stats",
                    "rowstats": "skinny-rowstats" if row_stats_fit else "skinny-stats"}.get(flag)
        # (measured at GPT-345M's width only: wider models keep the LayerNorm launches unless the flag says)
        if not (skinny_enabled(self.device, self.dtype) and whole_rows_fit) or self._small_m_gemm(tokens):
            return None
        if tokens <= SKINNY_LN_AUTO_MAX_M:
            return "skinny"
        if row_stats_fit:
            return "skinny-rowstats"
        return "skinny-stats" if tokens <= SKINNY_STATS_AUTO_MAX_M else None

    def _blocks_cublas(self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor],
                       keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T, H) through this stage's blocks with cuBLAS GEMMs, each LayerNorm fused with the residual add and
        the bias before it; attend(i, qkv (T, 3, nh, hs)) -> (T, nh, hs) is block i's attention. keep_rows: after
        the last block's attention only these rows go on (returns (len(keep_rows), H)). x may be overwritten.

        In one process at prefill sizes (more rows than skinny_gemm takes) the residual stream is kept without the
        out-projection and FC2 biases: cuBLAS adds each product into it in place (x += a W^T, beta = 1 in its
        epilogue, under the GEMM's FLOPs) and the LayerNorm after it adds the biases so far (x_bias), so it reads x
        once and writes h alone, where it would read the product and x and write both x and h."""
        eps, T = self.config.layernorm_eps, x.shape[0]
        blocks = self.weights.blocks
        in_place = self.all_reduce is None and not skinny_gemm_on(x, blocks[0].qkv_weight)
        bias_sums = self._residual_bias_sums() if in_place else None
        h = layernorm(x, blocks[0].ln1_weight, blocks[0].ln1_bias, eps)
        for i, block in enumerate(blocks):
            qkv = _dense(h, block.qkv_weight, block.qkv_bias)  # (T, 3*nh*hs)
            attn = attend(i, qkv.view(T, 3, self.local_heads, self.config.size_per_head))  # (T, nh, hs)
            if keep_rows is not None and i + 1 == len(blocks):
                attn, x = attn[keep_rows], x[keep_rows]
                T = x.shape[0]
                if self._tail_off_cublas(T):
                    if in_place and i > 0:  # the kept rows' residual with the biases it was kept without
                        x = (x.float() + bias_sums[2 * i - 1]).to(x.dtype)
                    return self._block_after_attention(block, x, attn)
            if in_place:
                x.addmm_(attn.view(T, -1), block.attn_out_weight.t())  # x += a W_o^T
                h = layernorm(x, block.ln2_weight, block.ln2_bias, eps, x_bias=bias_sums[2 * i])
            else:
                y = self._reduced(_dense(attn.view(T, -1), block.attn_out_weight))  # (T, H)
                h, x = layernorm(y, block.ln2_weight, block.ln2_bias, eps, residual=x, x_bias=block.attn_out_bias)
            g = _dense(h, block.fc1_weight, block.fc1_bias, gelu=True)  # (T, I_local)
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if in_place:
                x.addmm_(g, block.fc2_weight.t())
                if nxt is not None:
                    h = layernorm(x, nxt.ln1_weight, nxt.ln1_bias, eps, x_bias=bias_sums[2 * i + 1])
                else:  # the stage hands on the residual stream with every bias in it
                    x = (x.float() + bias_sums[2 * i + 1]).to(x.dtype)
                continue
            if nxt is not None and self._fc2_partials(g, block.fc2_weight):
                # split-K products summed by the next block's LN_1 with the residual add (see _fc2_partials)
                parts = skinny_gemm(g, block.fc2_weight, partials=True)  # (S, T, H) fp32
                h, x = layernorm(parts, nxt.ln1_weight, nxt.ln1_bias, eps, residual=x, x_bias=block.fc2_bias)
                continue
            if nxt is None and self.all_reduce is None and skinny_gemm_on(g, block.fc2_weight):
                # the stage hands on the residual stream (5..64 rows): bias and residual in the GEMM's epilogue,
                # one launch instead of a GEMM and two adds that have no PDL
                x = skinny_gemm(g, block.fc2_weight, block.fc2_bias, residual=x)
                continue
            y = self._reduced(_dense(g, block.fc2_weight))
            if nxt is not None:  # the next block's LN_1, fused with this block's last residual add
                h, x = layernorm(y, nxt.ln1_weight, nxt.ln1_bias, eps, residual=x, x_bias=block.fc2_bias)
            else:  # the stage hands on the residual stream (the LM head or the next stage normalises it)
                x = x + (y + block.fc2_bias)
        return x

    def _blocks_row_stats(self, x: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor],
                          keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T, H), 5..64 rows, through this stage's blocks on kernels/skinny_gemm.py with the LayerNorms folded
        into QKV and FC1 ("skinny-rowstats", see `_skinny_ln_mode`): the out-projection and FC2 (bias and residual
        in their epilogues) also write their output tiles' row statistics, which the folded GEMM after each merges
        as it loads x, so only the first LN_1 is a statistics launch. attend(i, qkv (T, 3, nh, hs)) -> (T, nh, hs);
        keep_rows as in `_blocks_cublas`. One process only (an all-reduce would change the rows after the
        statistics were taken)."""
        eps, blocks = self.config.layernorm_eps, self.weights.blocks
        stats = layernorm_stats(x, eps)
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            T = x.shape[0]
            qkv = skinny_gemm(x, block.qkv_weight, block.qkv_bias, ln_row_sums=block.qkv_ln_row_sums, ln_eps=eps,
                              ln_stats=stats)  # (T, 3*nh*hs)
            attn = attend(i, qkv.view(T, 3, self.local_heads, self.config.size_per_head))  # (T, nh, hs)
            if keep_rows is not None and i == last:
                attn, x = attn[keep_rows], x[keep_rows]
                T = x.shape[0]
            x, stats = skinny_gemm(attn.reshape(T, -1), block.attn_out_weight, block.attn_out_bias, residual=x,
                                   row_stats=True)  # (T, H) and its rows' statistics for LN_2
            g = skinny_gemm(x, block.fc1_weight, block.fc1_bias, activation="gelu", ln_row_sums=block.fc1_ln_row_sums,
                            ln_eps=eps, ln_stats=stats)  # (T, I_local)
            if i == last:  # the stage hands on the residual stream (the LM head normalises it itself)
                return skinny_gemm(g, block.fc2_weight, block.fc2_bias, residual=x)
            x, stats = skinny_gemm(g, block.fc2_weight, block.fc2_bias, residual=x, row_stats=True)  # for LN_1
        return x

    def _fc2_partials(self, g: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether FC2 on kernels/skinny_gemm.py hands its split-K products to the next LayerNorm unsummed (one
        process; FC2's K = 4 x H makes it split): the GEMM then has no last program summing the splits after its
        counter, and the LayerNorm reads fp32 slices instead of one row. FTLAB_SKINNY_PARTIALS=0 keeps the sum in
        the GEMM (read per call)."""
        return (self.all_reduce is None and os.environ.get("FTLAB_SKINNY_PARTIALS", "1") != "0"
                and skinny_gemm_on(g, weight) and skinny_splits(g.shape[0], weight.shape[0], g.shape[1]) > 1)

    def _residual_bias_sums(self) -> torch.Tensor:
        """(2 * blocks, H) fp32: row 2i the sum of this stage's out-projection and FC2 biases up to block i's
        out-projection, row 2i + 1 up to its FC2 (what `_blocks_cublas` keeps out of the residual stream). Computed
        once: the weights do not change after loading."""
        if self._bias_sums is None:
            pairs = [(b.attn_out_bias.float(), b.fc2_bias.float()) for b in self.weights.blocks]
            self._bias_sums = torch.stack([t for pair in pairs for t in pair]).cumsum(0)
        return self._bias_sums

    def run_blocks_prefill(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                           cache: KVCache, last_tokens_only: bool = False) -> torch.Tensor:
        """Packed prompts (T, H) through this stage's blocks, filling cache rows 0..len-1 of each sequence.

        last_tokens_only: return only each prompt's last row (B, H), for its logits. The last block then needs
        every row only up to its attention's cache write (the cache takes every key and value); its attention
        computes the last rows alone (context_attention's last_rows_only; FTLAB_PREFILL_LAST_ROWS=0, read per
        call, computes every row as before), and its out-projection, LayerNorm and MLP run on those rows, which
        saves under 1/num_layers of a long prompt's work."""
        last = len(self.weights.blocks) - 1
        keep_rows = cu_seqlens[1:].long() - 1 if last_tokens_only else None  # (B,)
        last_rows = last_tokens_only and os.environ.get("FTLAB_PREFILL_LAST_ROWS", "1") != "0"

        def attend(i, qkv):
            return context_attention(qkv, cu_seqlens, max_seqlen, k_cache=cache.k[i], v_cache=cache.v[i],
                                     last_rows_only=last_rows and i == last)
        if not self.weights.blocks:
            return x if keep_rows is None else x[keep_rows]
        if self._uses_cublas(x.shape[0]):
            return self._blocks_cublas(x, attend, keep_rows)
        if self._block_impl(x.shape[0]) == "skinny-rowstats":
            return self._blocks_row_stats(x, attend, keep_rows)
        for i, block in enumerate(self.weights.blocks):
            x = self._block(block, x, functools.partial(attend, i), keep_rows=keep_rows if i == last else None)
        return x

    def run_blocks_decode(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence (B, H) at `positions` (B,) through this stage's blocks.

        `positions` and the cache rows below them must have been written before x was (x comes from the step's
        embedding, a receive, or the previous captured step: work finished before the first block starts), so
        decode attention reads them before its PDL wait."""
        if self._use_fused_block(x, cache):
            for i, block in enumerate(self.weights.blocks):  # BlockWeights' fields are decode_block's weight names
                tensors = {k: v for k, v in vars(block).items() if not k.endswith("_ln_row_sums")}
                x = decode_block(x, positions, cache.k[i], cache.v[i], sync=cache.sync, num_heads=self.local_heads,
                                 eps=self.config.layernorm_eps, **tensors)
            return x
        def attend_i(i, qkv):
            return decode_attention(qkv, cache.k[i], cache.v[i], positions, counter=cache.counters,
                                    history_ready=True)
        if self._uses_cublas(x.shape[0]):
            return self._blocks_cublas(x, attend_i)
        if self._block_impl(x.shape[0]) == "skinny-rowstats":
            return self._blocks_row_stats(x, attend_i)
        targets = self._prefetch_targets()
        for i, block in enumerate(self.weights.blocks):
            qkv_pf, attn_pf, out_pf, fc1_pf, fc2_pf = targets[5 * i:5 * i + 5]

            def attend(qkv, i=i, attn_pf=attn_pf):
                return decode_attention(qkv, cache.k[i], cache.v[i], positions, counter=cache.counters,
                                        history_ready=True, prefetch=attn_pf)
            x = self._block(block, x, attend, (qkv_pf, out_pf, fc1_pf, fc2_pf))
        return x

    def _prefetch_targets(self) -> list:
        """For each kernel of a decode step in launch order (per block: QKV, attention, out-proj, FC1, FC2), the
        weight it asks L2 to fetch (kernels/_prefetch.py): that of the kernel FTLAB_PREFETCH_AHEAD launches later
        (with 2, every block weight is in flight two kernels before it is read, and decode attention, which reads
        no weight, fetches FC1's). Off (0) by default: on the H200 (GPT-345M, bs1, context 512) it measured slower,
        decode step 0.569 -> 0.598 ms at 2 ahead; with PDL the GEMVs already load their weights before they wait,
        so the step is bound by the latency of its kernel chain, not by HBM idling. Again with kernels/gemv_rows.py
        (which ignores the hint, so only decode attention prefetches; 2026-12-02, two rounds, data/bench/
        prefetch_ahead_ab.csv): 0 / 1 / 2 / 3 ahead 0.365 / 0.364-0.365 / 0.369-0.376 / 0.374-0.375 ms. Never the
        LM head (twice the L2). Read per call, like FTLAB_FUSED_BLOCK, so a benchmark can compare. At bs32 / bs64
        (the cuBLAS-path blocks, scratch code, 2026-12-02, data/bench/attention_prefetch_bs64_ab.csv) decode
        attention prefetching its block's out-projection, FC1 or FC2 weight or the next block's QKV weight made
        the step slower or equal (bs64 1.60-1.65 ms without, 1.61-1.68 with; bs32 1.07-1.08 vs 1.08-1.12)."""
        ahead = int(os.environ.get("FTLAB_PREFETCH_AHEAD", "0"))
        order = [w for b in self.weights.blocks for w in (b.qkv_weight, None, b.attn_out_weight, b.fc1_weight,
                                                           b.fc2_weight)]
        return [order[k + ahead] if ahead > 0 and k + ahead < len(order) else None for k in range(len(order))]

    def _use_fused_block(self, x: torch.Tensor, cache: KVCache) -> bool:
        # read per call, so a benchmark or test can compare both paths in one process
        return (self.fused_decode and cache.sync is not None and x.shape[0] <= FUSED_MAX_BATCH
                and os.environ.get("FTLAB_FUSED_BLOCK", "0") == "1")

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, H) last hidden states -> (M, V) logits: final LayerNorm folded into the LM-head GEMM."""
        w = self.weights
        # On a CPU the kernels run in Triton's interpreter, which needs seconds per token for a 50k-row LM head:
        # there (only) the same GEMM + LayerNorm prologue runs through torch. The Triton paths of this exact call are
        # tested on their own (tests/kernels/) and are what runs on a GPU (linear()'s dispatch by the number of rows).
        impl = "torch" if x.device.type == "cpu" else None
        return linear(x, w.lm_head, w.lm_head_bias, ln_weight=w.lnf_weight, ln_bias=w.lnf_bias,
                      ln_eps=self.config.layernorm_eps, impl=impl, ln_row_sums=w.lm_head_ln_row_sums)

    # --- whole model (single stage) -----------------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """Context phase over packed prompts. Returns the logits of each sequence's last token (B, V), or of every
        token (T, V) with all_logits."""
        return self.lm_logits(self.run_blocks_prefill(self.embed(token_ids, positions), cu_seqlens, max_seqlen,
                                                      cache, last_tokens_only=not all_logits))

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: (B,) new tokens at (B,) positions -> (B, V) logits; appends to the cache."""
        return self.lm_logits(self.run_blocks_decode(self.embed(token_ids, positions), positions, cache))

    @torch.no_grad()
    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits of every position of each sequence (for checks against other implementations, perplexity)."""
        batch = pack_prompts(sequences, self.device)
        cache = self.new_kv_cache(len(sequences), batch.max_seqlen)
        out = self.prefill(batch.token_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen, cache,
                           all_logits=True)
        return list(out.split(batch.lengths))


_NUMPY_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32, torch.bool: np.bool_}


class DeviceColumns:
    """Named 1-D device tensors of fixed lengths and dtypes, all views of ONE byte buffer, so that filling every
    one of them from the host is a single host-to-device copy (`load`). Why: a profiled generate() call on the
    H200 machine (bs1, 512 -> 1) spent its first ~0.8 ms before the prefill on the host: eight small copies from
    Python ~35 us apart, then clones, zero-fills and copies into the captured graphs' input buffers. A captured
    graph keeps one DeviceColumns as its static inputs, so a call loads them in place (no device-side copies).
    With kernels/finish_step.py (H200, GPT-345M, fp16, data/bench/host_overhead_ab.csv): bs1 128 -> 8 5.25 ->
    4.25 ms, 512 -> 32 16.5 -> 14.9 ms, bs64 512 -> 32 104.2 -> 100.3 ms."""

    def __init__(self, device, pinned_staging: bool = False, **spec):  # name=(length, torch dtype)
        """pinned_staging (for columns loaded again and again, a captured graph's inputs): `load` fills one pinned
        host buffer kept with the columns and copies it asynchronously (a pageable copy synchronises, and costs
        the host 0.2-0.3 ms at batch 64 on the H200 machine)."""
        self.spec, self.offsets, nbytes = {}, {}, 0
        for name, (length, dtype) in spec.items():
            if dtype not in _NUMPY_DTYPES:
                raise TypeError(f"DeviceColumns: column {name!r} has dtype {dtype}; supported: {list(_NUMPY_DTYPES)}")
            size = int(length) * torch.empty((), dtype=dtype).element_size()
            self.spec[name], self.offsets[name] = (int(length), dtype), (nbytes, size)
            nbytes += -(-size // 8) * 8  # every part 8-byte aligned
        self.nbytes = nbytes
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.views = {name: self.buffer[o:o + size].view(self.spec[name][1]) for name, (o, size) in self.offsets.items()}
        self.staging = None  # (pinned host tensor, its columns as numpy views, event of its last copy)
        if pinned_staging and self.buffer.is_cuda:
            pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.staging = (pinned, self._host_parts(pinned.numpy()), torch.cuda.Event())

    def _host_parts(self, host: np.ndarray) -> dict[str, np.ndarray]:
        """Each column's numpy view of a host byte buffer laid out like `buffer`."""
        return {name: host[o:o + size].view(_NUMPY_DTYPES[self.spec[name][1]])
                for name, (o, size) in self.offsets.items()}

    def load(self, **values) -> dict[str, torch.Tensor]:
        """Every column from host values (lists, numpy arrays; a scalar fills its column) in one copy: the views.
        The staging buffer's column views are made once, and lists go into them without an array of their own: on
        the H200 machine's host a call's 8 request columns took ~120 us to load with a view, np.ndim and
        np.asarray per column (bs1 512 -> 32, perf_counter marks; 14 -> 2.4 us on our CPU)."""
        if values.keys() != self.spec.keys():
            raise KeyError(f"DeviceColumns.load: got columns {sorted(values)}, expected {sorted(self.spec)}")
        if self.staging is not None:
            pinned, parts, copied = self.staging
            copied.synchronize()  # the previous load's copy has left the staging buffer
        else:
            host = np.empty(self.nbytes, dtype=np.uint8)
            parts = self._host_parts(host)
        for name, value in values.items():
            part = parts[name]
            if isinstance(value, np.ndarray) and value.ndim:
                size = value.size
                value = value.reshape(-1)
            elif isinstance(value, (list, tuple)):
                size = len(value)
                if size and value.count(value[0]) == size:  # one value for every entry (a batch sharing its
                    value = value[0]  # parameters): a fill, not a conversion of the list
            else:  # a scalar fills the column
                size = part.size
            if size != part.size:
                raise ValueError(f"DeviceColumns.load: column {name!r} has {size} values, expected {part.size}")
            part[...] = value
        if self.staging is not None:
            self.buffer.copy_(pinned, non_blocking=True)
            copied.record(torch.cuda.current_stream(self.buffer.device))
        else:
            self.buffer.copy_(torch.from_numpy(host))
        return self.views

    @classmethod
    def like(cls, device, columns: dict, pinned_staging: bool = False) -> "DeviceColumns":
        """Columns shaped for host data given as name=(values, torch dtype)."""
        return cls(device, pinned_staging,
                   **{name: (int(np.size(values)), dtype) for name, (values, dtype) in columns.items()})

    def load_columns(self, columns: dict) -> dict[str, torch.Tensor]:
        """load() from name=(values, torch dtype)."""
        return self.load(**{name: values for name, (values, _) in columns.items()})


def host_to_device(device, **columns) -> dict[str, torch.Tensor]:
    """name=(values, torch dtype) host data (lists, numpy arrays) -> {name: 1-D tensor on `device`}, in ONE
    host-to-device copy (DeviceColumns, allocated for this call)."""
    return DeviceColumns.like(device, columns).load_columns(columns)


@dataclass
class PackedPrompts:
    token_ids: torch.Tensor  # (T,) all prompts back to back
    positions: torch.Tensor  # (T,) 0..len_b-1 within each prompt
    cu_seqlens: torch.Tensor  # (B+1,) int32 prompt boundaries
    lengths: list[int]
    max_seqlen: int
    lengths_device: torch.Tensor | None = None  # (B,) int32, the same as `lengths` (do not modify: clone it)


@dataclass
class HostPrompts:
    """Prompts packed back to back on the host (numpy), ready for one copy to the device (`columns`)."""
    token_ids: np.ndarray  # (T,) int64, every prompt back to back
    positions: np.ndarray  # (T,) int64: 0..len_b-1 within each prompt
    cu_seqlens: np.ndarray  # (B+1,) int64 prompt boundaries
    lengths: list[int]

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1])

    def columns(self) -> dict:
        """name=(values, dtype) for DeviceColumns / host_to_device."""
        return dict(token_ids=(self.token_ids, torch.int64), positions=(self.positions, torch.int64),
                    cu_seqlens=(self.cu_seqlens, torch.int32), lengths=(self.lengths, torch.int32))

    def to_device(self, device) -> PackedPrompts:
        """The prompts in one copy to fresh device tensors."""
        return self.on_device(host_to_device(device, **self.columns()))

    def on_device(self, moved: dict[str, torch.Tensor]) -> PackedPrompts:
        """The PackedPrompts viewing device columns loaded from `columns()`."""
        return PackedPrompts(token_ids=moved["token_ids"], positions=moved["positions"],
                             cu_seqlens=moved["cu_seqlens"], lengths=self.lengths, max_seqlen=self.max_seqlen,
                             lengths_device=moved["lengths"])


@functools.lru_cache(maxsize=16)
def _uniform_layout(batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """positions and cu_seqlens of `batch` prompts of `length` tokens (read-only: shared by every call of that
    shape)."""
    positions = np.tile(np.arange(length, dtype=np.int64), batch)
    cu = np.arange(0, (batch + 1) * length, length, dtype=np.int64)
    positions.flags.writeable = cu.flags.writeable = False
    return positions, cu


def pack_prompts_host(prompts: list[list[int]] | list[np.ndarray]) -> HostPrompts:
    """Prompts (lists of ints or integer arrays) back to back, built with numpy (64 prompts of 512 tokens: ~1.5 ms
    of host time on our 2-core CPU instead of ~8 with Python lists). Prompts of one length take their positions
    and boundaries from a cache per shape (bs1 512 tokens on the H200 machine's host: ~50 us of numpy calls)."""
    lengths = [len(p) for p in prompts]
    if all(isinstance(p, np.ndarray) for p in prompts):  # generate()'s checked prompts
        token_ids = np.concatenate(prompts, dtype=np.int64)
    else:
        token_ids = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=sum(lengths))
    if min(lengths) == max(lengths):  # a (B, T) batch
        positions, cu = _uniform_layout(len(prompts), lengths[0])
    else:
        cu = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)  # 0..len_b-1 within each prompt
    return HostPrompts(token_ids, positions, cu, lengths)


def pack_prompts(prompts: list[list[int]] | list[np.ndarray], device) -> PackedPrompts:
    """pack_prompts_host, moved to the device in one copy (with the boundaries and lengths)."""
    return pack_prompts_host(prompts).to_device(device)
