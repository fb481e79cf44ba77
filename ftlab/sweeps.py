"""Parameter sweeps: what top-k / top-p / temperature do to the tokens a model samples, and what tensor_para_size
changes (memory per GPU, numerics).

    sampling_sweep(model, contexts, top_ks, top_ps)      next-token distributions after FasterTransformer's top-k /
                                                         top-p filter (the sampling kernel's torch reference): kept
                                                         tokens, kept probability mass, entropy, P(greedy token)
    generation_sweep(model, prompt, configs, seeds=...)  one batched generate() with per-request parameters: how
                                                         diverse and how likely each configuration's continuations are
    tensor_parallel_sweep(tps, ...)                      each tensor_para_size on T ranks (torchrun): weights per
                                                         rank, logits against T=1, greedy tokens equal or not
    plot_sampling_sweep(rows, path)                      heatmaps over top_k x top_p

Latency against tensor_para_size is measured on GPUs by `ftlab bench --tensor-para-size` (data/bench/scaling.csv);
on a CPU the ranks run over gloo, where time says nothing about GPUs, so the sweep reports no speed.
`ftlab sweep` runs the first two from the command line; the notebook 06-sweeps tells the story.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .checkpoint import resolve_model_dir, tensor_specs
from .config import GPTConfig
from .generate import generate
from .kernels.sampling import kept_distribution_reference


def _last_logits(model, contexts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return [seq_logits[-1].float().cpu() for seq_logits in model.logits([list(c) for c in contexts])]


def sampling_sweep(model, contexts: Sequence[Sequence[int]], top_ks: Sequence[int], top_ps: Sequence[float],
                   temperature: float = 1.0) -> list[dict]:
    """One row per (top_k, top_p), averaged over the next-token distributions after each context:
    kept_tokens (how many tokens the sampler may return), kept_mass (their probability under the model at this
    temperature), entropy_nats (of the renormalised distribution the sampler draws from), greedy_prob (the chance
    it returns the argmax). FT's conventions: top_k 1 is greedy, 0 no limit; top_p 1.0 no limit."""
    if not contexts:
        raise ValueError("sampling_sweep needs at least one context")
    rows_logits = _last_logits(model, contexts)
    rows = []
    for k in top_ks:
        for p in top_ps:
            stats = []
            for logits in rows_logits:
                full = torch.softmax(logits.double() / float(temperature), 0)
                kept = kept_distribution_reference(logits, k, p, temperature)  # float64 (V,)
                mask = kept > 0
                nz = kept[mask]
                stats.append((mask.sum().item(), full[mask].sum().item(), -(nz * nz.log()).sum().item(),
                              kept[torch.argmax(logits)].item()))
            n = len(stats)
            rows.append(dict(top_k=int(k), top_p=float(p), temperature=float(temperature),
                             kept_tokens=sum(s[0] for s in stats) / n, kept_mass=sum(s[1] for s in stats) / n,
                             entropy_nats=sum(s[2] for s in stats) / n, greedy_prob=sum(s[3] for s in stats) / n))
    return rows


def _distinct(sequences: list[list[int]], n: int) -> float:
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generation_sweep(model, prompt: Sequence[int], configs: Sequence[dict], *, seeds: int = 4,
                     max_new_tokens: int = 16, tokenizer=None) -> list[dict]:
    """Continue `prompt` with every configuration (dicts of generate() parameters: top_k, top_p, temperature, ...)
    under `seeds` seeds each, all in ONE batched generate() call. One row per configuration: distinct_1/distinct_2
    (unique n-grams over all n-grams of its continuations: 1/seeds when every seed gives the same text),
    unique_continuations, mean_log_prob (per generated token, as reported by the sampler), and the first
    continuation (decoded when a tokenizer is given)."""
    if seeds < 1 or not configs:
        raise ValueError("generation_sweep needs at least one configuration and seeds >= 1")
    knobs = {"top_k": 1, "top_p": 1.0, "temperature": 1.0}  # generate()'s defaults
    for config in configs:
        unknown = set(config) - set(knobs)
        if unknown:
            raise ValueError(f"generation_sweep: configuration {config} has {sorted(unknown)}; it sweeps "
                             f"{', '.join(knobs)} only")
    cells = [{**knobs, **c} for c in configs]
    requests = [(c, s) for c in cells for s in range(seeds)]
    result = generate(model, [list(prompt)] * len(requests), max_new_tokens=max_new_tokens, return_log_probs=True,
                      random_seed=[s for _, s in requests],
                      **{name: [c[name] for c, _ in requests] for name in knobs})
    rows = []
    for i, cell in enumerate(cells):
        span = range(i * seeds, (i + 1) * seeds)
        outs = [result.generated_ids(b) for b in span]
        log_probs = [lp for b in span for lp in result.output_log_probs[b]]
        rows.append(dict(**cell, seeds=seeds, distinct_1=_distinct(outs, 1), distinct_2=_distinct(outs, 2),
                         unique_continuations=len({tuple(o) for o in outs}),
                         mean_log_prob=sum(log_probs) / max(1, len(log_probs)),
                         first_continuation=tokenizer.decode(outs[0]) if tokenizer is not None else outs[0]))
    return rows


