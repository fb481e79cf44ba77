"""Beam search (FasterTransformer's beam_width > 1), with HF transformers' semantics so results can be compared:

- every step, each live beam's log-softmax (after the logits processors) is added to its running score and the best
  2 * beam_width continuations over (beams x vocabulary) are kept;
- a continuation that produces end_id, or reaches max_new_tokens, is a finished hypothesis scored
  sum_log_probs / generated_length ** len_penalty; only the best beam_width of the 2 * beam_width candidates may
  become finished ones, and the request keeps its best beam_width finished hypotheses;
- the best beam_width unfinished continuations go on (their KV-cache rows are reordered to follow them);
- a request is done when no running beam can still beat its worst kept hypothesis (HF's early_stopping=False
  heuristic: the best running score normalised by the current length) or nothing can continue.
beam_search_diversity_rate (FT) subtracts rate * rank from the j-th best continuation of each beam before the
beams compete (diverse beams); 0 turns it off. Beams run on the non-graph path; the cache reorder copies rows.
Under ftlab.parallel every rank runs the same search: tensor-parallel ranks hold the same logits, and with
layer parallelism the last stage picks the continuations and broadcasts them (PipelineBeamModel).
"""
from __future__ import annotations

import torch

from .generate import GenerationError, GenerationOutput, RequestParams, validate_prompts
from .kernels.beam_topk import topk
from .model import pack_prompts
from .processing import LogitsProcessor

MAX_BEAM_WIDTH = 64


