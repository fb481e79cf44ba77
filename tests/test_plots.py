"""Latency plots from bench CSVs (the shipped H200 results and small synthetic ones)."""
import csv

import pytest

from ftlab.bench import COLUMNS, append_csv, sampling_label
from ftlab.plots import (grid_rows, main, plot_grid, plot_sampling, plot_timeline, power_rows, sampling_rows,
                         timeline_name, timeline_rows)
from ftlab.timeline import CSV_COLUMNS as TIMELINE_COLUMNS
from ftlab.tokenizer import DATA_DIR


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(**kw):
    base = dict(gpu="G", date="2026-01-01", config="gpt-345m", dtype="fp16", tp=1, pp=1, cell="e2e", bs=1, n_in=128,
                n_out=8, ftlab_ms=5.0, peer_ms=9.0, hf_ms="", floor_ms=1.5)
    return dict(base, **kw)


def test_grid_rows_keep_the_newest_single_gpu_row_per_cell(tmp_path):
    path = _write(tmp_path / "b.csv", [_row(bs=8, ftlab_ms=7.0), _row(ftlab_ms=6.0), _row(ftlab_ms=5.5),
                                       _row(tp=2, ftlab_ms=1.0), _row(cell="decode_step", ftlab_ms=0.5),
                                       _row(config="gpt-1.3b", ftlab_ms=2.0)])
    rows = grid_rows(path)
    assert [(r["bs"], r["ftlab_ms"]) for r in rows] == [(1, 5.5), (8, 7.0)]
    assert rows[0]["hf_ms"] is None and rows[0]["peer_ms"] == 9.0


def test_grid_rows_are_one_dtypes_rows(tmp_path):
    # `ftlab bench --dtype bf16` rows make a grid of their own: the default fp16 grid keeps its cells
    path = _write(tmp_path / "b.csv", [_row(ftlab_ms=5.0), _row(ftlab_ms=6.5, dtype="bf16"), _row(bs=8, dtype="bf16")])
    assert [(r["bs"], r["ftlab_ms"], r["dtype"]) for r in grid_rows(path)] == [(1, 5.0, "fp16")]
    assert [(r["bs"], r["ftlab_ms"]) for r in grid_rows(path, dtype="bf16")] == [(1, 6.5), (8, 5.0)]
    with pytest.raises(ValueError, match="in fp32"):
        grid_rows(path, dtype="fp32")


def test_grid_rows_are_greedy_rows(tmp_path):
    # `ftlab bench --top-k/--top-p` rows (the sampling column) do not replace the greedy grid's cells
    path = _write(tmp_path / "b.csv", [_row(ftlab_ms=5.0), _row(ftlab_ms=5.1, sampling="greedy"),
                                       _row(ftlab_ms=6.0, sampling=sampling_label(dict(top_k=40, top_p=0.9)))])
    assert [r["ftlab_ms"] for r in grid_rows(path)] == [5.1]


def test_sampling_label():
    assert sampling_label({}) == "greedy" and sampling_label(dict(top_k=1, top_p=0.5)) == "greedy"
    assert sampling_label(dict(top_k=0, top_p=0.9)) == "top_k=0 top_p=0.9 temperature=1"


