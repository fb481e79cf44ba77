"""FasterTransformer's "c-model" directory: raw little-endian .bin files, one per tensor (per rank when split).

Layout of `<out>/<N>-gpu/` (N = tensor_para_size the files are split for), every Linear weight stored [in, out]:

    config.ini
    model.wte.bin [V, H]   model.wpe.bin [P, H]   model.final_layernorm.{weight,bias}.bin [H]
    model.lm_head.weight.bin [V, H]                      (optional; absent = tied to wte)
    model.layers.L.input_layernorm.{weight,bias}.bin [H]
    model.layers.L.post_attention_layernorm.{weight,bias}.bin [H]
    model.layers.L.attention.dense.bias.bin [H]          model.layers.L.mlp.dense_4h_to_h.bias.bin [H]
    model.layers.L.attention.query_key_value.weight.R.bin [H, 3, H/N]
    model.layers.L.attention.query_key_value.bias.R.bin   [3, H/N]
    model.layers.L.attention.dense.weight.R.bin           [H/N, H]
    model.layers.L.mlp.dense_h_to_4h.weight.R.bin         [H, I/N]
    model.layers.L.mlp.dense_h_to_4h.bias.R.bin           [I/N]
    model.layers.L.mlp.dense_4h_to_h.weight.R.bin         [I/N, H]

Tensors here are named without the rank suffix and `.bin`; a "full" tensor is the unsplit one (N = 1 shape).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .config import GPTConfig

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}

# per-layer tensors: suffix -> axis along which tensor parallelism splits it (None: unsplit, kept on every rank)
LAYER_TENSORS = {
    "input_layernorm.weight": None,
    "input_layernorm.bias": None,
    "attention.query_key_value.weight": -1,  # column-parallel: [H, 3, H] -> [H, 3, H/N]
    "attention.query_key_value.bias": -1,  # [3, H] -> [3, H/N]
    "attention.dense.weight": 0,  # row-parallel: [H, H] -> [H/N, H]
    "attention.dense.bias": None,
    "post_attention_layernorm.weight": None,
    "post_attention_layernorm.bias": None,
    "mlp.dense_h_to_4h.weight": -1,  # column-parallel: [H, I] -> [H, I/N]
    "mlp.dense_h_to_4h.bias": -1,  # [I] -> [I/N]
    "mlp.dense_4h_to_h.weight": 0,  # row-parallel: [I, H] -> [I/N, H]
    "mlp.dense_4h_to_h.bias": None,
}
LM_HEAD = "model.lm_head.weight"


class CheckpointError(ValueError):
    """A c-model directory is missing a file, has a file of the wrong size, or is split for another N."""


@dataclass(frozen=True)
class TensorSpec:
    name: str  # e.g. "model.layers.3.attention.dense.weight"
    shape: tuple  # full (unsplit) shape
    split_axis: int | None  # None: one unsplit file; else split across ranks along this axis

    def shard_shape(self, tp: int) -> tuple:
        if self.split_axis is None:
            return self.shape
        shape = list(self.shape)
        axis = self.split_axis % len(shape)
        if shape[axis] % tp:
            raise CheckpointError(f"{self.name}: dimension {axis} of shape {self.shape} is not divisible by "
                                  f"tensor_para_size={tp}")
        shape[axis] //= tp
        return tuple(shape)

    def filename(self, rank: int | None = None) -> str:
        if self.split_axis is None:
            return f"{self.name}.bin"
        return f"{self.name}.{rank}.bin"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def tensor_specs(config: GPTConfig, *, lm_head: bool = False, layers: Iterable[int] | None = None,
                 embeddings: bool = True) -> list[TensorSpec]:
    """Every tensor of a model with this config, in FT's file layout (full shapes)."""
    H, I, V, P = config.hidden, config.inter_size, config.vocab_size, config.max_pos_seq_len
    shapes = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "attention.query_key_value.weight": (H, 3, H), "attention.query_key_value.bias": (3, H),
        "attention.dense.weight": (H, H), "attention.dense.bias": (H,),
        "post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
        "mlp.dense_h_to_4h.weight": (H, I), "mlp.dense_h_to_4h.bias": (I,),
        "mlp.dense_4h_to_h.weight": (I, H), "mlp.dense_4h_to_h.bias": (H,),
    }
    specs = []
    if embeddings:
        specs += [TensorSpec("model.wte", (V, H), None), TensorSpec("model.wpe", (P, H), None),
                  TensorSpec("model.final_layernorm.weight", (H,), None),
                  TensorSpec("model.final_layernorm.bias", (H,), None)]
        if lm_head:
            specs.append(TensorSpec(LM_HEAD, (V, H), None))
    for layer in range(config.num_layer) if layers is None else layers:
        for suffix, axis in LAYER_TENSORS.items():
            specs.append(TensorSpec(layer_prefix(layer) + suffix, shapes[suffix], axis))
    return specs


