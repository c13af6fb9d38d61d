"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, NHWC, BatchNorm, ReLU6.

Parameter paths ('/'-joined; BatchNorm statistics under `batch_stats` with the same paths):

  stem_conv/kernel, stem_bn/{scale,bias}              3x3/2 conv (torchvision features.0)
  block{i}/expand_conv/kernel, expand_bn/...          1x1 expansion (absent in block1, t = 1)
  block{i}/depthwise_conv/kernel, depthwise_bn/...    3x3 grouped conv, one group per channel
  block{i}/project_conv/kernel, project_bn/...        1x1 linear projection
  final_conv/kernel, final_bn/{scale,bias}            1x1 conv to 1280 (features.18)
  head/{kernel,bias}                                  linear classifier (absent when num_classes == 0)

`block{i}` is torchvision's `features.{i}` (i = 1..17). Grouped convs are the ones named
`depthwise_conv`; every other conv is dense (what LoRA and TSA may target).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medpeft_jax.models.resnet import conv_bn_layers

Dtype = Any

# The layers PEFT defaults refer to (`models.ROLE_NAMES`). `conv`: every dense conv; never the depthwise ones.
ROLES = {"conv": r"(.*/)?(stem|expand|project|final)_conv", "norm": r"(.*/)?([a-z]+_)?bn\d?"}

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds channels to a multiple of `divisor`, never below 90 % of `v` (torchvision's rule)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
  out_channels: int
  strides: int
  expand_ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_bn_layers(self.dtype, train)
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = nn.relu6(norm(name="expand_bn")(conv(hidden, (1, 1), name="expand_conv")(y)))
    s = self.strides
    y = conv(hidden, (3, 3), (s, s), ((1, 1), (1, 1)), feature_group_count=hidden, name="depthwise_conv")(y)
    y = nn.relu6(norm(name="depthwise_bn")(y))
    y = norm(name="project_bn")(conv(self.out_channels, (1, 1), name="project_conv")(y))
    return x + y if s == 1 and x.shape[-1] == self.out_channels else y


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier; returns logits, or pooled features when `num_classes == 0`.

  torchvision applies Dropout(0.2) before the classifier; we leave regularisation to the trainer.
  """

  num_classes: int
  width_mult: float = 1.0
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False):
    conv, norm = conv_bn_layers(self.dtype, train)
    c = make_divisible(32 * self.width_mult)
    x = conv(c, (3, 3), (2, 2), ((1, 1), (1, 1)), name="stem_conv")(images)
    x = nn.relu6(norm(name="stem_bn")(x))
    block = nn.remat(InvertedResidual, static_argnums=(2,)) if self.remat else InvertedResidual
    i = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      for j in range(n):
        x = block(make_divisible(c * self.width_mult), s if j == 0 else 1, t, dtype=self.dtype,
                  name=f"block{i}")(x, train)
        i += 1
    last = make_divisible(1280 * max(1.0, self.width_mult))
    x = nn.relu6(norm(name="final_bn")(conv(last, (1, 1), name="final_conv")(x)))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name="head")(x)
    return x.astype(jnp.float32)
