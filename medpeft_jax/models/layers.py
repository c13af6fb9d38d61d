"""Layers shared by the models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype


def attention(q, k, v):
  """Softmax attention over (batch, tokens, heads, head_dim) inputs; the softmax runs in float32.

  GPUs get `jax.nn.dot_product_attention`: cuDNN's fused flash-attention kernel when the inputs are
  bfloat16/float16 (the bfloat16 compute policy) and cuDNN takes the shapes (head_dim a multiple of 8,
  at most 256 on Hopper, 128 before), else XLA's implementation, which other accelerators get too.
  On CPU, XLA runs that op's batched products in the token-major layout about 2x slower than after a
  transpose to (batch, heads, tokens, head_dim) (measured on ViT-B shapes: forward 66 -> 28 ms), so
  there we transpose first.
  """
  backend = jax.default_backend()
  if backend in ("gpu", "cuda") and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, RuntimeError):  # raised while tracing: shapes or a cuDNN it does not take
      pass
  if backend != "cpu":
    return jax.nn.dot_product_attention(q, k, v)
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits = (q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)) @ jnp.swapaxes(k, -1, -2)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.swapaxes(weights @ v, 1, 2)


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _explicit_padding(padding, kernel_size, strides, spatial) -> tuple[tuple[int, int], ...] | None:
  """`nn.Conv`'s padding as (low, high) pairs per spatial dim; None for modes without an equivalent."""
  if padding == "VALID":
    return ((0, 0),) * len(kernel_size)
  if padding == "SAME":
    pairs = []
    for k, s, n in zip(kernel_size, strides, spatial):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pairs.append((total // 2, total - total // 2))
    return tuple(pairs)
  if isinstance(padding, int):
    return ((padding, padding),) * len(kernel_size)
  if isinstance(padding, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  return None


def _depthwise(x, kernel, strides, padding):
  """A depthwise convolution (one group per channel) as a sum of shifted, channel-scaled inputs.

  Written in `lax` ops: tracing is part of every run's start-up, and `jnp` indexing traces slower.
  """
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)))
  b, h, w, c = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
      tap = tap * kernel[i, j, 0]
      y = tap if y is None else y + tap
  return y


class Conv(nn.Conv):
  """`nn.Conv` (same fields, parameters and results) that runs some convolutions as cheaper ops.

  Matrix-product-shaped convolutions — 1x1, and non-overlapping patch embeddings (kernel == stride,
  no padding) — run as matrix products: XLA's CPU backward pass of such convolutions is several
  times slower than the same matmul (measured: a 1x1 conv 64->256 on 8x56x56, forward + backward,
  7 GFLOP/s as a convolution, 43 GFLOP/s as a matmul), and ResNet bottlenecks are mostly 1x1.
  On CPU, depthwise convolutions (MobileNetV2's) run as kh*kw shifted multiply-adds: XLA's grouped
  convolution backward is 8-14x slower there (3x3 on 32x32x32x96, forward + backward: 1.60 s as a
  grouped convolution, 0.12 s shifted). Accelerators keep their native grouped convolutions.
  """

  @nn.compact
  def __call__(self, inputs):
    kernel_size, strides = _pair(self.kernel_size), _pair(self.strides or 1)
    dilated = any(d != 1 for d in _pair(self.kernel_dilation or 1)) or any(
        d != 1 for d in _pair(self.input_dilation or 1))
    if dilated or self.mask is not None or inputs.ndim != 4:
      return super().__call__(inputs)
    cin = inputs.shape[-1]
    pointwise = kernel_size == (1, 1) and self.padding in ("SAME", "VALID")
    patches = kernel_size == strides and self.padding == "VALID"
    depthwise = (self.feature_group_count == cin == self.features and jax.default_backend() == "cpu")
    padding = _explicit_padding(self.padding, kernel_size, strides, inputs.shape[1:3]) if depthwise else None
    if not (((pointwise or patches) and self.feature_group_count == 1) or padding is not None):
      return super().__call__(inputs)
    kh, kw = kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if padding is not None:
      y = _depthwise(x, kernel, strides, padding)
    else:
      if pointwise and not patches:  # strided 1x1 (SAME pads nothing for a 1x1 kernel)
        x = x[:, ::strides[0], ::strides[1], :]
      else:  # (B, H, W, C) -> (B, H/kh, W/kw, kh*kw*C), in the kernel's (kh, kw, C) order
        b, h, w, _ = x.shape
        x = x[:, :h - h % kh, :w - w % kw, :].reshape(b, h // kh, kh, w // kw, kw, cin)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // kh, w // kw, kh * kw * cin)
      y = x @ kernel.reshape(kh * kw * cin, self.features)
    return y + bias if bias is not None else y
