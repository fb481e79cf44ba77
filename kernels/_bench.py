"""Shared by the kernel files' `python -m ftlab.kernels.<name>` micro-benchmarks (never imported at run time)."""
import csv
import os


def save_rows(rows: list[dict], filename: str) -> None:
    """Write benchmark rows as CSV to $OUT/filename when OUT is set (the GPU runner brings $OUT back)."""
    out_dir = os.environ.get("OUT")
    if not out_dir or not rows:
        return
    path = os.path.join(out_dir, filename)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def time_us_rotating(call, inputs: list, rep: int = 20) -> float:
    """Median microseconds of call(input) replayed in a CUDA graph, each captured call taking the next of `inputs`
    (copies totalling more than the L2 cache, so every call streams its data from HBM as a real decode step does;
    the graph removes the host launch overhead that would swamp few-microsecond kernels)."""
    from triton.testing import do_bench_cudagraph

    turn = [0]

    def step():
        turn[0] += 1
        return call(inputs[turn[0] % len(inputs)])

    try:
        return do_bench_cudagraph(step, rep=rep, return_mode="median") * 1e3
    except TypeError:  # a Triton whose do_bench_cudagraph has no return_mode
        return do_bench_cudagraph(step, rep=rep, quantiles=[0.5])[0] * 1e3
