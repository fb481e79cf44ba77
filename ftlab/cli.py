"""The `ftlab` command: thin argument parsing over the library.

    ftlab generate [-m MODEL_DIR] (--prompt TEXT ... | --input-ids "1,2,3;4,5") [--max-new-tokens N] [--top-k K]
                   [--top-p P] [--temperature T] [--seed S] [--dtype fp32|fp16|bf16] [--json] [--stream]
    ftlab convert hf -i HF_DIR -o OUT_DIR -i_g N [--weight-data-type fp32|fp16] [--force]
    ftlab convert megatron -i CKPT_DIR -o OUT_DIR [-t_g T] -i_g N [--head-num H] [--weight-data-type ..] [--force]
    ftlab bench [--shape 345m | -m MODEL_DIR] [--batch-sizes 1,8] [--cells 128x8,512x32]
                [--profile-decode | --timeline-decode | --timeline-prefill | --breakdown-decode |
                 --ab-decode "default;FTLAB_NAME=value ..."]
    ftlab serve [-m MODEL_DIR] [--host H] [--port 8000] [--grpc-port 8001] [--max-batch-size N]
                [--max-queue-delay-us US]     (under torchrun with --tensor-para-size T --layer-para-size L)
    ftlab sweep [-m MODEL_DIR] [--prompt TEXT ...] [--top-k 1,8,40,0] [--top-p 0.5,0.9,1] [--seeds N] [--csv F]
                [--plot F.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .tokenizer import DATA_DIR

DEFAULT_MODEL_DIR = DATA_DIR / "demo-model"


def _parse_input_ids(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids {text!r}: expected comma-separated integers, requests "
                                         f"separated by ';' (e.g. \"1,2,3;4,5\")") from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text or token ids with a c-model")
    p.add_argument("-m", "--model-dir", type=Path, default=None,
                   help="c-model directory (<out>/<N>-gpu or its parent); default: the bundled demo model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="one or more prompts (a batch)")
    src.add_argument("--input-ids", type=_parse_input_ids, help='token ids, e.g. "1,2,3;4,5" for two requests')
    p.add_argument("--no-start-id", action="store_true",
                   help="do not put the model's start_id (GPT-2: <|endoftext|>) before each --prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=1, help="top-k (FT candidate_num); 1 = greedy, 0 = no limit")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus probability in (0, 1]; 1 = no limit")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="random_seed of every request")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="multiplicative, 1 = off (FT/HF semantics)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="additive, 0 = off; exclusive with the above")
    p.add_argument("--min-length", type=int, default=0, help="generate at least this many tokens before end_id")
    p.add_argument("--stop-words", nargs="+", default=None, metavar="WORD",
                   help='finish a request once it ends with one of these (text, or ids like "13,198")')
    p.add_argument("--bad-words", nargs="+", default=None, metavar="WORD",
                   help='never generate these (text, or ids like "13,198")')
    p.add_argument("--beam-width", type=int, default=1, help="> 1: beam search (deterministic) instead of sampling")
    p.add_argument("--len-penalty", type=float, default=1.0, help="beam score = log-prob / length ** len_penalty")
    p.add_argument("--beam-search-diversity-rate", type=float, default=0.0,
                   help="FT's diverse beams: the j-th best token of a beam pays j * rate")
    p.add_argument("--return-log-probs", action="store_true",
                   help="with --json: add output_log_probs and cum_log_probs")
    p.add_argument("--dtype", default="auto", help="fp32 | fp16 | bf16 (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print {output_ids, sequence_length, text} as JSON")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (one request)")
    _add_parallelism(p, "generate")


def _add_parallelism(p, command: str) -> None:
    par = p.add_argument_group(f"parallelism (run under: torchrun --nproc-per-node T*L -m ftlab {command} ...)")
    par.add_argument("--tensor-para-size", type=int, default=1, help="T: ranks splitting every layer")
    par.add_argument("--layer-para-size", type=int, default=1, help="L: pipeline stages of contiguous layers")
    par.add_argument("--layer-para-batch-size", type=int, default=None,
                     help="micro-batch size of the pipelined context phase (default: batch / L)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to FasterTransformer's c-model format")
    conv = p.add_subparsers(dest="source", required=True)
    hf = conv.add_parser("hf", help="a local HF GPT-2 directory (config.json + safetensors or pytorch_model.bin)")
    hf.add_argument("-i", "--input-dir", "--in-file", type=Path, required=True)
    hf.add_argument("-o", "--output-dir", "--saved-dir", type=Path, required=True)
    hf.add_argument("-i_g", "--infer-gpu-num", type=int, default=1, help="tensor_para_size to split for")
    hf.add_argument("--weight-data-type", choices=("fp32", "fp16"), default="fp32")
    hf.add_argument("--force", action="store_true", help="overwrite an existing <OUT_DIR>/<N>-gpu")
    from .convert.megatron import add_megatron_arguments

    add_megatron_arguments(conv.add_parser("megatron", help="a Megatron-LM GPT checkpoint (mp_rank_XX/*.pt), "
                                                            "resharded from -t_g to -i_g tensor-parallel ranks"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="FT's latency grid on the GPU vs HF, a torch.compile peer and the floor")
    p.add_argument("-m", "--model-dir", type=Path, default=None, help="c-model dir (default: random weights)")
    p.add_argument("--shape", default="345m", choices=sorted(SHAPES), help="model shape for random weights")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--cells", type=_parse_cells, default=None, metavar="INxOUT,...",
                   help='input -> output lengths, e.g. "128x8,512x32,20x8" (default: 128x8,512x32)')
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top-k", type=int, default=1, help="ftlab's sampling in the grid (1 = greedy; the peer and HF "
                                                        "stay greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="ftlab's nucleus probability (FT's published grid: 0.9)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-peer", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers' generate")
    p.add_argument("--no-clocks", action="store_true",
                   help="do not sample the SM clock and power with nvidia-smi while ftlab's calls run")
    p.add_argument("--csv", type=Path, default=None, help="CSV to append rows to (default data/bench/bench.csv)")
    p.add_argument("--tensor-para-size", type=int, default=1,
                   help="under torchrun: T (-m: files split for T; without -m: random weights of --shape, no files)")
    p.add_argument("--layer-para-size", type=int, default=1, help="under torchrun: L pipeline stages")
    p.add_argument("--tokens-json", type=Path, default=None, help="parallel runs: write greedy output ids here")
    p.add_argument("--write-random-cmodel", type=Path, default=None, metavar="OUT_DIR",
                   help="only write random fp16 weights of --shape as OUT_DIR/<N>-gpu for each N in --splits")
    p.add_argument("--splits", default="1,2", help="tensor_para_size values for --write-random-cmodel")
    p.add_argument("--profile-decode", action="store_true",
                   help="only print the per-kernel GPU time of the prefill of 512-token prompts and of a decode "
                        "step at context 512 (--shape), for each of --batch-sizes")
    p.add_argument("--timeline-decode", action="store_true",
                   help="only print what each kernel adds to the captured decode step at context 512 as the graph "
                        "runs it (overlaps and gaps included), for each of --batch-sizes (ftlab/timeline.py; rows "
                        "appended to --csv, default data/bench/decode_timeline.csv)")
    p.add_argument("--timeline-prefill", action="store_true",
                   help="the same for the captured context phase of prompts of 512 tokens, for each of "
                        "--batch-sizes (rows appended to --csv, default data/bench/prefill_timeline.csv)")
    p.add_argument("--breakdown-decode", action="store_true",
                   help="only split the captured decode step at context 512 into blocks (HBM weights, L2-resident "
                        "weights) and the rest, for each of --batch-sizes (rows appended to --csv, default "
                        "data/bench/decode_breakdown.csv; FTLAB_* settings recorded as the variant)")
    p.add_argument("--ab-decode", default=None, metavar="VARIANTS",
                   help='only time the captured decode step at context 512 under each of ";"-separated variants '
                        '("default" or FTLAB_NAME=value ...), replayed in turn --repeats rounds in one process, '
                        'for each of --batch-sizes (rows appended to --csv, default data/bench/decode_step_ab.csv)')


def _ftlab_env() -> str:
    """The FTLAB_* settings of this run, recorded as a benchmark row's variant."""
    return ",".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FTLAB_"))


