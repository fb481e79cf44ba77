"""`ftlab convert hf`: HF GPT-2 directory -> c-model, checked tensor by tensor against the HF weights."""
import json

import pytest
import torch

from ftlab.checkpoint import load_cmodel
from ftlab.cli import main
from ftlab.convert.huggingface import HFConversionError, convert_hf, ft_to_hf_state_dict

transformers = pytest.importorskip("transformers")


def make_hf_dir(path, *, n_embd=24, n_head=4, n_layer=2, vocab=53, n_positions=40, safe=True, seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=n_layer, vocab_size=vocab,
                                     n_positions=n_positions, bos_token_id=vocab - 1, eos_token_id=vocab - 1, **extra)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases and LN to 0/1: make every tensor informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=safe)
    return model


@pytest.mark.parametrize("i_g", [1, 2])
@pytest.mark.parametrize("safe", [True, False])
def test_convert_cli_matches_hf_weights(tmp_path, i_g, safe):
    hf = make_hf_dir(tmp_path / "hf", safe=safe)
    (tmp_path / "hf" / "vocab.json").write_text("{}")
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n")
    assert main(["convert", "hf", "-i", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "-i_g", str(i_g)]) == 0
    out = tmp_path / "out" / f"{i_g}-gpu"
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    config, weights = load_cmodel(out)
    assert (config.head_num, config.size_per_head, config.num_layer, config.vocab_size, config.tensor_para_size) == \
        (4, 6, 2, 53, i_g)
    assert config.end_id == 52 and config.max_pos_seq_len == 40
    back = ft_to_hf_state_dict(weights, config)
    for name, tensor in hf.state_dict().items():
        if name.endswith(".attn.bias") or name.endswith("masked_bias"):
            continue  # causal-mask buffers of older transformers
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)


def test_fp16_weights_and_refusal_to_overwrite(tmp_path, capsys):
    make_hf_dir(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "out", weight_data_type="fp16", progress=False)
    assert (tmp_path / "out" / "1-gpu" / "model.wte.bin").stat().st_size == 53 * 24 * 2
    assert main(["convert", "hf", "-i", str(tmp_path / "hf"), "-o", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "hf", "-i", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "1-gpu" / "model.wte.bin").stat().st_size == 53 * 24 * 4


def test_untied_lm_head_is_written(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    out = convert_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    assert (out / "model.lm_head.weight.bin").is_file()


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"model_type": "llama"}, "model_type 'llama'"),
])
def test_unsupported_configs_are_named(tmp_path, change, message):
    make_hf_dir(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match=message):
        convert_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bad_inputs(tmp_path):
    with pytest.raises(HFConversionError, match="config.json: not found"):
        convert_hf(tmp_path, tmp_path / "out")
    make_hf_dir(tmp_path / "hf")
    with pytest.raises(HFConversionError, match="not divisible by -i_g"):
        convert_hf(tmp_path / "hf", tmp_path / "out", infer_gpu_num=3)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_embd"] = 32  # weights no longer match config.json
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match=r"'wte.weight' has shape \(53, 24\), expected \(53, 32\)"):
        convert_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("tied", [True, False])
def test_export_hf_round_trip(tmp_path, tied):
    # c-model (split for 2 GPUs) -> HF directory -> c-model: the same tensors; HF loads it and computes the
    # logits of the original HF model
    from ftlab.convert.huggingface import export_hf

    hf = make_hf_dir(tmp_path / "hf", tie_word_embeddings=tied)
    first = convert_hf(tmp_path / "hf", tmp_path / "ft", infer_gpu_num=2, progress=False)
    exported = export_hf(first, tmp_path / "hf2")
    again = convert_hf(exported, tmp_path / "ft2", infer_gpu_num=1, progress=False)
    (config1, w1), (config2, w2) = load_cmodel(first), load_cmodel(again)
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert config2.replace(tensor_para_size=2) == config1.replace(model_name=config2.model_name)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, rtol=0, atol=0)
    with pytest.raises(HFConversionError, match="already exists"):
        export_hf(first, tmp_path / "hf2")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
