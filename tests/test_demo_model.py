"""The bundled demo model (data/demo-model): loads as the default model, is far better than uniform on Python source,
and ftlab scores it exactly as HF transformers does on the same weights."""
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from ftlab.checkpoint import load_cmodel
from ftlab.cli import DEFAULT_MODEL_DIR, main
from ftlab.convert.huggingface import ft_to_hf_state_dict
from ftlab.evaluate import perplexity
from ftlab.model import GPT
from ftlab.tokenizer import load_tokenizer
from ftlab.train_demo import list_stdlib_sources, split_train_val

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="data/demo-model not present")


@pytest.fixture(scope="module")
def validation_tokens():
    """Held-out text as the trainer splits it: validation files of this machine's own CPython stdlib (the model was
    trained on another Python's stdlib; the split is by a hash of the relative path)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = dict(list_stdlib_sources(stdlib))
    _, val = split_train_val(sorted(sources))
    tokenizer = load_tokenizer()
    tokens = []
    for rel in val[:3]:
        tokens += [50256] + tokenizer.encode(sources[rel].read_text(encoding="utf-8"))
    return tokens


def hf_logits_fn(model):
    def fn(sequences):
        with torch.no_grad():
            return [model(torch.tensor([s], device=model.device)).logits[0] for s in sequences]
    return fn


def test_demo_model_files_and_size():
    config, weights = load_cmodel(DEFAULT_MODEL_DIR)
    assert (config.vocab_size, config.num_layer, config.hidden, config.weight_data_type) == (50257, 6, 192, "fp16")
    assert config.max_pos_seq_len >= 512
    size = sum(p.stat().st_size for p in (DEFAULT_MODEL_DIR / "1-gpu").glob("*.bin"))
    assert size <= 32 * 2**20
    for name in ("MODEL_CARD.md", "loss_curve.png", "training_log.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file()


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("fp16", marks=pytest.mark.gpu)])
def test_perplexity_equals_hf_and_beats_uniform(validation_tokens, device, dtype):
    window = 512 if device == "cuda" else 96  # the CPU interpreter scores a shorter slice
    tokens = validation_tokens[: (8 if device == "cuda" else 3) * window]
    config, ft = load_cmodel(DEFAULT_MODEL_DIR)
    ours = perplexity(GPT.from_ft_tensors(config, ft, dtype=dtype, device=device).logits, tokens, window)
    hf_config = transformers.GPT2Config(n_embd=config.hidden, n_head=config.head_num, n_layer=config.num_layer,
                                        n_positions=config.max_pos_seq_len, vocab_size=config.vocab_size)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.load_state_dict({k: v.float() for k, v in ft_to_hf_state_dict(ft, config).items()}, strict=False)
    ref = perplexity(hf_logits_fn(hf.to(device)), tokens, window)
    assert ours.tokens == ref.tokens
    assert ours.ppl == pytest.approx(ref.ppl, rel=1e-3), f"{dtype}: ftlab ppl {ours.ppl:.4f} vs HF {ref.ppl:.4f}"
    assert ours.nll < 0.5 * math.log(config.vocab_size), f"validation loss {ours.nll:.3f} nats is not far below uniform"


def test_default_model_generates_python_looking_text(capsys):
    # the README's main job (fewer tokens): sampled text after "def main():" reads as Python
    assert main(["generate", "--prompt", "def main():", "--max-new-tokens", "12", "--top-k", "40",
                 "--temperature", "0.8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def main():\n")  # <|endoftext|> before the prompt is not shown
    completion = text[len("def main():"):]
    assert completion.strip(), "the completion is only whitespace"
    assert any(word in completion for word in ("return", "self", "(", "=")), completion
