"""Layers shared by the models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype


def attention(q, k, v):
  """Softmax attention over (batch, tokens, heads, head_dim) inputs.

  Accelerators get `jax.nn.dot_product_attention` (fused kernels where the backend has them). On
  CPU, XLA runs that op's batched products in the token-major layout about 2x slower than after a
  transpose to (batch, heads, tokens, head_dim) (measured on ViT-B shapes: forward 66 -> 28 ms), so
  there we transpose first.
  """
  if jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v)
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits = (q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)) @ jnp.swapaxes(k, -1, -2)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.swapaxes(weights @ v, 1, 2)


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Conv):
  """`nn.Conv` (same fields, parameters and results) that runs matrix-product-shaped convolutions as
  matrix products: 1x1 convolutions, and non-overlapping patch embeddings (kernel == stride, no
  padding). XLA's CPU backward pass of such convolutions is several times slower than the same
  matmul (measured: a 1x1 conv 64->256 on 8x56x56, forward + backward, 7 GFLOP/s as a convolution,
  43 GFLOP/s as a matmul), and ResNet bottlenecks are mostly 1x1 convolutions.
  """

  @nn.compact
  def __call__(self, inputs):
    kernel_size, strides = _pair(self.kernel_size), _pair(self.strides or 1)
    pointwise = kernel_size == (1, 1) and self.padding in ("SAME", "VALID")
    patches = kernel_size == strides and self.padding == "VALID"
    dilated = any(d != 1 for d in _pair(self.kernel_dilation or 1)) or any(
        d != 1 for d in _pair(self.input_dilation or 1))
    if not (pointwise or patches) or self.feature_group_count != 1 or dilated or self.mask is not None \
        or inputs.ndim != 4:
      return super().__call__(inputs)
    kh, kw = kernel_size
    cin = inputs.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if pointwise and not patches:  # strided 1x1 (SAME pads nothing for a 1x1 kernel)
      x = x[:, ::strides[0], ::strides[1], :]
    else:  # (B, H, W, C) -> (B, H/kh, W/kw, kh*kw*C), in the kernel's (kh, kw, C) order
      b, h, w, _ = x.shape
      x = x[:, :h - h % kh, :w - w % kw, :].reshape(b, h // kh, kh, w // kw, kw, cin)
      x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // kh, w // kw, kh * kw * cin)
    y = x @ kernel.reshape(kh * kw * cin, self.features)
    return y + bias if bias is not None else y
