"""Where a generate() call's host time goes: perf_counter marks around its phases, and the garbage collector's pauses.

The device machine's host is several times slower than our CPU at Python work, and whatever the host does before the
prefill is launched, or after the last tokens have been read, adds to the call's latency (the GPU idles meanwhile).
Inside `marked()`, each phase in PHASES (functions of ftlab.generate and ftlab.model, and CUDAGraph.replay) is
wrapped to record when it started and ended, relative to the call's start; `gc.callbacks` records every collection.
`call_marks` reduces `repeats` calls to medians: `<phase> start` (its first call), `<phase> first dur`, `<phase>
total`, `prefill launch` (the first graph replay, or eager GPT.prefill), `last read end` (the last _HostRows.wait
returned), `return`, the garbage collections' count and ms per generation, and `wall` (CUDA events around the call).
`python -m ftlab.host_marks` (GPU): GPT-345M random weights, cells bs1 512 -> 32, bs64 512 -> 32, bs1 128 -> 8; prints
the marks and writes them as JSON (--json). Each wrapper adds its own time to the phases around it (not measured
separately): compare marks taken the same way, not marks with unmarked timings. `--profile` instead times the host's
side op by op (`host_ops`: torch.profiler over a few calls, CUDA runtime calls included; self CPU time per call), and
`--cprofile` function by function (`host_functions`: Python's cProfile, by own time).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import time
import types
from pathlib import Path

import torch

from . import generate as gen
from . import model as mdl

PHASES = [(gen, "_checked_prompts"), (gen, "_open"), (gen, "_launch_early"), (gen.RequestParams, "build"),
          (gen, "pack_prompts_host"),
          (gen.LogitsProcessor, "build"), (gen.LocalSession, "__init__"), (gen, "decode_graph"),
          (gen.DecodeGraph, "load_request"), (gen.DecodeGraph, "first"), (gen.DecodeGraph, "launch_prefill"),
          (gen.DecodeGraph, "first_token"), (gen.PrefillGraph, "run"),
          (mdl.DeviceColumns, "load"), (mdl.GPT, "prefill"), (torch.cuda.CUDAGraph, "replay"),
          (gen._HostRows, "__init__"), (gen._HostRows, "start"), (gen._HostRows, "wait")]


class _Recorder:
    def __init__(self):
        self.t0 = 0.0
        self.marks: list[tuple[str, float, float]] = []  # (phase, start, end) in s from t0
        self.collections: list[tuple[int, float, float]] = []  # (generation, start, end)
        self._gc_start = 0.0

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((info["generation"], self._gc_start - self.t0, time.perf_counter() - self.t0))

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def marked_fn(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks.append((name, start - self.t0, time.perf_counter() - self.t0))
        return marked_fn


@contextlib.contextmanager
def marked():
    """PHASES wrapped (and the collector watched) inside the block; everything restored after it."""
    rec, saved = _Recorder(), []
    for owner, attr in PHASES:
        own = attr in owner.__dict__
        # a classmethod stays one; a method may live on a base class (CUDAGraph's on torch's C++ one)
        raw = owner.__dict__[attr] if own else getattr(owner, attr)
        name = attr if isinstance(owner, types.ModuleType) else f"{owner.__name__}.{attr}"
        if isinstance(raw, classmethod):
            wrapped = classmethod(rec.wrap(raw.__func__, name))
        else:
            wrapped = rec.wrap(raw, name)
        saved.append((owner, attr, raw if own else None))
        setattr(owner, attr, wrapped)
    gc.callbacks.append(rec.on_gc)
    try:
        yield rec
    finally:
        gc.callbacks.remove(rec.on_gc)
        for owner, attr, raw in saved:
            if raw is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, raw)


def _one_call(rec: _Recorder, model, prompts, n_out: int, **params) -> dict[str, float]:
    rec.marks.clear()
    rec.collections.clear()
    cuda = model.device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
    rec.t0 = time.perf_counter()
    if cuda:
        events[0].record()
    result = gen.generate(model, prompts, max_new_tokens=n_out, **params)
    if cuda:
        events[1].record()
    returned = time.perf_counter() - rec.t0
    row: dict[str, float] = {}
    for name, start, end in rec.marks:
        if f"{name} start" not in row:
            row[f"{name} start"], row[f"{name} first dur"] = start * 1e3, (end - start) * 1e3
        row[f"{name} total"] = row.get(f"{name} total", 0.0) + (end - start) * 1e3
    launches = [start for name, start, _ in rec.marks if name in ("CUDAGraph.replay", "GPT.prefill")]
    reads = [end for name, _, end in rec.marks if name == "_HostRows.wait"]
    row["prefill launch"] = min(launches) * 1e3
    row["last read end"] = max(reads) * 1e3
    row["return"] = returned * 1e3
    for g in (0, 1, 2):
        row[f"gc{g} count"] = sum(1 for gg, _, _ in rec.collections if gg == g)
        row[f"gc{g} ms"] = sum(end - start for gg, start, end in rec.collections if gg == g) * 1e3
    if cuda:
        events[1].synchronize()
        row["wall"] = events[0].elapsed_time(events[1])
    del result  # freed outside the marks, as ftlab bench does
    return row


def _calls(model, prompts, n_out: int, n: int, params: dict) -> None:
    """`n` generate() calls, results dropped (warm-ups: graphs captured, kernels compiled)."""
    for _ in range(n):
        gen.generate(model, prompts, max_new_tokens=n_out, **params)


def call_marks(model, prompts, n_out: int, repeats: int = 25, warmup: int = 3, **params) -> dict[str, float]:
    """Medians over `repeats` marked generate() calls (after `warmup` unmarked ones: graphs captured)."""
    _calls(model, prompts, n_out, warmup, params)
    rows = []
    with marked() as rec:
        for _ in range(repeats):
            rows.append(_one_call(rec, model, prompts, n_out, **params))
    keys = {k for row in rows for k in row}
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}


def host_ops(model, prompts, n_out: int, calls: int = 5, warmup: int = 3, row_limit: int = 30, **params) -> str:
    """The host's own time per operator over `calls` generate() calls (after `warmup`), as torch.profiler records
    it: aten ops and, on a GPU, the CUDA runtime calls (cudaGraphLaunch, cudaMemcpyAsync, events...), sorted by self
    CPU time. The profiler slows Python down, so the ranking matters, not the sum."""
    from torch.profiler import ProfilerActivity, profile

    _calls(model, prompts, n_out, warmup, params)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            gen.generate(model, prompts, max_new_tokens=n_out, **params)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def host_functions(model, prompts, n_out: int, calls: int = 20, warmup: int = 3, row_limit: int = 45,
                   **params) -> str:
    """Python's cProfile over `calls` generate() calls (after `warmup`), by each function's own time: where the
    host's Python goes, the waits for the device (_HostRows.wait's event synchronisation) included."""
    import cProfile
    import io
    import pstats

    _calls(model, prompts, n_out, warmup, params)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        result = gen.generate(model, prompts, max_new_tokens=n_out, **params)
        del result  # freed inside the profile, as a caller would
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(row_limit)
    return text.getvalue()


def print_marks(title: str, medians: dict[str, float]) -> None:
    print(f"=== {title}")
    for key in sorted(medians, key=medians.get):
        print(f"  {key:40s} {medians[key]:10.3f}")


def main(argv=None) -> None:
    from .bench import GPT_345M, random_model, random_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the medians here")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the warm-up calls")
    p.add_argument("--profile", action="store_true", help="print the host's time per operator instead of marks")
    p.add_argument("--cprofile", action="store_true", help="print the host's time per Python function instead")
    args = p.parse_args(argv)
    model = random_model(GPT_345M)
    out = {}
    for batch, n_in, n_out in ((1, 512, 32), (64, 512, 32), (1, 128, 8)):
        prompts = random_prompts(batch, n_in, GPT_345M.vocab_size)
        if args.profile:
            print(f"=== bs{batch} {n_in} -> {n_out}: host time per operator over 5 calls\n"
                  + host_ops(model, prompts, n_out), flush=True)
            continue
        if args.cprofile:
            print(f"=== bs{batch} {n_in} -> {n_out}: cProfile of 20 calls, by own time\n"
                  + host_functions(model, prompts, n_out), flush=True)
            continue
        for _ in range(3):
            gen.generate(model, prompts, max_new_tokens=n_out)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        medians = call_marks(model, prompts, n_out, repeats=args.repeats, warmup=0)
        print_marks(f"bs{batch} {n_in} -> {n_out}", medians)
        out[f"{batch}x{n_in}x{n_out}"] = medians
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
