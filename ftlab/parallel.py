"""Tensor x layer (pipeline) parallelism on torch.distributed, layered over ftlab.model.

Ranks: P = tensor_para_size (T) x layer_para_size (L); global rank = stage * T + tp_rank, so the T ranks of a stage
are neighbours. Each rank reads only its own files: its `.R.bin` shards (R = tp_rank) of its stage's layers, plus the
embeddings on the first stage and the final LayerNorm / LM head on the last. Without files (benchmarks of large
shapes: `ParallelEngine.random(config, ...)`), each rank draws the same tensors on its own device instead, one full
layer at a time (ftlab.checkpoint.random_ft_tensors gives every tensor its own seed), and keeps only its shard: no
rank ever holds more than its share plus one full layer, and the model equals the single-process one of that seed.

Tensor parallelism (Megatron style, as FasterTransformer splits the files): QKV and fc1 are column-split, the attention
output projection and fc2 row-split with an all-reduce after each (GPT.all_reduce). The token/position embeddings and
the LM head are REPLICATED on every rank of their stage rather than vocab-split: the replicated copy costs V*H weights
per rank (0.1 GB for GPT-345M, 0.6 GB for GPT-20B in fp16) but avoids an all-gather of the logits every step, and
sampling needs the whole row anyway; every rank of the last stage therefore holds identical logits.

Layer parallelism: stage s owns layers [s*n/L, (s+1)*n/L). Hidden states travel stage to stage with send/recv between
ranks of equal tp_rank. In the context phase the batch is cut into micro-batches of layer_para_batch_size so stage s+1
works on micro-batch i while stage s computes i+1. The last stage samples; tokens (and log-probs) are broadcast from its
lead rank to every rank, so all ranks run the same loop and the same seed gives the same tokens whatever T and L are.

Failures never hang: inputs are validated identically on every rank before any collective (each rank prints the same
message and exits non-zero, and torchrun then stops the rest), and every collective has a bounded timeout.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_cmodel, random_ft_tensors, resolve_model_dir
from .config import GPTConfig, compute_dtype
from .generate import (GenerationOutput, LocalSession, RequestParams, cache_capacity, capture_cuda_graph, generate,
                       lru_get)
from .processing import LogitsProcessor
from .kernels.sampling import sample
from .model import GPT, GPTWeights, device_weights, pack_prompts


class ParallelError(ValueError):
    """The requested split cannot run: the message says why, identically on every rank."""


@dataclass(frozen=True)
class Layout:
    tp: int  # tensor_para_size
    pp: int  # layer_para_size
    rank: int
    world: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def last_stage_lead(self) -> int:
        return (self.pp - 1) * self.tp

    def stage_layers(self, num_layer: int) -> range:
        per = num_layer // self.pp
        return range(self.stage * per, (self.stage + 1) * per)

    def validate(self, config: GPTConfig, model_dir: Path | None) -> None:
        """model_dir None: random weights, drawn for any split (no files to match)."""
        if self.world != self.tp * self.pp:
            raise ParallelError(f"{self.world} processes but tensor_para_size={self.tp} x layer_para_size={self.pp} "
                                f"= {self.tp * self.pp}; start torchrun with --nproc-per-node {self.tp * self.pp}")
        if model_dir is not None and config.tensor_para_size != self.tp:
            raise ParallelError(
                f"{model_dir}: files are split for tensor_para_size={config.tensor_para_size}, not {self.tp}; run with "
                f"--tensor-para-size {config.tensor_para_size} or convert again with -i_g {self.tp}")
        if config.head_num % self.tp:
            raise ParallelError(f"head_num={config.head_num} is not divisible by tensor_para_size={self.tp}")
        if config.inter_size % self.tp:
            raise ParallelError(f"inter_size={config.inter_size} is not divisible by tensor_para_size={self.tp}")
        if config.num_layer % self.pp:
            raise ParallelError(f"num_layer={config.num_layer} is not divisible by layer_para_size={self.pp}")


def init_process_group(timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Join the torchrun job (NCCL on GPUs, gloo on CPUs); returns (rank, world size, this rank's device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return rank, world, device


def random_stage_weights(config: GPTConfig, layout: Layout, *, seed: int = 0, std: float = 0.02,
                         dtype: torch.dtype, device) -> GPTWeights:
    """This rank's weights of the model random_ft_tensors(config, seed=seed, std=std) gives, drawn on `device`.

    Each of the stage's layers is drawn as full tensors, split, and dropped before the next is drawn, so the peak
    is this rank's share plus one full layer (GPT-20B in fp16: 0.9 GB a layer; 20 GB a rank at T=2) and the host
    holds nothing. The tensors are drawn in the compute dtype: fp32 noise rounded once, as a cast of fp32 would be."""
    layers = layout.stage_layers(config.num_layer)
    shard = dict(dtype=dtype, device=device, tp_rank=layout.tp_rank, tp_size=layout.tp, is_shard=False)
    blocks = []
    for layer in layers:
        full = random_ft_tensors(config, seed=seed, std=std, dtype=dtype, device=device, layers=[layer],
                                 embeddings=False)
        blocks += device_weights(config, full, layers=range(layer, layer + 1), first_stage=False, last_stage=False,
                                 **shard).blocks
        del full  # the unsplit layer goes before the next one is drawn
    weights = GPTWeights(blocks=blocks, first_layer=layers.start)
    if layout.is_first_stage or layout.is_last_stage:
        ends = random_ft_tensors(config, seed=seed, std=std, dtype=dtype, device=device, layers=[])
        edge = device_weights(config, ends, layers=range(layers.start, layers.start),
                              first_stage=layout.is_first_stage, last_stage=layout.is_last_stage, **shard)
        weights.wte, weights.wpe, weights.lm_head = edge.wte, edge.wpe, edge.lm_head
        weights.lnf_weight, weights.lnf_bias = edge.lnf_weight, edge.lnf_bias
        weights.lm_head_bias, weights.lm_head_ln_row_sums = edge.lm_head_bias, edge.lm_head_ln_row_sums
    return weights


class ParallelEngine:
    """This rank's share of a GPT split T x L ways; `stream`/`generate` accept it in place of a GPT.

    ParallelEngine(model_dir, ...) reads a c-model split for T; ParallelEngine(None, config=GPTConfig(...),
    random_seed=s, ...) or ParallelEngine.random(config, seed=s, ...) draws random_ft_tensors(config, seed=s,
    std=random_std) on each rank's device instead (no files; any T and L the shape allows)."""

    def __init__(self, model_dir=None, *, config: GPTConfig | None = None, random_seed: int = 0,
                 random_std: float = 0.02, tensor_para_size: int = 1, layer_para_size: int = 1, dtype="fp16",
                 layer_para_batch_size: int | None = None, timeout_s: float = 300.0):
        if (model_dir is None) == (config is None):
            raise ParallelError("pass either model_dir (a c-model) or config (random weights of that shape), "
                                f"not {'both' if config is not None else 'neither'}")
        rank, world, self.device = init_process_group(timeout_s)
        self.layout = Layout(tensor_para_size, layer_para_size, rank, world)
        if model_dir is not None:
            model_dir = resolve_model_dir(model_dir)
            self.config = GPTConfig.from_ini(model_dir / "config.ini")
        else:
            self.config = config.replace(tensor_para_size=tensor_para_size)
        self.layout.validate(self.config, model_dir)
        self.layer_para_batch_size = layer_para_batch_size
        lay = self.layout
        tp_groups = [dist.new_group(list(range(s * lay.tp, (s + 1) * lay.tp))) if world > 1 else None
                     for s in range(lay.pp)]  # every rank creates every group, in the same order
        self.tp_group = tp_groups[lay.stage]
        if model_dir is None:
            weights = random_stage_weights(self.config, lay, seed=random_seed, std=random_std,
                                           dtype=compute_dtype(dtype), device=self.device)
        else:
            layers = lay.stage_layers(self.config.num_layer)
            _, ft = load_cmodel(model_dir, tp_rank=lay.tp_rank, layers=layers,
                                embeddings=lay.is_first_stage or lay.is_last_stage)
            weights = device_weights(self.config, ft, dtype=compute_dtype(dtype), device=self.device,
                                     tp_rank=lay.tp_rank, tp_size=lay.tp, is_shard=True, layers=layers,
                                     first_stage=lay.is_first_stage, last_stage=lay.is_last_stage)
        self.model = GPT(self.config, weights, tp_size=lay.tp, tp_rank=lay.tp_rank,
                         all_reduce=self._all_reduce if lay.tp > 1 else None, fused_decode=lay.world == 1)
        self.stage_graphs: dict = {}  # StageGraph by (batch, KV capacity), pipeline runs only

    def stage_graph(self, batch_size: int, capacity: int) -> "StageGraph":
        """This stage's captured decode step for (batch, capacity); least recently used ones beyond
        MAX_STAGE_GRAPHS are dropped with their caches. Every rank captures at the same calls (same keys)."""
        lay = self.layout
        return lru_get(self.stage_graphs, (batch_size, capacity),
                       lambda: StageGraph(self.model, batch_size, capacity, lay.is_first_stage, lay.is_last_stage),
                       MAX_STAGE_GRAPHS)

    def close(self, *, leave_group: bool = True) -> None:
        """Free this engine's captured CUDA graphs, then (leave_group) leave the process group; on every rank.

        The graphs hold captured NCCL all-reduces, and destroy_process_group() hangs on every rank while they
        live (2 H200s, torch 2.11, NCCL 2.28.9: T=2 runs that had generated never exited); freed first, it
        returns in ~0.5 s."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stage_graphs.clear()
        self.model.graph_cache.clear()
        gc.collect()  # graphs caught in reference cycles (sessions, closures) go now, not at some later collection
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if leave_group and dist.is_initialized():
            dist.destroy_process_group()

    @classmethod
    def random(cls, config: GPTConfig, *, seed: int = 0, std: float = 0.02, **kwargs) -> "ParallelEngine":
        """Random weights of `config`'s shape, no files (kwargs: tensor_para_size, layer_para_size, dtype, ...)."""
        return cls(None, config=config, random_seed=seed, random_std=std, **kwargs)

    def _all_reduce(self, x: torch.Tensor) -> None:
        dist.all_reduce(x, group=self.tp_group)

    def open_session(self, prompts, max_new_tokens, params: RequestParams, use_cuda_graph: bool | None = None):
        if self.layout.pp == 1:
            # one stage: every tensor-parallel rank holds the same all-reduced logits and samples the same tokens
            # (same seeds, same kernels), so the single-process session runs as is, CUDA graph included (the
            # all-reduces are captured with the rest of the decode step)
            return LocalSession(self.model, prompts, max_new_tokens, params, use_cuda_graph=use_cuda_graph)
        return PipelineSession(self, prompts, max_new_tokens, params, use_cuda_graph=use_cuda_graph)

    def beam_model(self):
        """What ftlab.beam searches with: at one stage the rank's GPT (every tensor-parallel rank holds the same
        all-reduced logits and runs the same search, the all-reduces inside keeping them in step), else a
        PipelineBeamModel."""
        return self.model if self.layout.pp == 1 else PipelineBeamModel(self)

    @torch.no_grad()
    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor] | None:
        """Logits of every position (the parallel twin of GPT.logits); on the last stage, None elsewhere."""
        session = PipelineSession(self, [list(s) for s in sequences], 1, params=None)
        batch = pack_prompts(session.prompts, self.device)

        def run(x):
            return self.model.run_blocks_prefill(x, batch.cu_seqlens, batch.max_seqlen, session.cache)

        x = session.link.run((batch.token_ids, batch.positions), run, rows=len(batch.token_ids))
        session.link.flush()
        return list(self.model.lm_logits(x).split(batch.lengths)) if x is not None else None


