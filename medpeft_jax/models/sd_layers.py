"""Blocks shared by Stable Diffusion's U-Net and VAE, named as in diffusers (NHWC, Flax linen)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medpeft_jax.models import layers
from medpeft_jax.models.layers import Conv


def attention(q, k, v, heads: int):
  """Multi-head softmax attention of (B, T, heads*d) inputs, through `layers.attention` (cuDNN's fused
  kernel on GPU in bfloat16/float16); softmax in float32."""
  b, t, _ = q.shape
  split = lambda x: x.reshape(x.shape[:2] + (heads, x.shape[-1] // heads))
  return layers.attention(split(q), split(k), split(v)).reshape(b, t, -1)


def conv3x3(features: int, dtype, name: str, strides: int = 1, padding=((1, 1), (1, 1))) -> Conv:
  return Conv(features, (3, 3), strides, padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, the time embedding added in between, 1x1 shortcut when widths differ."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
    h = conv3x3(self.out_channels, self.dtype, "conv1")(nn.silu(norm("norm1")(x)))
    if temb is not None:
      h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
    h = conv3x3(self.out_channels, self.dtype, "conv2")(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv; `padding=0` is the VAE's variant (pad right/bottom by one, then VALID)."""
  features: int
  padding: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return Conv(self.features, (3, 3), 2, "VALID", dtype=self.dtype, name="conv")(x)
    return conv3x3(self.features, self.dtype, "conv", 2, ((self.padding,) * 2,) * 2)(x)


def _nearest(x, axis: int, size: int):
  """Nearest-neighbour resize of one axis as PyTorch's `interpolate(mode="nearest")`: src = floor(dst*in/out)."""
  n = x.shape[axis]
  if size == 2 * n:
    return jnp.repeat(x, 2, axis=axis)
  return jnp.take(x, (np.arange(size) * n) // size, axis=axis)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x (or to `size`, the U-Net's skip size when the input is not a multiple of
  its total downsampling, e.g. 224-px images -> 28x28 latents), then a 3x3 conv."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int] | None = None):
    h, w = size or (2 * x.shape[1], 2 * x.shape[2])
    x = _nearest(_nearest(x, 1, h), 2, w)
    return conv3x3(self.features, self.dtype, "conv")(x)
