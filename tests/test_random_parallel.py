"""Random-weight parallel runs need no files: per-tensor seeds, per-stage drawing, and the scaling plot."""
import argparse
import csv
import os

import pytest
import torch

from ftlab.checkpoint import random_ft_tensors, tensor_specs
from ftlab.cli import _parse_cells
from ftlab.config import GPTConfig
from ftlab.generate import generate
from ftlab.model import GPT, device_weights
from ftlab.parallel import Layout, ParallelEngine, ParallelError, random_stage_weights, run_workers
from tests.util import assert_rel_close

CFG = GPTConfig(head_num=4, size_per_head=8, num_layer=4, vocab_size=61, max_pos_seq_len=32, start_id=0, end_id=60)
SEED, STD = 5, 0.3
PROMPTS = [[3, 14, 15, 9, 2], [6], [5, 35, 8]]
GREEDY = dict(max_new_tokens=6)


def test_subsets_draw_exactly_the_full_calls_tensors():
    full = random_ft_tensors(CFG, seed=SEED, std=STD, lm_head=True)
    assert set(full) == {s.name for s in tensor_specs(CFG, lm_head=True)}
    for layers, embeddings in [([2], False), ([3, 1], True), ([], True), (range(4), False)]:
        part = random_ft_tensors(CFG, seed=SEED, std=STD, lm_head=True, layers=layers, embeddings=embeddings)
        assert set(part) == {s.name for s in tensor_specs(CFG, lm_head=True, layers=layers, embeddings=embeddings)}
        for name, tensor in part.items():
            assert torch.equal(tensor, full[name]), name
    # a deeper model of the same width draws the same values for the layers both have; seeds and names matter
    deeper = random_ft_tensors(CFG.replace(num_layer=6), seed=SEED, std=STD, layers=[1], embeddings=False)
    assert all(torch.equal(t, full[n]) for n, t in deeper.items())
    other_seed = random_ft_tensors(CFG, seed=SEED + 1, std=STD, layers=[1], embeddings=False)
    name = "model.layers.1.mlp.dense_h_to_4h.weight"
    assert not torch.equal(other_seed[name], full[name])
    assert not torch.equal(full["model.layers.1.attention.dense.weight"], full["model.layers.2.attention.dense.weight"])
    # fp16 is the fp32 draw rounded once
    half = random_ft_tensors(CFG, seed=SEED, std=STD, dtype=torch.float16, layers=[0], embeddings=False)
    assert all(torch.equal(t, full[n].half()) for n, t in half.items())
    ln = full["model.layers.0.input_layernorm.weight"]
    assert 0.5 < ln.mean() < 1.5 and full["model.wte"].std() == pytest.approx(STD, rel=0.1)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_stage_weights_are_the_full_models_shards_drawn_a_layer_at_a_time(monkeypatch, tp, pp):
    import ftlab.parallel as parallel

    drawn = []

    def spy(config, **kwargs):
        drawn.append(list(kwargs["layers"]))
        return random_ft_tensors(config, **kwargs)

    monkeypatch.setattr(parallel, "random_ft_tensors", spy)
    full = random_ft_tensors(CFG, seed=SEED, std=STD)
    for rank in range(tp * pp):
        lay = Layout(tp, pp, rank, tp * pp)
        drawn.clear()
        got = random_stage_weights(CFG, lay, seed=SEED, std=STD, dtype=torch.float32, device="cpu")
        ends = lay.is_first_stage or lay.is_last_stage
        assert drawn == [[i] for i in lay.stage_layers(CFG.num_layer)] + ([[]] if ends else [])
        want = device_weights(CFG, full, dtype=torch.float32, device="cpu", tp_rank=lay.tp_rank, tp_size=tp,
                              layers=lay.stage_layers(CFG.num_layer), first_stage=lay.is_first_stage,
                              last_stage=lay.is_last_stage)
        assert got.first_layer == want.first_layer and len(got.blocks) == len(want.blocks) == CFG.num_layer // pp
        for g, w in zip(got.blocks, want.blocks):
            for field, tensor in vars(w).items():
                other = getattr(g, field)
                assert (other is None) == (tensor is None), field
                assert tensor is None or (other.is_contiguous() and torch.equal(other, tensor)), field
        for field in ("wte", "wpe", "lnf_weight", "lnf_bias", "lm_head"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), field