def _send(x: torch.Tensor, dst: int):
    # gloo moves bytes fine but lacks some reductions/dtypes (bf16): ship hidden states as raw bytes
    return dist.isend(x.view(torch.uint8), dst)


def _recv(shape, dtype, device, src: int, out: torch.Tensor | None = None) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device) if out is None else out
    dist.recv(buf.view(torch.uint8), src)
    return buf


class StageLink:
    """Hidden states between neighbouring stages (ranks of equal tp_rank). A send is asynchronous: its tensor is
    kept in `pending` until flush(), which every rank calls before its next broadcast."""

    def __init__(self, engine: "ParallelEngine"):
        self.engine, self.lay, self.model = engine, engine.layout, engine.model
        self.pending = []  # (isend handle, tensor) pairs: the tensor must live until its send completes

    def run(self, inputs, run_blocks, rows: int) -> torch.Tensor | None:
        """Embed `inputs` (token ids, positions) on the first stage or receive (rows, H) hidden states, run this
        stage's blocks, send them on; the last stage returns its output, the others None."""
        lay, model = self.lay, self.model
        if lay.is_first_stage:
            x = model.embed(*inputs)
        else:
            x = _recv((rows, self.engine.config.hidden), model.dtype, self.engine.device, src=lay.rank - lay.tp)
        x = run_blocks(x)
        if not lay.is_last_stage:
            self.send(x.contiguous())
            return None
        return x

    def send(self, x: torch.Tensor) -> None:
        self.pending.append((_send(x, dst=self.lay.rank + self.lay.tp), x))

    def flush(self) -> None:
        for handle, _ in self.pending:
            handle.wait()
        self.pending = []


