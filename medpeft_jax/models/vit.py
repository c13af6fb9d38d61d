"""Vision Transformer (Dosovitskiy et al. 2021), pre-norm, NHWC input; one config for the foundation ViTs.

Parameter paths (what PEFT regexes select; '/'-joined):

  patch_embed/{kernel,bias}                 patch projection (a strided conv)
  cls_token, pos_embed                      class token (1, 1, D); learned positions (1, 1 + N, D)
  reg_token                                 register tokens (1, R, D), when `num_registers`
  norm_pre/{scale,bias}                     CLIP's LayerNorm before the blocks, when `pre_norm`
  block{i}/norm1/{scale,bias}               LayerNorm before attention
  block{i}/attn/{query,key,value}/{kernel,bias}   separate D x D projections (LoRA targets)
  block{i}/attn/out/{kernel,bias}           attention output projection
  block{i}/ls1/scale, block{i}/ls2/scale    layer scale after attention / MLP, when `init_values`
  block{i}/norm2/{scale,bias}               LayerNorm before the MLP
  block{i}/mlp/{fc1,fc2}/{kernel,bias}      the MLP (`MlpBlock`, interceptable for AdaptFormer)
  norm/{scale,bias}                         final LayerNorm
  map_head/{probe,attn,norm,mlp}/...        SigLIP's attention-pooling head, when `pool == "map"`
  head/{kernel,bias}                        linear classifier (absent when num_classes == 0)

`EncoderBlock`, `Attention` and `MlpBlock` are separate modules so that a PEFT method can intercept
their `__call__` (flax.linen.intercept_methods) without editing this file. The position embedding's
grid follows the image size the model is initialised with; checkpoints trained at another size are
resampled when loaded (`medpeft_jax.models.weights`), the way each checkpoint's source resamples it.

The foundation ViTs (DINOv2, RAD-DINO, CLIP, SigLIP, the timm pathology ViTs) are this module with other
fields (`ViT`'s docstring): checkpoints with fused qkv or packed SwiGLU weights are converted on import,
so every parameter path above, and every PEFT regex over them, is the same for all of them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medpeft_jax.models.layers import Conv, attention

Dtype = Any

# The layers PEFT defaults refer to (`models.ROLE_NAMES`), as regexes over module paths.
ROLES = {  # the encoder blocks' layers (not a pooling head's); every norm, CLIP's pre-norm included
    "query": r"block\d+/attn/query", "key": r"block\d+/attn/key", "value": r"block\d+/attn/value",
    "attn_out": r"block\d+/attn/out", "attention": r"block\d+/attn", "position": r"pos_embed",
    "block": r"block\d+", "mlp_block": r"block\d+/mlp", "mlp": r"block\d+/mlp/fc[12]", "norm": r"(.*/)?norm(\d|_pre)?",
}


_ACTIVATIONS = {  # MLP activations by the name a ViT config gives them
    "gelu": functools.partial(nn.gelu, approximate=False),  # timm, DINOv2, Hugging Face ViT
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # SigLIP (`gelu_pytorch_tanh`)
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP
}
MLP_ACTS = (*_ACTIVATIONS, "swiglu")


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value projections (checkpoints with a fused qkv are
  split on import); self-attention, or cross-attention from `x` to `context` (the MAP head's probe)."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    heads = lambda name, y: nn.Dense(d, dtype=self.dtype, name=name)(y).reshape(*y.shape[:2], self.num_heads, -1)
    y = attention(heads("query", x), heads("key", context), heads("value", context))
    return nn.Dense(d, dtype=self.dtype, name="out")(y.reshape(x.shape))


class MlpBlock(nn.Module):
  """fc1 -> activation -> fc2. `swiglu` packs the gate and the value in fc1 (2 x mlp_dim outputs, gate
  first: timm's SwiGLUPacked, DINOv2's `weights_in`) and multiplies silu(gate) by the value."""

  mlp_dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.act not in MLP_ACTS:
      raise ValueError(f"MLP activation {self.act!r} is not one of {', '.join(MLP_ACTS)}")
    packed = 2 if self.act == "swiglu" else 1
    y = nn.Dense(self.mlp_dim * packed, dtype=self.dtype, name="fc1")(x)
    if self.act == "swiglu":
      gate, value = jnp.split(y, 2, axis=-1)
      y = nn.silu(gate) * value
    else:
      y = _ACTIVATIONS[self.act](y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class LayerScale(nn.Module):
  """Per-channel residual-branch scale (CaiT; timm `init_values`, DINOv2 `layerscale_value`)."""

  init_value: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))) (ls: layer scale,
  only when `init_values` is set)."""

  num_heads: int
  mlp_dim: int
  norm_eps: float
  dtype: Dtype = jnp.float32
  mlp_act: str = "gelu"
  init_values: float | None = None

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)
    scale = lambda name, y: y if self.init_values is None else LayerScale(self.init_values, name=name)(y)
    x = x + scale("ls1", Attention(self.num_heads, dtype=self.dtype, name="attn")(norm("norm1")(x)))
    return x + scale("ls2", MlpBlock(self.mlp_dim, self.mlp_act, dtype=self.dtype, name="mlp")(norm("norm2")(x)))


