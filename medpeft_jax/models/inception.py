"""The FID Inception-v3 (pytorch-fid's network: TF-Inception 2015-12-05 weights) in Flax linen, NHWC.

`InceptionV3FID()(images in [0, 1], any size) -> (B, 2048)` pool-3 features: bilinear resize to
299 (no antialiasing, as torch's `interpolate`), scale to [-1, 1], the Inception-v3 trunk with the
FID variant's blocks (average pools that ignore padding; max pool in the last block), global average
pool. Names follow torchvision/pytorch-fid (`Mixed_5b/branch1x1/conv`, `.../bn`), so
`pt_inception-2015-12-05-6726825d.pth` converts by renaming (`medpeft_jax.models.weights.inception`);
BatchNorm statistics are `batch_stats`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv


class BasicConv2d(nn.Module):
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = Conv(self.features, self.kernel, self.strides, ((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _avg_pool(x):  # TF-style: the padded zeros do not count
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv2d(48, name="branch5x5_1")(x))
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(BasicConv2d(64, name="branch3x3dbl_1")(x))
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), 2, name="branch3x3")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(BasicConv2d(64, name="branch3x3dbl_1")(x))
    bd = BasicConv2d(96, (3, 3), 2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(self.c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(BasicConv2d(self.c7, **row, name="branch7x7_2")(b7))
    bd = BasicConv2d(self.c7, name="branch7x7dbl_1")(x)
    for i, (features, shape) in enumerate([(self.c7, col), (self.c7, row), (self.c7, col), (192, row)], start=2):
      bd = BasicConv2d(features, **shape, name=f"branch7x7dbl_{i}")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(320, (3, 3), 2, name="branch3x3_2")(BasicConv2d(192, name="branch3x3_1")(x))
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), 2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
  pool: str  # "avg" (Mixed_7b) or "max" (Mixed_7c, the FID network's variant)

  @nn.compact
  def __call__(self, x):
    def split(y, prefix):
      return [BasicConv2d(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y),
              BasicConv2d(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)]

    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = split(BasicConv2d(384, name="branch3x3_1")(x), "branch3x3_2")
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(BasicConv2d(448, name="branch3x3dbl_1")(x))
    bd = split(bd, "branch3x3dbl_3")
    pooled = _avg_pool(x) if self.pool == "avg" else _max_pool(x, 1, 1)
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], -1)


class InceptionV3FID(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], 299, 299, images.shape[-1]), "bilinear",
                         antialias=False)
    x = 2 * x - 1
    x = BasicConv2d(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = _max_pool(BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x))
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = _max_pool(BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x))
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))

