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


class ReferenceGPT(torch.nn.Module):
    def __init__(self, config: GPTConfig, ft: dict[str, torch.Tensor], *, dtype="fp32", device="cpu"):
        super().__init__()
        self.config = config
        dtype = compute_dtype(dtype)
        H = config.hidden

        def get(name):
            return ft[name].to(device=device, dtype=dtype)

        self.wte, self.wpe = get("model.wte"), get("model.wpe")
        self.lm_head = get(LM_HEAD) if LM_HEAD in ft else self.wte
        self.lnf = (get("model.final_layernorm.weight"), get("model.final_layernorm.bias"))
        self.blocks = []
        for i in range(config.num_layer):
            p = layer_prefix(i)
            self.blocks.append(dict(
                ln1=(get(p + "input_layernorm.weight"), get(p + "input_layernorm.bias")),
                qkv_w=get(p + "attention.query_key_value.weight").reshape(H, 3 * H).t().contiguous(),
                qkv_b=get(p + "attention.query_key_value.bias").reshape(3 * H),
                out_w=get(p + "attention.dense.weight").t().contiguous(), out_b=get(p + "attention.dense.bias"),
                ln2=(get(p + "post_attention_layernorm.weight"), get(p + "post_attention_layernorm.bias")),
                fc1_w=get(p + "mlp.dense_h_to_4h.weight").t().contiguous(), fc1_b=get(p + "mlp.dense_h_to_4h.bias"),
                fc2_w=get(p + "mlp.dense_4h_to_h.weight").t().contiguous(), fc2_b=get(p + "mlp.dense_4h_to_h.bias"),
            ))
        self.dtype, self.device = dtype, torch.device(device)

    def new_kv_cache(self, batch_size: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.num_layer, batch_size, c.head_num, capacity, c.size_per_head)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _ln(self, x, wb):
        return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], self.config.layernorm_eps)

    def _blocks(self, x, positions, k_cache, v_cache, mask):
        """x (B, T, H) at positions (B, T); writes k/v at those positions; mask (B, 1, T, S) True = attend."""
        B, T, H = x.shape
        nh, hs = self.config.head_num, self.config.size_per_head
        batch_index = torch.arange(B, device=x.device)[:, None].expand(B, T)
        for i, blk in enumerate(self.blocks):
            qkv = F.linear(self._ln(x, blk["ln1"]), blk["qkv_w"], blk["qkv_b"]).view(B, T, 3, nh, hs)
            q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
            k_cache[i][batch_index, :, positions] = qkv[:, :, 1]
            v_cache[i][batch_index, :, positions] = qkv[:, :, 2]
            att = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=mask, scale=1 / math.sqrt(hs))
            x = x + F.linear(att.transpose(1, 2).reshape(B, T, H), blk["out_w"], blk["out_b"])
            h = F.gelu(F.linear(self._ln(x, blk["ln2"]), blk["fc1_w"], blk["fc1_b"]), approximate="tanh")
            x = x + F.linear(h, blk["fc2_w"], blk["fc2_b"])
        return x

    def _logits(self, x):
        return F.linear(self._ln(x, self.lnf), self.lm_head)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, k_cache, v_cache) -> torch.Tensor:
        """Right-padded prompts (B, T) with lengths (B,) -> logits of every position (B, T, V)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        S = k_cache.shape[3]
        keys = torch.arange(S, device=input_ids.device)
        # query t attends keys s <= t of its own prompt (padding rows attend something harmless: themselves)
        mask = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < lengths[:, None, None])
        mask = mask | (keys[None, None, :] == positions[:, :, None])
        x = self.wte[input_ids] + self.wpe[positions]
        return self._logits(self._blocks(x, positions, k_cache, v_cache, mask[:, None]))

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, k_cache, v_cache) -> torch.Tensor:
        """(B,) tokens at (B,) positions -> (B, V) logits; static shapes, so it compiles into one CUDA graph."""
        keys = torch.arange(k_cache.shape[3], device=token_ids.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, S)
        x = (self.wte[token_ids] + self.wpe[positions])[:, None]  # (B, 1, H)
        return self._logits(self._blocks(x, positions[:, None], k_cache, v_cache, mask))[:, 0]


@torch.no_grad()
def reference_greedy(model: ReferenceGPT, prompts: list[list[int]], max_new_tokens: int, decode_fn=None,
                     end_id: int | None = None) -> list[list[int]]:
    """Greedy generation with the reference model (decode_fn: e.g. a torch.compile'd model.decode)."""
    decode_fn = decode_fn or model.decode
    B, T = len(prompts), max(len(p) for p in prompts)
    dev = model.device
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=dev)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    k_cache, v_cache = model.new_kv_cache(B, T + max_new_tokens)
    logits = model.prefill(ids, lengths, k_cache, v_cache)[torch.arange(B, device=dev), lengths - 1]
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
        logits = decode_fn(tokens, positions, k_cache, v_cache)
        positions = positions + 1
    return out
