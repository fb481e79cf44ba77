"""What the GPU's SM clock and power did while a benchmark cell ran: nvidia-smi, sampled in the background.

Why `ftlab bench` records it: the same code measures differently on a cool GPU, a hot one and another machine, and
one reason is visible only from the driver. On the H200 the captured prefill of 64 prompts of 512 tokens, replayed
back to back for ~4 s, drew ~690 W, the driver reported "SW power cap" and the SM clock fell from 1980 to 1470-1635
MHz (data/bench/prefill_power.csv, 2026-12-03); three runs of 10 replays in a row took 37.0, 38.0 and 39.5 ms per
prefill as the GPU heated (data/bench/cublaslt_workspace_ab.csv). The bench's cells are shorter (a bs64 512 -> 32
cell is ~0.6 s of ftlab calls): in that session's runs their median clock stayed at 1905-1980 MHz, while the driver
reported the cap in 0-73 % of a cell's samples. A row's clock columns say which case it was measured in.

ClockSampler runs `nvidia-smi --query-gpu=clocks.sm,power.draw.instant,clocks_throttle_reasons.active
--loop-ms=50` (power.draw where the driver has no instant reading) for the GPU in question while its block runs;
summary() gives the median and lowest SM clock, the median power and the share of samples in which the driver
reported the power cap. The driver refreshes these values about every 100 ms, so a cell of a few tens of
milliseconds gets one or two distinct readings, and the clocks say more than the power. Without nvidia-smi (a CPU
machine, another vendor) it samples nothing and summary() is None.
"""
from __future__ import annotations

import functools
import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass

POWER_FIELDS = ("power.draw.instant", "power.draw")  # the first the driver knows; power.draw may be a 1 s average
SW_POWER_CAP = 0x4  # a bit of clocks_throttle_reasons.active (nvidia-smi --help-query-gpu)


@dataclass
class ClockSummary:
    samples: int
    sm_clock_mhz: float  # median over the samples
    sm_clock_min_mhz: float
    power_w: float  # median
    power_capped: float  # share of samples whose reasons include the SW power cap

    def row(self) -> dict:
        """The bench CSV's columns."""
        return dict(sm_clock_mhz=self.sm_clock_mhz, sm_clock_min_mhz=self.sm_clock_min_mhz, power_w=self.power_w,
                    power_capped=self.power_capped)


def parse_sample(line: str) -> tuple[float, float, int] | None:
    """(SM clock MHz, power W, reasons bit mask) from one line of `--format=csv,noheader,nounits` output such as
    "1650, 233.52, 0x0000000000000004"; None for a line it cannot read ("[N/A]", a warning, a blank)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        return float(parts[0]), float(parts[1]), int(parts[2], 16)
    except ValueError:
        return None


def summarize(samples: list[tuple[float, float, int]]) -> ClockSummary | None:
    if not samples:
        return None
    clocks = [s[0] for s in samples]
    return ClockSummary(samples=len(samples), sm_clock_mhz=statistics.median(clocks), sm_clock_min_mhz=min(clocks),
                        power_w=statistics.median(s[1] for s in samples),
                        power_capped=sum(bool(s[2] & SW_POWER_CAP) for s in samples) / len(samples))


def nvidia_smi_command(device=None, interval_ms: int = 50) -> list[str] | None:
    """The sampling command for a torch CUDA device (by its UUID, so CUDA_VISIBLE_DEVICES cannot point it at
    another GPU); None without nvidia-smi on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = f"clocks.sm,{_power_field(exe)},clocks_throttle_reasons.active"
    command = [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", f"--loop-ms={int(interval_ms)}"]
    if device is not None:
        import torch

        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            command.append(f"--id=GPU-{uuid}")
    return command


@functools.lru_cache(maxsize=None)
def _power_field(exe: str) -> str:
    # instantaneous power where the driver has it (on the H200's, power.draw reads like a one-second average, which
    # lags a cell of a few hundred milliseconds); an unknown field makes nvidia-smi fail, so ask once
    try:
        probe = subprocess.run([exe, f"--query-gpu={POWER_FIELDS[0]}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10)
        float(probe.stdout.split()[0])
        return POWER_FIELDS[0]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return POWER_FIELDS[1]


class ClockSampler:
    """`with ClockSampler(device) as clocks: ...`, then clocks.summary(). Entering waits (up to `first_wait_s`)
    for the first sample, so the block is covered from its start; leaving stops the sampler."""

    def __init__(self, device=None, interval_ms: int = 50, command: list[str] | None = None,
                 first_wait_s: float = 2.0):
        self.command = command if command is not None else nvidia_smi_command(device, interval_ms)
        self.first_wait_s = first_wait_s
        self._samples: list[tuple[float, float, int]] = []
        self._first = threading.Event()
        self._proc = None
        self._reader = None

    def __enter__(self) -> "ClockSampler":
        if self.command is None:
            return self
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # not executable after all: a benchmark must not fail for want of its clock readings
            self._proc = None
            return self
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._first.wait(self.first_wait_s)
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                self._samples.append(sample)
                self._first.set()

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def summary(self) -> ClockSummary | None:
        return summarize(list(self._samples))


def sampled(fn, device=None, enabled: bool = True, **kwargs):
    """(fn(), ClockSummary or None) with the clocks sampled while fn runs (not at all unless `enabled`)."""
    if not enabled:
        return fn(), None
    with ClockSampler(device, **kwargs) as clocks:
        result = fn()
    return result, clocks.summary()
