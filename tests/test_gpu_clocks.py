"""ftlab/gpu_clocks.py: reading nvidia-smi's samples, summarising them, and a sampler that never fails a benchmark.
The sampler runs a fake nvidia-smi here (a Python child printing lines), so these run on the CPU."""
import sys
import time

import pytest

from ftlab.bench import COLUMNS, _clock_columns, append_csv, print_header, print_row
from ftlab.gpu_clocks import ClockSampler, nvidia_smi_command, parse_sample, sampled, summarize


@pytest.mark.parametrize("line, expected", [
    ("1650, 233.52, 0x0000000000000004", (1650.0, 233.52, 4)),
    ("1980, 690.1, 0x0000000000000000\n", (1980.0, 690.1, 0)),
    ("1515, 692.29, 0x0000000000000024", (1515.0, 692.29, 0x24)),
])
def test_parse_sample_reads_clock_power_and_reasons(line, expected):
    assert parse_sample(line) == expected


@pytest.mark.parametrize("line", ["", "[N/A], 233.52, 0x4", "1650, [N/A], 0x4", "1650, 233.5", "No devices were found",
                                  "1650, 233.5, 0x4, extra"])
def test_parse_sample_skips_what_it_cannot_read(line):
    assert parse_sample(line) is None


def test_summarize_takes_median_min_and_the_share_under_the_power_cap():
    samples = [(1980.0, 300.0, 0x0), (1605.0, 690.0, 0x4), (1470.0, 695.0, 0x4 | 0x20), (1635.0, 688.0, 0x20)]
    s = summarize(samples)
    assert s.samples == 4
    assert s.sm_clock_mhz == pytest.approx((1605 + 1635) / 2)
    assert s.sm_clock_min_mhz == 1470.0
    assert s.power_w == pytest.approx((688 + 690) / 2)
    assert s.power_capped == pytest.approx(0.5)  # 0x20 alone (a thermal reason) is not the power cap
    assert summarize([]) is None


def _fake_smi(lines, linger_s=30.0):
    # prints its lines, then idles until terminated, as `nvidia-smi --loop-ms` does
    code = "import sys, time\n" + "".join(f"print({line!r}, flush=True)\n" for line in lines) + \
        f"time.sleep({linger_s})\n"
    return [sys.executable, "-c", code]


def test_sampler_collects_until_the_block_ends_and_stops_the_child():
    lines = ["1980, 300.5, 0x0000000000000000", "garbage", "1500, 699.0, 0x0000000000000004"]
    with ClockSampler(command=_fake_smi(lines)) as clocks:
        proc = clocks._proc
        for _ in range(200):  # the reader thread may lag the child's output a little
            if len(clocks._samples) == 2:
                break
            time.sleep(0.01)
    assert proc.poll() is not None, "the sampling child must be stopped when the block ends"
    s = clocks.summary()
    assert (s.samples, s.sm_clock_min_mhz, s.power_capped) == (2, 1500.0, 0.5)
    assert _clock_columns(s) == dict(sm_clock_mhz=1740.0, sm_clock_min_mhz=1500.0, power_w=pytest.approx(499.75),
                                     power_capped=0.5)


def test_sampler_without_nvidia_smi_or_with_a_missing_binary_gives_none(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with ClockSampler() as clocks:
        pass
    assert clocks.summary() is None
    with ClockSampler(command=["/nonexistent/nvidia-smi-for-ftlab-tests"]) as clocks:
        pass
    assert clocks.summary() is None
    assert _clock_columns(None) == {}


def test_sampled_returns_the_result_and_can_be_turned_off():
    result, summary = sampled(lambda: 41 + 1, command=_fake_smi(["1700, 500.0, 0x4"]))
    assert result == 42 and summary.sm_clock_mhz == 1700.0
    assert sampled(lambda: "x", enabled=False) == ("x", None)


def _fake_probe(tmp_path, answer: str):
    # an executable "nvidia-smi" that answers the power-field probe with `answer` (a driver that does or does not
    # know power.draw.instant)
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!{sys.executable}\nprint({answer!r})\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize("answer, power", [("431.25", "power.draw.instant"),
                                           ('Field "power.draw.instant" is not a valid field to query.',
                                            "power.draw")])
def test_command_asks_nvidia_smi_for_clock_power_and_reasons(tmp_path, monkeypatch, answer, power):
    exe = _fake_probe(tmp_path, answer)
    monkeypatch.setattr("shutil.which", lambda name: exe if name == "nvidia-smi" else None)
    command = nvidia_smi_command(None, interval_ms=50)
    assert command[0] == exe
    assert f"--query-gpu=clocks.sm,{power},clocks_throttle_reasons.active" in command
    assert "--format=csv,noheader,nounits" in command and "--loop-ms=50" in command
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert nvidia_smi_command(None) is None


def test_bench_rows_carry_the_clock_columns(tmp_path, capsys):
    row = dict(gpu="NVIDIA H200", date="2026-12-03", config="gpt-345m", dtype="fp16", tp=1, pp=1, sampling="greedy",
               cell="e2e", bs=64, n_in=512, n_out=32, ftlab_ms=85.0, ftlab_spread=0.01, bandwidth_tbps=4.1,
               matmul_tflops=719.0, **_clock_columns(summarize([(1605.0, 690.0, 0x4), (1635.0, 692.0, 0x4)])))
    print_header(row)
    print_row(row)
    out = capsys.readouterr().out
    assert "1620" in out and "100%" in out
    path = tmp_path / "bench.csv"
    append_csv([row], path)
    header, values = path.read_text().splitlines()
    assert header.split(",") == COLUMNS
    assert dict(zip(COLUMNS, values.split(",")))["sm_clock_mhz"] == "1620"