def weight_bytes_per_rank(config: GPTConfig, tp: int, elem_bytes: int = 2) -> int:
    """Bytes of weights each of tp ranks holds (split tensors divided, the rest replicated), embeddings included."""
    return sum(math.prod(spec.shard_shape(tp)) for spec in tensor_specs(config)) * elem_bytes


def tensor_parallel_sweep(tps: Sequence[int], prompts: Sequence[Sequence[int]], *,
                          model_dirs: Mapping[int, str | Path] | None = None, config: GPTConfig | None = None,
                          random_seed: int = 0, dtype: str = "fp32", max_new_tokens: int = 8,
                          timeout_s: float = 600.0) -> list[dict]:
    """Run the same prompts at each tensor_para_size T on T ranks (ftlab.parallel.run_workers: torchrun; NCCL on
    GPUs, gloo on a CPU), with model_dirs[T] (a c-model directory split for T, e.g. by `ftlab convert
    --infer-gpu-num T`) or random weights of `config`. One row per T: weight MB per rank (fp16), the largest
    relative error of its logits against the first T's, whether its greedy tokens equal those, and the wall time
    of the run (start-up included)."""
    from .parallel import run_workers

    if (model_dirs is None) == (config is None):
        raise ValueError("tensor_parallel_sweep: pass either model_dirs (one per tensor_para_size) or config")
    missing = [tp for tp in tps if model_dirs is not None and tp not in model_dirs]
    if missing:
        raise ValueError(f"tensor_parallel_sweep: no c-model directory for tensor_para_size {missing}")
    jobs = [{"logits": [list(p) for p in prompts]},
            {"generate": dict(prompts=[list(p) for p in prompts], max_new_tokens=max_new_tokens, top_k=1)}]
    rows, base = [], None
    for tp in tps:
        model_dir = None if model_dirs is None else model_dirs[tp]
        shape = config if model_dir is None else GPTConfig.from_ini(resolve_model_dir(model_dir) / "config.ini")
        start = time.perf_counter()
        logits, greedy = run_workers(model_dir, jobs, tensor_para_size=tp, dtype=dtype,
                                     config=config if model_dir is None else None, random_seed=random_seed,
                                     timeout_s=timeout_s)
        wall = time.perf_counter() - start
        if base is None:
            base = (logits, greedy.output_ids)
        err = max(((got.double() - ref.double()).norm() / ref.double().norm()).item()
                  for got, ref in zip(logits, base[0]))
        rows.append(dict(tensor_para_size=tp, weight_mb_per_rank=weight_bytes_per_rank(shape, tp) / 2**20,
                         logits_rel_err=err, greedy_equal=greedy.output_ids == base[1], wall_s=wall))
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_sampling_sweep(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Heatmaps over top_k x top_p of the tokens kept (log scale) and the entropy sampled from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    ks = sorted({r["top_k"] for r in rows}, key=lambda k: (k == 0, k))  # 0 (no limit) last
    ps = sorted({r["top_p"] for r in rows})
    cell = {(r["top_k"], r["top_p"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, norm in ((axes[0], "kept_tokens", "tokens the sampler may return", LogNorm()),
                                 (axes[1], "entropy_nats", "entropy sampled from (nats)", None)):
        grid = [[cell[(k, p)][key] for p in ps] for k in ks]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                        color="black" if image.norm(v) > 0.6 else "white")  # readable on the bright cells
        ax.set_xticks(range(len(ps)), [f"{p:g}" for p in ps])
        ax.set_yticks(range(len(ks)), ["none" if k == 0 else str(k) for k in ks])
        ax.set_xlabel("top_p")
        ax.set_ylabel("top_k")
        ax.set_title(label)
        fig.colorbar(image, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
