"""HF GPT-2 directory (config.json + safetensors / pytorch_model.bin) <-> FasterTransformer c-model tensors.

HF's GPT-2 uses Conv1D, whose weights are already [in, out], so no transpose is needed; c_attn's output columns are
ordered [3, heads, size_per_head], which is FT's [H, 3, H] after a reshape.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import LM_HEAD, layer_prefix, write_cmodel
from ..config import GPTConfig

# GELU variants computing the tanh approximation that FT (and ftlab's kernels) use
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# HF GPT-2 names (after 'transformer.h.L.') -> FT per-layer names, with the reshape FT's layout needs
_LAYER_MAP = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "attn.c_attn.weight": "attention.query_key_value.weight",
    "attn.c_attn.bias": "attention.query_key_value.bias",
    "attn.c_proj.weight": "attention.dense.weight",
    "attn.c_proj.bias": "attention.dense.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "mlp.c_fc.weight": "mlp.dense_h_to_4h.weight",
    "mlp.c_fc.bias": "mlp.dense_h_to_4h.bias",
    "mlp.c_proj.weight": "mlp.dense_4h_to_h.weight",
    "mlp.c_proj.bias": "mlp.dense_4h_to_h.bias",
}


class HFConversionError(ValueError):
    """The HF directory cannot be converted; the message names the file or tensor."""


def config_from_hf(hf_config: dict, source: str = "config.json") -> GPTConfig:
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise HFConversionError(f"{source}: model_type {model_type!r} is not supported (only 'gpt2')")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise HFConversionError(f"{source}: activation_function {activation!r} is not supported; ftlab (like "
                                f"FasterTransformer) computes the tanh GELU: one of {TANH_GELUS}")
    if hf_config.get("scale_attn_by_inverse_layer_idx"):
        raise HFConversionError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
    if hf_config.get("scale_attn_weights", True) is False:
        raise HFConversionError(f"{source}: scale_attn_weights=false is not supported")
    try:
        hidden, heads = int(hf_config["n_embd"]), int(hf_config["n_head"])
        if hidden % heads:
            raise HFConversionError(f"{source}: n_embd={hidden} is not divisible by n_head={heads}")
        return GPTConfig(
            model_name=str(hf_config.get("_name_or_path") or "gpt2"),
            head_num=heads,
            size_per_head=hidden // heads,
            num_layer=int(hf_config["n_layer"]),
            vocab_size=int(hf_config["vocab_size"]),
            max_pos_seq_len=int(hf_config["n_positions"]),
            inter_size=int(hf_config.get("n_inner") or 4 * hidden),
            layernorm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
            start_id=int(hf_config.get("bos_token_id", 50256)),
            end_id=int(hf_config.get("eos_token_id", 50256)),
        )
    except KeyError as exc:
        raise HFConversionError(f"{source}: missing key {exc.args[0]!r}") from None


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (single or sharded with an index) or pytorch_model.bin, keys without a 'transformer.'
    prefix stripped (GPT2Model and GPT2LMHeadModel checkpoints both load)."""
    files = sorted(hf_dir.glob("model*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state = {}
        for f in files:
            state.update(load_file(f))
    elif (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise HFConversionError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}


def hf_to_ft_tensors(state: dict[str, torch.Tensor], config: GPTConfig, source: str = "") -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict -> full FT-layout tensors (fp32), as c-model writers and the model take them."""
    H = config.hidden

    def get(key: str, shape: tuple) -> torch.Tensor:
        if key not in state:
            raise HFConversionError(f"{source}: tensor {key!r} missing")
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise HFConversionError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} "
                                    f"from config.json")
        return tensor.to(torch.float32)

    V, P, I = config.vocab_size, config.max_pos_seq_len, config.inter_size
    layer_shapes = {"ln_1.weight": (H,), "ln_1.bias": (H,), "attn.c_attn.weight": (H, 3 * H),
                    "attn.c_attn.bias": (3 * H,), "attn.c_proj.weight": (H, H), "attn.c_proj.bias": (H,),
                    "ln_2.weight": (H,), "ln_2.bias": (H,), "mlp.c_fc.weight": (H, I), "mlp.c_fc.bias": (I,),
                    "mlp.c_proj.weight": (I, H), "mlp.c_proj.bias": (H,)}
    out = {"model.wte": get("wte.weight", (V, H)), "model.wpe": get("wpe.weight", (P, H)),
           "model.final_layernorm.weight": get("ln_f.weight", (H,)),
           "model.final_layernorm.bias": get("ln_f.bias", (H,))}
    for layer in range(config.num_layer):
        for hf_name, ft_name in _LAYER_MAP.items():
            tensor = get(f"h.{layer}.{hf_name}", layer_shapes[hf_name])
            if ft_name == "attention.query_key_value.weight":
                tensor = tensor.reshape(H, 3, H)
            elif ft_name == "attention.query_key_value.bias":
                tensor = tensor.reshape(3, H)
            out[layer_prefix(layer) + ft_name] = tensor
    head = state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["wte.weight"]):
        out[LM_HEAD] = get("lm_head.weight", (V, H))
    return out


def ft_to_hf_state_dict(weights: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse: full FT tensors -> a GPT2LMHeadModel state dict (used to check ftlab against HF)."""
    H = config.hidden
    state = {"transformer.wte.weight": weights["model.wte"], "transformer.wpe.weight": weights["model.wpe"],
             "transformer.ln_f.weight": weights["model.final_layernorm.weight"],
             "transformer.ln_f.bias": weights["model.final_layernorm.bias"],
             "lm_head.weight": weights.get(LM_HEAD, weights["model.wte"])}
    for layer in range(config.num_layer):
        for hf_name, ft_name in _LAYER_MAP.items():
            tensor = weights[layer_prefix(layer) + ft_name]
            if ft_name == "attention.query_key_value.weight":
                tensor = tensor.reshape(H, 3 * H)
            elif ft_name == "attention.query_key_value.bias":
                tensor = tensor.reshape(3 * H)
            state[f"transformer.h.{layer}.{hf_name}"] = tensor
    return state


def convert_hf(hf_dir: str | Path, out_root: str | Path, *, infer_gpu_num: int = 1, weight_data_type: str = "fp32",
               force: bool = False, progress: bool = True) -> Path:
    """`ftlab convert hf`: HF GPT-2 directory -> `<out_root>/<infer_gpu_num>-gpu/`. Returns the written directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise HFConversionError(f"{config_path}: not found (expected an HF GPT-2 directory)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise HFConversionError(f"{config_path}: invalid JSON ({exc})") from None
    config = config_from_hf(hf_config, str(config_path))
    if config.head_num % infer_gpu_num:
        raise HFConversionError(f"head_num={config.head_num} is not divisible by -i_g/--infer-gpu-num={infer_gpu_num}")
    if config.inter_size % infer_gpu_num:
        raise HFConversionError(f"inter_size={config.inter_size} is not divisible by -i_g={infer_gpu_num}")
    weights = hf_to_ft_tensors(read_hf_state_dict(hf_dir), config, str(hf_dir))
    extra = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    return write_cmodel(out_root, config, weights, tensor_para_size=infer_gpu_num, weight_data_type=weight_data_type,
                        force=force, extra_files=extra, progress=progress)


def hf_config_from(config: GPTConfig, *, tied: bool = True) -> dict:
    """The GPT-2 config.json of a GPTConfig (the inverse of config_from_hf); tied: the LM head is the embedding."""
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], _name_or_path=config.model_name,
                tie_word_embeddings=tied,
                n_embd=config.hidden, n_head=config.head_num, n_layer=config.num_layer, n_inner=config.inter_size,
                vocab_size=config.vocab_size, n_positions=config.max_pos_seq_len,
                layer_norm_epsilon=config.layernorm_eps, activation_function="gelu_new",
                bos_token_id=config.start_id, eos_token_id=config.end_id)


def export_hf(model_dir: str | Path, hf_dir: str | Path, *, force: bool = False) -> Path:
    """A c-model directory -> an HF GPT-2 directory (config.json + model.safetensors, fp32), loadable with
    transformers' GPT2LMHeadModel.from_pretrained: to check a conversion against HF, or to hand a model back.
    Written to a temporary directory beside hf_dir and renamed at the end."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ..checkpoint import load_cmodel

    hf_dir = Path(hf_dir)
    if hf_dir.exists() and not force:
        raise HFConversionError(f"{hf_dir}: already exists (force=True / --force to replace it)")
    config, weights = load_cmodel(model_dir)
    state = {k: v.float().contiguous() for k, v in ft_to_hf_state_dict(weights, config).items()}
    if LM_HEAD not in weights:  # tied: safetensors refuses shared storage, and HF re-ties on load
        del state["lm_head.weight"]
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}-", dir=hf_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config_from(config, tied=LM_HEAD not in weights), indent=2)
                                         + "\n")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        tmp.rename(hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_dir