@torch.no_grad()
def beam_search(model, prompts, *, max_new_tokens: int, beam_width: int, len_penalty: float = 1.0,
                beam_search_diversity_rate: float = 0.0, **params) -> GenerationOutput:
    """Returns the best hypothesis of every request in output_ids (prompt + generated), with every kept hypothesis
    in `beams` / `beam_scores` / `beam_log_probs` (summed log-probabilities) and cum_log_probs the best
    hypothesis' summed log-probability."""
    cfg = model.config
    if hasattr(model, "open_session"):  # ftlab.parallel's engine: every rank runs this same search
        model = model.beam_model()
    # a pipeline's stages: logits on the last one only, which shares its choices (GPT: it has the logits already)
    share = getattr(model, "share", None)
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise GenerationError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {beam_width!r}")
    if 2 * beam_width > cfg.vocab_size:
        raise GenerationError(f"beam_width={beam_width} needs 2*beam_width <= vocab_size={cfg.vocab_size}")
    sampling = {k: params[k] for k in ("top_k", "top_p", "temperature", "random_seed") if k in params}
    if any(v not in (None, 1, 1.0, 0) for k, v in sampling.items() if k != "random_seed"):
        raise GenerationError(f"beam search is deterministic: top_k/top_p/temperature ({sampling}) do not apply")
    prompts = validate_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_pos_seq_len)
    B, K, dev = len(prompts), beam_width, model.device
    end_id = cfg.end_id if params.get("end_id") is None else params["end_id"]
    if not isinstance(end_id, int):
        raise GenerationError("beam search takes one end_id for the whole batch")
    request = RequestParams.build(B * K, cfg.vocab_size, dev, end_id=end_id,
                                  **{k: _per_beam(v, B, K) for k, v in params.items()
                                     if k not in ("end_id", "top_k", "top_p", "temperature", "random_seed")})
    beam_prompts = [p for p in prompts for _ in range(K)]
    processor = LogitsProcessor.build(beam_prompts, cfg.vocab_size, dev, request)

    # context phase once per request, then copy its cache rows to its K beams
    batch = pack_prompts(prompts, dev)
    capacity = max(batch.lengths) + max_new_tokens
    cache = model.new_kv_cache(B * K, capacity)
    prompt_cache = model.new_kv_cache(B, capacity)
    logits = model.prefill(batch.token_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen, prompt_cache)
    rows = torch.arange(B, device=dev).repeat_interleave(K)
    cache.k.copy_(prompt_cache.k[:, rows])
    cache.v.copy_(prompt_cache.v[:, rows])
    del prompt_cache
    logits = logits[rows] if logits is not None else None  # (B*K, V)
    positions = batch.lengths_device.repeat_interleave(K)
    steps = torch.zeros(B * K, dtype=torch.int32, device=dev)

    running = torch.zeros(B, K, device=dev)
    running[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step 0
    histories = [[[] for _ in range(K)] for _ in range(B)]  # generated tokens of each running beam
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(B)]  # (score, tokens, sum log-prob)
    done = [False] * B
    V = cfg.vocab_size
    for step in range(max_new_tokens):
        top_scores = top_index = None
        if logits is not None:
            if processor is not None:
                logits = processor.process(logits, steps)
            top_scores, top_index = _best_continuations(logits, running, 2 * K, beam_search_diversity_rate)
        if share is not None:
            top_scores, top_index = share(top_scores, top_index, (B, 2 * K))
        top_beam, top_token = top_index // V, top_index % V
        last = step == max_new_tokens - 1
        host_scores, host_beam, host_token = top_scores.tolist(), top_beam.tolist(), top_token.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            length = step + 1
            for rank in range(2 * K):
                token, beam, score = host_token[b][rank], host_beam[b][rank], host_scores[b][rank]
                ends = token == end_id or last
                if ends:
                    if rank < K and not done[b]:
                        _keep(finished[b], score / length ** len_penalty, histories[b][beam] + [token], score, K)
                elif len(next_rows) < (b + 1) * K:
                    next_rows.append(b * K + beam)
                    next_tokens.append(token)
                    next_scores.append(score)
            while len(next_rows) < (b + 1) * K:  # nothing can continue (only at the last step)
                next_rows.append(b * K)
                next_tokens.append(end_id)
                next_scores.append(-1e9)
        new_histories = [[histories[r // K][r % K] + [t] for r, t in zip(next_rows[b * K:(b + 1) * K],
                                                                         next_tokens[b * K:(b + 1) * K])]
                         for b in range(B)]
        running = torch.tensor(next_scores, device=dev).view(B, K)
        for b in range(B):  # HF's early_stopping=False heuristic, evaluated at the new length
            best_running = running[b, 0].item() / (step + 1) ** len_penalty
            if len(finished[b]) == K and best_running <= min(f[0] for f in finished[b]):
                done[b] = True
        histories = new_histories
        if last or all(done):
            break
        row_index = torch.tensor(next_rows, device=dev)
        cache.k.copy_(cache.k[:, row_index])
        cache.v.copy_(cache.v[:, row_index])
        tokens = torch.tensor(next_tokens, device=dev)
        if processor is not None:
            processor.reorder(row_index)
            processor.observe(tokens)
        steps += 1
        logits = model.decode(tokens, positions, cache)
        positions += 1
    outputs, scores, cum, all_beams, beam_log_probs = [], [], [], [], []
    for b, prompt in enumerate(prompts):
        hyps = sorted(finished[b], key=lambda f: -f[0])
        all_beams.append([prompt + h[1] for h in hyps])
        scores.append([h[0] for h in hyps])
        beam_log_probs.append([h[2] for h in hyps])
        outputs.append(prompt + hyps[0][1])
        cum.append(hyps[0][2])
    result = GenerationOutput(output_ids=outputs, sequence_length=[len(o) for o in outputs],
                              input_length=[len(p) for p in prompts], cum_log_probs=cum)
    result.beams, result.beam_scores, result.beam_log_probs = all_beams, scores, beam_log_probs
    return result


def _best_continuations(logits, running, n: int, diversity_rate: float):
    """(B*K, V) logits and (B, K) running scores -> the n best (score, beam * V + token) of each request, (B, n)
    each, best first; equal scores: lowest index first."""
    B, K = running.shape
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
    if diversity_rate:
        # FT's diverse beams: within each beam, the j-th best token pays j * rate. This needs the rank of every
        # token (a full sort), not a top-k, so it stays in torch rather than the beam top-k kernel.
        order = log_probs.argsort(dim=-1, descending=True).argsort(dim=-1)
        log_probs = log_probs - diversity_rate * order.float()
    return topk((log_probs.view(B, K, -1) + running[:, :, None]).view(B, -1), n)


def _keep(hyps: list, score: float, tokens: list[int], log_prob: float, width: int) -> None:
    """Add a finished hypothesis, keeping the best `width` (ties keep the earlier one, like a stable top-k)."""
    if len(hyps) < width or score > min(h[0] for h in hyps):
        hyps.append((score, tokens, log_prob))
        if len(hyps) > width:
            hyps.remove(min(hyps, key=lambda h: h[0]))


def _per_beam(value, B: int, K: int):
    """A per-request parameter expanded to every beam of its request."""
    if isinstance(value, (list, tuple)) and len(value) == B and K > 1:
        return [v for v in value for _ in range(K)]
    return value
