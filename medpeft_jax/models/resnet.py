"""ResNet v1.5 (torchvision/timm layout: the stride sits in the 3x3 conv), NHWC, BatchNorm.

Parameter paths ('/'-joined; BatchNorm statistics live under `batch_stats` with the same paths):

  stem_conv/kernel, stem_bn/{scale,bias}        7x7/2 conv + BN, then 3x3/2 max-pool
  layer{1-4}/block{j}/conv{1,2,3}/kernel        main-path convs (basic blocks have conv1, conv2)
  layer{1-4}/block{j}/bn{1,2,3}/{scale,bias}    main-path BatchNorms
  layer{1-4}/block{j}/downsample_conv/kernel    1x1 projection shortcut (first block of a stage)
  layer{1-4}/block{j}/downsample_bn/{scale,bias}
  head/{kernel,bias}                            linear classifier (absent when num_classes == 0)

So `layer\\d/block\\d+/conv\\d` selects exactly the main-path convs (TSA) and never the shortcuts.
Convs have no bias, as in torchvision; `width` scales every stage (64 is the standard network).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv

Dtype = Any

# The layers PEFT defaults refer to (`models.ROLE_NAMES`). `conv`: the main-path convs of layer1-4 (the
# paper's TSA placement), not the stem or the downsampling shortcuts.
ROLES = {"conv": r"layer\d/block\d+/conv\d", "norm": r"(.*/)?([a-z]+_)?bn\d?"}


def conv_bn_layers(dtype: Dtype, train: bool):
  """The conv and BatchNorm constructors shared by the CNNs (torchvision padding and BN defaults)."""
  conv = functools.partial(Conv, use_bias=False, dtype=dtype)
  # torch BatchNorm2d(momentum=0.1) updates running stats by 0.1 * batch; flax's momentum is 1 - that.
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  width: int
  strides: int
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_bn_layers(self.dtype, train)
    s = self.strides
    y = nn.relu(norm(name="bn1")(conv(self.width, (3, 3), (s, s), ((1, 1), (1, 1)), name="conv1")(x)))
    y = norm(name="bn2")(conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y))
    return nn.relu(y + _shortcut(x, y, s, conv, norm))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101/152)."""

  width: int
  strides: int
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_bn_layers(self.dtype, train)
    s = self.strides
    y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.width, (3, 3), (s, s), ((1, 1), (1, 1)), name="conv2")(y)))
    y = norm(name="bn3")(conv(self.width * 4, (1, 1), name="conv3")(y))
    return nn.relu(y + _shortcut(x, y, s, conv, norm))


def _shortcut(x, y, strides, conv, norm):
  if x.shape == y.shape:
    return x
  x = conv(y.shape[-1], (1, 1), (strides, strides), name="downsample_conv")(x)
  return norm(name="downsample_bn")(x)


class Stage(nn.Module):
  """`num_blocks` residual blocks; the first one strides (except in layer1)."""

  block: type[nn.Module]
  num_blocks: int
  width: int
  strides: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    block = nn.remat(self.block, static_argnums=(2,)) if self.remat else self.block
    for j in range(self.num_blocks):
      x = block(self.width, self.strides if j == 0 else 1, dtype=self.dtype, name=f"block{j}")(x, train)
    return x


class ResNet(nn.Module):
  """ResNet classifier; returns logits, or pooled features when `num_classes == 0`.

  `train=True` normalises with batch statistics and needs `mutable=["batch_stats"]`.
  """

  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int
  width: int = 64
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False):
    conv, norm = conv_bn_layers(self.dtype, train)
    x = conv(self.width, (7, 7), (2, 2), ((3, 3), (3, 3)), name="stem_conv")(images)
    x = nn.relu(norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      x = Stage(self.block, n, self.width * 2**i, 1 if i == 0 else 2, dtype=self.dtype, remat=self.remat,
                name=f"layer{i + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name="head")(x)
    return x.astype(jnp.float32)
