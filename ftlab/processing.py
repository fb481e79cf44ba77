"""Per-request logits processing between the LM head and the sampler, all on the device (no host sync per token):
repetition / presence penalties and min_length (the Triton kernel in ftlab.kernels.penalties), bad words (banned
continuations) and stop words (finish a request once its sequence ends with one).

Word lists follow FasterTransformer: per request, a list of words, each a list of token ids; FT's packed
[batch, 2, L] layout (row 0 the flattened ids, row 1 the cumulative end offsets, -1 padded) converts with
`words_from_ft_layout`. A bad word of one token is always banned; a longer one bans its last token whenever the
sequence ends with its other tokens (HF's NoBadWordsLogitsProcessor). Matching looks at prompt + generated tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .kernels.penalties import apply_penalties

Words = list[list[list[int]]]  # per request: words, each a list of token ids


def words_from_ft_layout(packed) -> Words:
    """FT's [batch, 2, L] word list -> per-request lists of words."""
    packed = torch.as_tensor(packed)
    if packed.dim() != 3 or packed.shape[1] != 2:
        raise ValueError(f"a FasterTransformer word list must have shape [batch, 2, L], got {tuple(packed.shape)}")
    out = []
    for b, (ids, offsets) in enumerate(packed.tolist()):
        words, start = [], 0
        for end in offsets:
            if end < 0:
                break
            if not start < end <= len(ids):
                raise ValueError(f"word list of request {b}: offset {end} after {start} is not increasing within "
                                 f"[1, {len(ids)}]")
            words.append(ids[start:end])
            start = end
        out.append(words)
    return out


def normalize_words(name: str, value, batch_size: int, vocab_size: int) -> Words | None:
    """None, FT's [batch, 2, L] layout, or one list of words per request -> validated per-request words."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        value = words_from_ft_layout(value)
    if not isinstance(value, (list, tuple)) or len(value) != batch_size:
        raise ValueError(f"{name} must give one list of words per request ({batch_size}), or FT's [batch, 2, L] "
                         f"layout; got {type(value).__name__}"
                         + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
    out = []
    for b, words in enumerate(value):
        if not isinstance(words, (list, tuple)):
            raise ValueError(f"{name}[{b}] must be a list of words (lists of token ids), got {type(words).__name__}")
        checked = []
        for w, word in enumerate(words):
            if not isinstance(word, (list, tuple)) or not word:
                raise ValueError(f"{name}[{b}][{w}] must be a non-empty list of token ids, got {word!r}")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in word):
                raise ValueError(f"{name}[{b}][{w}] = {list(word)} has ids outside the vocabulary [0, {vocab_size})")
            checked.append([int(t) for t in word])
        out.append(checked)
    return out if any(out) else None


def _right_aligned(words: Words, device) -> torch.Tensor:
    """(B, W, L) int64: each word's ids at the end of its row, -1 before them and for missing words."""
    width = max((len(ws) for ws in words), default=0)
    length = max((len(w) for ws in words for w in ws), default=1)
    table = torch.full((len(words), max(width, 1), length), -1, dtype=torch.int64)
    for b, ws in enumerate(words):
        for i, w in enumerate(ws):
            table[b, i, length - len(w):] = torch.tensor(w)
    return table.to(device)


def _penalised(repetition_penalty: list[float], presence_penalty: list[float]) -> bool:
    return any(p != 1.0 for p in repetition_penalty) or any(q != 0.0 for q in presence_penalty)


class LogitsProcessor:
    """Device state of one batch: token counts (penalties) and the last few tokens (word matching)."""

    def __init__(self, prompts: Sequence[Sequence[int]], vocab_size: int, device, *, repetition_penalty, presence_penalty,
                 min_length, end_id, bad_words: Words | None, stop_words: Words | None):
        B = len(prompts)
        self.repetition = torch.tensor(repetition_penalty, dtype=torch.float32, device=device)
        self.presence = torch.tensor(presence_penalty, dtype=torch.float32, device=device)
        self.min_length = torch.tensor(min_length, dtype=torch.int32, device=device)
        self.end_id = torch.tensor(end_id, dtype=torch.int64, device=device)
        self.counts = None
        if _penalised(repetition_penalty, presence_penalty):
            self.counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
            for b, prompt in enumerate(prompts):
                ids = torch.tensor(prompt, dtype=torch.int64, device=device)
                self.counts[b].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.bad = _right_aligned(bad_words, device) if bad_words else None
        self.stop = _right_aligned(stop_words, device) if stop_words else None
        span = max(self.bad.shape[2] - 1 if self.bad is not None else 0, self.stop.shape[2] if self.stop is not None else 0)
        self.history = None
        if span:
            # the last `span` tokens of each sequence; -2 before its start (never equal to an id or to padding -1)
            rows = [([-2] * span + list(p))[-span:] for p in prompts]
            self.history = torch.tensor(rows, dtype=torch.int64, device=device)

    @classmethod
    def build(cls, prompts, vocab_size, device, params) -> "LogitsProcessor | None":
        active = (_penalised(params.repetition_penalty, params.presence_penalty)
                  or any(m > 0 for m in params.min_length) or params.bad_words or params.stop_words)
        if not active:
            return None
        return cls(prompts, vocab_size, device, repetition_penalty=params.repetition_penalty,
                   presence_penalty=params.presence_penalty, min_length=params.min_length, end_id=params.end_id,
                   bad_words=params.bad_words, stop_words=params.stop_words)

    def process(self, logits: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) fp32 logits with penalties, min_length and bad words applied."""
        out = apply_penalties(logits, self.counts, self.repetition, self.presence, self.min_length, steps, self.end_id)
        if self.bad is not None:
            prefix, last = self.bad[:, :, :-1], self.bad[:, :, -1]  # (B, W, L-1), (B, W)
            hist = self.history[:, self.history.shape[1] - prefix.shape[2]:][:, None, :] if prefix.shape[2] else None
            match = last >= 0
            if hist is not None:
                match = match & ((prefix < 0) | (prefix == hist)).all(-1)
            banned = torch.zeros_like(out, dtype=torch.int32).scatter_add_(1, last.clamp_min(0), match.int())
            out = out.masked_fill(banned > 0, float("-inf"))
        return out

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow a beam reorder: row i takes the state of row rows[i]."""
        if self.counts is not None:
            self.counts = self.counts[rows]
        if self.history is not None:
            self.history = self.history[rows]
        for name in ("repetition", "presence", "min_length", "end_id"):
            setattr(self, name, getattr(self, name)[rows])
        if self.bad is not None:
            self.bad = self.bad[rows]
        if self.stop is not None:
            self.stop = self.stop[rows]

    def observe(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Account for each request's new token; returns (B,) True where the sequence now ends with a stop word."""
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))
        if self.history is None:
            return None
        self.history = torch.cat([self.history[:, 1:], tokens[:, None]], dim=1)
        if self.stop is None:
            return None
        L = self.stop.shape[2]
        tail = self.history[:, self.history.shape[1] - L:][:, None, :]  # (B, 1, L)
        word_present = (self.stop >= 0).any(-1)
        return (((self.stop < 0) | (self.stop == tail)).all(-1) & word_present).any(-1)
