"""ftlab.timeline's accounting of a profiled step or prefill (pure functions: no GPU needed; the profiling itself on
the GPU only)."""
import random

import pytest
import torch

from ftlab.checkpoint import random_ft_tensors
from ftlab.config import GPTConfig
from ftlab.model import GPT
from ftlab.timeline import CSV_COLUMNS, Timeline, _period, label_step, prefill_timeline, short_name, step_table


def _step(names, durations, gaps):
    """Events back to back, each starting `gap` after the previous one's START (negative gaps overlap)."""
    t, events = 100.0, []
    for name, dur, gap in zip(names, durations, gaps):
        t += gap
        events.append((t, t + dur, name))
    return events


def test_short_name_strips_templates_and_arguments():
    assert short_name("void at::native::vectorized_elementwise_kernel<4, Foo>(int, Bar)") == \
        "vectorized_elementwise_kernel"
    assert short_name("_gemv_kernel") == "_gemv_kernel"


def test_block_slots_found_between_other_kernels():
    block = ["gemv", "_decode_partition_kernel", "gemv", "gemv", "gemv"]
    names = ["copy", "embedding"] + block * 3 + ["gemv", "sample_a", "sample_b"]
    labels = label_step(names, 5)
    assert labels[:2] == ["copy", "embedding"]
    assert labels[2] == "block 0/5: gemv" and labels[3] == "block 1/5: _decode_partition_kernel"
    assert labels[16] == "block 4/5: gemv"
    assert labels[17:] == ["gemv", "sample_a", "sample_b"]  # the LM head after the blocks is not a block slot
    assert label_step(names, None) == names


def test_charges_sum_to_the_span_with_overlaps_and_gaps():
    rng = random.Random(7)
    names = ["embedding"] + ["gemv", "_decode_partition_kernel", "gemv", "gemv", "gemv"] * 4 + ["gemv", "sample"]
    steps = []
    for _ in range(3):
        durations = [rng.uniform(1.0, 9.0) for _ in names]
        gaps = [0.0] + [rng.uniform(-3.0, 6.0) for _ in names[1:]]
        steps.append(_step(names, durations, gaps))
    rows, span = step_table(steps, 5)
    spans = [max(e for _, e, _ in s) - s[0][0] for s in steps]
    assert abs(span - sum(spans) / 3) < 1e-9
    assert abs(sum(r["added_us"] + r["gap_us"] for r in rows) - span) < 1e-9
    assert any(r["gap_us"] > 0 for r in rows)
    by_label = {r["label"]: r for r in rows}
    assert by_label["block 1/5: _decode_partition_kernel"]["calls"] == 4
    assert by_label["gemv"]["calls"] == 1
    assert all(r["added_us"] >= 0 for r in rows)


def test_a_kernel_hidden_under_another_adds_nothing():
    events = [(0.0, 10.0, "long"), (2.0, 5.0, "hidden"), (9.0, 12.0, "tail"), (15.0, 16.0, "late")]
    rows, span = step_table([events], None)
    by_label = {r["label"]: r for r in rows}
    assert span == 16.0
    assert by_label["late"]["gap_us"] == 3.0 and by_label["late"]["added_us"] == 1.0
    assert by_label["hidden"]["added_us"] == 0.0 and by_label["hidden"]["mean_us"] == 3.0
    assert by_label["long"]["added_us"] == 10.0 and by_label["tail"]["added_us"] == 2.0


def test_timeline_text_and_csv_rows():
    events = [(0.0, 10.0, "embedding"), (12.0, 20.0, "gemv")]
    rows, span = step_table([events], None)
    result = Timeline(batch=1, context=512, events_per_step=2, rows=rows, span_us=span, event_us=25.0,
                      back_to_back_us=21.0)
    text = result.text()
    assert "batch 1, context 512, 2 GPU events per step" in text and "gemv" in text and "embedding" in text
    common = dict(gpu="G", date="d", torch="t", triton="tr", config="c", dtype="fp16", variant="", sampling="greedy")
    csv_rows = result.csv_rows(**common)
    assert [list(r) for r in csv_rows] == [CSV_COLUMNS] * 2
    assert {r["label"]: (r["gap_us"], r["added_us"]) for r in csv_rows} == {"embedding": (0.0, 10.0),
                                                                           "gemv": (2.0, 8.0)}


def test_period_from_the_prefills_context_attention():
    block = ["_layernorm_kernel", "nvjet_bias", "_context_attention_kernel", "nvjet_badd", "_layernorm_kernel",
             "nvjet_gelubias", "nvjet_badd"]
    names = ["Memcpy HtoD", "_embedding_kernel"] + block * 3 + ["_gemv_rows_kernel"]
    assert _period(names, ("context_attention",)) == 7
    assert _period(names) is None  # the default markers are decode attention's
    labels = label_step(names, 7)
    assert labels[4] == "block 2/7: _context_attention_kernel" and labels[-1] == "_gemv_rows_kernel"


def test_prefill_timeline_text_names_the_phase():
    rows, span = step_table([[(0.0, 30.0, "nvjet_bias"), (31.0, 40.0, "_context_attention_kernel")]], None)
    result = Timeline(batch=64, context=512, events_per_step=2, rows=rows, span_us=span, event_us=41.0,
                      back_to_back_us=40.5, phase="prefill")
    text = result.text()
    assert "2 GPU events per prefill" in text and "busy with the prefill" in text and "step" not in text


def test_prefill_timeline_needs_a_gpu_model():
    # a model on the CPU (where every machine has one): refused before anything runs
    cfg = GPTConfig(head_num=2, size_per_head=8, num_layer=2, vocab_size=50, max_pos_seq_len=64, start_id=0,
                    end_id=49)
    model = GPT.from_ft_tensors(cfg, random_ft_tensors(cfg), dtype="fp32", device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="model is on cpu"):
        prefill_timeline(model, batch=1, context=8)


@pytest.mark.gpu
def test_prefill_timeline_on_a_small_model():
    cfg = GPTConfig(head_num=4, size_per_head=32, num_layer=3, vocab_size=97, max_pos_seq_len=128, start_id=0,
                    end_id=96)
    device = torch.device("cuda")
    model = GPT.from_ft_tensors(cfg, random_ft_tensors(cfg, dtype=torch.float16, device=device), dtype="fp16",
                                device=device)
    result = prefill_timeline(model, batch=3, context=40, replays=4)
    labels = [r["label"] for r in result.rows]
    assert result.phase == "prefill" and result.events_per_step >= 3 * 5
    assert any("_context_attention" in label for label in labels)
    assert abs(sum(r["added_us"] + r["gap_us"] for r in result.rows) - result.span_us) < 1e-6 * result.span_us + 1e-6
    assert result.event_us > 0 and result.back_to_back_us > 0
