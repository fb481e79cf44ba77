"""kernels/_pdl.py's chain-hop probe (the micro-benchmark's kernel) computes what it says."""
import pytest
import torch

from ftlab.kernels._pdl import chain_hop


@pytest.mark.parametrize("n,programs", [(1, 1), (7, 13), (1023, 5)])
@pytest.mark.parametrize("read_x", [False, True])
def test_chain_hop(n, programs, read_x, device):
    x = torch.randn(n).to(device)
    out = torch.full((programs,), float("nan")).to(device)
    chain_hop(x, out, programs, read_x)
    expected = 0.5 * (x.double().sum().expand(programs) if read_x else x.double()[torch.arange(programs, device=x.device) % n])
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-5)