def test_append_csv_rewrites_an_older_header(tmp_path):
    old_columns = [c for c in COLUMNS if c != "sampling"]
    path = tmp_path / "b.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(_row(ftlab_ms=5.0))
    append_csv([_row(ftlab_ms=4.0, sampling="greedy")], path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [(r["ftlab_ms"], r["sampling"], r["bs"]) for r in rows] == [("5.0", "", "1"), ("4", "greedy", "1")]
    bad = tmp_path / "other.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=r"other.csv: columns \['x', 'y'\] are not bench columns"):
        append_csv([_row()], bad)


def test_grid_rows_keep_each_baseline_from_its_newest_measurement(tmp_path):
    # a later ftlab-only run (--no-peer --no-hf) keeps the earlier baselines of the same cell, dated
    path = _write(tmp_path / "b.csv", [_row(ftlab_ms=6.0, peer_ms=9.0, hf_ms=90.0, date="2026-01-01"),
                                       _row(ftlab_ms=5.0, peer_ms=8.0, hf_ms="", date="2026-01-02"),
                                       _row(ftlab_ms=4.0, peer_ms="", hf_ms="", floor_ms=1.4, date="2026-01-03")])
    (row,) = grid_rows(path)
    assert (row["ftlab_ms"], row["floor_ms"], row["date"]) == (4.0, 1.4, "2026-01-03")
    assert (row["peer_ms"], row["hf_ms"], row["baseline_date"]) == (8.0, 90.0, "2026-01-02")


def test_plot_grid_of_the_shipped_h200_results(tmp_path):
    out = plot_grid(DATA_DIR / "bench" / "bench.csv", tmp_path / "grid.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_grid_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match="no single-GPU e2e rows of config 'gpt-9b'"):
        grid_rows(DATA_DIR / "bench" / "bench.csv", config="gpt-9b")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["grid", str(bad), str(tmp_path / "x.png")]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_sampling_rows_pair_the_two_samplers(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("B,V,mode,sampler,split,us\n"
                    "1,9,top_k=40,passes,default,200\n1,9,top_k=40,candidates,default,27\n"
                    "1,9,top_k=40,candidates,\"2048,64,0,0\",60\n1,9,greedy,passes,default,12\n"
                    "1,9,greedy,candidates,default,5\n1,9,greedy,torch eager,,20\n64,9,greedy,passes,default,13\n")
    rows = sampling_rows(path)
    assert rows == [dict(B=1, mode="greedy", passes_us=12.0, candidates_us=5.0),
                    dict(B=1, mode="top_k=40", passes_us=200.0, candidates_us=27.0)]


@pytest.mark.parametrize("reader, text", [(sampling_rows, "B,mode\n1,greedy\n"), (timeline_rows, "bs,label\n1,x\n")],
                         ids=["sampling", "timeline"])
def test_csv_readers_name_missing_columns(reader, text, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(ValueError, match="missing columns"):
        reader(bad)


def test_plot_sampling_of_the_shipped_h200_results(tmp_path):
    rows = sampling_rows(DATA_DIR / "bench" / "sampling_bench.csv")
    assert {r["B"] for r in rows} == {1, 8, 64} and all(r["candidates_us"] > 0 for r in rows)
    out = plot_sampling(DATA_DIR / "bench" / "sampling_bench.csv", tmp_path / "sampling.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def _timeline_row(variant, label, added, event_us, bs=1, sampling="greedy"):
    return dict(gpu="G", date="2026-11-30", torch="t", triton="tr", config="c", dtype="fp16", variant=variant,
                sampling=sampling, bs=bs, context=512, label=label, calls=24, mean_us=1.0, gap_us=0.0,
                added_us=added, span_us=900.0, event_us=event_us, back_to_back_us=400.0)


def test_timeline_rows_name_the_block_slots_and_keep_each_variants_newest_run(tmp_path):
    path = tmp_path / "t.csv"
    append_csv([_timeline_row("", "block 3/5: _gemv_kernel", 120.0, 500.0),
                _timeline_row("", "_gemv_kernel", 48.0, 500.0),
                _timeline_row("FTLAB_X=1", "block 1/5: _decode_partition_kernel", 90.0, 480.0),
                _timeline_row("", "block 3/5: _gemv_kernel", 80.0, 450.0),  # a newer run of the default
                _timeline_row("", "block 1/8: nvjet_sm90_x", 7.0, 450.0, bs=64),
                _timeline_row("", "_select_kernel", 14.0, 460.0, sampling="top_k=40 top_p=0.9 temperature=1")],
               path, TIMELINE_COLUMNS)
    rows = timeline_rows(path)
    assert rows == {"default": {"FC1 GEMV": 80.0}, "FTLAB_X=1": {"decode attention": 90.0}}
    assert timeline_rows(path, bs=64) == {"default": {"block 1/8: nvjet_sm90_x": 7.0}}
    assert timeline_name("_gemv_kernel") == "LM head GEMV" and timeline_name("Memcpy DtoD") == "Memcpy DtoD"
    assert timeline_name("_gemv_rows_kernel") == "LM head GEMV"  # kernels/gemv_rows.py runs the M = 1 LM head
    with pytest.raises(ValueError, match="no timeline rows for batch 8"):
        timeline_rows(path, bs=8)


def test_plot_timeline_of_the_shipped_h200_results(tmp_path):
    rows = timeline_rows(DATA_DIR / "bench" / "decode_timeline.csv")
    assert len(rows) >= 2 and all(r["QKV GEMV"] > 0 and r["LM head GEMV"] > 0 for r in rows.values())
    out = plot_timeline(DATA_DIR / "bench" / "decode_timeline.csv", tmp_path / "timeline.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_power_of_the_shipped_h200_samples(tmp_path):
    rows = power_rows(DATA_DIR / "bench" / "prefill_power.csv")
    assert rows[0]["t_s"] == 0.0 and all(a["t_s"] <= b["t_s"] for a, b in zip(rows, rows[1:]))
    capped = [r for r in rows if r["power_capped"]]
    # the sustained prefill: capped samples are the slow ones, and the GPU ran uncapped at its top clock in between
    assert capped and max(r["sm_clock_mhz"] for r in capped if r["power_w"] > 650) < 1700
    assert any(not r["power_capped"] and r["sm_clock_mhz"] >= 1900 for r in rows)
    out = tmp_path / "power.png"
    assert main(["power", str(DATA_DIR / "bench" / "prefill_power.csv"), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_power_rows_reads_the_reasons_mask_and_names_a_wrong_file(tmp_path):
    path = tmp_path / "samples.csv"
    path.write_text("timestamp,sm_clock_mhz,power_w,throttle_reasons\n"
                    "2026/12/03 21:02:43.617,1635,203.88,0x0000000000000004\n"
                    "2026/12/03 21:02:43.517,1980,139.03,0x0000000000000000\n"
                    "2026/12/03 21:02:43.717,1605,262.9,0x0000000000000024\n")
    rows = power_rows(path)
    assert [round(r["t_s"], 3) for r in rows] == [0.0, 0.1, 0.2]  # ordered by time, not by line
    assert [r["power_capped"] for r in rows] == [False, True, True]
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,sm_clock_mhz\n2026/12/03 21:02:43.617,1635\n")
    with pytest.raises(ValueError, match="bad.csv.*missing columns"):
        power_rows(bad)
