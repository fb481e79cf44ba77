import os

# Triton kernels run under the interpreter when no GPU is present; the variable must be set
# before triton is imported anywhere (the kernels are defined at import time).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the imports below
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

# pytest puts the repo root on sys.path (tests/ is a package), where kernels/ would shadow the PyPI package
# `kernels` that transformers >= 5.25 imports: load the installed one first (ftlab/_kernels_shadow.py)
from ftlab._kernels_shadow import import_pypi_kernels  # noqa: E402

import_pypi_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if _has_cuda else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip = (pytest.mark.skip(reason="CPU/gloo path: Triton runs on CPU tensors only under the interpreter; "
                                    ".ci/gpu-check parallel-check covers the GPU")
            if _has_cuda else pytest.mark.skip(reason="needs a CUDA device"))
    marker = "cpu_only" if _has_cuda else "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # every test draws fresh random inputs; the seed comes from the test's name so a failure reproduces
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