@pytest.fixture(scope="module")
def single_process():
    model = GPT.from_ft_tensors(CFG, random_ft_tensors(CFG, seed=SEED, std=STD), dtype="fp32", device="cpu")
    return generate(model, PROMPTS, **GREEDY), model.logits(PROMPTS)


@pytest.mark.cpu_only
def test_one_process_engine_without_files(single_process):
    engine = ParallelEngine.random(CFG, seed=SEED, std=STD, dtype="fp32")
    assert engine.config.tensor_para_size == 1 and engine.config.model_name == CFG.model_name
    assert generate(engine, PROMPTS, **GREEDY).output_ids == single_process[0].output_ids
    for got, ref in zip(engine.logits(PROMPTS), single_process[1]):
        assert torch.equal(got, ref)
    with pytest.raises(ParallelError, match="either model_dir .* or config"):
        ParallelEngine(None, dtype="fp32")
    with pytest.raises(ParallelError, match="1 processes but tensor_para_size=1 x layer_para_size=2 = 2"):
        ParallelEngine.random(CFG, layer_para_size=2, dtype="fp32")


@pytest.mark.cpu_only
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_random_parallel_matches_single_process(single_process, tp, pp):
    jobs = [{"generate": dict(GREEDY, prompts=PROMPTS)}, {"logits": PROMPTS}]
    greedy, logits = run_workers(None, jobs, config=CFG, random_seed=SEED, random_std=STD, tensor_para_size=tp,
                                 layer_para_size=pp, dtype="fp32", layer_para_batch_size=2, timeout_s=240)
    ref_greedy, ref_logits = single_process
    assert greedy.output_ids == ref_greedy.output_ids
    assert len(logits) == len(ref_logits)
    for got, ref in zip(logits, ref_logits):
        assert_rel_close(got, ref, tol=1e-5, what=f"logits T={tp} L={pp}")


@pytest.mark.cpu_only
def test_random_parallel_validates_the_split_on_every_rank():
    with pytest.raises(ParallelError, match="head_num=3 is not divisible by tensor_para_size=2"):
        run_workers(None, [{"logits": PROMPTS}], config=CFG.replace(head_num=3), tensor_para_size=2, dtype="fp32",
                    timeout_s=120)


def test_cells_option():
    assert _parse_cells("128x8,512x32, 20X8") == [(128, 8), (512, 32), (20, 8)]
    for bad in ("128", "128x", "0x8", "128x8;20x8", "ax8"):
        with pytest.raises(argparse.ArgumentTypeError, match="INxOUT"):
            _parse_cells(bad)


def test_ab_decode_variants_option():
    from ftlab.bench import parse_env_variants, variant_label

    got = parse_env_variants("default; FTLAB_SKINNY_LN=stats;FTLAB_SKINNY_LN=rowstats  FTLAB_SKINNY_TILE=32,512,4")
    assert got == [{}, {"FTLAB_SKINNY_LN": "stats"}, {"FTLAB_SKINNY_LN": "rowstats", "FTLAB_SKINNY_TILE": "32,512,4"}]
    assert [variant_label(v) for v in got] == ["default", "FTLAB_SKINNY_LN=stats",
                                                 "FTLAB_SKINNY_LN=rowstats FTLAB_SKINNY_TILE=32,512,4"]
    for bad, what in (("default", "at least two"), ("default;SKINNY_LN=1", "SKINNY_LN=1"),
                      ("default;FTLAB_PDL", "FTLAB_PDL"), ("default;FTLAB_A-B=1", "FTLAB_A-B=1")):
        with pytest.raises(ValueError, match=what):
            parse_env_variants(bad)


