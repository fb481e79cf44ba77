"""Device helpers shared by several kernel families (kept apart so that those files need not import each other)."""
import triton
import triton.language as tl


@triton.jit
def gelu_tanh(v):
    # 0.5 * v * (1 + tanh(u)) == v * sigmoid(2u): no tanh needed, and saturates cleanly for large |v|
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    return v / (1.0 + tl.exp(-2.0 * u))
