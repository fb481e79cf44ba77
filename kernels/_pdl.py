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
"""
import functools
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401  (used in kernels)
    _HAS_GDC = True
except ImportError:  # an older triton: no PDL (pdl_for() is then always False, so the kernels never call these)
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def pdl_for(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (read per call, so FTLAB_PDL can be flipped at run time;
    a kernel compiled both ways keeps both)."""
    if device.type != "cuda" or not _HAS_GDC or os.environ.get("FTLAB_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


def launch_options(use_pdl: bool) -> dict:
    """Extra keyword arguments for `kernel[grid](...)`: none unless PDL is on (the interpreter takes no such option)."""
    return {"launch_pdl": True} if use_pdl else {}
