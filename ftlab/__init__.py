"""ftlab: FasterTransformer-style GPT inference with Triton kernels."""
import os as _os

__version__ = "0.1.0"


def _select_triton_backend() -> None:
    # Triton reads TRITON_INTERPRET when it is imported, and ftlab.kernels defines its kernels at import time:
    # on a machine without a CUDA device the kernels must run under Triton's interpreter, so decide it here,
    # before anything below ftlab can import triton. An explicit setting in the environment wins.
    if "TRITON_INTERPRET" in _os.environ:
        return
    try:
        import torch

        if not torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # torch missing: the import that needs it will say so
        pass


_select_triton_backend()