def split_tensor(spec: TensorSpec, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """A full tensor -> the tp shards FT writes (a list of one for unsplit tensors)."""
    if tuple(full.shape) != spec.shape:
        raise CheckpointError(f"{spec.name}: got shape {tuple(full.shape)}, expected {spec.shape}")
    if spec.split_axis is None:
        return [full]
    spec.shard_shape(tp)  # divisibility check with a clear message
    return list(torch.chunk(full, tp, dim=spec.split_axis))


def join_shards(spec: TensorSpec, shards: list[torch.Tensor]) -> torch.Tensor:
    return shards[0] if spec.split_axis is None else torch.cat(shards, dim=spec.split_axis)


def resolve_model_dir(path: str | Path) -> Path:
    """Accept the `<N>-gpu` directory itself, or its parent when that holds exactly one `*-gpu` directory."""
    path = Path(path)
    if (path / "config.ini").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found")
    candidates = sorted(p for p in path.glob("*-gpu") if (p / "config.ini").is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{path}: no config.ini here and no '<N>-gpu' sub-directory with one")
    raise CheckpointError(f"{path}: several c-model directories ({', '.join(p.name for p in candidates)}); "
                          f"pass one of them")


def read_tensor(model_dir: Path, spec: TensorSpec, rank: int | None, tp: int, weight_data_type: str) -> torch.Tensor:
    path = model_dir / spec.filename(rank)
    shape = spec.shard_shape(tp)
    dtype = NUMPY_DTYPES[weight_data_type]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not path.is_file():
        hint = ""
        if spec.split_axis is not None and rank is not None:
            other = sorted(model_dir.glob(f"{spec.name}.*.bin"))
            if other:
                hint = (f" (found {len(other)} shard file(s) of it: the directory may be split for another "
                        f"tensor_para_size than {tp})")
        raise CheckpointError(f"{path}: missing file for tensor {spec.name} of shape {shape}{hint}")
    size = path.stat().st_size
    if size != expected:
        raise CheckpointError(f"{path}: {size} bytes, expected {expected} bytes = shape {shape} in "
                              f"{weight_data_type} (weight_data_type from config.ini); truncated or written for "
                              f"another config")
    array = np.fromfile(path, dtype=dtype).reshape(shape)
    return torch.from_numpy(array)


def _check_split_count(model_dir: Path, config: GPTConfig) -> None:
    """The rank suffixes present must be exactly 0..N-1 for N = config.ini's tensor_para_size."""
    probe = "model.layers.0.attention.query_key_value.weight"
    ranks = sorted(int(p.name[len(probe) + 1:-len(".bin")]) for p in model_dir.glob(f"{probe}.*.bin")
                   if p.name[len(probe) + 1:-len(".bin")].isdigit())
    if ranks and ranks != list(range(config.tensor_para_size)):
        raise CheckpointError(f"{model_dir}: files are split for tensor_para_size={len(ranks)} (ranks {ranks}) but "
                              f"config.ini says {config.tensor_para_size}")


def load_cmodel(model_dir: str | Path, *, tp_rank: int | None = None, layers: Iterable[int] | None = None,
                embeddings: bool = True) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Read a c-model directory into CPU tensors in FT layout, stored dtype.

    tp_rank None: a single process joins all N shards into full tensors. tp_rank r: only rank r's shards are read
    (shapes as split for N = config.tensor_para_size). `layers` restricts the layers read (a pipeline stage);
    `embeddings=False` skips wte/wpe/final LayerNorm/lm_head.
    """
    model_dir = resolve_model_dir(model_dir)
    config = GPTConfig.from_ini(model_dir / "config.ini")
    tp = config.tensor_para_size
    if tp_rank is not None and not 0 <= tp_rank < tp:
        raise CheckpointError(f"{model_dir}: tensor-parallel rank {tp_rank} but the files are split for "
                              f"tensor_para_size={tp}")
    _check_split_count(model_dir, config)
    lm_head = (model_dir / f"{LM_HEAD}.bin").is_file()
    weights = {}
    for spec in tensor_specs(config, lm_head=lm_head, layers=layers, embeddings=embeddings):
        if spec.split_axis is None:
            weights[spec.name] = read_tensor(model_dir, spec, None, tp, config.weight_data_type)
        elif tp_rank is not None:
            weights[spec.name] = read_tensor(model_dir, spec, tp_rank, tp, config.weight_data_type)
        else:
            shards = [read_tensor(model_dir, spec, r, tp, config.weight_data_type) for r in range(tp)]
            weights[spec.name] = join_shards(spec, shards)
    return config, weights


class CModelWriter:
    """Writes `<out_root>/<N>-gpu/` atomically: everything goes to a temporary directory beside it, which is renamed
    into place only when every expected tensor was written; on any error the temporary directory is removed and an
    existing output is left untouched.

        with CModelWriter(out_root, config, tensor_para_size=2) as writer:
            writer.add("model.wte", wte)   # full tensors in FT layout; split and cast here
    """

    def __init__(self, out_root: str | Path, config: GPTConfig, *, tensor_para_size: int,
                 weight_data_type: str = "fp32", force: bool = False, lm_head: bool = False):
        if weight_data_type not in NUMPY_DTYPES:
            raise ValueError(f"weight_data_type must be one of {list(NUMPY_DTYPES)}, got {weight_data_type!r}")
        if tensor_para_size < 1:
            raise ValueError(f"tensor_para_size must be >= 1, got {tensor_para_size}")
        self.config = config.replace(tensor_para_size=tensor_para_size, weight_data_type=weight_data_type)
        self.tp = tensor_para_size
        self.out_root = Path(out_root)
        self.final_dir = self.out_root / f"{tensor_para_size}-gpu"
        self.force = force
        if config.head_num % tensor_para_size:
            raise CheckpointError(f"head_num={config.head_num} is not divisible by tensor_para_size={tensor_para_size}")
        self.specs = {s.name: s for s in tensor_specs(self.config, lm_head=lm_head)}
        for spec in self.specs.values():
            spec.shard_shape(self.tp)  # fail before writing anything if a split is impossible
        self.written: set[str] = set()
        self.tmp_dir: Path | None = None

    def __enter__(self) -> "CModelWriter":
        if self.final_dir.exists() and not self.force:
            raise FileExistsError(f"{self.final_dir} already exists; pass --force to overwrite it")
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.final_dir.name}.tmp-", dir=self.out_root))
        return self

    def add(self, name: str, full: torch.Tensor) -> None:
        if name not in self.specs:
            raise CheckpointError(f"unexpected tensor {name!r} for this config")
        spec = self.specs[name]
        for rank, shard in enumerate(split_tensor(spec, full, self.tp)):
            self._write(spec, rank, shard)
        self.written.add(name)

    def _write(self, spec: TensorSpec, rank: int, shard: torch.Tensor) -> None:
        array = shard.detach().to(torch.float32).contiguous().numpy().astype(NUMPY_DTYPES[self.config.weight_data_type])
        array.tofile(self.tmp_dir / spec.filename(rank if spec.split_axis is not None else None))

    def copy_file(self, src: str | Path, dst_name: str | None = None) -> None:
        shutil.copy2(src, self.tmp_dir / (dst_name or Path(src).name))

    def _missing(self) -> list[str]:
        return [name for name in self.specs if name not in self.written]

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                missing = self._missing()
                if missing:
                    raise CheckpointError(f"c-model incomplete, {len(missing)} tensor(s) never written, e.g. "
                                          f"{missing[:3]}")
                self.config.to_ini(self.tmp_dir / "config.ini")
                self._publish()
        finally:
            if self.tmp_dir is not None and self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False

    def _publish(self) -> None:
        old = None
        if self.final_dir.exists():
            old = self.out_root / f".{self.final_dir.name}.old-{os.getpid()}"
            os.rename(self.final_dir, old)
        os.rename(self.tmp_dir, self.final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_cmodel(out_root: str | Path, config: GPTConfig, weights: dict[str, torch.Tensor], *, tensor_para_size: int,
                 weight_data_type: str = "fp32", force: bool = False, extra_files: Iterable[Path] = (),
                 progress: bool = False) -> Path:
    """Write full FT-layout tensors (as load_cmodel(tp_rank=None) returns them) as `<out_root>/<N>-gpu/`."""
    from tqdm.auto import tqdm

    with CModelWriter(out_root, config, tensor_para_size=tensor_para_size, weight_data_type=weight_data_type,
                      force=force, lm_head=LM_HEAD in weights) as writer:
        for name, tensor in tqdm(weights.items(), desc="writing c-model", unit="tensor", disable=not progress):
            writer.add(name, tensor)
        for path in extra_files:
            writer.copy_file(path)
    return writer.final_dir


def random_tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: a stable 64-bit digest of (seed, tensor name), the same in every process
    and Python session (Python's own hash() of a str is salted per process, so it cannot serve)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_ft_tensor(spec: TensorSpec, *, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
                     device="cpu") -> torch.Tensor:
    """One full tensor of random_ft_tensors: its values depend only on (seed, spec.name, spec.shape) and the device
    kind it is drawn on (CUDA draws other numbers than the CPU for the same seed)."""
    generator = torch.Generator(device=device).manual_seed(random_tensor_seed(seed, spec.name))
    # drawn in fp32 whatever `dtype`, so an fp16 copy is exactly the fp32 tensor rounded
    noise = torch.randn(spec.shape, generator=generator, device=device, dtype=torch.float32)
    if "layernorm.weight" in spec.name:
        noise.mul_(0.1).add_(1.0)
    elif spec.name.endswith(".bias"):
        noise.mul_(0.1)
    else:
        noise.mul_(std)
    return noise.to(dtype)


def random_ft_tensors(config: GPTConfig, *, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
                      device="cpu", lm_head: bool = False, layers: Iterable[int] | None = None,
                      embeddings: bool = True) -> dict[str, torch.Tensor]:
    """Random full FT-layout weights (GPT-2-like init: N(0, std) matrices, LayerNorm scales near 1), for tests,
    benchmarks and the untrained fallback model. Generated on `device` so large shapes need no host memory.

    Each tensor has its own generator seeded from (seed, tensor name), so `layers` / `embeddings` (as for
    tensor_specs) select a subset whose tensors are exactly those of the full call: a pipeline stage, or one layer
    at a time, draws the same model as a single process does."""
    return {spec.name: random_ft_tensor(spec, seed=seed, std=std, dtype=dtype, device=device)
            for spec in tensor_specs(config, lm_head=lm_head, layers=layers, embeddings=embeddings)}
