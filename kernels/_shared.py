"""Device helpers shared by several kernel families (kept apart so that those files need not import each other)."""
import triton
import triton.language as tl


@triton.jit
def gelu_tanh(v):
    # 0.5 * v * (1 + tanh(u)) == v * sigmoid(2u): no tanh needed, and saturates cleanly for large |v|
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    return v / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def add3(a0, b0, c0, a1, b1, c1):
    # the combine function of one tl.reduce over three tensors at once (one pass of shuffles for all three sums)
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def bias_act_residual(acc, bias, res, ACT_GELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    # a GEMM epilogue in fp32: act(acc + bias) + res (bias / res already loaded, broadcastable to acc)
    if HAS_BIAS:
        acc = acc + bias
    if ACT_GELU:
        acc = gelu_tanh(acc)
    if HAS_RES:
        acc = acc + res
    return acc


@triton.jit
def chan_merge(mean, m2, v, valid, n0):
    # one chunk of a row-wise (mean, sum of squared deviations) pass, merged with Chan's formula (no large
    # sum-of-squares that could cancel): v (BLOCK_M, BLOCK_N) fp32 holds columns n0.. of each row, zero where
    # `valid` (BLOCK_N,) is false, and every chunk before it was full
    count = n0 * 1.0
    chunk_count = tl.sum(valid.to(tl.float32), axis=0)
    chunk_mean = tl.sum(v, axis=1) / chunk_count
    dev = tl.where(valid[None, :], v - chunk_mean[:, None], 0.0)
    total = count + chunk_count
    delta = chunk_mean - mean
    return (mean + delta * (chunk_count / total),
            m2 + tl.sum(dev * dev, axis=1) + delta * delta * (count * chunk_count / total))


@triton.jit
def shifted_ln_stats(s1, s2, K, eps):
    # a LayerNorm's statistics from the sums over a row of K of d = x - x0 and of d * d (x0: the row's first element,
    # so that a mean much larger than the spread does not cancel in fp32): (mean - x0, rstd)
    shift = s1 / K
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / K - shift * shift, 0.0) + eps)
    return shift, rstd
