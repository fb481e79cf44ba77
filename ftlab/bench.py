"""`ftlab bench`: FasterTransformer's latency grid on one GPU, with the baselines measured in the same process.

For each cell (batch, input length -> output length) it times, on the same random weights:
  ftlab      generate() end to end (prefill + CUDA-graph decode steps; greedy unless --top-k / --top-p say
             otherwise, the `sampling` column), the number we optimise;
  peer       ftlab.reference.ReferenceGPT, plain PyTorch with a static KV cache, decode step compiled with
             torch.compile(mode="reduce-overhead", fullgraph=True), prefill compiled too: the strongest plain peer;
  hf         HF transformers' eager GPT2LMHeadModel.generate (when transformers is installed);
  floor      the physical limit from this run's measured copy bandwidth and matmul rate: every decode step reads all
             weights and the live KV cache once; the prefill does 2*params*tokens (+ attention) FLOPs or reads the
             weights, whichever takes longer.
Rows are appended to a tidy CSV (data/bench/bench.csv by default) with the GPU, date and versions, and with the
SM clock and power nvidia-smi reported while ftlab's calls of the cell ran (ftlab/gpu_clocks.py: the bs64 prefill
runs into the H200's power cap, so a row says how hard the cap held when it was measured).
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import random_ft_tensors
from .config import GPTConfig, compute_dtype
from .generate import LocalSession, RequestParams, capture_cuda_graph, generate
from .gpu_clocks import ClockSummary, sampled
from .model import GPT
from .tokenizer import DATA_DIR

GPT_345M = GPTConfig(head_num=16, size_per_head=64, num_layer=24, vocab_size=50257, max_pos_seq_len=1024,
                     model_name="gpt-345m")
GRID_BATCHES = (1, 8, 32, 64)
GRID_CELLS = ((128, 8), (512, 32))
DEFAULT_CSV = DATA_DIR / "bench" / "bench.csv"
GREEDY = dict(top_k=1, top_p=1.0, temperature=1.0)  # the grid's sampling unless --top-k / --top-p say otherwise


@dataclass
class Ceilings:
    bandwidth: float  # bytes/s, device-to-device copy counting bytes read + written
    matmul: float  # FLOP/s, fp16/bf16 GEMM


def measure_ceilings(device, dtype) -> Ceilings:
    n = 1 << 28  # 512 MB of fp16: far past the L2
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), repeats=20)
    a = torch.randn(8192, 8192, dtype=dtype, device=device)
    b = torch.randn(8192, 8192, dtype=dtype, device=device)
    mm_ms = _median_ms(lambda: a @ b, repeats=10)
    return Ceilings(bandwidth=2 * n * 2 / (copy_ms * 1e-3), matmul=2 * 8192**3 / (mm_ms * 1e-3))


def _time_ms(fn, repeats: int, warmup: int = 1, last: list | None = None) -> list[float]:
    """CUDA-event times of `repeats` calls of fn after `warmup` untimed ones. What a call returns is freed after its
    stop event (64 x 544 Python ints: ~0.5 ms of the H200 machine's host): that is its caller's time, not the
    call's. `last` (a list) receives what the final call returned."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if last is not None and i == repeats - 1:
            last.append(result)
        del result
    return times


def _median_ms(fn, repeats: int) -> float:
    return statistics.median(_time_ms(fn, repeats, warmup=3))


def param_count(config: GPTConfig) -> int:
    H, I, V, P = config.hidden, config.inter_size, config.vocab_size, config.max_pos_seq_len
    per_layer = 3 * H * H + 3 * H + H * H + H + H * I + I + I * H + H + 4 * H
    return config.num_layer * per_layer + V * H + P * H + 2 * H


def floor_ms(config: GPTConfig, batch: int, n_in: int, n_out: int, ceil: Ceilings, elem_bytes: int = 2) -> float:
    """Lower bound of an end-to-end generate: prefill at the matmul rate (or one weight read), then n_out - 1 decode
    steps each reading every weight and the KV cache written so far."""
    params = param_count(config)
    weight_bytes = params * elem_bytes
    L, H = config.num_layer, config.hidden
    attn_flops = 2 * 2 * L * batch * H * n_in * n_in / 2  # QK^T and PV, causal half
    prefill = max((2 * params * batch * n_in + attn_flops) / ceil.matmul, weight_bytes / ceil.bandwidth)
    decode = 0.0
    for step in range(1, n_out):
        kv_bytes = 2 * L * batch * (n_in + step) * H * elem_bytes
        decode += max((weight_bytes + kv_bytes) / ceil.bandwidth, 2 * params * batch / ceil.matmul)
    return (prefill + decode) * 1e3


def _spread(times: list[float]) -> float:
    """Half the inter-quartile range relative to the median (a robust +-)."""
    if len(times) < 4:
        return (max(times) - min(times)) / 2 / statistics.median(times)
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(times)


def random_prompts(batch: int, n_in: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(batch, n_in) int64 token ids on the host: what every engine of the grid is handed (HF and FasterTransformer
    take a tensor of input ids too). Until 2026-12-02 they were Python lists, which ftlab's generate() turned into
    numpy (checked) inside its timing while HF got a tensor made outside it: H200, alternating in one process
    (data/bench/prompt_form_ab.csv), bs64 512 -> 32 89.2-90.2 ms from lists, 88.4-89.3 from the array; bs1 equal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (batch, n_in), generator=g).numpy()


class Peer:
    """The plain-PyTorch twin, compiled the gpt-fast way, with one static cache shape for every cell."""

    def __init__(self, config, ft, dtype, device, capacity: int):
        from .reference import ReferenceGPT

        self.model = ReferenceGPT(config, ft, dtype=dtype, device=device)
        self.capacity = capacity
        self.decode = torch.compile(self.model.decode, mode="reduce-overhead", fullgraph=True)
        self.prefill = torch.compile(self.model.prefill, dynamic=True)

    def run(self, prompts: np.ndarray, n_out: int) -> torch.Tensor:
        B = len(prompts)
        dev = self.model.device
        if self.model.cache is None or self.model.cache.k.shape[1] != B:
            self.model.setup_cache(B, self.capacity)  # a new batch size recompiles (static shapes, like gpt-fast)
        ids = torch.tensor(prompts, device=dev)
        lengths = torch.full((B,), ids.shape[1], device=dev)
        logits = self.prefill(ids, lengths)[:, -1]
        positions = lengths.clone()
        out = torch.empty(n_out, B, dtype=torch.int64, device=dev)
        tokens = logits.argmax(-1)
        out[0] = tokens
        for step in range(1, n_out):
            logits = self.decode(tokens, positions)
            positions += 1
            tokens = logits.argmax(-1)
            out[step] = tokens
        return out


def sampling_label(sampling: dict) -> str:
    """The CSV's `sampling` value: "greedy", or the top-k / top-p / temperature settings."""
    s = {**GREEDY, **sampling}
    return "greedy" if s["top_k"] == 1 else f"top_k={s['top_k']} top_p={s['top_p']:g} temperature={s['temperature']:g}"


def open_decode_session(model: GPT, *, batch: int, context: int, max_steps: int,
                        **sampling) -> tuple[LocalSession, torch.Tensor]:
    """A session over `batch` random prompts of `context` tokens (room for `max_steps` tokens), past its first
    token and three warm-up replays of the captured step: (session, its last tokens). `sampling`: top_k / top_p /
    temperature (default greedy)."""
    prompts = random_prompts(batch, context, model.config.vocab_size, seed=1)
    params = RequestParams.build(batch, model.config.vocab_size, model.device, **{**GREEDY, **sampling},
                                 random_seed=0, end_id=model.config.end_id)
    session = LocalSession(model, prompts, max_steps, params)
    tokens = session.first()[0]
    for _ in range(3):  # warm-up replays
        tokens = session.next(tokens)[0]
    torch.cuda.synchronize()
    return session, tokens


def timed_steps(session: LocalSession, tokens: torch.Tensor, n: int) -> tuple[list[float], torch.Tensor]:
    """ms of each of `n` decode steps, timed between CUDA events with a host synchronisation after each (what a
    streaming user waits per token); and the last tokens."""
    times = []
    for _ in range(n):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        tokens = session.next(tokens)[0]
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times, tokens


def decode_step_ms(model: GPT, context: int = 512, batch: int = 1, steps: int = 64, **sampling) -> list[float]:
    """Per-token latency of the captured decode step at a given context (what a streaming user waits);
    `sampling`: top_k / top_p / temperature (default greedy)."""
    session, tokens = open_decode_session(model, batch=batch, context=context, max_steps=steps + 1, **sampling)
    return timed_steps(session, tokens, steps - 4)[0]


def random_model(config: GPTConfig, dtype: str = "fp16") -> GPT:
    """A GPT of `config`'s shape with random weights drawn on the GPU."""
    device = torch.device("cuda")
    return GPT.from_ft_tensors(config, random_ft_tensors(config, dtype=compute_dtype(dtype), device=device),
                               dtype=dtype, device=device)


def profile_decode_step(config: GPTConfig = GPT_345M, *, batch: int = 1, context: int = 512, dtype="fp16",
                        steps: int = 20) -> str:
    """Per-kernel GPU time of the prefill of `batch` prompts of `context` tokens (3 runs) and of the decode step
    after it (`steps` runs), kernel by kernel rather than as graphs, so that each launch is visible."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model(config, dtype)
    device = model.device
    prompts = random_prompts(batch, context, config.vocab_size, seed=1)
    params = RequestParams.build(batch, config.vocab_size, device, **GREEDY, random_seed=0, end_id=config.end_id)

    def new_session():
        return LocalSession(model, prompts, steps + 8, params, use_cuda_graph=False)

    new_session().first()  # compiles the prefill kernels
    sessions = [new_session() for _ in range(3)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_prof:
        for session in sessions:
            tokens = session.first()[0]
        torch.cuda.synchronize()
    for _ in range(3):
        tokens = session.next(tokens)[0]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = session.next(tokens)[0]
        torch.cuda.synchronize()
    return (f"prefill (3 runs):\n{prefill_prof.key_averages().table(sort_by='cuda_time_total', row_limit=20)}\n"
            f"decode step ({steps} runs):\n{prof.key_averages().table(sort_by='cuda_time_total', row_limit=25)}")


def decode_step_breakdown(config: GPTConfig = GPT_345M, *, batch: int = 1, context: int = 512,
                          dtype="fp16") -> dict:
    """Splits the captured decode step's time by rebuilding the same model three ways (median ms per step):
    `full` (every block its own weights, streamed from HBM), `shared` (every block runs block 0's weights, which
    then stay in L2: what is left of a block is the latency of its kernel chain, not its bytes) and `no_blocks`
    (embedding, final LayerNorm + LM head, sampling and the host's per-token work). Per block: (full - no_blocks)
    / L and (shared - no_blocks) / L."""
    device = torch.device("cuda")
    ft = random_ft_tensors(config, dtype=compute_dtype(dtype), device=device)
    model = GPT.from_ft_tensors(config, ft, dtype=dtype, device=device)
    del ft
    blocks = model.weights.blocks
    result = {}
    for name, variant in (("full", blocks), ("shared", [blocks[0]] * len(blocks)), ("no_blocks", [])):
        model.weights.blocks, model.graph_cache = variant, {}
        result[name] = statistics.median(decode_step_ms(model, context=context, batch=batch))
    model.weights.blocks = blocks
    layers = len(blocks)
    result["per_block_full"] = (result["full"] - result["no_blocks"]) / layers
    result["per_block_shared"] = (result["shared"] - result["no_blocks"]) / layers
    return result


BREAKDOWN_CSV = DATA_DIR / "bench" / "decode_breakdown.csv"
BREAKDOWN_COLUMNS = ["gpu", "date", "torch", "triton", "config", "dtype", "bs", "context", "variant", "full_ms",
                     "shared_ms", "no_blocks_ms", "per_block_full_us", "per_block_shared_us"]


def run_info() -> dict:
    """The GPU, date and versions every benchmark row starts with."""
    return dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=_triton_version())


def breakdown_row(config: GPTConfig, parts: dict, *, batch: int, context: int = 512, dtype="fp16",
                  variant: str = "") -> dict:
    """A CSV row (BREAKDOWN_COLUMNS) of decode_step_breakdown's result, with the GPU, date and versions."""
    return dict(run_info(), config=config.model_name, dtype=dtype, bs=batch, context=context,
                variant=variant, full_ms=parts["full"], shared_ms=parts["shared"], no_blocks_ms=parts["no_blocks"],
                per_block_full_us=parts["per_block_full"] * 1e3, per_block_shared_us=parts["per_block_shared"] * 1e3)


def parse_env_variants(text: str) -> list[dict[str, str]]:
    """`--ab-decode` variants: ";"-separated, each "default" (the environment as it is) or space-separated
    FTLAB_NAME=value settings (values may hold commas), e.g.
    "default;FTLAB_SKINNY_LN=stats;FTLAB_SKINNY_LN=rowstats FTLAB_SKINNY_TILE=32,512,4"."""
    variants = []
    for part in text.split(";"):
        part = part.strip()
        settings = {}
        for item in ([] if part in ("", "default") else part.split()):
            name, sep, value = item.strip().partition("=")
            if not (sep and name.startswith("FTLAB_") and name[6:].replace("_", "").isalnum()):
                raise ValueError(f"--ab-decode {text!r}: expected \"default\" or FTLAB_NAME=value settings "
                                 f"separated by spaces, variants by \";\" (bad part {item.strip()!r})")
            settings[name] = value
        variants.append(settings)
    if len(variants) < 2:
        raise ValueError(f"--ab-decode {text!r}: give at least two variants, separated by \";\"")
    return variants


def variant_label(settings: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "default"


def decode_step_ab(model: GPT, variants: list[dict[str, str]], *, batch: int, context: int = 512,
                   rounds: int = 5, replays: int = 20) -> list[dict]:
    """The decode step at `context` captured once per variant (its FTLAB_* settings in the environment while it is
    captured: the model reads them per call), then the graphs replayed in turn, `rounds` x `replays` each, in one
    process on the same weights, KV cache and inputs, so that the GPU's clock and power state drift alike for all
    of them. Per variant: label, median ms per step and each round's ms, and its logits against the first
    variant's (max |difference|, share of equal argmaxes). The step is `GPT.decode` (blocks and LM head): settings
    read only by the sampler or greedy_finish_step change nothing here. Captures of the same code differ (H200,
    bs1: 0.3318-0.3383 ms over eight, data/bench/capture_spread_ab.csv): repeat a variant to see its spread."""

    device = model.device
    gen = torch.Generator(device=device).manual_seed(0)
    cache = model.new_kv_cache(batch, context + 32)
    for t in (cache.k, cache.v):
        t.normal_(0, 1, generator=gen)  # a filled cache: attention reads `context` random positions per row
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device, generator=gen)
    positions = torch.full((batch,), context, dtype=torch.int32, device=device)
    graphs, logits = [], []
    for settings in variants:
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            graph, out = capture_cuda_graph(lambda: model.decode(tokens, positions, cache), device)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        graph.replay()
        torch.cuda.synchronize()
        graphs.append(graph)
        logits.append(out.float().clone())
    times = [[] for _ in variants]
    for _ in range(rounds):
        for graph, t in zip(graphs, times):
            graph.replay()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            stop.record()
            stop.synchronize()
            t.append(start.elapsed_time(stop) / replays)
    return [dict(variant=variant_label(settings), median_ms=statistics.median(t), rounds_ms=t,
                 max_logit_diff=(lg - logits[0]).abs().max().item(),
                 argmax_agreement=(lg.argmax(-1) == logits[0].argmax(-1)).float().mean().item())
            for settings, t, lg in zip(variants, times, logits)]


AB_CSV = DATA_DIR / "bench" / "decode_step_ab.csv"
AB_COLUMNS = ["gpu", "date", "torch", "triton", "config", "dtype", "bs", "context", "variant", "median_ms",
              "rounds_ms", "max_logit_diff", "argmax_agreement"]


def ab_rows(config: GPTConfig, results: list[dict], *, batch: int, context: int = 512, dtype="fp16") -> list[dict]:
    """CSV rows (AB_COLUMNS) of decode_step_ab's results, with the GPU, date and versions."""
    return [dict(run_info(), config=config.model_name, dtype=dtype, bs=batch, context=context,
                 **{**r, "rounds_ms": " ".join(f"{t:.4f}" for t in r["rounds_ms"])}) for r in results]


def run(config: GPTConfig | None = None, model_dir=None, *, dtype="fp16", batches=GRID_BATCHES, cells=GRID_CELLS,
        repeats: int = 10, with_peer: bool = True, with_hf: bool = True, csv_path: Path | None = DEFAULT_CSV,
        label: str | None = None, sampling: dict | None = None, with_clocks: bool = True) -> list[dict]:
    """FT's grid (see the module docstring). `sampling` (top_k, top_p, temperature) applies to ftlab's decode
    step and generate(); the peer and HF always decode greedily (their sampling is not what is compared).
    with_clocks: sample the SM clock and power while ftlab's calls run (ftlab/gpu_clocks.py)."""
    sampling = dict(sampling or {})

    device = torch.device("cuda")
    torch_dtype = compute_dtype(dtype)
    if model_dir is not None:
        from .checkpoint import load_cmodel

        config, ft = load_cmodel(model_dir)
    else:
        config = config or GPT_345M
        ft = random_ft_tensors(config, dtype=torch_dtype, device=device)
    model = GPT.from_ft_tensors(config, ft, dtype=dtype, device=device)
    ceil = measure_ceilings(device, torch_dtype if torch_dtype != torch.float32 else torch.float16)
    capacity = max(n_in + n_out for n_in, n_out in cells)
    peer = Peer(config, ft, dtype, device, capacity=-(-capacity // 128) * 128) if with_peer else None
    hf = _hf_model(config, ft, torch_dtype, device) if with_hf else None
    del ft
    common = dict(run_info(), config=label or config.model_name,
                  layers=config.num_layer, heads=config.head_num, size_per_head=config.size_per_head,
                  vocab=config.vocab_size, dtype=dtype, tp=1, pp=1, sampling=sampling_label(sampling))
    rows = []

    def done(row):  # print and save each row as soon as it exists: a long run killed midway keeps its rows
        for base in ("peer", "hf", "floor"):
            if row.get(f"{base}_ms"):
                row[f"ftlab_vs_{base}"] = row["ftlab_ms"] / row[f"{base}_ms"]
        row.update(bandwidth_tbps=ceil.bandwidth / 1e12, matmul_tflops=ceil.matmul / 1e12)
        if not rows:
            print_header(row)
        rows.append(row)
        print_row(row)
        if csv_path is not None:
            append_csv([row], csv_path)

    step, clocks = sampled(lambda: decode_step_ms(model, **sampling), device, enabled=with_clocks)
    weight_bytes = param_count(config) * torch.finfo(torch_dtype).bits // 8
    kv_bytes = 2 * config.num_layer * 512 * config.hidden * torch.finfo(torch_dtype).bits // 8
    done(dict(common, cell="decode_step", bs=1, n_in=512, n_out=1, ftlab_ms=statistics.median(step),
              ftlab_spread=_spread(step), floor_ms=(weight_bytes + kv_bytes) / ceil.bandwidth * 1e3,
              peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9, **_clock_columns(clocks)))
    for batch in batches:
        for n_in, n_out in cells:
            prompts = random_prompts(batch, n_in, config.vocab_size)
            torch.cuda.reset_peak_memory_stats(device)
            # two untimed calls: the first captures the decode graph, the second the prefill graph (second sight).
            # (Until session 30 each call's output was kept in a variable here and freed by the next call, inside
            # its timing: ~0.3-0.5 ms more at bs64, see _time_ms.)
            last: list = []
            t_ours, clocks = sampled(lambda: _time_ms(lambda: generate(model, prompts, max_new_tokens=n_out,
                                                                       **sampling), repeats, warmup=2, last=last),
                                     device, enabled=with_clocks)
            result = last[0]
            row = dict(common, cell="e2e", bs=batch, n_in=n_in, n_out=n_out, ftlab_ms=statistics.median(t_ours),
                       ftlab_spread=_spread(t_ours), floor_ms=floor_ms(config, batch, n_in, n_out, ceil),
                       peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                       full_length=all(n == n_in + n_out for n in result.sequence_length), **_clock_columns(clocks))
            if peer is not None:
                t_peer = _time_ms(lambda: peer.run(prompts, n_out), repeats, warmup=2)
                row.update(peer_ms=statistics.median(t_peer), peer_spread=_spread(t_peer))
            if hf is not None:
                ids = torch.tensor(prompts, device=device)
                t_hf = _time_ms(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                    max_new_tokens=n_out, min_new_tokens=n_out,
                                                    pad_token_id=config.end_id), max(2, repeats // 4))
                row.update(hf_ms=statistics.median(t_hf))
            done(row)
    return rows


def run_parallel(model_dir=None, *, tensor_para_size: int, layer_para_size: int, dtype="fp16", batches=(1, 8),
                 cells=GRID_CELLS, repeats: int = 10, csv_path: Path | None = DEFAULT_CSV, label: str | None = None,
                 tokens_path: Path | None = None, config: GPTConfig | None = None,
                 random_seed: int = 0) -> list[dict]:
    """Under torchrun: FT's grid for a T x L split (ftlab only: the peers are single-GPU), of a c-model, or with
    model_dir None of random weights of `config` drawn on each rank's GPU (no files; the same weights for every
    split, so splits can be compared token for token). Every rank runs the same calls; rank 0 prints and saves.
    tokens_path: rank 0 also writes the greedy output ids of every cell as JSON."""
    import json

    import torch.distributed as dist

    from .parallel import ParallelEngine

    engine = ParallelEngine(model_dir, config=config if model_dir is None else None, random_seed=random_seed,
                            tensor_para_size=tensor_para_size, layer_para_size=layer_para_size, dtype=dtype)
    config, device, rank = engine.config, engine.device, engine.layout.rank
    common = dict(run_info(), config=label or config.model_name,
                  layers=config.num_layer, heads=config.head_num, size_per_head=config.size_per_head,
                  vocab=config.vocab_size, dtype=dtype, tp=tensor_para_size, pp=layer_para_size, sampling="greedy")
    rows, tokens = [], {}
    for batch in batches:
        for n_in, n_out in cells:
            prompts = random_prompts(batch, n_in, config.vocab_size)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(repeats + 2):  # untimed: call 0 captures the decode graphs, call 1 the prefill graph
                if dist.is_initialized():
                    dist.barrier()
                torch.cuda.synchronize()
                result = None  # the previous call's output is freed before the clock starts (the caller's time)
                start = time.perf_counter()
                result = generate(engine, prompts, max_new_tokens=n_out)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - start) * 1e3)
            tokens[f"bs{batch}_{n_in}_{n_out}"] = result.output_ids
            row = dict(common, cell="e2e", bs=batch, n_in=n_in, n_out=n_out, ftlab_ms=statistics.median(times),
                       ftlab_spread=_spread(times), peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                       full_length=all(n == n_in + n_out for n in result.sequence_length),
                       bandwidth_tbps=float("nan"), matmul_tflops=float("nan"))
            if rank == 0:
                if not rows:
                    print_header(row)
                print_row(row)
                if csv_path is not None:
                    append_csv([row], csv_path)
            rows.append(row)
    if rank == 0 and tokens_path is not None:
        Path(tokens_path).write_text(json.dumps(tokens))
    engine.close()
    return rows


def _hf_model(config, ft, dtype, device):
    from ._kernels_shadow import import_pypi_kernels

    import_pypi_kernels()  # before transformers: the repo's kernels/ folder must not stand in for the PyPI package
    try:
        import transformers
    except ImportError:
        return None
    from .convert.huggingface import ft_to_hf_state_dict

    hf_config = transformers.GPT2Config(n_embd=config.hidden, n_head=config.head_num, n_layer=config.num_layer,
                                        vocab_size=config.vocab_size, n_positions=config.max_pos_seq_len,
                                        n_inner=config.inter_size, layer_norm_epsilon=config.layernorm_eps,
                                        bos_token_id=config.start_id, eos_token_id=config.end_id)
    model = transformers.GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in ft_to_hf_state_dict(ft, config).items()}, strict=False)
    return model


def _triton_version() -> str:
    import triton

    return triton.__version__


COLUMNS = ["gpu", "date", "torch", "triton", "config", "layers", "heads", "size_per_head", "vocab", "dtype", "tp",
           "pp", "cell", "bs", "n_in", "n_out", "sampling", "ftlab_ms", "ftlab_spread", "peer_ms", "peer_spread",
           "hf_ms", "floor_ms", "ftlab_vs_peer", "ftlab_vs_hf", "ftlab_vs_floor", "peak_mem_gb", "full_length",
           "bandwidth_tbps", "matmul_tflops", "sm_clock_mhz", "sm_clock_min_mhz", "power_w", "power_capped"]


def _clock_columns(clocks: ClockSummary | None) -> dict:
    """The clock columns of a row (ftlab/gpu_clocks.py: sampled while ftlab's calls of the cell ran; none without
    nvidia-smi)."""
    return clocks.row() if clocks is not None else {}


def append_csv(rows: list[dict], path: Path, columns: list[str] = COLUMNS) -> None:
    """Append rows; a file written before a column was added is first rewritten with the new header (its rows keep
    their values; the new column stays empty there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_columns, old_rows = reader.fieldnames or [], list(reader)
        if old_columns != columns:
            unknown = [c for c in old_columns if c not in columns]
            if unknown:
                raise ValueError(f"{path}: columns {unknown} are not bench columns; append to another CSV")
            tmp = path.with_suffix(path.suffix + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_header(r: dict) -> None:
    print(f"{r['gpu']}  {r['config']}  {r['dtype']}  tp={r['tp']} pp={r['pp']}  {r.get('sampling') or 'greedy'}  "
          f"copy {r['bandwidth_tbps']:.2f} TB/s  matmul {r['matmul_tflops']:.0f} TFLOP/s")
    print(f"{'cell':>12} {'bs':>3} {'in->out':>8} {'ftlab ms':>10} {'+-':>5} {'peer ms':>9} {'hf ms':>9} "
          f"{'floor ms':>9} {'x peer':>7} {'x floor':>7} {'MHz':>5} {'W':>4} {'capped':>6}", flush=True)


def print_row(r: dict) -> None:
    print(f"{r['cell']:>12} {r['bs']:>3} {str(r['n_in']) + '->' + str(r['n_out']):>8} {_fmt(r['ftlab_ms']):>10} "
          f"{_fmt(r['ftlab_spread'] * 100, '.0f') + '%':>5} {_fmt(r.get('peer_ms')):>9} "
          f"{_fmt(r.get('hf_ms'), '.1f'):>9} {_fmt(r.get('floor_ms')):>9} {_fmt(r.get('ftlab_vs_peer'), '.2f'):>7} "
          f"{_fmt(r.get('ftlab_vs_floor'), '.2f'):>7} {_fmt(r.get('sm_clock_mhz'), '.0f'):>5} "
          f"{_fmt(r.get('power_w'), '.0f'):>4} {_fmt(r.get('power_capped'), '.0%'):>6}", flush=True)