class StageGraph:
    """A pipeline stage's share of the decode step captured as a CUDA graph over static buffers (the stage twin of
    ftlab.generate.DecodeGraph): embedding (first stage) or the received hidden states, this stage's blocks, and
    the LM head (last stage). Send/recv, the logits processors and sampling stay outside, so every decoding
    feature works with it. Kept on the engine per (batch, KV capacity) with its KV cache."""

    def __init__(self, model: GPT, batch_size: int, capacity: int, first: bool, last: bool):
        dev = model.device
        self.model, self.first, self.last = model, first, last
        self.cache = model.new_kv_cache(batch_size, capacity)
        self.positions = torch.zeros(batch_size, dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        self.hidden_in = torch.zeros(batch_size, model.config.hidden, dtype=model.dtype, device=dev)
        # (the warm-up run writes cache slot 0; the context phase overwrites it before any replay)
        self.graph, self.out = capture_cuda_graph(self._step, dev)  # out: (B, H) to send on, or (B, V) logits

    def _step(self) -> torch.Tensor:
        x = self.model.embed(self.tokens, self.positions) if self.first else self.hidden_in
        x = self.model.run_blocks_decode(x, self.positions, self.cache)
        self.positions += 1
        return self.model.lm_logits(x) if self.last else x


MAX_STAGE_GRAPHS = 4


class PipelineSession:
    """One generate() call across the ranks (the parallel twin of ftlab.generate.LocalSession)."""

    def __init__(self, engine: ParallelEngine, prompts: list[list[int]], max_new_tokens: int, params: RequestParams,
                 use_cuda_graph: bool | None = None):
        self.engine, self.model, self.lay, self.params = engine, engine.model, engine.layout, params
        self.prompts = prompts
        B = len(prompts)
        capacity = cache_capacity([len(p) for p in prompts], max_new_tokens, engine.config.max_pos_seq_len)
        if use_cuda_graph is None:
            use_cuda_graph = engine.device.type == "cuda" and params is not None
        self.graph = engine.stage_graph(B, capacity) if use_cuda_graph else None
        self.cache = self.graph.cache if self.graph is not None else self.model.new_kv_cache(B, capacity)
        self.positions = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=engine.device)
        self.steps = torch.zeros(B, dtype=torch.int32, device=engine.device)
        self.link = StageLink(engine)
        # every rank keeps the processor's state (it only needs the shared tokens); the last stage applies it
        self.processor = (LogitsProcessor.build(prompts, engine.config.vocab_size, engine.device, params)
                          if params is not None else None)

    def _sample_and_share(self, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the last stage, broadcast (token, log-prob) of every request to all ranks."""
        B, dev = len(self.prompts), self.engine.device
        shared = torch.empty(2, B, dtype=torch.float64, device=dev)  # token ids are exact in float64
        if self.lay.is_last_stage:
            if self.processor is not None:
                logits = self.processor.process(logits, self.steps)
            t = self.params.tensors
            tokens, log_probs = sample(logits, t["top_k"], t["top_p"], t["temperature"], t["seeds"], self.steps,
                                       return_logprobs=True)
            shared[0], shared[1] = tokens.double(), log_probs.double()
        self.steps += 1
        if self.lay.world > 1:
            self.link.flush()
            dist.broadcast(shared, src=self.lay.last_stage_lead)
        tokens = shared[0].long()
        stopped = self.processor.observe(tokens) if self.processor is not None else None
        return tokens, shared[1].float(), stopped

    def first(self):
        B = len(self.prompts)
        mb = self.engine.layer_para_batch_size or max(1, -(-B // self.lay.pp))
        last_hidden = []
        for start in range(0, B, mb):
            stop = min(B, start + mb)
            batch = pack_prompts(self.prompts[start:stop], self.engine.device)
            cache = self.cache.rows(start, stop)

            # the last stage's last block carries on only each prompt's last token (GPT.run_blocks_prefill)
            def run(x, batch=batch, cache=cache, last=self.lay.is_last_stage):
                return self.model.run_blocks_prefill(x, batch.cu_seqlens, batch.max_seqlen, cache,
                                                     last_tokens_only=last)

            x = self.link.run((batch.token_ids, batch.positions), run, rows=len(batch.token_ids))
            if x is not None:
                last_hidden.append(x)  # (prompts of this micro-batch, H)
        logits = self.model.lm_logits(torch.cat(last_hidden)) if self.lay.is_last_stage else None
        if self.graph is not None:
            self.graph.positions.copy_(self.positions)
        return self._sample_and_share(logits)

    def next(self, tokens: torch.Tensor):
        lay, graph = self.lay, self.graph
        if graph is not None:
            if lay.is_first_stage:
                graph.tokens.copy_(tokens)
            else:
                _recv(None, None, None, src=lay.rank - lay.tp, out=graph.hidden_in)
            graph.graph.replay()
            if not lay.is_last_stage:  # graph.out is rewritten by the next replay, which waits for this send
                self.link.send(graph.out)
            return self._sample_and_share(graph.out if lay.is_last_stage else None)

        def run(x):
            return self.model.run_blocks_decode(x, self.positions, self.cache)

        x = self.link.run((tokens, self.positions), run, rows=len(self.prompts))
        self.positions += 1
        return self._sample_and_share(self.model.lm_logits(x) if x is not None else None)


class PipelineBeamModel:
    """The stages as beam search sees a model: prefill and decode return logits on the last stage and None on the
    others, and share() gives every rank the last stage's choice of continuations, so all ranks keep the same
    hypotheses and reorder their own layers' KV-cache rows alike. Eager (no CUDA graph), like beam search in one
    process."""

    def __init__(self, engine: ParallelEngine):
        self.config, self.device = engine.config, engine.device
        self.lay, self.model, self.link = engine.layout, engine.model, StageLink(engine)

    def new_kv_cache(self, batch_size: int, capacity: int):
        return self.model.new_kv_cache(batch_size, capacity)  # this stage's layers only

    def prefill(self, token_ids, positions, cu_seqlens, max_seqlen: int, cache) -> torch.Tensor | None:
        def run(x):
            return self.model.run_blocks_prefill(x, cu_seqlens, max_seqlen, cache,
                                                 last_tokens_only=self.lay.is_last_stage)

        x = self.link.run((token_ids, positions), run, rows=len(token_ids))
        return self.model.lm_logits(x) if x is not None else None

    def decode(self, token_ids, positions, cache) -> torch.Tensor | None:
        x = self.link.run((token_ids, positions), lambda x: self.model.run_blocks_decode(x, positions, cache),
                          rows=len(token_ids))
        return self.model.lm_logits(x) if x is not None else None

    def share(self, scores: torch.Tensor | None, index: torch.Tensor | None, shape) -> tuple[torch.Tensor, ...]:
        """(scores, flat indices) of the best continuations, `shape` each, from the last stage's lead rank."""
        shared = torch.empty(2, *shape, dtype=torch.float64, device=self.device)  # indices < 2**53 stay exact
        if self.lay.is_last_stage:
            shared[0], shared[1] = scores.double(), index.double()
        self.link.flush()
        dist.broadcast(shared, src=self.lay.last_stage_lead)
        return shared[0].float(), shared[1].long()


# --- a Python API for notebooks: run the ranks under torchrun in a subprocess ------------------------------------------

def run_workers(model_dir, jobs: list[dict], *, tensor_para_size: int = 1, layer_para_size: int = 1,
                dtype: str = "fp16", layer_para_batch_size: int | None = None, timeout_s: float = 600.0,
                config: GPTConfig | None = None, random_seed: int = 0, random_std: float = 0.02) -> list:
    """Start T x L ranks with torchrun (a subprocess) and run `jobs` on them: {"generate": kwargs with prompts} or
    {"logits": sequences}. Returns one result per job (GenerationOutput, or a list of (T, V) logits tensors).
    model_dir None and a config: the ranks draw random_ft_tensors(config, seed=random_seed, std=random_std)."""
    nproc = tensor_para_size * layer_para_size
    if (model_dir is None) == (config is None):
        raise ParallelError("run_workers: pass either model_dir or config (random weights), not both or neither")
    random_weights = (None if config is None else
                      dict(config=dataclasses.asdict(config), seed=random_seed, std=random_std))
    with tempfile.TemporaryDirectory(prefix="ftlab-launch-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps(dict(
            model_dir=None if model_dir is None else str(model_dir), random=random_weights, dtype=dtype,
            tensor_para_size=tensor_para_size, layer_para_size=layer_para_size,
            layer_para_batch_size=layer_para_batch_size, timeout_s=timeout_s, jobs=jobs)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ftlab.parallel", str(request), str(result)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 60)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error:" in line] or proc.stderr.splitlines()[-20:]
            raise ParallelError(f"parallel workers failed (exit {proc.returncode}):\n" + "\n".join(errors))
        outputs = json.loads(result.read_text())
    return [_generation_output(out) if "generate" in job else [torch.tensor(t) for t in out]
            for job, out in zip(jobs, outputs)]


