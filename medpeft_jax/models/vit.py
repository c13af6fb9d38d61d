"""Vision Transformer (Dosovitskiy et al. 2021), pre-norm, class-token pooling, NHWC input.

Parameter paths (what PEFT regexes select; '/'-joined):

  patch_embed/{kernel,bias}                 patch projection (a strided conv)
  cls_token, pos_embed                      class token (1, 1, D); learned positions (1, 1 + N, D)
  block{i}/norm1/{scale,bias}               LayerNorm before attention
  block{i}/attn/{query,key,value}/{kernel,bias}   separate D x D projections (LoRA targets)
  block{i}/attn/out/{kernel,bias}           attention output projection
  block{i}/norm2/{scale,bias}               LayerNorm before the MLP
  block{i}/mlp/{fc1,fc2}/{kernel,bias}      the MLP (`MlpBlock`, interceptable for AdaptFormer)
  norm/{scale,bias}                         final LayerNorm
  head/{kernel,bias}                        linear classifier (absent when num_classes == 0)

`EncoderBlock`, `Attention` and `MlpBlock` are separate modules so that a PEFT method can intercept
their `__call__` (flax.linen.intercept_methods) without editing this file. The position embedding's
grid follows the image size the model is initialised with; checkpoints trained at another size are
resampled when loaded (`medpeft_jax.models.weights`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv, attention

Dtype = Any


class Attention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    heads = lambda name: nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, t, self.num_heads, -1)
    y = attention(heads("query"), heads("key"), heads("value"))
    return nn.Dense(d, dtype=self.dtype, name="out")(y.reshape(b, t, d))


class MlpBlock(nn.Module):
  """fc1 -> exact GELU -> fc2, as in timm and Hugging Face ViT."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x), approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_dim: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)
    x = x + Attention(self.num_heads, dtype=self.dtype, name="attn")(norm("norm1")(x))
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(norm("norm2")(x))


class ViT(nn.Module):
  """ViT classifier; returns logits, or the pooled class token when `num_classes == 0`.

  `norm_eps` is 1e-6 in timm/big_vision checkpoints and 1e-12 in Hugging Face's configs (the loader
  takes it from a checkpoint folder's config.json). `dtype` is the compute dtype (e.g. bfloat16);
  parameters stay float32 and logits are returned in float32.
  """

  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_classes: int
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # no dropout or batch statistics; the flag keeps one signature across models
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size {p}")
    x = Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
             name="patch_embed")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.norm_eps, dtype=self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)[:, 0]
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name="head")(x)
    return x.astype(jnp.float32)


def resample_pos_embed(pos_embed, num_tokens: int):
  """Bilinearly resamples a (1, 1 + g*g, D) position embedding to (1, num_tokens, D).

  The class-token position is kept; the g x g grid is resized (half-pixel centres, as
  torch's `interpolate(mode="bilinear", align_corners=False)` and big_vision's resampling).
  """
  old_grid, new_grid = _grid_side(pos_embed.shape[1] - 1), _grid_side(num_tokens - 1)
  cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
  grid = grid.reshape(1, old_grid, old_grid, -1)
  grid = jax.image.resize(grid, (1, new_grid, new_grid, grid.shape[-1]), "bilinear", antialias=False)
  return jnp.concatenate([cls, grid.reshape(1, new_grid * new_grid, -1).astype(cls.dtype)], axis=1)


def _grid_side(n: int) -> int:
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f"cannot resample a position embedding of {n} patch tokens: not a square grid")
  return side
