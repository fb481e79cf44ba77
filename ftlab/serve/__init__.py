"""Serving over Triton Inference Server's protocol (FasterTransformer's `fastertransformer` model tensors)."""
from .server import InferenceServer

__all__ = ["InferenceServer"]