class MAPHead(nn.Module):
  """Multihead attention pooling (SigLIP, big_vision `MAPHead`): a learned probe attends to all tokens,
  then a pre-norm residual MLP; returns the probe's output."""

  num_heads: int
  mlp_dim: int
  norm_eps: float
  mlp_act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    y = Attention(self.num_heads, dtype=self.dtype, name="attn")(
        jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1])).astype(x.dtype), x)
    y = y + MlpBlock(self.mlp_dim, self.mlp_act, dtype=self.dtype, name="mlp")(
        nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(y))
    return y[:, 0]


POOLS = ("token", "mean", "token_mean", "map")
POS_PREFIXES = ("class", "all", "none")
POS_INTERPOLATIONS = ("bilinear", "bicubic", "bicubic_aa")


class ViT(nn.Module):
  """ViT classifier; returns logits, or the pooled features when `num_classes == 0`.

  `norm_eps` is 1e-6 in timm/big_vision checkpoints and 1e-12 in Hugging Face's configs (the loader
  takes it from a checkpoint folder's config.json). `dtype` is the compute dtype (e.g. bfloat16);
  parameters stay float32 and logits are returned in float32.

  The remaining fields describe the foundation-model variants; their defaults are the original ViT.
    class_token        a learned class token first (`cls_token`); SigLIP has none
    num_registers      register tokens after it (`reg_token`, Darcet et al. 2024)
    pos_embed_prefix   which leading tokens `pos_embed` covers besides the patches: "class" (the class
                       token; registers get no position, as in DINOv2), "all" (class and register tokens:
                       timm), "none" (patches only: timm `no_embed_class`, SigLIP)
    pos_interpolation  how a checkpoint's position grid is resampled to this model's grid, as its source
                       does it (`resample_pos_embed`)
    patch_bias         the patch projection has a bias (CLIP's has none)
    pre_norm           CLIP's LayerNorm on the embedded tokens before the blocks (`norm_pre`)
    init_values        layer scale after attention and MLP (`block{i}/ls1|ls2/scale`); None: none
    mlp_act            gelu | gelu_tanh | quick_gelu | swiglu (`MlpBlock`)
    pool               after the final norm: "token" (class token), "mean" (patch tokens), "token_mean"
                       (both, concatenated: DINOv2's linear evaluation, Virchow2's embedding), "map"
                       (SigLIP's attention-pooling head, `map_head/...`)
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
  class_token: bool = True
  num_registers: int = 0
  pos_embed_prefix: str = "class"
  pos_interpolation: str = "bilinear"
  patch_bias: bool = True
  pre_norm: bool = False
  init_values: float | None = None
  mlp_act: str = "gelu"
  pool: str = "token"

  @property
  def num_prefix_tokens(self) -> int:
    """Class and register tokens before the patch tokens."""
    return int(self.class_token) + self.num_registers

  @property
  def num_pos_prefix(self) -> int:
    """Leading tokens that `pos_embed` has a position for, before the patch grid."""
    return {"class": int(self.class_token), "all": self.num_prefix_tokens, "none": 0}[self.pos_embed_prefix]

  def _check_fields(self):
    for field, value, allowed in (("pool", self.pool, POOLS), ("pos_embed_prefix", self.pos_embed_prefix, POS_PREFIXES),
                                  ("pos_interpolation", self.pos_interpolation, POS_INTERPOLATIONS),
                                  ("mlp_act", self.mlp_act, MLP_ACTS)):
      if value not in allowed:
        raise ValueError(f"ViT field {field}={value!r} is not one of {', '.join(allowed)}")
    if self.pool.startswith("token") and not self.class_token:
      raise ValueError(f"ViT pool={self.pool!r} needs class_token=True; use pool='mean' or 'map' without a "
                       "class token")

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # no dropout or batch statistics; the flag keeps one signature across models
    self._check_fields()
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size {p}")
    x = Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
             name="patch_embed")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    prefix = []
    if self.class_token:
      prefix.append(self.param("cls_token", nn.initializers.zeros, (1, 1, self.width)))
    if self.num_registers:
      prefix.append(self.param("reg_token", nn.initializers.normal(0.02), (1, self.num_registers, self.width)))
    prefix = [jnp.broadcast_to(t, (b, *t.shape[1:])).astype(x.dtype) for t in prefix]
    # The prefix tokens with a position come first; the others are inserted after the positions are added.
    k = {"class": int(self.class_token), "all": len(prefix), "none": 0}[self.pos_embed_prefix]
    if k:
      x = jnp.concatenate([*prefix[:k], x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    if prefix[k:]:
      n = self.num_pos_prefix
      x = jnp.concatenate([x[:, :n], *prefix[k:], x[:, n:]], axis=1)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm_pre")(x)
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.norm_eps, dtype=self.dtype, mlp_act=self.mlp_act,
                init_values=self.init_values, name=f"block{i}")(x)
    x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)
    if self.pool == "token":
      x = x[:, 0]
    elif self.pool == "mean":
      x = x[:, self.num_prefix_tokens:].mean(axis=1)
    elif self.pool == "token_mean":
      x = jnp.concatenate([x[:, 0], x[:, self.num_prefix_tokens:].mean(axis=1)], axis=-1)
    else:
      x = MAPHead(self.num_heads, self.mlp_dim, self.norm_eps, self.mlp_act, dtype=self.dtype, name="map_head")(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name="head")(x)
    return x.astype(jnp.float32)


def resample_pos_embed(pos_embed, num_tokens: int, num_prefix: int = 1, method: str = "bilinear"):
  """Resamples a (1, num_prefix + g*g, D) position embedding to (1, num_tokens, D) as its source does.

  The `num_prefix` leading positions (class/register tokens) are kept; the g x g grid is resized with
    bilinear    half-pixel centres, as torch's `interpolate(mode="bilinear", align_corners=False)` and
                big_vision's resampling (the original ViT checkpoints);
    bicubic     torch's `interpolate(mode="bicubic", align_corners=False)`: Keys' kernel with a = -0.75,
                taps beyond the edge clamped to it (Hugging Face DINOv2, CLIP, SigLIP at another
                resolution; `jax.image.resize`'s cubic has a = -0.5, so it is not used);
    bicubic_aa  the same with `antialias=True`: a = -0.5, the kernel widened when shrinking, taps beyond
                the edge dropped and the weights renormalised (timm's `resample_abs_pos_embed`).
  """
  if method not in POS_INTERPOLATIONS:
    raise ValueError(f"position interpolation {method!r} is not one of {', '.join(POS_INTERPOLATIONS)}")
  old_grid, new_grid = _grid_side(pos_embed.shape[1] - num_prefix), _grid_side(num_tokens - num_prefix)
  cls, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  grid = grid.reshape(1, old_grid, old_grid, -1)
  if method == "bilinear":
    grid = jax.image.resize(grid, (1, new_grid, new_grid, grid.shape[-1]), "bilinear", antialias=False)
  else:
    m = _torch_bicubic_weights(old_grid, new_grid, antialias=method == "bicubic_aa")
    grid = jnp.asarray(np.einsum("ij,bjkd,lk->bild", m, np.asarray(grid, np.float64), m))
  return jnp.concatenate([cls, grid.reshape(1, new_grid * new_grid, -1).astype(cls.dtype)], axis=1)


def _cubic(x, a: float):
  """Keys' cubic convolution kernel at distances x."""
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _torch_bicubic_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """The (n_out, n_in) matrix of torch's 1-d bicubic resampling with align_corners=False."""
  scale = n_in / n_out
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    if antialias:  # torch's `_upsample_bicubic2d_aa` (PIL's filter)
      support, inv = (2.0 * scale, 1 / scale) if scale >= 1 else (2.0, 1.0)
      center = scale * (i + 0.5)
      lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
      taps = np.arange(lo, hi)
      k = _cubic((taps - center + 0.5) * inv, -0.5)
      w[i, taps] = k / k.sum()
    else:  # torch's `upsample_bicubic2d`: source coordinate not clamped, taps clamped to the edge
      src = scale * (i + 0.5) - 0.5
      base = int(np.floor(src))
      t = src - base
      for tap, dist in zip(range(base - 1, base + 3), (t + 1, t, 1 - t, 2 - t)):
        w[i, min(max(tap, 0), n_in - 1)] += _cubic(dist, -0.75)
  return w


def _grid_side(n: int) -> int:
  side = round(n**0.5)
  if side * side != n:
    raise ValueError(f"cannot resample a position embedding of {n} patch tokens: not a square grid")
  return side
