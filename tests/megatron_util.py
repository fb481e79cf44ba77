"""Builds Megatron-LM-layout GPT checkpoints from HF GPT-2 models, for the Megatron converter's tests.

Mapping from an HF GPT2LMHeadModel (Conv1D weights are [in, out]) to Megatron's tensors (Linear weights are
[out, in]), for T tensor-parallel ranks, rank r:

    transformer.wte.weight [V, H]     -> embedding.word_embeddings.weight, rows r*Vp/T .. of the vocabulary padded
                                         to Vp rows (`pad_vocab_to`; the extra rows are seeded random values, as
                                         Megatron's padding rows are trained-but-unused parameters)
    transformer.wpe.weight [P, H]     -> embedding.position_embeddings.weight (every rank)
    h.L.ln_1 / ln_2 {weight,bias}     -> layers.L.input_layernorm / post_attention_layernorm (every rank)
    h.L.attn.c_attn.weight [H, 3H]    -> layers.L.attention.query_key_value.weight [3H/T, H]: transposed, then the
                                         rows of heads r*nh/T .. (r+1)*nh/T-1 taken from HF's [3, nh, d] order and
                                         arranged per checkpoint_version: 0 -> [3, nh/T, d]; 1 -> [nh/T, d, 3];
                                         2, 3 -> [nh/T, 3, d]. The bias [3H] -> [3H/T] the same way.
    h.L.attn.c_proj.weight [H, H]     -> layers.L.attention.dense.weight [H, H/T] (transposed, in-dim split);
                                         its bias [H] on every rank
    h.L.mlp.c_fc.weight [H, I]        -> layers.L.mlp.dense_h_to_4h.weight [I/T, H] (transposed, out-dim split);
                                         bias [I] -> [I/T]
    h.L.mlp.c_proj.weight [I, H]      -> layers.L.mlp.dense_4h_to_h.weight [H, I/T] (transposed, in-dim split);
                                         its bias [H] on every rank
    ln_f {weight,bias}                -> transformer.final_layernorm (every rank)
    lm_head.weight, when untied       -> output_layer.weight [Vp/T, H] (vocab-parallel like the embedding)

`transformer.` becomes `encoder.` and `attention` becomes `self_attention` with the flags of newer Megatron. The
state is nested like Megatron's state_dict_for_save_checkpoint: {'embedding': {'word_embeddings': {'weight'}, ...},
'transformer': {'layers.0.input_layernorm.weight': ..., 'final_layernorm.weight': ...}}. Each rank file also holds
'checkpoint_version', 'iteration', a small optimizer state and an argparse.Namespace `args` with the hyper-parameters
(num_layers, hidden_size, num_attention_heads, ffn_hidden_size, max_position_embeddings, padded_vocab_size,
layernorm_epsilon, tensor_model_parallel_size, ...) plus, like newer Megatron, a `model_type` enum from a
`megatron.core.enums` module that is not importable when the file is loaded.
"""
from __future__ import annotations

import argparse
import enum
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def _fake_megatron_enums():
    """A `megatron.core.enums.ModelType` that exists only while the checkpoint is pickled."""
    names = ("megatron", "megatron.core", "megatron.core.enums")
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    model_type = enum.Enum("ModelType", "encoder_or_decoder encoder_and_decoder", module="megatron.core.enums")
    modules["megatron.core.enums"].ModelType = model_type
    sys.modules.update(modules)
    try:
        yield model_type
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _qkv_rows_for_version(rows: torch.Tensor, version: float) -> torch.Tensor:
    """rows [3, heads, d, ...] (HF's order for one rank's heads) -> the flat row order of checkpoint_version."""
    if version == 0:
        ordered = rows
    elif version == 1:
        ordered = rows.movedim(0, 2)  # [heads, d, 3, ...]
    else:
        ordered = rows.transpose(0, 1)  # [heads, 3, d, ...]
    return ordered.reshape(-1, *rows.shape[3:]).clone()