def _parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for part in text.split(","):
        n_in, sep, n_out = part.strip().lower().partition("x")
        if not (sep and n_in.isdigit() and n_out.isdigit() and int(n_in) > 0 and int(n_out) > 0):
            raise argparse.ArgumentTypeError(f"--cells {text!r}: expected comma-separated INxOUT with positive "
                                             f"lengths, e.g. \"128x8,512x32,20x8\" (bad part {part!r})")
        cells.append((int(n_in), int(n_out)))
    return cells


SHAPES = {  # FasterTransformer's benchmark shapes: (heads, size_per_head, layers)
    "345m": (16, 64, 24), "1.3b": (32, 64, 24), "6.7b": (32, 128, 32), "20b": (48, 128, 44)}


def shape_config(shape: str):
    """GPTConfig of one of FT's benchmark SHAPES (GPT-2 vocabulary, 1024 positions)."""
    from .config import GPTConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    heads, size, layers = SHAPES[shape]
    return GPTConfig(head_num=heads, size_per_head=size, num_layer=layers, vocab_size=50257, max_pos_seq_len=1024,
                     model_name=f"gpt-{shape}")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a c-model to Triton clients (HTTP, FasterTransformer's model tensors)")
    p.add_argument("-m", "--model-dir", type=Path, default=None,
                   help="c-model directory (<out>/<N>-gpu or its parent); default: the bundled demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (Triton's default 8000)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve Triton's gRPC protocol on this port (Triton's default 8001; needs "
                        "tritonclient[grpc]); FT's decoupled streaming is gRPC only")
    p.add_argument("--model-name", default="fastertransformer", help="the name clients ask for")
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences per batch (dynamic batching)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000,
                   help="how long the first request of a batch waits for more")
    p.add_argument("--dtype", default="auto", help="fp32 | fp16 | bf16 (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    _add_parallelism(p, "serve")


def _csv_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__} values") from None
    return parse


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="sweep top-k x top-p on a c-model: what the sampler keeps, and what it writes")
    p.add_argument("-m", "--model-dir", type=Path, default=None,
                   help="c-model directory (<out>/<N>-gpu or its parent); default: the bundled demo model")
    p.add_argument("--prompt", nargs="+", default=["def main():\n    ", "import os\n"],
                   help="contexts whose next-token distributions are filtered (the first is also continued)")
    p.add_argument("--top-k", type=_csv_list(int), default=[1, 8, 40, 0], help="values to sweep (0 = no limit)")
    p.add_argument("--top-p", type=_csv_list(float), default=[0.5, 0.9, 1.0], help="values to sweep (1 = no limit)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=0,
                   help="also continue the first prompt with every (top_k, top_p) under this many seeds")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--csv", type=Path, default=None, help="write the rows here (the generation rows beside it)")
    p.add_argument("--plot", type=Path, default=None, help="write heatmaps over top_k x top_p (PNG) here")
    p.add_argument("--dtype", default="auto", help="fp32 | fp16 | bf16 (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(tensor_para_size=1, layer_para_size=1, layer_para_batch_size=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_sweep(sub)
    return parser


def _load_model(args):
    import torch

    from .checkpoint import random_ft_tensors
    from .config import GPTConfig
    from .model import GPT

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    model_dir = args.model_dir
    if model_dir is None and DEFAULT_MODEL_DIR.is_dir():
        model_dir = DEFAULT_MODEL_DIR
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 or args.tensor_para_size * args.layer_para_size > 1:
        if world == 1:
            raise ValueError(f"--tensor-para-size {args.tensor_para_size} x --layer-para-size {args.layer_para_size} "
                             f"needs that many processes: torchrun --nproc-per-node "
                             f"{args.tensor_para_size * args.layer_para_size} -m ftlab generate ...")
        from .parallel import ParallelEngine

        if model_dir is None:
            raise ValueError("parallel generation needs -m MODEL_DIR")
        engine = ParallelEngine(model_dir, tensor_para_size=args.tensor_para_size,
                                layer_para_size=args.layer_para_size, dtype=dtype,
                                layer_para_batch_size=args.layer_para_batch_size)
        return engine, model_dir
    if model_dir is not None:
        return GPT.from_cmodel(model_dir, dtype=dtype, device=device), model_dir
    print("ftlab: no trained default model is bundled (data/demo-model is missing): using a RANDOM 2-layer GPT "
          "with the GPT-2 vocabulary, so the text will be gibberish", file=sys.stderr)
    config = GPTConfig(head_num=4, size_per_head=16, num_layer=2, max_pos_seq_len=256, model_name="random")
    return GPT.from_ft_tensors(config, random_ft_tensors(config), dtype=dtype, device=device), None


def cmd_generate(args) -> int:
    from .generate import generate
    from .tokenizer import load_tokenizer

    model, model_dir = _load_model(args)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{model_dir}: no tokenizer files (vocab.json + merges.txt) for --prompt; "
                             f"use --input-ids")
        # GPT-2-style models see <|endoftext|> between documents: after it, a prompt reads as the start of a file
        start = [] if args.no_start_id else [model.config.start_id]
        prompts = [start + tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = args.input_ids

    def show(step):
        if tokenizer is not None:
            print(tokenizer.decode(step.token_ids[:1], skip_special_tokens=True), end="", flush=True)
        else:
            print(step.token_ids[0], end=" ", flush=True)

    printing = int(os.environ.get("RANK", 0)) == 0  # under torchrun every rank has the tokens; rank 0 prints
    streaming = args.stream and not args.json and printing
    if streaming and args.prompt is not None:
        print(args.prompt[0], end="", flush=True)
    def words(values):
        if values is None:
            return None
        parsed = []
        for value in values:
            if all(part.strip().isdigit() for part in value.split(",")):
                parsed.append([int(part) for part in value.split(",")])
            elif tokenizer is None:
                raise ValueError(f"word {value!r}: no tokenizer for this model; give token ids like \"13,198\"")
            else:
                parsed.append(tokenizer.encode(value))
        return [parsed] * len(prompts)  # the same words for every request

    beam = {}
    if args.beam_width != 1:
        beam = dict(beam_width=args.beam_width, len_penalty=args.len_penalty,
                    beam_search_diversity_rate=args.beam_search_diversity_rate)
        if streaming:
            raise ValueError("--stream and --beam-width > 1 do not go together: beam search returns whole hypotheses")
    sampling = {} if beam else dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                    random_seed=args.seed)
    result = generate(model, prompts, max_new_tokens=args.max_new_tokens, **sampling, **beam,
                      repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                      min_length=args.min_length, stop_words=words(args.stop_words), bad_words=words(args.bad_words),
                      return_log_probs=args.return_log_probs and not beam, on_step=show if streaming else None)
    if hasattr(model, "close"):
        # a ParallelEngine: leave the process group on every rank before exiting. Without it 2 of 8 CPU (gloo) runs
        # at layer_para_size 2 aborted at exit ("terminate called without an active exception") after printing.
        model.close()
    if not printing:
        return 0
    texts = ([tokenizer.decode(ids, skip_special_tokens=True) for ids in result.output_ids]
             if tokenizer is not None else None)
    if args.json:
        out = {"output_ids": result.output_ids, "sequence_length": result.sequence_length}
        if args.return_log_probs:
            out.update(output_log_probs=result.output_log_probs, cum_log_probs=result.cum_log_probs)
        if beam:
            out.update(beams=result.beams, beam_scores=result.beam_scores)
        if texts is not None:
            out["text"] = texts
        print(json.dumps(out))
    elif streaming:
        print()
    else:
        for b in range(len(prompts)):
            print(texts[b] if texts is not None else " ".join(map(str, result.output_ids[b])))
            if b + 1 < len(prompts):
                print("-" * 40)
    return 0


