"""Programmatic dependent launch (PDL): let a kernel start while the one before it in the stream is still running.

On Hopper and later, a kernel launched with `launch_pdl=True` may be scheduled as soon as every program of the
previous kernel has executed `gdc_launch_dependents()` (ours do so first thing). It must then execute `gdc_wait()`
before it reads anything an earlier kernel wrote and before it writes anything: the wait returns once the previous
kernel has completed and its memory is visible. Because every program of every PDL kernel waits before its first
write and before finishing, completion of kernel n implies completion of kernel n - 1, n - 2, ... : ordering
stays transitive. Kernels launched the ordinary way (torch ops, cuBLAS, NCCL, our other kernels) are full barriers.

What runs before the wait is what overlaps the previous kernel: loads of tensors no kernel of the current chain
writes (weights; in decode attention, the cache rows of earlier steps). At batch 1 a GPT decode step is ~120 small
kernels whose weight loads each pay a full memory latency and a launch gap; overlapping them is the point.

Used on CUDA devices of compute capability >= 9 when triton has the grid-dependency ops; FTLAB_PDL=0 turns it off
(for measuring what it gives). Never under the interpreter.

`python -m ftlab.kernels._pdl` times one hop of such a chain (a kernel that waits, reads what the previous one
wrote and writes for the next), with and without PDL: on the H200 0.7-1.3 us with PDL for 1 to 768 programs,
1.0-1.7 without (data/bench/pdl_chain_hop.csv). At 4096 programs PDL is slower (5.5 vs 3.6 us), likely because
programs launched early occupy the SMs while they wait.
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401  (used in kernels)
    _HAS_GDC = True
except ImportError:  # an older triton: no PDL (pdl_for() is then always False, so the kernels never call these)
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def hopper_or_later(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9 or later (PDL, TMA descriptors, bulk L2 prefetch)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


def pdl_for(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (read per call, so FTLAB_PDL can be flipped at run time;
    a kernel compiled both ways keeps both)."""
    return _HAS_GDC and os.environ.get("FTLAB_PDL", "1") != "0" and hopper_or_later(device)


def launch_options(use_pdl: bool) -> dict:
    """Extra keyword arguments for `kernel[grid](...)`: none unless PDL is on (the interpreter takes no such option)."""
    return {"launch_pdl": True} if use_pdl else {}


# ----------------------------------------------------------------------------------------------------------------
# micro-benchmark: the latency of one hop of a dependent kernel chain (`python -m ftlab.kernels._pdl`)


@triton.jit
def _chain_hop_kernel(x_ptr, out_ptr, n, USE_PDL: tl.constexpr, READ_X: tl.constexpr, BLOCK: tl.constexpr):
    # one hop: wait for the previous kernel, read what it wrote (one value, or a whole x row as a GEMV would),
    # write one value per program for the next
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    if READ_X:
        offs = tl.arange(0, BLOCK)
        v = tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32), axis=0)
    else:
        v = tl.load(x_ptr + pid % n).to(tl.float32)
    tl.store(out_ptr + pid, (v * 0.5).to(out_ptr.dtype.element_ty))


def chain_hop(x: torch.Tensor, out: torch.Tensor, programs: int, read_x: bool, use_pdl: bool = False) -> None:
    """One hop: out[p] = 0.5 * (sum(x) if read_x else x[p % len(x)]) for p < programs."""
    n = x.numel()
    _chain_hop_kernel[(programs,)](x, out, n, USE_PDL=use_pdl, READ_X=read_x, BLOCK=triton.next_power_of_2(n),
                                   num_warps=4, **launch_options(use_pdl))


def chain_hop_us(programs: int, use_pdl: bool, read_x: bool, width: int = 1024, hops: int = 96) -> float:
    """Microseconds per kernel of a CUDA graph of `hops` dependent launches of `programs` programs (4 warps)."""
    from triton.testing import do_bench_cudagraph

    bufs = [torch.randn(max(programs, width), device="cuda", dtype=torch.float16) for _ in range(2)]

    def chain():
        for i in range(hops):
            chain_hop(bufs[i % 2][:width], bufs[(i + 1) % 2], programs, read_x, use_pdl)
    return do_bench_cudagraph(chain, rep=50) * 1e3 / hops


if __name__ == "__main__":
    from ._bench import save_rows

    rows = []
    print(f"{'programs':>9} {'reads':>6} {'PDL':>4} {'us per hop':>10}")
    for programs in (1, 132, 768, 4096):
        for read_x in (False, True):
            for use_pdl in (False, True):
                us = chain_hop_us(programs, use_pdl, read_x)
                rows.append(dict(gpu=torch.cuda.get_device_name(), programs=programs,
                                 reads="x row" if read_x else "one value", pdl=int(use_pdl), us_per_hop=round(us, 3)))
                print(f"{programs:>9} {'x row' if read_x else '1':>6} {int(use_pdl):>4} {us:>10.2f}", flush=True)
    save_rows(rows, "pdl_chain_hop.csv")
