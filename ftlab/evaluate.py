"""Language-model evaluation: perplexity over a token stream in non-overlapping windows."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def perplexity(logits_fn, token_ids: list[int], window: int = 512, batch_windows: int = 8) -> Perplexity:
    """Cut token_ids into non-overlapping windows of `window` tokens (the last may be shorter), predict every token
    after the first of each window. logits_fn(list of sequences) -> list of (T, V) logits: GPT.logits, or anything
    computing the same (an HF model wrapped likewise), so two implementations are scored on identical windows."""
    windows = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError(f"need at least 2 tokens to score, got {len(token_ids)}")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_windows):
        chunk = windows[start:start + batch_windows]
        for seq, logits in zip(chunk, logits_fn(chunk)):
            logp = torch.log_softmax(logits[:-1].float(), dim=-1)
            targets = torch.tensor(seq[1:], device=logp.device)
            total -= logp.gather(1, targets[:, None]).sum().item()
            count += len(seq) - 1
    return Perplexity(nll=total / count, tokens=count)
