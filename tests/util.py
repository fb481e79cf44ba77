"""Shared tolerances and comparison helpers for kernel and model tests."""
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Relative error ||out - ref|| / ||ref|| allowed per compute dtype (reference computed in fp32/fp64).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel_close(out, ref, dtype=None, tol=None, what="output"):
    tol = tol if tol is not None else REL_TOL[dtype or out.dtype]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def skip_if_interpreter_bf16(dtype, device):
    """bf16 tl.dot is silently wrong under TRITON_INTERPRET; those cases run on the GPU only."""
    import pytest

    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 tl.dot is unreliable in the Triton interpreter; checked on the GPU")


def cache_with_history(positions, num_heads, s_max, head_dim, dtype, device):
    """(k, v) caches (B, nh, S_max, d) whose slots [0, positions[b]) hold random keys/values and every other slot
    is NaN, so a kernel that reads a slot it should not shows it."""
    batch = len(positions)
    k_cache = torch.full((batch, num_heads, s_max, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b, pos in enumerate(positions):
        k_cache[b, :, :pos] = torch.randn(num_heads, pos, head_dim).to(dtype=dtype, device=device)
        v_cache[b, :, :pos] = torch.randn(num_heads, pos, head_dim).to(dtype=dtype, device=device)
    return k_cache, v_cache