@pytest.mark.gpu
def test_decode_step_ab_times_each_variant_and_restores_the_environment(monkeypatch):
    from ftlab.bench import decode_step_ab

    monkeypatch.delenv("FTLAB_SKINNY_LN", raising=False)
    monkeypatch.setenv("FTLAB_PDL", "1")
    cfg = GPTConfig(head_num=2, size_per_head=32, num_layer=2, vocab_size=301, max_pos_seq_len=128, start_id=0,
                    end_id=0)
    dev = torch.device("cuda")
    model = GPT.from_ft_tensors(cfg, random_ft_tensors(cfg, dtype=torch.float16, device=dev), dtype="fp16",
                                device=dev)
    results = decode_step_ab(model, [{}, {"FTLAB_SKINNY_LN": "stats"}, {"FTLAB_PDL": "0"}], batch=24, context=40,
                             rounds=2, replays=3)
    assert [r["variant"] for r in results] == ["default", "FTLAB_SKINNY_LN=stats", "FTLAB_PDL=0"]
    assert "FTLAB_SKINNY_LN" not in os.environ and os.environ["FTLAB_PDL"] == "1"
    for r in results:
        assert len(r["rounds_ms"]) == 2 and all(t > 0 for t in r["rounds_ms"])
        assert r["max_logit_diff"] < 0.05 and r["argmax_agreement"] > 0.8, r
    assert results[0]["max_logit_diff"] == 0.0


def test_bench_sampling_options_are_checked_before_any_gpu_work():
    from ftlab.cli import main

    with pytest.raises(SystemExit, match=r"top_p\[0\] = 1.5 is outside \(0, 1\]"):
        main(["bench", "--top-p", "1.5"])
    with pytest.raises(SystemExit, match="single-GPU runs only"):
        main(["bench", "--top-k", "40", "--tensor-para-size", "2"])


# --- the scaling plot ---------------------------------------------------------------------------------------------

def _write_bench_csv(path, rows):
    from ftlab.bench import append_csv

    common = dict(gpu="NVIDIA H200", date="2026-12-01", torch="2.11", triton="3.6", layers=44, heads=48,
                  size_per_head=128, vocab=50257, dtype="fp16", ftlab_spread=0.01, cell="e2e")
    append_csv([dict(common, **row) for row in rows], path)


def test_plot_scaling_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ftlab.plots import FT_20B_A100, latency_table, plot_scaling

    path = tmp_path / "bench.csv"
    rows = []
    for config in ("gpt-6.7b", "gpt-20b"):
        for tp in (1, 2, 4):
            for bs, n_in, n_out, ms in [(1, 20, 8, 200.0), (1, 128, 8, 240.0), (8, 512, 32, 900.0)]:
                rows.append(dict(config=config, tp=tp, pp=1, bs=bs, n_in=n_in, n_out=n_out, ftlab_ms=ms / tp ** 0.5))
        rows.append(dict(config=config, tp=1, pp=2, bs=1, n_in=128, n_out=8, ftlab_ms=250.0))
    rows.append(dict(config="gpt-20b", tp=2, pp=1, bs=1, n_in=20, n_out=8, ftlab_ms=120.0))  # a newer run: wins
    _write_bench_csv(path, rows)
    _write_bench_csv(path, [dict(config="gpt-20b", tp=1, pp=1, cell="decode_step", bs=1, n_in=512, n_out=1,
                                 ftlab_ms=5.0)])  # not an e2e row: left out
    png = plot_scaling(path, tmp_path / "plots" / "scaling.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    table = latency_table(path)
    assert len(table) == 2 * (3 * 3 + 1)
    anchor_rows = [r for r in table if r["anchor_ms"] is not None]
    assert [(r["tp"], r["anchor_ms"]) for r in anchor_rows] == [(t, FT_20B_A100.ms_by_tp[t]) for t in (1, 2, 4)]
    tp2 = next(r for r in anchor_rows if r["tp"] == 2)
    assert tp2["ftlab_ms"] == 120.0 and tp2["speedup"] == pytest.approx(200.0 / 120.0)
    assert {r["pp"] for r in table if r["gpus"] == 2 and r["tp"] == 1} == {2}


def test_plot_scaling_names_missing_columns(tmp_path):
    from ftlab.plots import main, plot_scaling

    path = tmp_path / "other.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gpu", "config", "bs", "latency"])
        writer.writerow(["H200", "gpt-20b", 1, 3.0])
    with pytest.raises(ValueError, match=r"other.csv: not an `ftlab bench` CSV: missing column\(s\) \['date', 'dtype', "
                                         r"'tp', 'pp', 'cell', 'n_in', 'n_out', 'ftlab_ms'\]"):
        plot_scaling(path, tmp_path / "x.png")
    assert main(["scaling", str(path), str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
