"""Converters from training checkpoints to FasterTransformer's c-model directory (see ftlab.checkpoint)."""
