"""ftlab.timeline's accounting of a profiled step (pure functions: no GPU needed)."""
import random

from ftlab.timeline import CSV_COLUMNS, Timeline, label_step, short_name, step_table


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
