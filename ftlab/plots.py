"""Plots of `ftlab bench` results: latency against tensor parallelism, with FasterTransformer's published anchor,
and the single-GPU grid against the baselines measured in the same run.

    python -m ftlab.plots scaling data/bench/scaling.csv data/bench/scaling.png
    python -m ftlab.plots grid data/bench/bench.csv data/bench/grid.png
    python -m ftlab.plots timeline data/bench/decode_timeline.csv data/bench/decode_timeline.png
    python -m ftlab.plots power data/bench/prefill_power.csv data/bench/prefill_power.png

Reads the bench CSV (columns: ftlab.bench.COLUMNS); only end-to-end rows (cell "e2e") are plotted. When a CSV holds
several measurements of one point (same GPU, dtype, config, cell, T and L), the last row in the file wins: the newest
run. matplotlib is imported inside the plotting function, so ftlab imports without it.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .gpu_clocks import SW_POWER_CAP

REQUIRED_COLUMNS = ("gpu", "date", "dtype", "config", "tp", "pp", "cell", "bs", "n_in", "n_out", "ftlab_ms")


@dataclass(frozen=True)
class Anchor:
    """A published latency series to draw as a reference: ms by tensor_para_size for one config and cell."""
    config: str  # the bench's config label it belongs to, e.g. "gpt-20b"
    bs: int
    n_in: int
    n_out: int
    ms_by_tp: dict
    label: str


# FasterTransformer's GPT-20B (48 heads x 128, 44 layers) fp16 end-to-end latency, batch 1, 20 -> 8 tokens, on A100s
FT_20B_A100 = Anchor(config="gpt-20b", bs=1, n_in=20, n_out=8, ms_by_tp={1: 225.0, 2: 147.0, 4: 102.0, 8: 89.0},
                     label="FasterTransformer (published), GPT-20B bs1 20->8, A100")


@dataclass(frozen=True)
class Point:
    gpu: str
    date: str
    dtype: str
    config: str
    bs: int
    n_in: int
    n_out: int
    tp: int
    pp: int
    ftlab_ms: float
    ftlab_spread: float | None

    @property
    def cell(self) -> str:
        return f"bs{self.bs} {self.n_in}->{self.n_out}"


def read_points(csv_path: str | Path) -> list[Point]:
    """The CSV's e2e rows, one per (gpu, dtype, config, bs, n_in, n_out, tp, pp): the last such row of the file."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: not an `ftlab bench` CSV: missing column(s) {missing} (has "
                             f"{reader.fieldnames or 'no header'}; needs {list(REQUIRED_COLUMNS)})")
        latest = {}
        for line, row in enumerate(reader, start=2):
            if row["cell"] != "e2e":
                continue
            try:
                spread = row.get("ftlab_spread")
                point = Point(gpu=row["gpu"], date=row["date"], dtype=row["dtype"], config=row["config"],
                              bs=int(row["bs"]), n_in=int(row["n_in"]), n_out=int(row["n_out"]), tp=int(row["tp"]),
                              pp=int(row["pp"]), ftlab_ms=float(row["ftlab_ms"]),
                              ftlab_spread=float(spread) if spread not in (None, "") else None)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path}:{line}: unreadable bench row ({exc})") from None
            key = (point.gpu, point.dtype, point.config, point.bs, point.n_in, point.n_out, point.tp, point.pp)
            latest.pop(key, None)  # re-insert: dict order then follows the file's last occurrences
            latest[key] = point
    if not latest:
        raise ValueError(f"{csv_path}: no end-to-end rows (cell 'e2e') to plot")
    return list(latest.values())


def latency_table(csv_path: str | Path, *, anchor: Anchor | None = FT_20B_A100) -> list[dict]:
    """The plotted data as rows (for notebooks: e.g. pandas.DataFrame(latency_table(path))), sorted by config,
    GPU, dtype, cell, L, T. speedup: over T=1, L=1 of the same config/GPU/dtype/cell when measured; anchor_ms: the
    anchor's latency at this T when the row is the anchor's config and cell with L=1."""
    points = read_points(csv_path)
    base = {(p.gpu, p.dtype, p.config, p.bs, p.n_in, p.n_out): p.ftlab_ms for p in points if p.tp == 1 and p.pp == 1}
    rows = []
    for p in sorted(points, key=lambda p: (p.config, p.gpu, p.dtype, p.bs, p.n_in, p.n_out, p.pp, p.tp)):
        single = base.get((p.gpu, p.dtype, p.config, p.bs, p.n_in, p.n_out))
        on_anchor = (anchor is not None and p.pp == 1 and (p.config, p.bs, p.n_in, p.n_out) ==
                     (anchor.config, anchor.bs, anchor.n_in, anchor.n_out))
        rows.append(dict(config=p.config, gpu=p.gpu, dtype=p.dtype, date=p.date, bs=p.bs, n_in=p.n_in,
                         n_out=p.n_out, tp=p.tp, pp=p.pp, gpus=p.tp * p.pp, ftlab_ms=p.ftlab_ms,
                         ftlab_spread=p.ftlab_spread, speedup=single / p.ftlab_ms if single else None,
                         anchor_ms=anchor.ms_by_tp.get(p.tp) if on_anchor else None))
    return rows