def _generation_output(fields: dict) -> GenerationOutput:
    """A worker's GenerationOutput.__dict__ back as the object, extras (beam search's beams) as attributes."""
    known = {f.name for f in dataclasses.fields(GenerationOutput)}
    out = GenerationOutput(**{k: v for k, v in fields.items() if k in known})
    for k, v in fields.items():
        if k not in known:
            setattr(out, k, v)
    return out


def launch(model_dir, prompts: list[list[int]], *, tensor_para_size: int = 1, layer_para_size: int = 1,
           dtype: str = "fp16", layer_para_batch_size: int | None = None, timeout_s: float = 600.0,
           config: GPTConfig | None = None, random_seed: int = 0, random_std: float = 0.02,
           **generate_kwargs) -> GenerationOutput:
    """Generate with T x L worker processes; generate_kwargs as for ftlab.generate.generate. model_dir None and a
    config: random weights of that shape (as run_workers)."""
    job = {"generate": dict(generate_kwargs, prompts=[list(map(int, p)) for p in prompts])}
    return run_workers(model_dir, [job], tensor_para_size=tensor_para_size, layer_para_size=layer_para_size,
                       dtype=dtype, layer_para_batch_size=layer_para_batch_size, timeout_s=timeout_s, config=config,
                       random_seed=random_seed, random_std=random_std)[0]


def _worker(request_path: str, result_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    try:
        drawn = req.get("random")  # random weights instead of model_dir
        weights = (dict(config=GPTConfig(**drawn["config"]), random_seed=drawn["seed"], random_std=drawn["std"])
                   if drawn else {})
        engine = ParallelEngine(req["model_dir"], tensor_para_size=req["tensor_para_size"],
                                layer_para_size=req["layer_para_size"], dtype=req["dtype"],
                                layer_para_batch_size=req["layer_para_batch_size"], timeout_s=req["timeout_s"],
                                **weights)
        outputs = []
        for job in req["jobs"]:
            if "generate" in job:
                kwargs = dict(job["generate"])
                outputs.append(generate(engine, kwargs.pop("prompts"), **kwargs).__dict__)
            else:
                logits = engine.logits(job["logits"])
                outputs.append([t.float().cpu().tolist() for t in logits] if logits is not None else None)
    except ValueError as exc:
        print(f"ftlab.parallel (rank {rank}): error: {exc}", file=sys.stderr, flush=True)
        return 2
    if rank == engine.layout.last_stage_lead:  # holds the logits; tokens are the same on every rank
        Path(result_path).write_text(json.dumps(outputs))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
