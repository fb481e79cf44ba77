"""A plain-PyTorch GPT over the same FT weights and the same static KV-cache layout as ftlab.model.

Two jobs: an oracle twin independent of the Triton kernels, and the strongest plain-PyTorch peer for `ftlab bench`
(gpt-fast style: static cache buffers, a decode step torch.compile'd with mode="reduce-overhead").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import LM_HEAD, layer_prefix
from .config import GPTConfig, compute_dtype


class _Buffers(torch.nn.Module):
    """Tensors registered as buffers: torch.compile treats them as static (no copies into CUDA graphs), and the KV
    cache may be mutated in place inside a captured graph, as gpt-fast keeps it."""

    def __init__(self, **tensors):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


class ReferenceGPT(torch.nn.Module):
    def __init__(self, config: GPTConfig, ft: dict[str, torch.Tensor], *, dtype="fp32", device="cpu"):
        super().__init__()
        self.config = config
        dtype = compute_dtype(dtype)
        H = config.hidden

        def get(name):
            return ft[name].to(device=device, dtype=dtype)

        self.emb = _Buffers(wte=get("model.wte"), wpe=get("model.wpe"), lnf_w=get("model.final_layernorm.weight"),
                            lnf_b=get("model.final_layernorm.bias"))
        self.untied_head = _Buffers(weight=get(LM_HEAD)) if LM_HEAD in ft else None
        blocks = []
        for i in range(config.num_layer):
            p = layer_prefix(i)
            blocks.append(_Buffers(
                ln1_w=get(p + "input_layernorm.weight"), ln1_b=get(p + "input_layernorm.bias"),
                qkv_w=get(p + "attention.query_key_value.weight").reshape(H, 3 * H).t().contiguous(),
                qkv_b=get(p + "attention.query_key_value.bias").reshape(3 * H),
                out_w=get(p + "attention.dense.weight").t().contiguous(), out_b=get(p + "attention.dense.bias"),
                ln2_w=get(p + "post_attention_layernorm.weight"), ln2_b=get(p + "post_attention_layernorm.bias"),
                fc1_w=get(p + "mlp.dense_h_to_4h.weight").t().contiguous(), fc1_b=get(p + "mlp.dense_h_to_4h.bias"),
                fc2_w=get(p + "mlp.dense_4h_to_h.weight").t().contiguous(), fc2_b=get(p + "mlp.dense_4h_to_h.bias"),
            ))
        self.blocks = torch.nn.ModuleList(blocks)
        self.cache = None
        self.dtype, self.device = dtype, torch.device(device)

    def setup_cache(self, batch_size: int, capacity: int) -> None:
        """Static KV-cache buffers (L, B, nh, capacity, hs), written in place by prefill and decode."""
        c = self.config
        shape = (c.num_layer, batch_size, c.head_num, capacity, c.size_per_head)
        self.cache = _Buffers(k=torch.zeros(shape, dtype=self.dtype, device=self.device),
                              v=torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _ln(self, x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, self.config.layernorm_eps)

    def _blocks(self, x, positions, mask):
        """x (B, T, H) at positions (B, T); writes k/v at those positions; mask (B, 1, T, S) True = attend."""
        B, T, H = x.shape
        nh, hs = self.config.head_num, self.config.size_per_head
        batch_index = torch.arange(B, device=x.device)[:, None].expand(B, T)
        k_cache, v_cache = self.cache.k, self.cache.v
        for i, blk in enumerate(self.blocks):
            qkv = F.linear(self._ln(x, blk.ln1_w, blk.ln1_b), blk.qkv_w, blk.qkv_b).view(B, T, 3, nh, hs)
            q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
            k_cache[i][batch_index, :, positions] = qkv[:, :, 1]
            v_cache[i][batch_index, :, positions] = qkv[:, :, 2]
            att = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=mask, scale=1 / math.sqrt(hs))
            x = x + F.linear(att.transpose(1, 2).reshape(B, T, H), blk.out_w, blk.out_b)
            h = F.gelu(F.linear(self._ln(x, blk.ln2_w, blk.ln2_b), blk.fc1_w, blk.fc1_b), approximate="tanh")
            x = x + F.linear(h, blk.fc2_w, blk.fc2_b)
        return x

    def _logits(self, x):
        head = self.untied_head.weight if self.untied_head is not None else self.emb.wte
        return F.linear(self._ln(x, self.emb.lnf_w, self.emb.lnf_b), head)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts (B, T) with lengths (B,) -> logits of every position (B, T, V)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        keys = torch.arange(self.cache.k.shape[3], device=input_ids.device)
        # query t attends keys s <= t of its own prompt (padding rows attend something harmless: themselves)
        mask = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < lengths[:, None, None])
        mask = mask | (keys[None, None, :] == positions[:, :, None])
        x = self.emb.wte[input_ids] + self.emb.wpe[positions]
        return self._logits(self._blocks(x, positions, mask[:, None]))

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B,) tokens at (B,) positions -> (B, V) logits; static shapes, so it compiles into one CUDA graph."""
        keys = torch.arange(self.cache.k.shape[3], device=token_ids.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, S)
        x = (self.emb.wte[token_ids] + self.emb.wpe[positions])[:, None]  # (B, 1, H)
        return self._logits(self._blocks(x, positions[:, None], mask))[:, 0]


@torch.no_grad()
def reference_greedy(model: ReferenceGPT, prompts: list[list[int]], max_new_tokens: int, decode_fn=None,
                     end_id: int | None = None) -> list[list[int]]:
    """Greedy generation with the reference model (decode_fn: e.g. a torch.compile'd model.decode)."""
    decode_fn = decode_fn or model.decode
    B, T = len(prompts), max(len(p) for p in prompts)
    dev = model.device
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=dev)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    model.setup_cache(B, T + max_new_tokens)
    logits = model.prefill(ids, lengths)[torch.arange(B, device=dev), lengths - 1]
    positions = lengths.clone()
    out = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t == end_id
        if all(done) or step == max_new_tokens - 1:
            break
        logits = decode_fn(tokens, positions)
        positions = positions + 1
    return out