def _summary(values) -> str:
    values = sorted(set(values))
    return ", ".join(values) if len(values) <= 3 else f"{values[0]} .. {values[-1]}"


def _save(fig, png_path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def plot_scaling(csv_path: str | Path, png_path: str | Path, *, anchor: Anchor | None = FT_20B_A100) -> Path:
    """One panel per model config: ftlab's end-to-end latency (ms, log scale) against tensor_para_size T (log2
    axis), one line per (bs, n_in->n_out) cell over the rows with layer_para_size L = 1. Rows with L > 1 are
    separate hollow squares in their cell's colour, labelled "TxL", placed at their GPU count T*L (where T alone
    would put T=1 x L=2 on top of the single-GPU point; this way it stands beside T=2, the other use of 2 GPUs).
    `anchor` (default: FasterTransformer's published GPT-20B A100 numbers) is a dashed line on its config's panel.
    GPU and dtype join the line labels when the CSV mixes several. Returns png_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    points = read_points(csv_path)
    configs = sorted({p.config for p in points}, key=lambda c: min(i for i, p in enumerate(points) if p.config == c))
    several_gpus = len({p.gpu for p in points}) > 1
    several_dtypes = len({p.dtype for p in points}) > 1

    def line_label(p: Point) -> str:
        extra = [x for x, show in ((p.gpu, several_gpus), (p.dtype, several_dtypes)) if show]
        return p.cell + (f" ({', '.join(extra)})" if extra else "")

    fig, axes = plt.subplots(1, len(configs), figsize=(6.2 * len(configs), 4.8), dpi=120, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, config in zip(axes[0], configs):
        mine = [p for p in points if p.config == config]
        series: dict[tuple, list[Point]] = {}
        for p in mine:
            series.setdefault((p.gpu, p.dtype, p.bs, p.n_in, p.n_out), []).append(p)
        tps = {1, 2, 4, 8}
        for i, key in enumerate(sorted(series)):  # (gpu, dtype, bs, n_in, n_out)
            color = colors[i % len(colors)]
            flat = sorted((p for p in series[key] if p.pp == 1), key=lambda p: p.tp)
            piped = [p for p in series[key] if p.pp > 1]
            label = line_label(series[key][0])
            if flat:
                ax.plot([p.tp for p in flat], [p.ftlab_ms for p in flat], "o-", color=color, lw=1.6, ms=5,
                        label=label)
            for k, p in enumerate(piped):  # same colour as the cell's line; the annotation says T and L
                ax.plot([p.tp * p.pp], [p.ftlab_ms], "s", mfc="none", mec=color, mew=1.5, ms=8,
                        label=None if flat or k else f"{label}, L > 1")
                ax.annotate(f"T{p.tp}xL{p.pp}", (p.tp * p.pp, p.ftlab_ms), textcoords="offset points", xytext=(7, -3),
                            fontsize=7, color=color)
            tps |= {p.tp * p.pp for p in series[key]}
        if any(p.pp > 1 for p in mine):
            ax.plot([], [], "s", mfc="none", mec="gray", mew=1.5, ms=8, label="T x L > 1: layer-parallel, at T*L")
        if anchor is not None and anchor.config == config:
            xs = sorted(anchor.ms_by_tp)
            ax.plot(xs, [anchor.ms_by_tp[x] for x in xs], "x--", color="black", lw=1.2, ms=6, label=anchor.label)
            tps |= set(xs)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(tps))
        ax.set_xticklabels([str(t) for t in sorted(tps)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tensor_para_size T = GPUs (squares: T x L GPUs)")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title(config)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"ftlab end-to-end latency vs tensor parallelism\n{_summary(p.gpu for p in points)}, "
                 f"{_summary(p.dtype for p in points)}, measured {_summary(p.date for p in points)}", fontsize=10)
    return _save(fig, png_path)


GRID_SERIES = (("ftlab_ms", "ftlab"), ("peer_ms", "torch.compile peer"), ("hf_ms", "HF eager generate"),
               ("floor_ms", "physical floor"))


def _csv_rows(csv_path: str | Path, required, kind: str) -> list[dict]:
    """Every row of a small CSV, after checking that its header has the `required` columns (else a ValueError
    naming the file, what it should be and what is missing)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: not a {kind} CSV, missing columns {missing}")
        return list(reader)


def grid_rows(csv_path: str | Path, *, config: str = "gpt-345m", dtype: str = "fp16") -> list[dict]:
    """The single-GPU greedy end-to-end rows of one config and dtype (T = L = 1), sorted by batch and lengths: per
    (gpu, dtype, bs, n_in, n_out) the newest ftlab and floor values, and for each baseline (peer, HF) its newest
    measured value, since `ftlab bench --no-peer --no-hf` runs re-measure ftlab alone; `date` is the ftlab row's and
    `baseline_date` the newest baseline row's. Values as floats (None where a baseline was never measured)."""
    latest, baselines = {}, {}
    for row in _csv_rows(csv_path, REQUIRED_COLUMNS + tuple(k for k, _ in GRID_SERIES), "bench"):
        greedy = row.get("sampling") in (None, "", "greedy")  # rows written before the column were greedy
        if (row["cell"] == "e2e" and row["tp"] == "1" and row["pp"] == "1" and row["config"] == config and greedy
                and row["dtype"] == dtype):
            key = (row["gpu"], row["dtype"], int(row["bs"]), int(row["n_in"]), int(row["n_out"]))
            latest[key] = row
            for k in ("peer_ms", "hf_ms"):
                if row[k] not in ("", None):
                    baselines.setdefault(key, {})[k] = (float(row[k]), row["date"])
    if not latest:
        raise ValueError(f"{csv_path}: no single-GPU e2e rows of config {config!r} in {dtype}")
    out = []
    for key, row in sorted(latest.items(), key=lambda kv: kv[0][2:]):
        gpu, dtype, bs, n_in, n_out = key
        measured = baselines.get(key, {})
        values = {k: float(row[k]) if row[k] not in ("", None) else None for k in ("ftlab_ms", "floor_ms")}
        values.update({k: measured[k][0] if k in measured else None for k in ("peer_ms", "hf_ms")})
        out.append(dict(gpu=gpu, dtype=dtype, date=row["date"], bs=bs, n_in=n_in, n_out=n_out, **values,
                        baseline_date=max((d for _, d in measured.values()), default=None)))
    return out


def plot_grid(csv_path: str | Path, png_path: str | Path, *, config: str = "gpt-345m", dtype: str = "fp16") -> Path:
    """FasterTransformer's single-GPU grid as grouped bars: for each (bs, n_in->n_out) cell, ftlab, the
    torch.compile peer, HF eager generate and the physical floor (ms, log scale), from grid_rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = grid_rows(csv_path, config=config, dtype=dtype)
    fig, ax = plt.subplots(figsize=(10, 4.6), dpi=120)
    width = 0.2
    for i, (key, label) in enumerate(GRID_SERIES):
        xs = [j + (i - 1.5) * width for j, r in enumerate(rows) if r[key] is not None]
        ax.bar(xs, [r[key] for r in rows if r[key] is not None], width, label=label,
               color=None if key != "floor_ms" else "lightgray", edgecolor="black" if key == "floor_ms" else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"bs{r['bs']}\n{r['n_in']}->{r['n_out']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("end-to-end latency (ms, log scale)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{config}: {_summary(r['gpu'] for r in rows)}, {_summary(r['dtype'] for r in rows)}, "
                 f"ftlab measured {_summary(r['date'] for r in rows)}, baselines "
                 f"{_summary(r['baseline_date'] for r in rows if r['baseline_date'])}", fontsize=10)
    return _save(fig, png_path)


SAMPLING_MODES = ("greedy", "top_k=40", "top_k=40+top_p=0.9", "temperature", "top_p=0.9")


def sampling_rows(csv_path: str | Path) -> list[dict]:
    """The sampling micro-benchmark's rows (`python -m ftlab.kernels.sampling`: B, mode, sampler, split, us) of
    the default split and of the pass sampler, as {B, mode, passes_us, candidates_us}, ordered by batch and mode."""
    table: dict = {}
    for row in _csv_rows(csv_path, ("B", "mode", "sampler", "split", "us"), "sampling benchmark"):
        if row["sampler"] in ("passes", "candidates") and row["split"] in ("", "default"):
            table.setdefault((int(row["B"]), row["mode"]), {})[f"{row['sampler']}_us"] = float(row["us"])
    rank = {m: i for i, m in enumerate(SAMPLING_MODES)}
    out = [dict(B=B, mode=mode, **times) for (B, mode), times in table.items() if len(times) == 2]
    if not out:
        raise ValueError(f"{csv_path}: no row has both the pass and the candidate sampler's time")
    return sorted(out, key=lambda r: (r["B"], rank.get(r["mode"], len(rank)), r["mode"]))


def plot_sampling(csv_path: str | Path, png_path: str | Path) -> Path:
    """Per-call sampling time (us, log scale) of the pass sampler and the candidate sampler, per batch and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sampling_rows(csv_path)
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), dpi=120, sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, B in zip(axes, batches):
        mine = [r for r in rows if r["B"] == B]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["passes_us"] for r in mine], 0.4, label="pass sampler")
        ax.bar([x + 0.2 for x in xs], [r["candidates_us"] for r in mine], 0.4, label="candidate sampler")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["mode"].replace("+", "\n+") for r in mine], rotation=30, fontsize=7, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"batch {B}", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("GPU time per call (us, log scale)")
    axes[0].legend(fontsize=8)
    return _save(fig, png_path)


