"""Where a captured decode step's time goes on the GPU, kernel by kernel, as the graph actually runs it.

`ftlab bench --profile-decode` times every kernel of an eager step; inside the CUDA graph the kernels overlap (PDL
launches each GEMV and decode attention before its predecessor ends) and small ones cost more than their own
duration (the gap before them). So this profiles graph replays (CUPTI sees the kernels inside a graph) and charges
each kernel what it ADDS to the step: how far it moves the latest end seen so far, and separately the idle gap
just before it; those sum to the step's GPU span. Block kernels are labelled by their slot in the block (the
kernels between the embedding and the LM head repeat with one period per layer), the others by name. Two more
numbers per step: the time between the step's events as `bench.decode_step_ms` measures it (host launch latency
included), and the time per step of replays issued back to back without a host synchronisation.
`ftlab bench --timeline-decode` prints the table and appends its rows to data/bench/decode_timeline.csv
(CSV_COLUMNS); `python -m ftlab.plots timeline` draws them.

`ftlab bench --timeline-prefill` does the same for the captured context phase of prompts of 512 tokens
(prefill_timeline; rows in data/bench/prefill_timeline.csv, `context` = the prompt's length): there the blocks'
GEMMs are cuBLAS's, so the table shows which cuBLAS kernel each one got and what ran between them (a profile of
that phase led to FC1's rows going to cuBLAS in two calls, kernels/linear.py linear_gelu_cublas).
"""
from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench import open_decode_session, random_prompts, timed_steps
from .model import GPT, pack_prompts_host
from .tokenizer import DATA_DIR

DEFAULT_CSV = DATA_DIR / "bench" / "decode_timeline.csv"
PREFILL_CSV = DATA_DIR / "bench" / "prefill_timeline.csv"

_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")


def short_name(name: str) -> str:
    """A kernel's name without templates / argument lists, and Triton's `_kernel` suffix dropped."""
    name = name.split("<")[0].split("(")[0].strip()
    for prefix in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(prefix, "")
    return name[:48]


def _gpu_events(prof) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every kernel / copy / memset of a finished torch.profiler run, in start order."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), short_name(e["name"]))
              for e in trace.get("traceEvents", []) if e.get("cat") in _KINDS and e.get("ph") == "X"]
    return sorted(events)


def label_step(names: list[str], period: int | None) -> list[str]:
    """Labels for one step's kernels: `block k/P: name` for the layers' kernels (k = slot within the block's P
    kernels), the plain name for the others. The blocks are the longest stretch that repeats with `period`."""
    labels = list(names)
    if not period:
        return labels
    n = len(names)
    best = (0, 0)  # (length, start) of the longest run with names[i] == names[i + period]
    i = 0
    while i + period < n:
        j = i
        while j + period < n and names[j] == names[j + period]:
            j += 1
        if j - i > best[0]:
            best = (j - i, i)
        i = j + 1
    length, start = best
    layers = (length + period) // period
    for i in range(start, start + layers * period):
        labels[i] = f"block {(i - start) % period}/{period}: {names[i]}"
    return labels


def step_table(steps: list[list[tuple[float, float, str]]], period: int | None) -> tuple[list[dict], float]:
    """Per label, per step on average: calls, mean duration, the idle time just before its calls (`gap_us`: the
    GPU ran nothing of this step) and the time its calls add beyond that (`added_us`); and the mean GPU span.
    Gaps plus additions sum to the span."""
    added, durations, gaps, calls = defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(int)
    spans = []
    for events in steps:
        labels = label_step([name for _, _, name in events], period)
        first = events[0][0]
        latest = first
        per_step = defaultdict(float)
        for (start, end, _), label in zip(events, labels):
            gaps[label].append(max(0.0, start - latest))
            per_step[label] += max(0.0, end - max(start, latest))
            latest = max(latest, end)
            durations[label].append(end - start)
            calls[label] += 1
        spans.append(latest - first)
        for label, value in per_step.items():
            added[label].append(value)
    rows = [dict(label=label, calls=calls[label] / len(steps), mean_us=statistics.mean(durations[label]),
                 added_us=statistics.mean(added[label]), gap_us=sum(gaps[label]) / len(steps)) for label in added]
    rows.sort(key=lambda r: -r["added_us"] - r["gap_us"])
    return rows, statistics.mean(spans)


def _period(names: list[str], markers: tuple[str, ...] = ("decode_attention", "decode_partition")) -> int | None:
    """Kernels per block: the distance between the first two kernels named with one of `markers` (the block's
    attention; None without two of them)."""
    where = [i for i, n in enumerate(names) if any(m in n for m in markers)]
    return where[1] - where[0] if len(where) > 1 else None


