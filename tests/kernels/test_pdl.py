"""When kernels are launched with programmatic dependent launch (the kernels' PDL paths run in the GPU suite)."""
import torch

from ftlab.kernels import _pdl


def test_never_on_the_cpu():
    assert not _pdl.pdl_for(torch.device("cpu"))
    assert _pdl.launch_options(False) == {}


def test_hopper_or_later_unless_turned_off(monkeypatch):
    cuda0 = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
    monkeypatch.setattr(_pdl, "_HAS_GDC", True)
    for major, expected in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(_pdl, "_capability_major", lambda index, major=major: major)
        assert _pdl.pdl_for(cuda0) is expected, major
    monkeypatch.setenv("FTLAB_PDL", "0")
    assert not _pdl.pdl_for(cuda0)
    monkeypatch.setenv("FTLAB_PDL", "1")
    assert _pdl.pdl_for(cuda0)
    monkeypatch.setattr(_pdl, "_HAS_GDC", False)  # a triton without the grid-dependency ops
    assert not _pdl.pdl_for(cuda0)
    assert _pdl.launch_options(True) == {"launch_pdl": True}