def power_rows(csv_path: str | Path) -> list[dict]:
    """nvidia-smi samples (data/bench/prefill_power.csv: timestamp, sm_clock_mhz, power_w, throttle_reasons) as
    {t_s (seconds since the first sample), sm_clock_mhz, power_w, power_capped}, in time order."""
    rows = _csv_rows(csv_path, ("timestamp", "sm_clock_mhz", "power_w", "throttle_reasons"), "clock and power")
    if not rows:
        raise ValueError(f"{csv_path}: no samples")
    times = [datetime.strptime(r["timestamp"], "%Y/%m/%d %H:%M:%S.%f") for r in rows]
    start = min(times)
    return [dict(t_s=(t - start).total_seconds(), sm_clock_mhz=float(r["sm_clock_mhz"]),
                 power_w=float(r["power_w"]), power_capped=bool(int(r["throttle_reasons"], 16) & SW_POWER_CAP))
            for t, r in sorted(zip(times, rows), key=lambda tr: tr[0])]


def plot_power(csv_path: str | Path, png_path: str | Path) -> Path:
    """SM clock and power over time from nvidia-smi samples, the samples under the power cap shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = power_rows(csv_path)
    t = [r["t_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.plot(t, [r["sm_clock_mhz"] for r in rows], color="tab:blue", label="SM clock")
    ax.set_xlabel("seconds")
    ax.set_ylabel("SM clock (MHz)", color="tab:blue")
    power = ax.twinx()
    power.plot(t, [r["power_w"] for r in rows], color="tab:red", label="power")
    power.set_ylabel("power (W)", color="tab:red")
    for r, t_next in zip(rows, t[1:] + t[-1:]):
        if r["power_capped"]:
            ax.axvspan(r["t_s"], t_next, color="0.85", lw=0)
    ax.set_title("nvidia-smi while the GPU ran (grey: driver reports the power cap)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, png_path)


# the five kernels of a decode block at batch <= 4 (GPT._block), by their slot in the timeline's labels
_DECODE_BLOCK_SLOTS = {"block 0/5": "QKV GEMV", "block 1/5": "decode attention", "block 2/5": "out-proj GEMV",
                       "block 3/5": "FC1 GEMV", "block 4/5": "FC2 GEMV"}


def timeline_name(label: str) -> str:
    """A readable name for a label of ftlab.timeline: the block slot's role at batch <= 4, the GEMV outside the
    blocks is the LM head, other kernels keep their names."""
    slot = label.partition(": ")[0]
    if slot in _DECODE_BLOCK_SLOTS:
        return _DECODE_BLOCK_SLOTS[slot]
    if label in ("_gemv_kernel", "_gemv_rows_kernel"):
        return "LM head GEMV"
    return label


def timeline_rows(csv_path: str | Path, *, bs: int = 1, sampling: str = "greedy") -> dict[str, dict[str, float]]:
    """{variant ("default" for none; other dtypes than fp16 named after it): {readable kernel name: us it adds per
    step}} from `ftlab bench --timeline-decode` rows (data/bench/decode_timeline.csv) of one batch size and
    sampling; the newest run of a variant wins."""
    runs: dict = {}
    required = ("variant", "sampling", "bs", "label", "added_us", "date", "event_us")
    for row in _csv_rows(csv_path, required, "decode timeline"):
        if int(row["bs"]) == bs and row["sampling"] == sampling:
            variant = row["variant"] or "default"
            if row.get("dtype", "fp16") not in ("", "fp16"):
                variant += f" ({row['dtype']})"
            key = (variant, row["date"], row["event_us"])  # one run of one variant
            runs.setdefault(key, {})[timeline_name(row["label"])] = float(row["added_us"])
    if not runs:
        raise ValueError(f"{csv_path}: no timeline rows for batch {bs}, sampling {sampling!r}")
    latest: dict = {}
    for (variant, _, _), kernels in runs.items():  # file order: a later run of a variant replaces the earlier
        latest[variant] = kernels
    return latest


def plot_timeline(csv_path: str | Path, png_path: str | Path, *, bs: int = 1, sampling: str = "greedy") -> Path:
    """What each kernel adds to a captured decode step (us per step, summed over the layers), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = timeline_rows(csv_path, bs=bs, sampling=sampling)
    names = sorted({n for kernels in variants.values() for n in kernels},
                   key=lambda n: -max(kernels.get(n, 0.0) for kernels in variants.values()))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5), dpi=120)
    height = 0.8 / len(variants)
    for i, (variant, kernels) in enumerate(variants.items()):
        ys = [y + (i - (len(variants) - 1) / 2) * height for y in range(len(names))]
        total = sum(kernels.values())
        ax.barh(ys, [kernels.get(n, 0.0) for n in names], height, label=f"{variant}: {total:.0f} us busy")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("us added to one decode step (all layers)")
    ax.set_title(f"Decode step at batch {bs}, context 512, {sampling}: what each kernel adds", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, png_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlab.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="plot", required=True)
    scaling = sub.add_parser("scaling", help="latency vs tensor_para_size from a bench CSV")
    scaling.add_argument("csv", type=Path, help="bench CSV (e.g. data/bench/parallel.csv)")
    scaling.add_argument("png", type=Path, help="PNG to write")
    scaling.add_argument("--no-anchor", action="store_true", help="leave out FasterTransformer's published line")
    grid = sub.add_parser("grid", help="single-GPU grid: ftlab vs peer vs HF vs floor from a bench CSV")
    grid.add_argument("csv", type=Path, help="bench CSV (e.g. data/bench/bench.csv)")
    grid.add_argument("png", type=Path, help="PNG to write")
    grid.add_argument("--config", default="gpt-345m", help="the bench's config label")
    grid.add_argument("--dtype", default="fp16", help="the rows' dtype (fp16, bf16, fp32)")
    sampling = sub.add_parser("sampling", help="pass vs candidate sampler per batch and mode")
    sampling.add_argument("csv", type=Path, help="sampling benchmark CSV (e.g. data/bench/sampling_bench.csv)")
    sampling.add_argument("png", type=Path, help="PNG to write")
    timeline = sub.add_parser("timeline", help="what each kernel adds to a decode step, per variant")
    timeline.add_argument("csv", type=Path, help="timeline CSV (e.g. data/bench/decode_timeline.csv)")
    timeline.add_argument("png", type=Path, help="PNG to write")
    timeline.add_argument("--bs", type=int, default=1, help="batch size")
    power = sub.add_parser("power", help="SM clock and power over time from nvidia-smi samples")
    power.add_argument("csv", type=Path, help="samples CSV (e.g. data/bench/prefill_power.csv)")
    power.add_argument("png", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        if args.plot == "power":
            out = plot_power(args.csv, args.png)
        elif args.plot == "timeline":
            out = plot_timeline(args.csv, args.png, bs=args.bs)
        elif args.plot == "grid":
            out = plot_grid(args.csv, args.png, config=args.config, dtype=args.dtype)
        elif args.plot == "sampling":
            out = plot_sampling(args.csv, args.png)
        else:
            out = plot_scaling(args.csv, args.png, anchor=None if args.no_anchor else FT_20B_A100)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ftlab.plots: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