def cmd_convert(args) -> int:
    if args.source == "hf":
        from .convert.huggingface import convert_hf

        out = convert_hf(args.input_dir, args.output_dir, infer_gpu_num=args.infer_gpu_num,
                         weight_data_type=args.weight_data_type, force=args.force)
        print(f"wrote {out}")
    elif args.source == "megatron":
        from .convert.megatron import run_megatron_cli

        print(f"wrote {run_megatron_cli(args)}")
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .kernels.sampling import check_sampling_params

    config = shape_config(args.shape)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.profile_decode:
        for batch in batches:
            print(f"{config.model_name}, batch {batch}, prompts of 512 tokens, {args.dtype}:")
            print(bench.profile_decode_step(config, batch=batch, dtype=args.dtype))
        return 0
    if args.timeline_decode:
        from . import timeline

        model = bench.random_model(config, args.dtype)
        sampling = dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
        common = dict(bench.run_info(), config=config.model_name, dtype=args.dtype, variant=_ftlab_env(),
                      sampling=bench.sampling_label(sampling))
        for batch in batches:
            result = timeline.decode_timeline(model, batch=batch, **sampling)
            print(f"{config.model_name}, {args.dtype}, {common['sampling']}:\n{result.text()}", flush=True)
            bench.append_csv(result.csv_rows(**common), args.csv or timeline.DEFAULT_CSV, timeline.CSV_COLUMNS)
        return 0
    if args.timeline_prefill:
        from . import timeline

        model = bench.random_model(config, args.dtype)
        common = dict(bench.run_info(), config=config.model_name, dtype=args.dtype, variant=_ftlab_env(),
                      sampling="prefill")
        for batch in batches:
            result = timeline.prefill_timeline(model, batch=batch)
            print(f"{config.model_name}, {args.dtype}, prefill:\n{result.text()}", flush=True)
            bench.append_csv(result.csv_rows(**common), args.csv or timeline.PREFILL_CSV, timeline.CSV_COLUMNS)
        return 0
    if args.ab_decode is not None:
        try:
            variants = bench.parse_env_variants(args.ab_decode)
        except ValueError as exc:
            raise SystemExit(f"ftlab bench: {exc}")
        model = bench.random_model(config, args.dtype)
        for batch in batches:
            results = bench.decode_step_ab(model, variants, batch=batch, rounds=args.repeats)
            for r in results:
                print(f"{config.model_name}, batch {batch}, context 512, {args.dtype}, {r['variant']}: median "
                      f"{r['median_ms']:.4f} ms (rounds {' '.join(f'{t:.4f}' for t in r['rounds_ms'])}), logits "
                      f"vs the first: max |diff| {r['max_logit_diff']:.4g}, argmax agreement "
                      f"{r['argmax_agreement']:.3f}", flush=True)
            bench.append_csv(bench.ab_rows(config, results, batch=batch, dtype=args.dtype),
                             args.csv or bench.AB_CSV, bench.AB_COLUMNS)
        return 0
    if args.breakdown_decode:
        variant = _ftlab_env()
        for batch in batches:
            parts = bench.decode_step_breakdown(config, batch=batch, dtype=args.dtype)
            print(f"{config.model_name}, batch {batch}, context 512, {args.dtype}: "
                  + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in parts.items()), flush=True)
            bench.append_csv([bench.breakdown_row(config, parts, batch=batch, dtype=args.dtype, variant=variant)],
                             args.csv or bench.BREAKDOWN_CSV, bench.BREAKDOWN_COLUMNS)
        return 0
    if args.write_random_cmodel is not None:
        from .checkpoint import random_ft_tensors, write_cmodel

        weights = random_ft_tensors(config)
        for n in (int(x) for x in args.splits.split(",")):
            print("wrote", write_cmodel(args.write_random_cmodel, config, weights, tensor_para_size=n,
                                        weight_data_type="fp16", force=True, progress=True))
        return 0
    cells = args.cells or bench.GRID_CELLS
    sampling = dict(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    try:
        check_sampling_params(args.top_k, args.top_p, args.temperature, config.vocab_size)
    except ValueError as exc:
        raise SystemExit(f"ftlab bench: {exc}")
    if args.tensor_para_size * args.layer_para_size > 1 or "WORLD_SIZE" in os.environ:
        if bench.sampling_label(sampling) != "greedy":
            raise SystemExit("ftlab bench: --top-k / --top-p apply to single-GPU runs only (the parallel grid is "
                             "greedy)")
        # without -m every rank draws its share of random weights of --shape on its GPU: no c-model on disk
        bench.run_parallel(args.model_dir, config=config, tensor_para_size=args.tensor_para_size,
                           layer_para_size=args.layer_para_size, dtype=args.dtype,
                           batches=batches, cells=cells, repeats=args.repeats,
                           csv_path=args.csv or bench.DEFAULT_CSV, tokens_path=args.tokens_json)
        return 0
    bench.run(config, args.model_dir, dtype=args.dtype, batches=batches,
              cells=cells, repeats=args.repeats, with_peer=not args.no_peer, with_hf=not args.no_hf,
              csv_path=args.csv or bench.DEFAULT_CSV, sampling=sampling, with_clocks=not args.no_clocks)
    return 0


def cmd_serve(args) -> int:
    from .serve import InferenceServer

    model, model_dir = _load_model(args)
    leader = None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: rank 0 serves, the other ranks follow it
        from .parallel_serve import ParallelLeader, calls_group, follow

        group = calls_group()
        if model.layout.rank != 0:
            follow(model, group)
            return 0
        model = leader = ParallelLeader(model, group)
    server = InferenceServer(model, model_name=args.model_name, host=args.host, port=args.port,
                             max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                             grpc_port=args.grpc_port)
    server.start()
    grpc = f" and grpc://{server.grpc_url}" if server.grpc_url else ""
    ranks = f", {leader.engine.layout.world} ranks" if leader is not None else ""
    print(f"ftlab serve: {model_dir or 'random weights'} as '{args.model_name}'{ranks} on http://{server.url}{grpc} "
          f"(KServe v2 / Triton protocols; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.serve_forever()  # returns after Ctrl-C, the server stopped
    if leader is not None:
        leader.close()
    return 0


def cmd_sweep(args) -> int:
    from .sweeps import generation_sweep, plot_sampling_sweep, sampling_sweep, write_csv
    from .tokenizer import load_tokenizer

    model, model_dir = _load_model(args)
    tokenizer = load_tokenizer()
    contexts = [tokenizer.encode(p) for p in args.prompt]
    rows = sampling_sweep(model, contexts, args.top_k, args.top_p, temperature=args.temperature)
    print(f"next-token distributions after {len(contexts)} prompt(s), {model_dir or 'random weights'}, "
          f"temperature {args.temperature}:")
    print(f"{'top_k':>6} {'top_p':>6} {'kept tokens':>12} {'kept mass':>10} {'entropy':>8} {'P(greedy)':>10}")
    for r in rows:
        print(f"{r['top_k'] or 'none':>6} {r['top_p']:>6g} {r['kept_tokens']:>12.1f} {r['kept_mass']:>10.3f} "
              f"{r['entropy_nats']:>8.3f} {r['greedy_prob']:>10.3f}")
    if args.csv:
        print("wrote", write_csv(rows, args.csv))
    if args.plot:
        print("wrote", plot_sampling_sweep(rows, args.plot, title=f"temperature {args.temperature:g}"))
    if args.seeds > 0:
        configs = [dict(top_k=k, top_p=p, temperature=args.temperature) for k in args.top_k for p in args.top_p]
        gen = generation_sweep(model, contexts[0], configs, seeds=args.seeds, max_new_tokens=args.max_new_tokens,
                               tokenizer=tokenizer)
        print(f"\ncontinuations of {args.prompt[0]!r}, {args.seeds} seeds each:")
        for r in gen:
            print(f"top_k {r['top_k'] or 'none':>4} top_p {r['top_p']:<4g} distinct-2 {r['distinct_2']:.2f} "
                  f"unique {r['unique_continuations']}/{args.seeds} mean log-prob {r['mean_log_prob']:.2f}  "
                  f"{r['first_continuation']!r}")
        if args.csv:
            print("wrote", write_csv(gen, args.csv.with_name(args.csv.stem + "-generation.csv")))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "sweep":
            return cmd_sweep(args)
    except (ValueError, OSError) as exc:  # OSError: missing or existing files, a port in use
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"ftlab {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
