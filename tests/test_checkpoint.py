"""config.ini and c-model directory: round trips, FT-written files, and clear errors on bad input."""
import numpy as np
import pytest
import torch

from ftlab.checkpoint import (CheckpointError, CModelWriter, load_cmodel, random_ft_tensors, resolve_model_dir,
                              tensor_specs, write_cmodel)
from ftlab.config import ConfigError, GPTConfig

TINY = dict(head_num=4, size_per_head=6, num_layer=2, vocab_size=37, max_pos_seq_len=19, start_id=0, end_id=36)


def test_config_ini_round_trip(tmp_path):
    cfg = GPTConfig(**{**TINY, "start_id": 1, "end_id": 2}, inter_size=40, layernorm_eps=1e-6, weight_data_type="fp16",
                    tensor_para_size=2, model_name="tiny")
    cfg.to_ini(tmp_path / "config.ini")
    assert GPTConfig.from_ini(tmp_path / "config.ini") == cfg
    assert GPTConfig(**TINY).inter_size == 4 * 24


def test_config_reads_fastertransformer_hf_converter_output(tmp_path):
    # FT's huggingface_gpt_convert.py writes no layernorm_eps and no tensor_para_size: the directory name says N
    d = tmp_path / "2-gpu"
    d.mkdir()
    (d / "config.ini").write_text(
        "[gpt]\nmodel_name = gpt2\nhead_num = 12\nsize_per_head = 64\ninter_size = 3072\nmax_pos_seq_len = 1024\n"
        "num_layer = 12\nvocab_size = 50257\nstart_id = 50256\nend_id = 50256\nweight_data_type = fp32\n\n"
        "[structure]\ngpt_with_moe = 0\n")
    cfg = GPTConfig.from_ini(d / "config.ini")
    assert (cfg.hidden, cfg.tensor_para_size, cfg.layernorm_eps, cfg.model_name) == (768, 2, 1e-5, "gpt2")


@pytest.mark.parametrize("text, message", [
    ("[other]\nhead_num = 2\n", r"no \[gpt\] section"),
    ("[gpt]\nhead_num = 2\nsize_per_head = 4\nnum_layer = 1\n", "lacks the required key 'vocab_size'"),
    ("[gpt]\nhead_num = two\nsize_per_head = 4\nnum_layer = 1\nvocab_size = 9\nend_id = 8\nstart_id = 8\n", "head_num = 'two' is not an integer"),
    ("[gpt]\nhead_num = 2\nsize_per_head = 4\nnum_layer = 1\nvocab_size = 9\nend_id = 8\nstart_id = 8\nweight_data_type = int3\n",
     "weight_data_type"),
    ("[gpt]\nhead_num = 2\nsize_per_head = 4\nnum_layer = 0\nvocab_size = 9\nend_id = 8\nstart_id = 8\n", "num_layer must be a positive"),
    ("no section header\n", "not a valid ini file"),
])
def test_bad_config_ini_is_named(tmp_path, text, message):
    path = tmp_path / "config.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        GPTConfig.from_ini(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("weight_data_type", ["fp32", "fp16"])
