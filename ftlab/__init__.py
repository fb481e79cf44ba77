"""ftlab: FasterTransformer-style GPT inference with Triton kernels."""

__version__ = "0.1.0"