@dataclass
class Timeline:
    """decode_timeline's result: per-label rows (step_table) and the step's totals, all in us."""
    batch: int
    context: int
    events_per_step: int
    rows: list[dict]
    span_us: float  # GPU span of a step under the profiler
    event_us: float  # between the step's events without the profiler, one host synchronisation per step
    back_to_back_us: float  # per step, replays issued back to back
    phase: str = "step"  # what one replay is: "step" (decode_timeline) or "prefill" (prefill_timeline)

    def text(self) -> str:
        p = self.phase
        lines = [f"batch {self.batch}, context {self.context}, {self.events_per_step} GPU events per {p}; GPU span "
                 f"{self.span_us:.1f} us under the profiler; without it {self.event_us:.1f} us between the {p}'s "
                 f"events (synchronised per {p}), {self.back_to_back_us:.1f} us per {p} back to back",
                 f"{'kernel (block slot/kernels per block)':<58} {'calls':>5} {'mean us':>8} {'gap us':>7} "
                 f"{'adds us':>8} {'share':>6}"]
        busy = self.span_us - sum(r["gap_us"] for r in self.rows)
        for r in self.rows:
            lines.append(f"{r['label'][:58]:<58} {r['calls']:>5.0f} {r['mean_us']:>8.2f} {r['gap_us']:>7.1f} "
                         f"{r['added_us']:>8.1f} {r['added_us'] / busy:>6.1%}")
        lines.append(f"(share: of the {busy:.1f} us the GPU was busy with the {p}; the gaps are mostly the "
                     f"profiler's own launch latency)")
        return "\n".join(lines)

    def csv_rows(self, **common) -> list[dict]:
        """One row per label (CSV_COLUMNS), `common` (gpu, date, versions, config, dtype, variant, sampling) first."""
        return [dict(common, bs=self.batch, context=self.context, label=r["label"], calls=r["calls"],
                     mean_us=round(r["mean_us"], 3), gap_us=round(r["gap_us"], 3), added_us=round(r["added_us"], 3),
                     span_us=round(self.span_us, 2), event_us=round(self.event_us, 2),
                     back_to_back_us=round(self.back_to_back_us, 2)) for r in self.rows]


CSV_COLUMNS = ["gpu", "date", "torch", "triton", "config", "dtype", "variant", "sampling", "bs", "context", "label",
               "calls", "mean_us", "gap_us", "added_us", "span_us", "event_us", "back_to_back_us"]


@torch.no_grad()
def decode_timeline(model: GPT, *, batch: int = 1, context: int = 512, steps: int = 10, **sampling) -> Timeline:
    """Profile `steps` replays of the captured decode step (each followed by a host synchronisation, as
    bench.decode_step_ms times them) and account for them as the module docstring says."""
    session, tokens = open_decode_session(model, batch=batch, context=context, max_steps=3 * steps + 16,
                                          **sampling)
    event_ms, tokens = timed_steps(session, tokens, steps)
    last = [tokens]  # each replay feeds the tokens of the one before

    def replay():
        last[0] = session.next(last[0])[0]

    back_to_back_ms = _back_to_back_ms(replay, steps)
    per, rows, span = _profiled_replays(replay, steps, ("decode_attention", "decode_partition"))
    return Timeline(batch=batch, context=context, events_per_step=per, rows=rows, span_us=span,
                    event_us=1e3 * statistics.median(event_ms), back_to_back_us=1e3 * back_to_back_ms)


def _back_to_back_ms(replay, n: int) -> float:
    """ms per call of `replay` over `n` calls issued back to back (CUDA events, one synchronisation at the end)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / n


def _profiled_replays(replay, n: int, markers: tuple[str, ...]) -> tuple[int, list[dict], float]:
    """Profile `n` calls of `replay` (one CUDA-graph replay each), a host synchronisation after each: (GPU events
    per replay, step_table's rows and mean span). Every replay must show the profiler the same number of events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
            torch.cuda.synchronize()
    events = _gpu_events(prof)
    if not events or len(events) % n:
        raise RuntimeError(f"the profiler saw {len(events)} GPU events in {n} replays (not a whole number per "
                           f"replay: CUPTI may not report kernels inside CUDA graphs here)")
    per = len(events) // n
    replays = [events[i * per:(i + 1) * per] for i in range(n)]
    rows, span = step_table(replays, _period([name for _, _, name in replays[0]], markers))
    return per, rows, span


@torch.no_grad()
def prefill_timeline(model: GPT, *, batch: int = 1, context: int = 512, replays: int = 10) -> Timeline:
    """The captured context phase of `batch` random prompts of `context` tokens (DecodeGraph.launch_prefill: the
    prompts' copy to the device, the blocks, the last tokens' logits), profiled like decode_timeline: `replays`
    replays, each followed by a host synchronisation, timed without the profiler too."""
    from .generate import _graph_for, generate

    if model.device.type != "cuda":
        raise RuntimeError(f"prefill_timeline profiles CUDA graphs: the model is on {model.device}, not a GPU")
    prompts = random_prompts(batch, context, model.config.vocab_size, seed=1)
    for _ in range(3):  # a packed shape's second call captures its prefill graph; the third replays it
        generate(model, prompts, max_new_tokens=2)
    host = pack_prompts_host(list(prompts))
    graph = _graph_for(model, host, 2, None, True)  # the decode graph (and its prefill) those calls ran on

    def replay():
        graph.launch_prefill(host)

    event_ms = [_back_to_back_ms(replay, 1) for _ in range(replays)]  # one replay at a time, synchronised
    back_to_back_ms = _back_to_back_ms(replay, replays)
    per, rows, span = _profiled_replays(replay, replays, ("context_attention",))
    return Timeline(batch=batch, context=context, events_per_step=per, rows=rows, span_us=span,
                    event_us=1e3 * statistics.median(event_ms), back_to_back_us=1e3 * back_to_back_ms,
                    phase="prefill")
