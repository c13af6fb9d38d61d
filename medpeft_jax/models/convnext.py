"""ConvNeXt (Liu et al. 2022), NHWC, channels-last LayerNorms, as timm `convnext_*` and transformers `ConvNextModel`.

Parameter paths ('/'-joined; stages and blocks count from 0, as both sources do):

  stem_conv/{kernel,bias}, stem_norm/{scale,bias}   4x4/4 patch conv + LayerNorm
  stage{1-3}/downsample_norm/{scale,bias}           LayerNorm, then a 2x2/2 conv (stage0 has none)
  stage{1-3}/downsample_conv/{kernel,bias}
  stage{i}/block{j}/dwconv/{kernel,bias}            depthwise 7x7 conv (one group per channel, padding 3)
  stage{i}/block{j}/norm/{scale,bias}               channels-last LayerNorm
  stage{i}/block{j}/mlp/{fc1,fc2}/{kernel,bias}     the pointwise (1x1) convs, written as Dense (`MlpBlock`,
                                                    interceptable for AdaptFormer): 4x expansion, exact GELU
  stage{i}/block{j}/gamma                           layer scale (C,)
  norm/{scale,bias}                                 LayerNorm after global average pooling
  head/{kernel,bias}                                linear classifier (absent when num_classes == 0)

So `stage\\d+/block\\d+/mlp/fc[12]` selects the pointwise convs and never the depthwise ones, which
LoRA/TSA refuse (grouped). Stochastic depth is the identity at inference and is not implemented: PEFT
fine-tuning runs without it. Every LayerNorm uses eps 1e-6 except the final one in transformers, which
takes the folder's `layer_norm_eps` (1e-12 by default; the loader passes it as `head_norm_eps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv
from medpeft_jax.models.vit import MlpBlock

Dtype = Any
_EPS = 1e-6

# Model roles (`models.ROLE_NAMES`): adapters attach to the dense convs — the pointwise Dense layers
# and the stem/downsampling convs — never to the depthwise ones.
ROLES = {
    "conv": r"stem_conv|stage\d+/downsample_conv|stage\d+/block\d+/mlp/fc[12]",
    "mlp": r"stage\d+/block\d+/mlp/fc[12]",
    "mlp_block": r"stage\d+/block\d+/mlp",
    "norm": r"(.*/)?([a-z]+_)?norm",
}


class Block(nn.Module):
  """x + gamma * mlp(norm(dwconv(x)))."""

  kernel_size: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    k, pad = self.kernel_size, (self.kernel_size // 2,) * 2
    y = Conv(c, (k, k), padding=(pad, pad), feature_group_count=c, dtype=self.dtype, name="dwconv")(x)
    y = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm")(y)
    y = MlpBlock(4 * c, dtype=self.dtype, name="mlp")(y)
    gamma = self.param("gamma", nn.initializers.constant(1e-6), (c,))
    return x + y * gamma.astype(y.dtype)


class Stage(nn.Module):
  """Optional LayerNorm + 2x2/2 downsampling conv, then `depth` blocks."""

  depth: int
  dim: int
  downsample: bool
  kernel_size: int = 7
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="downsample_norm")(x)
      x = Conv(self.dim, (2, 2), (2, 2), "VALID", dtype=self.dtype, name="downsample_conv")(x)
    block = nn.remat(Block) if self.remat else Block
    for j in range(self.depth):
      x = block(self.kernel_size, dtype=self.dtype, name=f"block{j}")(x)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt classifier; returns logits, or the pooled, normalised features when `num_classes == 0`.

  `dtype` is the compute dtype; parameters stay float32 and the output is float32. No batch
  statistics or dropout: `train` only keeps one signature across models.
  """

  depths: Sequence[int]
  dims: Sequence[int]
  num_classes: int
  head_norm_eps: float = _EPS
  kernel_size: int = 7  # of the depthwise convs (timm's `kernel_sizes`); smaller ones make cheap test models
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train
    if len(self.depths) != len(self.dims):
      raise ValueError(f"ConvNeXt depths {tuple(self.depths)} and dims {tuple(self.dims)} must have one entry "
                       "per stage.")
    x = Conv(self.dims[0], (4, 4), (4, 4), "VALID", dtype=self.dtype, name="stem_conv")(images)
    x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="stem_norm")(x)
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      x = Stage(depth, dim, i > 0, self.kernel_size, dtype=self.dtype, remat=self.remat, name=f"stage{i}")(x)
    x = nn.LayerNorm(epsilon=self.head_norm_eps, dtype=self.dtype, name="norm")(jnp.mean(x, axis=(1, 2)))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="head")(x)
    return x.astype(jnp.float32)
