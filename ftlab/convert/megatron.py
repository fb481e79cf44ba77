"""Megatron-LM GPT checkpoint (T tensor-parallel shards) -> FasterTransformer c-model split for N GPUs.

Input layout (what Megatron-LM's `save_checkpoint` writes; no Megatron install is needed to read it):

    CKPT_DIR/latest_checkpointed_iteration.txt      "release" or an iteration number such as 123
    CKPT_DIR/release/mp_rank_00/model_optim_rng.pt  (or iter_0000123/..., or model_rng.pt; or CKPT_DIR/mp_rank_00/...)
    ...
    CKPT_DIR/release/mp_rank_{T-1}/model_optim_rng.pt

Each rank file holds {'model': {'language_model': ...}, 'checkpoint_version': v, 'args': argparse.Namespace, ...}.
The language model's tensors (nested dicts or dotted keys, both accepted), per rank:

    embedding.word_embeddings.weight         [V/T, H]   vocab-parallel (V padded, e.g. 50304)
    embedding.position_embeddings.weight     [P, H]     replicated
    transformer.layers.L.input_layernorm.{weight,bias}, post_attention_layernorm.{weight,bias}   [H] replicated
    transformer.layers.L.attention.query_key_value.weight  [3H/T, H]  column-parallel, out-dim order by version
    transformer.layers.L.attention.query_key_value.bias    [3H/T]
    transformer.layers.L.attention.dense.weight            [H, H/T]   row-parallel; its bias [H] replicated
    transformer.layers.L.mlp.dense_h_to_4h.{weight,bias}   [I/T, H], [I/T]  column-parallel
    transformer.layers.L.mlp.dense_4h_to_h.weight          [H, I/T]   row-parallel; its bias [H] replicated
    transformer.final_layernorm.{weight,bias}              [H]
    output_layer.weight                                    [V/T, H]   only when the output layer is untied

Newer Megatron spells `transformer.` as `encoder.` and `attention` as `self_attention`. Linear weights are
[out, in] (FT wants [in, out]). A rank's QKV rows cover heads r*nh/T .. (r+1)*nh/T - 1, ordered per
checkpoint_version: 0 -> [3, nh/T, d]; 1 -> [nh/T, d, 3]; >= 2 -> [nh/T, 3, d]. FT's layout is [3, nh, d].

Resharding T -> N: for each layer, the T shards are joined into the full FT tensor (concatenating along FT's split
axis after reordering each rank's QKV heads), and CModelWriter splits that for N. Only one layer of all T ranks is
materialised at a time (rank files are memory-mapped when saved in torch's zip format).

GELU: FT and ftlab compute the tanh approximation, which is what Megatron's fused bias-GELU (the default,
--bias-gelu-fusion) computes; a model trained without the fusion and without --openai-gelu used the erf GELU, and
the conversion warns about that small mismatch.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import LM_HEAD, CModelWriter, layer_prefix
from ..config import GPTConfig

CHECKPOINT_FILES = ("model_optim_rng.pt", "model_rng.pt")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "gpt2-vocab.json", "gpt2-merges.txt")
LATEST_FILE = "latest_checkpointed_iteration.txt"
GPT2_END_ID = 50256
_RANK_DIR = re.compile(r"^mp_rank_(\d+)$")
_PIPELINE_RANK_DIR = re.compile(r"^mp_rank_\d+_\d+$")
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")

# How a Megatron tensor is sharded over the T trained ranks, and how the shards join into FT's full tensor.
REPLICATED = "replicated"  # the same [H] (or [P, H]) on every rank: rank 0's copy is taken
QKV_WEIGHT = "qkv_weight"  # [3H/T, H], heads r*nh/T.. of rank r, row order by checkpoint_version
QKV_BIAS = "qkv_bias"  # [3H/T]
COLUMN_WEIGHT = "column_weight"  # [I/T, H] out-dim split -> FT [H, I] (columns concatenated)
COLUMN_BIAS = "column_bias"  # [I/T]
ROW_WEIGHT = "row_weight"  # [H, X/T] in-dim split -> FT [X, H] (rows concatenated)
VOCAB_PARALLEL = "vocab_parallel"  # [V/T, H] -> [V, H]

# Megatron per-layer tensor (after 'transformer.layers.L.', attention spelled 'attention') -> how it is sharded.
# The FT name is the same string: FT's converter kept Megatron's names.
LAYER_TENSORS = {
    "input_layernorm.weight": REPLICATED,
    "input_layernorm.bias": REPLICATED,
    "attention.query_key_value.weight": QKV_WEIGHT,
    "attention.query_key_value.bias": QKV_BIAS,
    "attention.dense.weight": ROW_WEIGHT,
    "attention.dense.bias": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED,
    "post_attention_layernorm.bias": REPLICATED,
    "mlp.dense_h_to_4h.weight": COLUMN_WEIGHT,
    "mlp.dense_h_to_4h.bias": COLUMN_BIAS,
    "mlp.dense_4h_to_h.weight": ROW_WEIGHT,
    "mlp.dense_4h_to_h.bias": REPLICATED,
}
# non-layer Megatron tensors -> (FT name, sharding)
GLOBAL_TENSORS = {
    "embedding.word_embeddings.weight": ("model.wte", VOCAB_PARALLEL),
    "embedding.position_embeddings.weight": ("model.wpe", REPLICATED),
    "transformer.final_layernorm.weight": ("model.final_layernorm.weight", REPLICATED),
    "transformer.final_layernorm.bias": ("model.final_layernorm.bias", REPLICATED),
}
OUTPUT_LAYER = "output_layer.weight"  # untied output embedding (newer Megatron), vocab-parallel -> model.lm_head


class MegatronConversionError(ValueError):
    """The Megatron checkpoint cannot be converted; the message names the file, tensor or option."""


# --- reading rank files without Megatron installed -------------------------------------------------------------

class _MissingClass:
    """Stands in for a class of a package that is not installed here (megatron, apex, transformer_engine, ...)
    pickled into `args` or the optimizer state, e.g. args.model_type = megatron.core.enums.ModelType. The converter
    never uses those values; it only needs unpickling not to fail."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} (not installed) {self.args!r}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ModuleNotFoundError, AttributeError):
            return type(name, (_MissingClass,), {"__module__": module, "__qualname__": name})


