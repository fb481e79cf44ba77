"""L2 prefetch of the next kernel's weights: keep HBM busy across kernel boundaries.

A batch-1 decode step streams ~0.7 GB of weights through ~120 kernels of a few microseconds each. Every kernel
ramps up and drains: at its start its loads have not reached HBM yet, at its end the last programs wait on their
last loads while most SMs idle, and between the GEMVs decode attention barely touches HBM at all. A kernel that
knows which weight the kernel after it will read can ask L2 to fetch it now: the request is fire-and-forget
(no registers, no wait), HBM keeps streaming through the gap, and the next kernel reads its weight from L2.
An H200's L2 (50 MB) holds a GPT-345M layer (25 MB), so one or two kernels of lookahead fit.

Each program of the issuing kernel prefetches one contiguous share of the target tensor (`prefetch_plan` sizes the
shares from the grid), either as one bulk request from one thread (MODE 1, `cp.async.bulk.prefetch.L2`, Hopper's TMA
unit does the rest) or one 128-byte line per thread (MODE 2, `prefetch.global.L2`). It is only a hint: results never
depend on it. Measured on the H200 (GPT-345M, fp16, bs1): it did not pay. A step's 96-GEMV chain
(`python -m ftlab.kernels.linear --chain --prefetch-only`) 16.25 us per layer without, 16.47 / 16.74 with bulk
prefetch 1 / 2 GEMVs ahead, 17.1 per line; the decode step 0.569 -> 0.598 ms (model, 2 kernels ahead). With PDL each
GEMV already issues its weight loads before it waits on the previous kernel, so HBM idling is not what the chain
loses; it loses the latency of each dependent kernel. So the model leaves it off (FTLAB_PREFETCH_AHEAD=0, see
GPT._prefetch_targets); kept for experiments on other shapes and GPUs. Session 14 aimed it at the one bandwidth-bound
kernel of the bs1 step instead, the 103 MB LM head: the decode attention of the last 2-16 layers prefetched its last
12-48 MB (2-12 MB each; data/bench/lm_prefetch_ab.csv): 0.360-0.366 ms against 0.362-0.363 without, within the
noise (scratch code, not kept). On for CUDA devices of compute
capability 9 or later (the bulk form needs sm_90); FTLAB_PREFETCH=0 turns it off, =2 picks the per-line form. Never
under the interpreter (MODE 0).
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._pdl import hopper_or_later

_LINE = 128  # bytes per L2 line request in MODE 2
_ALIGN = 16  # the bulk form needs 16-byte aligned addresses and sizes


@triton.jit
def l2_prefetch(pf_ptr, pf_bytes, pf_share, MODE: tl.constexpr, LINES: tl.constexpr):
    """Program p (row-major over the grid) prefetches bytes [p * pf_share, (p + 1) * pf_share) of pf_ptr, clipped
    to pf_bytes. MODE 1: one bulk request; MODE 2: LINES line requests per pass, one per thread."""
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    lo = pid.to(tl.int64) * pf_share
    size = tl.minimum(pf_share, pf_bytes - lo)
    base = pf_ptr.to(tl.pointer_type(tl.uint8))
    if size > 0:
        if MODE == 1:
            # a 1-element tensor is replicated in every thread: thread 0 alone issues the request
            addr = base + lo + tl.zeros((1,), dtype=tl.int64)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
                "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [addr, size.to(tl.int32) + tl.zeros((1,), dtype=tl.int32)],
                dtype=tl.int32, is_pure=False, pack=1)
        else:
            for start in range(0, size, LINES * 128):
                offs = tl.minimum(start + tl.arange(0, LINES).to(tl.int64) * 128, size - 1)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [base + lo + offs],
                                          dtype=tl.int32, is_pure=False, pack=1)


class PrefetchPlan(NamedTuple):
    target: torch.Tensor  # a tensor the issuing kernel never reads (so any placeholder works when MODE is 0)
    nbytes: int
    share: int  # bytes per program, a multiple of 128
    mode: int  # 0 off, 1 bulk, 2 lines


def prefetch_mode(device: torch.device) -> int:
    """0 (off), 1 (bulk) or 2 (per line) for kernels on `device`; FTLAB_PREFETCH is read per call."""
    if device.type != "cuda":
        return 0
    env = os.environ.get("FTLAB_PREFETCH", "1")
    if env == "0":
        return 0
    if not hopper_or_later(device):
        return 0
    return 2 if env == "2" else 1


def prefetch_plan(target: Optional[torch.Tensor], programs: int, placeholder: torch.Tensor) -> PrefetchPlan:
    """How `programs` programs split the prefetch of `target` (None, another device or a misaligned view: off)."""
    mode = prefetch_mode(placeholder.device) if target is not None else 0
    if mode == 0 or target.device != placeholder.device or target.data_ptr() % _ALIGN or not target.is_contiguous():
        return PrefetchPlan(placeholder, 0, _LINE, 0)
    nbytes = target.numel() * target.element_size() // _ALIGN * _ALIGN
    share = triton.cdiv(triton.cdiv(nbytes, max(1, programs)), _LINE) * _LINE
    return PrefetchPlan(target, nbytes, share, mode)
