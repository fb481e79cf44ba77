"""Do tensor/layer-parallel splits compute the same model as one GPU? A logits-level check for the GPU.

In fp16/bf16 a split sums the row-parallel GEMMs in another order, so after a near-tie a greedy token may differ:
exact token equality cannot be promised. The honest check compares logits with an fp32 single-GPU reference: a
correct split is as close to it as the single-GPU run of the same dtype is.

    torchrun --nproc-per-node P -m ftlab.parallel_check run (-m DIR/N-gpu | --shape 1.3b) -t T -l L
             --dtypes fp16,bf16 --out-dir DIR
        saves (as DIR/t{T}l{L}-{dtype}.pt) the logits of every position of fixed ragged prompts and the greedy
        tokens of a batch (written by the last stage's lead rank); --shape draws random weights (the same for every
        split, no files);
    python -m ftlab.parallel_check compare REF.pt F.pt ... [--csv OUT.csv]
        per run: relative logits error against REF (max over prompts), argmax agreement with REF, and greedy token
        agreement with the run of the same dtype at T=1, L=1 when it is among the files.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

PROMPT_LENGTHS = (1, 7, 13, 130, 513)
GREEDY_BATCH, GREEDY_IN, GREEDY_OUT = 8, 64, 16


def _prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(model_dir, tensor_para_size: int, layer_para_size: int, dtypes: list[str], out_dir: Path,
        shape: str | None = None) -> None:
    """One engine per dtype in this process (one start-up for all): saves out_dir/t{T}l{L}-{dtype}.pt."""
    import time

    from .generate import generate
    from .parallel import ParallelEngine

    for i, dtype in enumerate(dtypes):
        start = time.perf_counter()
        split = dict(tensor_para_size=tensor_para_size, layer_para_size=layer_para_size, dtype=dtype)
        if shape is not None:
            from .cli import shape_config

            engine = ParallelEngine.random(shape_config(shape), **split)
        else:
            engine = ParallelEngine(model_dir, **split)
        vocab = engine.config.vocab_size
        logits = engine.logits(_prompts(PROMPT_LENGTHS, vocab, seed=1))
        greedy = generate(engine, _prompts([GREEDY_IN] * GREEDY_BATCH, vocab, seed=2), max_new_tokens=GREEDY_OUT)
        if engine.layout.rank == engine.layout.last_stage_lead:
            out = Path(out_dir) / f"t{tensor_para_size}l{layer_para_size}-{dtype}.pt"
            torch.save(dict(tp=tensor_para_size, pp=layer_para_size, dtype=dtype, config=engine.config.model_name,
                            logits=[t.float().cpu() for t in logits], tokens=greedy.output_ids), out)
            print(f"saved {out} ({time.perf_counter() - start:.1f} s)", flush=True)
        engine.close(leave_group=i == len(dtypes) - 1)  # graphs first: see ParallelEngine.close
        del engine, logits


def compare(reference: Path, runs: list[Path]) -> list[dict]:
    ref = torch.load(reference)
    loaded = [torch.load(p) for p in runs]
    single = {r["dtype"]: r for r in loaded if r["tp"] == 1 and r["pp"] == 1}
    rows = []
    for path, r in zip(runs, loaded):
        rel = [((a - b).norm() / b.norm()).item() for a, b in zip(r["logits"], ref["logits"])]
        argmax = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(r["logits"], ref["logits"])]).float()
        row = dict(run=path.name, config=r["config"], dtype=r["dtype"], tp=r["tp"], pp=r["pp"],
                   logits_rel_err_max=max(rel), logits_rel_err_mean=sum(rel) / len(rel),
                   argmax_agree=argmax.mean().item(), positions=argmax.numel())
        base = single.get(r["dtype"])
        if base is not None:
            same = [a == b for a, b in zip(r["tokens"], base["tokens"])]
            tokens = [x == y for a, b in zip(r["tokens"], base["tokens"]) for x, y in zip(a, b)]
            row.update(greedy_seqs_equal_t1=f"{sum(same)}/{len(same)}",
                       greedy_tokens_equal_t1=sum(tokens) / len(tokens))
            rel_t1 = [((a - b).norm() / b.norm()).item() for a, b in zip(r["logits"], base["logits"])]
            row.update(logits_rel_diff_vs_t1=max(rel_t1))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlab.parallel_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model-dir")
    source.add_argument("--shape", help="random weights of an `ftlab bench --shape` (345m, 1.3b, 6.7b, 20b)")
    p.add_argument("-t", "--tensor-para-size", type=int, default=1)
    p.add_argument("-l", "--layer-para-size", type=int, default=1)
    p.add_argument("--dtypes", default="fp16", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--out-dir", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("reference", type=Path)
    c.add_argument("runs", type=Path, nargs="+")
    c.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.model_dir, args.tensor_para_size, args.layer_para_size, args.dtypes.split(","), args.out_dir,
            shape=args.shape)
        return 0
    rows = compare(args.reference, args.runs)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{row.get(k, ''):.3g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                        for k in keys))
    if args.csv is not None:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