# torch.load takes a module-like object providing `Unpickler` and `load`
_tolerant_pickle = types.ModuleType("ftlab_tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler
_tolerant_pickle.load = lambda file, **kwargs: _TolerantUnpickler(file, **kwargs).load()


def load_rank_file(path: Path) -> dict:
    """torch.load on the CPU, memory-mapped when the file is in torch's zip format (tensors are then paged in only
    when read). weights_only=False because Megatron pickles an argparse.Namespace (and sometimes Megatron enums):
    unpickling can run arbitrary code, so convert only checkpoints from a source you trust."""
    try:
        state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=False,
                           pickle_module=_tolerant_pickle)
    except Exception as exc:  # corrupt or not a torch file: name the file
        raise MegatronConversionError(f"{path}: cannot be read as a torch checkpoint "
                                      f"({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise MegatronConversionError(f"{path}: expected a dict, got {type(state).__name__}")
    # the optimizer state (fp32 master weights, Adam moments) can be several times the model: let it go now (it is
    # only paged in at all for the legacy non-zip format)
    for unused in ("optimizer", "opt_param_scheduler", "lr_scheduler", "rng_state"):
        state.pop(unused, None)
    return state


def _flatten(tree, prefix: str, out: dict) -> dict:
    """Nested dicts (Megatron's state_dict_for_save_checkpoint) or dotted keys -> {dotted key: value}."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        else:
            out[name] = value
    return out


def _normalize(key: str) -> str:
    """Newer Megatron's spelling -> the older one used in this file's tables."""
    if key.startswith("encoder."):
        key = "transformer." + key[len("encoder."):]
    return key.replace(".self_attention.", ".attention.")


# --- locating the checkpoint ----------------------------------------------------------------------------------

def find_iteration_dir(ckpt_dir: Path) -> Path:
    """CKPT_DIR itself when it holds mp_rank_XX directories, else the iteration named by
    latest_checkpointed_iteration.txt, else CKPT_DIR/release."""
    if not ckpt_dir.is_dir():
        raise MegatronConversionError(f"{ckpt_dir}: checkpoint directory not found")
    if any(_RANK_DIR.match(p.name) or _PIPELINE_RANK_DIR.match(p.name) for p in ckpt_dir.iterdir()):
        return ckpt_dir
    latest = ckpt_dir / LATEST_FILE
    if latest.is_file():
        text = latest.read_text().strip()
        if text == "release":
            target = ckpt_dir / "release"
        elif text.isdigit():
            target = ckpt_dir / f"iter_{int(text):07d}"
        else:
            raise MegatronConversionError(f"{latest}: expected 'release' or an iteration number, got {text!r}")
        if not target.is_dir():
            raise MegatronConversionError(f"{latest} names iteration {text!r} but {target} does not exist")
        return target
    if (ckpt_dir / "release").is_dir():
        return ckpt_dir / "release"
    raise MegatronConversionError(f"{ckpt_dir}: not a Megatron checkpoint (no {LATEST_FILE}, no release/ and no "
                                  f"mp_rank_XX directories)")


def find_rank_files(iteration_dir: Path, trained_gpu_num: int | None) -> list[Path]:
    """mp_rank_00 .. mp_rank_{T-1}, each with model_optim_rng.pt or model_rng.pt."""
    names = sorted(p.name for p in iteration_dir.iterdir() if p.is_dir())
    if any(_PIPELINE_RANK_DIR.match(n) for n in names):
        raise MegatronConversionError(f"{iteration_dir}: pipeline-parallel checkpoint (mp_rank_XX_YYY directories) "
                                      f"is not supported; merge the pipeline stages first")
    found = sorted(int(m.group(1)) for m in map(_RANK_DIR.match, names) if m)
    if not found:
        raise MegatronConversionError(f"{iteration_dir}: no mp_rank_XX directories")
    count = trained_gpu_num if trained_gpu_num is not None else max(found) + 1
    if count < 1:
        raise MegatronConversionError(f"-t_g/--trained-gpu-num must be >= 1, got {count}")
    for rank in range(count):
        if rank not in found:
            raise MegatronConversionError(f"{iteration_dir / f'mp_rank_{rank:02d}'}: rank directory missing (the "
                                          f"checkpoint should have {count} tensor-parallel ranks)")
    if max(found) >= count:
        raise MegatronConversionError(f"{iteration_dir}: has rank directories up to mp_rank_{max(found):02d} but "
                                      f"-t_g/--trained-gpu-num is {count}")
    files = []
    for rank in range(count):
        rank_dir = iteration_dir / f"mp_rank_{rank:02d}"
        path = next((rank_dir / n for n in CHECKPOINT_FILES if (rank_dir / n).is_file()), None)
        if path is None:
            raise MegatronConversionError(f"{rank_dir}: no {' or '.join(CHECKPOINT_FILES)}")
        files.append(path)
    return files


# --- the checkpoint's structure and hyper-parameters ------------------------------------------------------------

@dataclass
class MegatronCheckpoint:
    """Rank files opened (memory-mapped), validated, and the GPT config they describe."""
    files: list[Path]
    tensors: list[dict[str, torch.Tensor]]  # per rank: normalized Megatron name -> tensor
    original_names: list[dict[str, str]]  # per rank: normalized name -> the key as stored (for messages)
    version: float
    config: GPTConfig
    untied_output: bool
    original_vocab_size: int | None = None
    tokenizer_files: list[Path] = field(default_factory=list)

    @property
    def tp(self) -> int:
        return len(self.files)

    def shards(self, name: str) -> list[torch.Tensor]:
        return [rank[name] for rank in self.tensors]


def _arg(args, name: str):
    return getattr(args, name, None) if args is not None else None


def _check_unsupported_args(args, source: str) -> None:
    """Architecture options Megatron records only in args (the tensor names would not reveal them)."""
    if args is None:
        return
    refusals = [
        ("apply_residual_connection_post_layernorm", True, "residual taken after the LayerNorm"),
        ("swiglu", True, "SwiGLU MLP"),
        ("group_query_attention", True, "grouped-query attention"),
        ("add_bias_linear", False, "linear layers without bias"),
    ]
    for name, bad, what in refusals:
        if _arg(args, name) is bad:
            raise MegatronConversionError(f"{source}: args.{name}={bad} ({what}) is not supported")
    pipeline = _arg(args, "pipeline_model_parallel_size")
    if isinstance(pipeline, int) and pipeline > 1:
        raise MegatronConversionError(f"{source}: args.pipeline_model_parallel_size={pipeline}: pipeline-parallel "
                                      f"checkpoints are not supported")
    position = _arg(args, "position_embedding_type")
    if isinstance(position, str) and position != "learned_absolute":
        raise MegatronConversionError(f"{source}: args.position_embedding_type={position!r} is not supported "
                                      f"(only learned absolute position embeddings)")
    norm = _arg(args, "normalization")
    if isinstance(norm, str) and norm != "LayerNorm":
        raise MegatronConversionError(f"{source}: args.normalization={norm!r} is not supported (only LayerNorm)")
    if _arg(args, "bias_gelu_fusion") is False and not _arg(args, "openai_gelu"):
        warnings.warn(f"{source}: trained with the erf GELU (bias_gelu_fusion=False, openai_gelu=False); ftlab and "
                      f"FasterTransformer compute the tanh approximation, so outputs will differ slightly",
                      stacklevel=3)


def _rank_tensors(state: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = state.get("model")
    if not isinstance(model, dict):
        keys = sorted(k for k in state if isinstance(k, str))
        hint = " (virtual-pipeline checkpoints with model0, model1, ... are not supported)" if "model0" in keys else ""
        raise MegatronConversionError(f"{path}: no 'model' entry (top-level keys: {keys}){hint}")
    language_model = model.get("language_model")
    if not isinstance(language_model, dict):
        raise MegatronConversionError(f"{path}: no ['model']['language_model'] entry (keys under 'model': "
                                      f"{sorted(map(str, model))}); only Megatron-LM GPT checkpoints are supported")
    tensors, names = {}, {}
    for key, value in _flatten(language_model, "", {}).items():
        name = _normalize(key)
        if name in names:
            raise MegatronConversionError(f"{path}: tensor {key!r} duplicates {names[name]!r}")
        if not isinstance(value, torch.Tensor):
            raise MegatronConversionError(f"{path}: unexpected non-tensor entry {key!r} "
                                          f"({type(value).__name__}) in the language model")
        tensors[name], names[name] = value, key
    return tensors, names


def _layer_count(tensors: dict[str, torch.Tensor], names: dict[str, str], path: Path) -> int:
    layers, unknown = set(), []
    for name in tensors:
        match = _LAYER_KEY.match(name)
        if match and match.group(2) in LAYER_TENSORS:
            layers.add(int(match.group(1)))
        elif name not in GLOBAL_TENSORS and name != OUTPUT_LAYER:
            unknown.append(names[name])
    if unknown:
        raise MegatronConversionError(f"{path}: {len(unknown)} unexpected tensor(s) the converter does not know, "
                                      f"e.g. {sorted(unknown)[:4]} (only Megatron-LM GPT models are supported)")
    if not layers:
        raise MegatronConversionError(f"{path}: no transformer.layers.N.* tensors")
    missing_layers = sorted(set(range(max(layers) + 1)) - layers)
    if missing_layers:
        raise MegatronConversionError(f"{path}: layer(s) {missing_layers} missing (found layers up to {max(layers)})")
    return max(layers) + 1


def _shard_shapes(config: GPTConfig, tp: int, untied_output: bool) -> dict[str, tuple]:
    """Every Megatron tensor name -> its shape on one of tp ranks."""
    H, I, V, P = config.hidden, config.inter_size, config.vocab_size, config.max_pos_seq_len
    per_layer = {
        REPLICATED: (H,), QKV_WEIGHT: (3 * H // tp, H), QKV_BIAS: (3 * H // tp,), COLUMN_BIAS: (I // tp,),
        COLUMN_WEIGHT: (I // tp, H),
    }
    shapes = {"embedding.word_embeddings.weight": (V // tp, H), "embedding.position_embeddings.weight": (P, H),
              "transformer.final_layernorm.weight": (H,), "transformer.final_layernorm.bias": (H,)}
    if untied_output:
        shapes[OUTPUT_LAYER] = (V // tp, H)
    for layer in range(config.num_layer):
        for suffix, kind in LAYER_TENSORS.items():
            if kind == ROW_WEIGHT:
                shape = (H, (H if suffix.startswith("attention") else I) // tp)
            else:
                shape = per_layer[kind]
            shapes[f"transformer.layers.{layer}.{suffix}"] = shape
    return shapes


def _infer_config(tensors: dict[str, torch.Tensor], path: Path, tp: int, num_layer: int, args,
                  head_num: int | None, version: float) -> GPTConfig:
    """Hyper-parameters from args when present, checked against (or else taken from) rank 0's tensor shapes."""
    def shape_of(name: str, ndim: int) -> tuple:
        if name not in tensors:
            raise MegatronConversionError(f"{path}: tensor {name!r} missing")
        shape = tuple(tensors[name].shape)
        if len(shape) != ndim:
            raise MegatronConversionError(f"{path}: tensor {name!r} has shape {shape}, expected {ndim} dimensions")
        return shape

    trained_tp = _arg(args, "tensor_model_parallel_size") or _arg(args, "model_parallel_size")
    if isinstance(trained_tp, int) and trained_tp != tp:  # checked first: it explains the shape mismatches below
        raise MegatronConversionError(f"{path}: args.tensor_model_parallel_size={trained_tp} but {tp} rank "
                                      f"director{'y is' if tp == 1 else 'ies are'} being read (mp_rank_00 .. "
                                      f"mp_rank_{tp - 1:02d}; see -t_g/--trained-gpu-num)")
    wte_rows, hidden = shape_of("embedding.word_embeddings.weight", 2)
    max_pos = shape_of("embedding.position_embeddings.weight", 2)[0]
    inter = shape_of("transformer.layers.0.mlp.dense_h_to_4h.weight", 2)[0] * tp
    vocab = wte_rows * tp

    def agree(arg_name: str, from_shapes: int, what: str) -> None:
        value = _arg(args, arg_name)
        if value is not None and value != from_shapes:
            raise MegatronConversionError(f"{path}: args.{arg_name}={value} but the tensors say {what}={from_shapes}")

    agree("hidden_size", hidden, "hidden (embedding.word_embeddings.weight columns)")
    agree("num_layers", num_layer, "the number of transformer layers")
    agree("max_position_embeddings", max_pos, "embedding.position_embeddings.weight rows")
    agree("padded_vocab_size", vocab, f"vocabulary {wte_rows} rows x {tp} ranks")
    agree("ffn_hidden_size", inter, f"mlp.dense_h_to_4h.weight rows x {tp} ranks")

    heads_from_args = _arg(args, "num_attention_heads")
    if head_num is not None and heads_from_args is not None and head_num != heads_from_args:
        raise MegatronConversionError(f"--head-num {head_num} contradicts the checkpoint's "
                                      f"args.num_attention_heads={heads_from_args} ({path})")
    heads = head_num if head_num is not None else heads_from_args
    if heads is None:
        raise MegatronConversionError(f"{path}: the checkpoint (checkpoint_version {version}) records no "
                                      f"num_attention_heads; pass --head-num (e.g. 16 for GPT-345M)")
    if heads < 1 or hidden % heads:
        raise MegatronConversionError(f"hidden size {hidden} is not divisible by the head count {heads}")
    if heads % tp:
        raise MegatronConversionError(f"{path}: head count {heads} is not divisible by the {tp} trained ranks")
    kv_channels = _arg(args, "kv_channels")
    if kv_channels is not None and kv_channels * heads != hidden:
        raise MegatronConversionError(f"{path}: args.kv_channels={kv_channels} x {heads} heads != hidden {hidden} "
                                      f"(not supported)")
    eps = _arg(args, "layernorm_epsilon")
    return GPTConfig(head_num=heads, size_per_head=hidden // heads, num_layer=num_layer, vocab_size=vocab,
                     max_pos_seq_len=max_pos, inter_size=inter, layernorm_eps=float(eps) if eps else 1e-5,
                     start_id=0, end_id=0, model_name="gpt")


def _tokenizer_info(ckpt_dir: Path, iteration_dir: Path, args, vocab: int) -> tuple[list[Path], int | None, int]:
    """Tokenizer files next to the checkpoint, the unpadded vocabulary size when known, and the end-of-text id."""
    files = []
    for name in TOKENIZER_FILES:
        for directory in (iteration_dir, ckpt_dir):
            if (directory / name).is_file():
                files.append(directory / name)
                break
    original, end_id = None, None
    vocab_json = next((f for f in files if f.name.endswith("vocab.json")), None)
    if vocab_json is not None:
        try:
            entries = json.loads(vocab_json.read_text())
            original = len(entries)
            end_id = entries.get("<|endoftext|>")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
            raise MegatronConversionError(f"{vocab_json}: not a valid vocab.json ({exc})") from None
    recorded = _arg(args, "vocab_size")
    if original is None and isinstance(recorded, int):
        original = recorded
    if original is not None and not 0 < original <= vocab:
        raise MegatronConversionError(f"{vocab_json or 'args.vocab_size'}: {original} tokens but the embedding "
                                      f"has only {vocab} rows")
    if end_id is None:  # GPT-2's <|endoftext|>; a tiny test vocabulary uses its last token instead
        end_id = GPT2_END_ID if GPT2_END_ID < (original or vocab) else (original or vocab) - 1
    return files, (original if original is not None and original < vocab else None), end_id


def open_megatron_checkpoint(ckpt_dir: str | Path, *, trained_gpu_num: int | None = None,
                             head_num: int | None = None) -> MegatronCheckpoint:
    """Locate, open (memory-mapped) and validate every rank: known tensor names only, the same set on every rank,
    each with the shard shape the config implies. Reads no tensor data beyond what shape checks need."""
    ckpt_dir = Path(ckpt_dir)
    iteration_dir = find_iteration_dir(ckpt_dir)
    files = find_rank_files(iteration_dir, trained_gpu_num)
    tp = len(files)
    states = [load_rank_file(path) for path in files]
    version = states[0].get("checkpoint_version", 0)  # Megatron treats a missing version as 0
    try:
        version = float(version)
    except (TypeError, ValueError):
        raise MegatronConversionError(f"{files[0]}: checkpoint_version {version!r} is not a number") from None
    if version not in (0.0, 1.0) and version < 2:
        raise MegatronConversionError(f"{files[0]}: checkpoint_version {version} is not supported (0, 1 or >= 2)")
    args = states[0].get("args")
    _check_unsupported_args(args, str(files[0]))

    per_rank = [_rank_tensors(state, path) for state, path in zip(states, files)]
    num_layer = _layer_count(*per_rank[0], files[0])
    config = _infer_config(per_rank[0][0], files[0], tp, num_layer, args, head_num, version)
    untied_output = OUTPUT_LAYER in per_rank[0][0]
    expected = _shard_shapes(config, tp, untied_output)
    for rank, ((tensors, names), path) in enumerate(zip(per_rank, files)):
        other_version = float(states[rank].get("checkpoint_version", 0))
        if other_version != version:
            raise MegatronConversionError(f"{path}: checkpoint_version {other_version} but {files[0]} has {version}")
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise MegatronConversionError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        unknown = [names[name] for name in tensors if name not in expected]
        if unknown:
            raise MegatronConversionError(f"{path}: unexpected tensor(s) {sorted(unknown)[:4]} (not in rank 0's "
                                          f"{num_layer}-layer model)")
        for name, shape in expected.items():
            got = tuple(tensors[name].shape)
            if got != shape:
                raise MegatronConversionError(
                    f"{path}: tensor {names[name]!r} has shape {got}, expected {shape} (rank {rank} of {tp}; shapes "
                    f"inconsistent between ranks or with the checkpoint's args)")
            if not tensors[name].is_floating_point():
                raise MegatronConversionError(f"{path}: tensor {names[name]!r} has dtype {tensors[name].dtype}")
    tokenizer_files, original_vocab, end_id = _tokenizer_info(ckpt_dir, iteration_dir, args, config.vocab_size)
    config = config.replace(start_id=end_id, end_id=end_id)
    return MegatronCheckpoint(files=files, tensors=[t for t, _ in per_rank], original_names=[n for _, n in per_rank],
                              version=version, config=config, untied_output=untied_output,
                              original_vocab_size=original_vocab, tokenizer_files=tokenizer_files)


# --- joining T shards into FT's full tensors -------------------------------------------------------------------

def _qkv_heads_first(shard: torch.Tensor, version: float, heads: int, size_per_head: int) -> torch.Tensor:
    """One rank's QKV rows (first dim 3*heads*d, any trailing dims) -> [3, heads, d, ...] (FT's order)."""
    rest = tuple(shard.shape[1:])
    if version == 0:
        return shard.reshape(3, heads, size_per_head, *rest)
    if version == 1:
        return shard.reshape(heads, size_per_head, 3, *rest).movedim(2, 0)
    return shard.reshape(heads, 3, size_per_head, *rest).transpose(0, 1)


def join_shards(kind: str, shards: list[torch.Tensor], config: GPTConfig, version: float) -> torch.Tensor:
    """The T trained shards of one tensor -> FT's full tensor in fp32 ([in, out] for Linear weights)."""
    shards = [s.to(torch.float32) for s in shards]
    tp = len(shards)
    if kind == REPLICATED:
        return shards[0]  # identical on every rank (Megatron keeps replicated parameters in sync)
    if kind == VOCAB_PARALLEL:
        return torch.cat(shards, dim=0)
    if kind == COLUMN_BIAS:
        return torch.cat(shards, dim=0)
    if kind == COLUMN_WEIGHT:  # [X/T, H] out-major -> [H, X]
        return torch.cat([s.t() for s in shards], dim=1).contiguous()
    if kind == ROW_WEIGHT:  # [H, X/T] -> [X, H]
        return torch.cat([s.t() for s in shards], dim=0).contiguous()
    H, local_heads, d = config.hidden, config.head_num // tp, config.size_per_head
    # each rank holds a contiguous block of heads: concatenate along the heads axis of [3, heads, d, ...]
    full = torch.cat([_qkv_heads_first(s, version, local_heads, d) for s in shards], dim=1)
    if kind == QKV_BIAS:
        return full.reshape(3, H).contiguous()
    if kind == QKV_WEIGHT:  # [3, nh, d, H_in] -> FT's [H_in, 3, H_out]
        return full.reshape(3, H, H).permute(2, 0, 1).contiguous()
    raise AssertionError(kind)


def _replicas_differ(ckpt: MegatronCheckpoint, name: str) -> list[str]:
    """[description] when the ranks' copies of a replicated tensor are not identical (Megatron keeps them equal)."""
    shards = ckpt.shards(name)
    worst = max(((s.float() - shards[0].float()).abs().max().item() for s in shards[1:]), default=0.0)
    return [f"{ckpt.original_names[0][name]} (max difference {worst:.3g})"] if worst > 0 else []


# --- writing -------------------------------------------------------------------------------------------------

@dataclass
class _ConfigWithOriginalVocab(GPTConfig):
    """GPTConfig whose config.ini also records the vocabulary size before Megatron's padding (a key FT ignores)."""
    original_vocab_size: int = 0

    def to_ini(self, path) -> None:
        super().to_ini(path)
        if self.original_vocab_size:
            with open(path) as f:
                text = f.read().rstrip("\n")
            with open(path, "w") as f:
                f.write(f"{text}\noriginal_vocab_size = {self.original_vocab_size}\n\n")


def convert_megatron(input_dir: str | Path, output_dir: str | Path, *, infer_gpu_num: int = 1,
                     trained_gpu_num: int | None = None, head_num: int | None = None, weight_data_type: str = "fp32",
                     force: bool = False, progress: bool = True) -> Path:
    """`ftlab convert megatron`: Megatron-LM GPT checkpoint -> `<output_dir>/<infer_gpu_num>-gpu/`.

    Everything is validated before the first file is written; on any error no output directory is left behind
    (an existing one is kept unless the conversion succeeds with force=True). Returns the written directory."""
    from tqdm.auto import tqdm

    if weight_data_type not in ("fp32", "fp16"):
        raise MegatronConversionError(f"--weight-data-type must be fp32 or fp16, got {weight_data_type!r}")
    if infer_gpu_num < 1:
        raise MegatronConversionError(f"-i_g/--infer-gpu-num must be >= 1, got {infer_gpu_num}")
    ckpt = open_megatron_checkpoint(input_dir, trained_gpu_num=trained_gpu_num, head_num=head_num)
    config = ckpt.config
    if config.head_num % infer_gpu_num:
        raise MegatronConversionError(f"head_num={config.head_num} is not divisible by "
                                      f"-i_g/--infer-gpu-num={infer_gpu_num}")
    if config.inter_size % infer_gpu_num:
        raise MegatronConversionError(f"inter_size={config.inter_size} is not divisible by "
                                      f"-i_g/--infer-gpu-num={infer_gpu_num}")
    if ckpt.original_vocab_size:
        config = _ConfigWithOriginalVocab(**vars(config), original_vocab_size=ckpt.original_vocab_size)

    output_dir = Path(output_dir)
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    try:
        with CModelWriter(output_dir, config, tensor_para_size=infer_gpu_num, weight_data_type=weight_data_type,
                          force=force, lm_head=ckpt.untied_output) as writer:
            diverged = []  # replicated tensors whose copies differ between ranks
            for megatron_name, (ft_name, kind) in GLOBAL_TENSORS.items():
                if kind == REPLICATED:
                    diverged += _replicas_differ(ckpt, megatron_name)
                writer.add(ft_name, join_shards(kind, ckpt.shards(megatron_name), config, ckpt.version))
            if ckpt.untied_output:
                writer.add(LM_HEAD, join_shards(VOCAB_PARALLEL, ckpt.shards(OUTPUT_LAYER), config, ckpt.version))
            for layer in tqdm(range(config.num_layer), desc="converting layers", unit="layer", disable=not progress):
                for suffix, kind in LAYER_TENSORS.items():
                    name = f"transformer.layers.{layer}.{suffix}"
                    if kind == REPLICATED:
                        diverged += _replicas_differ(ckpt, name)
                    writer.add(layer_prefix(layer) + suffix, join_shards(kind, ckpt.shards(name), config, ckpt.version))
            for path in ckpt.tokenizer_files:
                writer.copy_file(path)
        if diverged:
            warnings.warn(f"{len(diverged)} replicated tensor(s) differ between the {ckpt.tp} ranks (rank 0's copy "
                          f"was used), e.g. {diverged[:3]}; are the rank files from the same training run and "
                          f"iteration?", stacklevel=2)
    except BaseException:
        for directory in created:  # directories this call made (deepest first), if they are still empty
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    return writer.final_dir


# --- command line (wired into `ftlab convert megatron` by ftlab.cli) ------------------------------------------

def add_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of FasterTransformer's megatron_ckpt_convert.py that ftlab supports."""
    # FasterTransformer's single-dash spellings (-in_file, -saved_dir, ...) are accepted too
    parser.add_argument("-i", "--input-dir", "--in-file", "-in_file", type=Path, required=True,
                        help="Megatron checkpoint directory (with latest_checkpointed_iteration.txt, release/ or "
                             "iter_XXXXXXX/, or the mp_rank_XX directories themselves)")
    parser.add_argument("-o", "--output-dir", "--saved-dir", "-saved_dir", type=Path, required=True,
                        help="where <N>-gpu/ is written")
    parser.add_argument("-t_g", "--trained-gpu-num", "-trained_tensor_parallel_size", type=int, default=None,
                        help="tensor-parallel ranks of the checkpoint (default: counted from mp_rank_XX)")
    parser.add_argument("-i_g", "--infer-gpu-num", "-infer_gpu_num", type=int, required=True,
                        help="tensor_para_size to split for")
    parser.add_argument("--head-num", "-head_num", type=int, default=None,
                        help="attention heads (needed when the checkpoint's args do not record them, e.g. "
                             "the public GPT-345M checkpoint: 16)")
    parser.add_argument("--weight-data-type", "-weight_data_type", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--force", action="store_true", help="overwrite an existing <OUT_DIR>/<N>-gpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_megatron_cli(args: argparse.Namespace) -> Path:
    out = convert_megatron(args.input_dir, args.output_dir, infer_gpu_num=args.infer_gpu_num,
                           trained_gpu_num=args.trained_gpu_num, head_num=args.head_num,
                           weight_data_type=args.weight_data_type, force=args.force,
                           progress=getattr(args, "progress", True))
    return out