def megatron_rank_states(hf_model, T: int, checkpoint_version: float, *, encoder_prefix: bool = False,
                         self_attention: bool = False, pad_vocab_to: int | None = None, pad_seed: int = 1234,
                         dtype: torch.dtype = torch.float32) -> list[dict]:
    """The `['model']['language_model']` dict of each of the T ranks (see the module docstring)."""
    cfg = hf_model.config
    H, nh, L, V = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
    I, d = cfg.n_inner or 4 * H, H // nh
    state = {k.removeprefix("transformer."): v.detach().to(torch.float32) for k, v in hf_model.state_dict().items()}
    Vp = pad_vocab_to or V
    if Vp < V or Vp % T or nh % T or I % T:
        raise ValueError(f"padded vocab {Vp} (>= {V}), heads {nh} and inter {I} must be divisible by T={T}")
    pad_rows = torch.randn(Vp - V, H, generator=torch.Generator().manual_seed(pad_seed)) * 0.02
    wte = torch.cat([state["wte.weight"], pad_rows])
    untied = not torch.equal(state["lm_head.weight"], state["wte.weight"])
    lm_head = torch.cat([state["lm_head.weight"], pad_rows]) if untied else None

    body = "encoder" if encoder_prefix else "transformer"
    attention = "self_attention" if self_attention else "attention"

    def part(t: torch.Tensor, dim: int, r: int) -> torch.Tensor:
        return t.chunk(T, dim=dim)[r].to(dtype).clone()

    ranks = []
    for r in range(T):
        heads = slice(r * nh // T, (r + 1) * nh // T)
        layers = {}
        for layer in range(L):
            h = f"h.{layer}."
            qkv_w = state[h + "attn.c_attn.weight"].t().reshape(3, nh, d, H)[:, heads]  # [3, nh/T, d, H_in]
            qkv_b = state[h + "attn.c_attn.bias"].reshape(3, nh, d)[:, heads]
            tensors = {
                "input_layernorm.weight": state[h + "ln_1.weight"], "input_layernorm.bias": state[h + "ln_1.bias"],
                f"{attention}.query_key_value.weight": _qkv_rows_for_version(qkv_w, checkpoint_version),
                f"{attention}.query_key_value.bias": _qkv_rows_for_version(qkv_b, checkpoint_version),
                f"{attention}.dense.weight": part(state[h + "attn.c_proj.weight"].t(), 1, r),
                f"{attention}.dense.bias": state[h + "attn.c_proj.bias"],
                "post_attention_layernorm.weight": state[h + "ln_2.weight"],
                "post_attention_layernorm.bias": state[h + "ln_2.bias"],
                "mlp.dense_h_to_4h.weight": part(state[h + "mlp.c_fc.weight"].t(), 0, r),
                "mlp.dense_h_to_4h.bias": part(state[h + "mlp.c_fc.bias"], 0, r),
                "mlp.dense_4h_to_h.weight": part(state[h + "mlp.c_proj.weight"].t(), 1, r),
                "mlp.dense_4h_to_h.bias": state[h + "mlp.c_proj.bias"],
            }
            layers.update({f"layers.{layer}.{k}": v.to(dtype).clone() for k, v in tensors.items()})
        layers["final_layernorm.weight"] = state["ln_f.weight"].to(dtype).clone()
        layers["final_layernorm.bias"] = state["ln_f.bias"].to(dtype).clone()
        language_model = {
            "embedding": {"word_embeddings": {"weight": part(wte, 0, r)},
                          "position_embeddings": {"weight": state["wpe.weight"].to(dtype).clone()}},
            body: layers,
        }
        if untied:
            language_model["output_layer"] = {"weight": part(lm_head, 0, r)}
        ranks.append(language_model)
    return ranks


def megatron_args(hf_model, T: int, padded_vocab: int) -> argparse.Namespace:
    cfg = hf_model.config
    return argparse.Namespace(
        num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
        ffn_hidden_size=cfg.n_inner or 4 * cfg.n_embd, max_position_embeddings=cfg.n_positions,
        padded_vocab_size=padded_vocab, layernorm_epsilon=cfg.layer_norm_epsilon, tensor_model_parallel_size=T,
        pipeline_model_parallel_size=1, seq_length=cfg.n_positions, make_vocab_size_divisible_by=128 // T,
        bias_gelu_fusion=True, openai_gelu=False, lr=1.5e-4, micro_batch_size=4, fp16=True)


def make_megatron_checkpoint(hf_model, root, T: int, checkpoint_version: float, *, encoder_prefix: bool = False,
                             self_attention: bool = False, pad_vocab_to: int | None = None, release: bool = True,
                             iteration: int = 1200, with_args: bool = True, legacy_format: bool = False,
                             filename: str = "model_optim_rng.pt", dtype: torch.dtype = torch.float32) -> Path:
    """Write `root/latest_checkpointed_iteration.txt` and `root/{release|iter_XXXXXXX}/mp_rank_XX/<filename>` for
    T ranks from an HF GPT2LMHeadModel (mapping in the module docstring). Returns root."""
    root = Path(root)
    iteration_dir = root / ("release" if release else f"iter_{iteration:07d}")
    padded = pad_vocab_to or hf_model.config.vocab_size
    states = megatron_rank_states(hf_model, T, checkpoint_version, encoder_prefix=encoder_prefix,
                                  self_attention=self_attention, pad_vocab_to=pad_vocab_to, dtype=dtype)
    with _fake_megatron_enums() as model_type:
        for r, language_model in enumerate(states):
            args = megatron_args(hf_model, T, padded)
            args.model_type = model_type.encoder_or_decoder
            checkpoint = {
                "args": args if with_args else None,
                "checkpoint_version": checkpoint_version,
                "iteration": 0 if release else iteration,
                "model": {"language_model": language_model},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
                "rng_state": [{"random_rng_state": (3, (1, 2, 3), None), "np_rng_state": None}],
            }
            rank_dir = iteration_dir / f"mp_rank_{r:02d}"
            rank_dir.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, rank_dir / filename, _use_new_zipfile_serialization=not legacy_format)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else str(iteration))
    return root
