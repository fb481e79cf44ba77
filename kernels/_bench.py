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