def test_cmodel_round_trip_and_shard_layout(tmp_path, tp, weight_data_type):
    cfg = GPTConfig(**TINY)
    weights = random_ft_tensors(cfg, seed=tp)
    out = write_cmodel(tmp_path, cfg, weights, tensor_para_size=tp, weight_data_type=weight_data_type)
    assert out == tmp_path / f"{tp}-gpu"
    H = cfg.hidden
    qkv = np.fromfile(out / f"model.layers.1.attention.query_key_value.weight.{tp - 1}.bin",
                      dtype=np.float32 if weight_data_type == "fp32" else np.float16)
    assert qkv.size == H * 3 * H // tp
    # rank r's QKV shard is columns r*H/tp..(r+1)*H/tp of each of q, k, v ([H, 3, H/tp])
    full = weights["model.layers.1.attention.query_key_value.weight"]
    expect = full[:, :, (tp - 1) * H // tp:].reshape(-1).numpy()
    np.testing.assert_allclose(qkv.astype(np.float32), expect, rtol=1e-3 if weight_data_type == "fp16" else 0,
                               atol=1e-6 if weight_data_type == "fp16" else 0)
    assert not list(out.glob("model.layers.0.attention.dense.bias.*.bin")), "row-parallel bias must not be split"
    config, loaded = load_cmodel(tmp_path)  # the parent directory resolves to its single <N>-gpu
    assert config.tensor_para_size == tp and config.weight_data_type == weight_data_type
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded[name].float(), tensor, rtol=1e-3 if weight_data_type == "fp16" else 0,
                                   atol=1e-3 if weight_data_type == "fp16" else 0)
    _, rank_shards = load_cmodel(out, tp_rank=tp - 1)
    assert rank_shards["model.layers.0.mlp.dense_4h_to_h.weight"].shape == (cfg.inter_size // tp, H)


def test_truncated_and_missing_files_are_named(tmp_path):
    cfg = GPTConfig(**TINY)
    out = write_cmodel(tmp_path, cfg, random_ft_tensors(cfg), tensor_para_size=2)
    victim = out / "model.layers.1.mlp.dense_h_to_4h.weight.1.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.weight\.1\.bin: .* expected .*shape \(24, 48\)"):
        load_cmodel(out)
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.weight\.1\.bin: missing file"):
        load_cmodel(out)


def test_files_split_for_another_n_are_reported(tmp_path):
    cfg = GPTConfig(**TINY)
    out = write_cmodel(tmp_path, cfg, random_ft_tensors(cfg), tensor_para_size=2)
    ini = (out / "config.ini").read_text().replace("tensor_para_size = 2", "tensor_para_size = 4")
    (out / "config.ini").write_text(ini)
    with pytest.raises(CheckpointError, match=r"split for tensor_para_size=2 \(ranks \[0, 1\]\).*config.ini says 4"):
        load_cmodel(out)


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    cfg = GPTConfig(**TINY)
    weights = random_ft_tensors(cfg)
    write_cmodel(tmp_path, cfg, weights, tensor_para_size=1)
    before = (tmp_path / "1-gpu" / "model.wte.bin").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        write_cmodel(tmp_path, cfg, weights, tensor_para_size=1)
    # a failure half-way (a tensor of the wrong shape) leaves neither a partial directory nor a changed output
    bad = dict(weights)
    bad["model.layers.1.attention.dense.weight"] = torch.randn(3, 3)
    with pytest.raises(CheckpointError, match=r"attention\.dense\.weight: got shape \(3, 3\)"):
        write_cmodel(tmp_path, cfg, bad, tensor_para_size=1, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1-gpu"]
    assert (tmp_path / "1-gpu" / "model.wte.bin").read_bytes() == before
    # an incomplete set of tensors is refused at the end, also leaving nothing behind
    with pytest.raises(CheckpointError, match="never written"):
        with CModelWriter(tmp_path / "other", cfg, tensor_para_size=1) as writer:
            writer.add("model.wte", weights["model.wte"])
    assert not (tmp_path / "other" / "1-gpu").exists()
    assert not list((tmp_path / "other").iterdir())
    # with force, a complete new output replaces the old one
    weights2 = random_ft_tensors(cfg, seed=5)
    write_cmodel(tmp_path, cfg, weights2, tensor_para_size=1, force=True)
    assert (tmp_path / "1-gpu" / "model.wte.bin").read_bytes() != before


def test_split_must_divide(tmp_path):
    cfg = GPTConfig(**TINY)
    with pytest.raises(CheckpointError, match="head_num=4 is not divisible by tensor_para_size=3"):
        write_cmodel(tmp_path, cfg, random_ft_tensors(cfg), tensor_para_size=3)
    assert not list(tmp_path.iterdir())


def test_resolve_model_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.ini"):
        resolve_model_dir(tmp_path)


def test_specs_cover_ft_names():
    names = {s.filename(0) for s in tensor_specs(GPTConfig(**TINY), lm_head=True)}
    for expected in ["model.wte.bin", "model.wpe.bin", "model.final_layernorm.weight.bin", "model.lm_head.weight.bin",
                     "model.layers.0.input_layernorm.bias.bin", "model.layers.1.attention.query_key_value.bias.0.bin",
                     "model.layers.1.mlp.dense_4h_to_h.bias.bin", "model.layers.0.attention.dense.weight.0.bin"]:
        assert expected in names
