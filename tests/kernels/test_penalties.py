import pytest
import torch

from ftlab.kernels.penalties import apply_penalties, apply_penalties_reference
from tests.util import DTYPES


def _inputs(B, V, dtype, device, with_counts=True):
    logits = (torch.randn(B, V) * 3).to(dtype).to(device)
    counts = torch.randint(0, 3, (B, V), dtype=torch.int32).to(device) if with_counts else None
    rep = (torch.rand(B) * 2 + 0.5).to(device)  # penalties above and below 1
    pres = torch.where(torch.rand(B) < 0.5, torch.zeros(B), torch.randn(B)).to(device)
    min_length = torch.randint(0, 4, (B,), dtype=torch.int32).to(device)
    steps = torch.randint(0, 4, (B,), dtype=torch.int32).to(device)
    end_ids = torch.randint(0, V, (B,)).to(device)
    return logits, counts, rep, pres, min_length, steps, end_ids


@pytest.mark.parametrize("B, V", [(1, 1), (3, 7), (5, 13), (2, 1023), (4, 50257)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("with_counts", [True, False])
def test_matches_reference(B, V, dtype, with_counts, device):
    args = _inputs(B, V, DTYPES[dtype], device, with_counts)
    out = apply_penalties(*args)
    ref = apply_penalties_reference(*args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_semantics_by_hand(device):
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]], device=device)
    counts = torch.tensor([[1, 1, 0, 0]], dtype=torch.int32, device=device)
    one = torch.ones(1, device=device)
    args = dict(min_length=torch.tensor([2], dtype=torch.int32, device=device),
                steps=torch.tensor([1], dtype=torch.int32, device=device),
                end_ids=torch.tensor([3], device=device))
    out = apply_penalties(logits, counts, 2 * one, 0 * one, **args)
    assert out.tolist() == [[1.0, -4.0, 1.0, float("-inf")]]  # seen: 2/2, -2*2; unseen kept; end masked at step 1<2
    out = apply_penalties(logits, counts, one, 0.5 * one, **dict(args, steps=args["min_length"]))
    assert out.tolist() == [[1.5, -2.5, 1.0, 4.0]]  # presence subtracts from seen tokens; min_length reached


def test_bad_arguments(device):
    logits, counts, rep, pres, min_length, steps, end_ids = _inputs(2, 5, torch.float32, device)
    with pytest.raises(ValueError, match="repetition_penalty must be a \\(2,\\) torch.float32"):
        apply_penalties(logits, counts, rep.double(), pres, min_length, steps, end_ids)
    with pytest.raises(ValueError, match="counts must be a \\(2, 5\\) int32"):
        apply_penalties(logits, counts.long(), rep, pres, min_length, steps, end_ids)
