"""A new model family in one file: a two-layer CNN, registered as "toy_cnn" (family "toy_cnn").

Parameter paths follow the zoo's conventions (`conv1/kernel`, ..., `head/kernel`), so every
regex-selected method and the sharding rules apply to it unchanged. It has no published weights:
train it with `init=random`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medpeft_jax import models


class ToyCNN(nn.Module):
  num_classes: int
  width: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(self.width, (3, 3), strides=2, dtype=self.dtype, name="conv1")(x))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2, dtype=self.dtype, name="conv2")(x))
    x = jnp.mean(x, axis=(1, 2))
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


# Its roles (`models.ROLE_NAMES`): what every method's defaults adapt on it, declared once.
models.register_model("toy_cnn", "toy_cnn", ToyCNN, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                      "none published: train with --config.init=random", roles={"conv": r"conv\d"})
