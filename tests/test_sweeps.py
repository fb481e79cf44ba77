"""Parameter sweeps (ftlab.sweeps) on a tiny random model."""
import pytest
import torch

from ftlab.checkpoint import random_ft_tensors
from ftlab.config import GPTConfig
from ftlab.model import GPT
from ftlab.sweeps import (generation_sweep, plot_sampling_sweep, sampling_sweep, tensor_parallel_sweep,
                          weight_bytes_per_rank, write_csv)

CFG = GPTConfig(head_num=2, size_per_head=16, num_layer=2, vocab_size=61, max_pos_seq_len=48, start_id=60,
                end_id=60)


@pytest.fixture(scope="module")
def model():
    # std 1: peaked next-token distributions, so top-k and top-p cut at different places
    return GPT.from_ft_tensors(CFG, random_ft_tensors(CFG, seed=5, std=1.0), dtype="fp32",
                               device="cuda" if torch.cuda.is_available() else "cpu")


def test_sampling_sweep_follows_ft_semantics(model):
    contexts = [[1, 2, 3], [7, 7, 7, 7, 9], [40]]
    rows = sampling_sweep(model, contexts, top_ks=[1, 2, 8, 0], top_ps=[0.3, 0.9, 1.0], temperature=0.7)
    cell = {(r["top_k"], r["top_p"]): r for r in rows}
    assert len(rows) == 12
    for p in (0.3, 0.9, 1.0):  # greedy: one token, no entropy, whatever top_p says
        assert cell[(1, p)]["kept_tokens"] == 1 and cell[(1, p)]["greedy_prob"] == 1
        assert cell[(1, p)]["entropy_nats"] == pytest.approx(0, abs=1e-12)
    assert cell[(0, 1.0)]["kept_tokens"] == CFG.vocab_size and cell[(0, 1.0)]["kept_mass"] == pytest.approx(1)
    assert all(cell[(2, p)]["kept_tokens"] <= 2 for p in (0.3, 0.9, 1.0))
    for k in (2, 8, 0):  # more room (larger top_p, larger or no top_k) keeps more, samples with more entropy
        assert cell[(k, 0.3)]["kept_tokens"] <= cell[(k, 0.9)]["kept_tokens"] <= cell[(k, 1.0)]["kept_tokens"]
        for p in (0.3, 0.9):  # FT applies top_p to the top-k set renormalised: at least p of the top-k mass stays
            assert cell[(k, p)]["kept_mass"] >= p * cell[(k, 1.0)]["kept_mass"] - 1e-9
        assert cell[(k, 0.3)]["greedy_prob"] >= cell[(k, 1.0)]["greedy_prob"]
    assert cell[(2, 1.0)]["entropy_nats"] <= cell[(8, 1.0)]["entropy_nats"] <= cell[(0, 1.0)]["entropy_nats"]
    with pytest.raises(ValueError, match="at least one context"):
        sampling_sweep(model, [], [1], [1.0])


def test_generation_sweep_one_batch_per_request_params(model, tmp_path):
    configs = [dict(top_k=1), dict(top_k=0, top_p=1.0, temperature=1.5), dict(top_k=4, top_p=0.8)]
    rows = generation_sweep(model, [3, 1, 4, 1, 5], configs, seeds=4, max_new_tokens=6)
    assert [(r["top_k"], r["top_p"], r["temperature"]) for r in rows] == [(1, 1.0, 1.0), (0, 1.0, 1.5), (4, 0.8, 1.0)]
    greedy, hot = rows[0], rows[1]
    assert greedy["unique_continuations"] == 1 and greedy["distinct_1"] <= 1 / 4 + 1e-9  # every seed the same text
    assert hot["unique_continuations"] > 1 and hot["distinct_2"] > greedy["distinct_2"]
    assert hot["mean_log_prob"] < greedy["mean_log_prob"] <= 0
    assert write_csv(rows, tmp_path / "gen.csv").read_text().startswith("top_k,top_p,temperature,seeds")
    with pytest.raises(ValueError, match="repetition_penalty"):
        generation_sweep(model, [1], [dict(top_k=1, repetition_penalty=1.2)])


def test_weight_bytes_per_rank_splits_the_layers_only():
    one, two = weight_bytes_per_rank(CFG, 1), weight_bytes_per_rank(CFG, 2)
    H, V, P, L = CFG.hidden, CFG.vocab_size, CFG.max_pos_seq_len, CFG.num_layer
    replicated = (V * H + P * H + 2 * H) + L * (4 * H + 2 * H)  # embeddings, final LN; per layer 2 LNs, 2 biases
    assert one - two == (one - 2 * replicated) // 2
    with pytest.raises(ValueError, match="not divisible"):
        weight_bytes_per_rank(CFG, 3)


def test_plot_sampling_sweep(model, tmp_path):
    rows = sampling_sweep(model, [[1, 2]], top_ks=[1, 4, 0], top_ps=[0.5, 1.0])
    assert plot_sampling_sweep(rows, tmp_path / "sweep.png", title="tiny").stat().st_size > 1000


@pytest.mark.cpu_only
def test_tensor_parallel_sweep_agrees_across_splits():
    rows = tensor_parallel_sweep([1, 2], [[1, 2, 3], [9]], config=CFG, max_new_tokens=4, timeout_s=240)
    assert [r["tensor_para_size"] for r in rows] == [1, 2]
    assert rows[0]["logits_rel_err"] == 0 and rows[1]["logits_rel_err"] < 1e-5
    assert all(r["greedy_equal"] for r in rows)
    assert rows[1]["weight_mb_per_rank"] < rows[0]["weight_mb_per_rank"]
    with pytest.raises(ValueError, match="no c-model directory for tensor_para_size"):
        tensor_parallel_sweep([1, 2], [[1]], model_dirs={1: "x"})


def test_sweep_cli_on_the_demo_model(tmp_path, capsys):
    from ftlab.cli import main

    assert main(["sweep", "--top-k", "1,0", "--top-p", "0.9,1", "--seeds", "1", "--max-new-tokens", "2",
                 "--prompt", "import os\n", "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "kept tokens" in out and "continuations of 'import os\\n'" in out
    for name in ("s.csv", "s-generation.csv", "s.png"):
        assert (tmp_path / name).is_file(), name
    with pytest.raises(SystemExit):
        main(["sweep", "--top-k", "1,x"])
