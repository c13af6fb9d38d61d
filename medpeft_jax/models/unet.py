"""Stable Diffusion's `UNet2DConditionModel` in Flax linen (NHWC), configured from a diffusers config.

Parameter names are diffusers' with list indices joined by "_" (`down_blocks.0.attentions.1` ->
`down_blocks_0/attentions_1`), so a diffusers checkpoint converts by renaming, and the paper's
strategies select by regex: `attentions_` (the Transformer2D blocks: norm, proj_in/out, attn1 self-
and attn2 cross-attention with to_q/to_k/to_v/to_out_0, ff), `norm` (every GroupNorm/LayerNorm),
`bias`. Layout:
  conv_in, time_embedding/{linear_1,linear_2}
  down_blocks_{i}/resnets_{j}/{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}
  down_blocks_{i}/attentions_{j}/{norm,proj_in,transformer_blocks_{k}/{norm1,attn1,norm2,attn2,norm3,
      ff/{net_0/proj,net_2}},proj_out}, down_blocks_{i}/downsamplers_0/conv
  mid_block/{resnets_0,attentions_0,resnets_1}
  up_blocks_{i}/{resnets_{j},attentions_{j},upsamplers_0/conv}
  conv_norm_out, conv_out
`__call__(sample (B,H,W,4), timesteps (B,) or scalar, encoder_hidden_states (B,T,768)) -> (B,H,W,4)`.
SD v1.5 (the defaults): 859,520,964 parameters.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv
from medpeft_jax.models.sd_layers import Downsample2D, ResnetBlock2D, Upsample2D, attention, conv3x3

# The layers PEFT defaults refer to (`models.ROLE_NAMES`; the paper's eight strategies keep their exact
# table in medpeft_jax/presets.py): the transformer blocks' projections and feed-forwards, every norm, and
# the resnet blocks' main-path convs.
ROLES = {
    "query": r".*/attn[12]/to_q", "key": r".*/attn[12]/to_k", "value": r".*/attn[12]/to_v",
    "attn_out": r".*/attn[12]/to_out_0", "attention": r"(.*/)?attentions_\d+", "mlp_block": r".*/ff",
    "mlp": r".*/ff/(net_0/proj|net_2)", "norm": r"(.*/)?[^/]*norm[^/]*", "conv": r".*/resnets_\d+/conv[12]",
}

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, DOWN)
  up_block_types: tuple = (UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  cross_attention_dim: int = 768
  attention_head_dim: int | tuple = 8  # diffusers' legacy name: the number of heads, when num_attention_heads is unset
  num_attention_heads: int | tuple | None = None
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  use_linear_projection: bool = False
  downsample_padding: int = 1
  transformer_layers_per_block: int = 1

  @classmethod
  def from_dict(cls, d: dict) -> UNetConfig:
    unsupported = {k: d[k] for k in ("mid_block_type", "time_embedding_type", "class_embed_type",
                                     "addition_embed_type", "encoder_hid_dim", "resnet_time_scale_shift")
                   if d.get(k) not in (None, "UNetMidBlock2DCrossAttn", "positional", "default")}
    if unsupported or d.get("act_fn", "silu") != "silu" or d.get("center_input_sample"):
      raise ValueError(f"Unsupported U-Net configuration {unsupported or d}: only the SD 1.x/2.x layout is built.")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    for k in ("down_block_types", "up_block_types"):
      bad = set(kwargs.get(k, ())) - {CROSS_ATTN_DOWN, DOWN, CROSS_ATTN_UP, UP}
      if bad:
        raise ValueError(f"Unsupported {k} {sorted(bad)}.")
    return cls(**kwargs)

  def heads(self) -> tuple[int, ...]:
    heads = self.num_attention_heads or self.attention_head_dim
    return tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * len(self.block_out_channels)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000):
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)], -1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class Attention(nn.Module):
  """diffusers' `Attention` as the U-Net uses it: q/k/v without bias, `to_out_0` with bias."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    dim = x.shape[-1]
    context = x if context is None else context
    dense = lambda name, bias=False: nn.Dense(dim, use_bias=bias, dtype=self.dtype, name=name)
    y = attention(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context), self.heads)
    return dense("to_out_0", True)(y)


class GEGLU(nn.Module):
  inner: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1] // 4, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    norm = lambda name: nn.LayerNorm(1e-5, dtype=self.dtype, name=name)
    x = x + Attention(self.heads, self.dtype, name="attn1")(norm("norm1")(x))
    x = x + Attention(self.heads, self.dtype, name="attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  heads: int
  groups: int
  layers: int = 1
  use_linear_projection: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    residual = x
    x = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    project = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.use_linear_projection else (
        lambda name: Conv(c, (1, 1), dtype=self.dtype, name=name))
    x = project("proj_in")(x).reshape(b, h * w, c)
    for k in range(self.layers):
      x = BasicTransformerBlock(self.heads, self.dtype, name=f"transformer_blocks_{k}")(x, context)
    return project("proj_out")(x.reshape(b, h, w, c)) + residual


class TimestepEmbedding(nn.Module):
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    t = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(t)


class _Builder:
  """Makes the blocks of one U-Net configuration (optionally rematerialised)."""

  def __init__(self, config: UNetConfig, dtype, remat: bool):
    self.config, self.dtype = config, dtype
    self.resnet_cls = nn.remat(ResnetBlock2D) if remat else ResnetBlock2D
    self.transformer_cls = nn.remat(Transformer2DModel) if remat else Transformer2DModel

  def resnet(self, channels: int, name: str):
    return self.resnet_cls(channels, self.config.norm_num_groups, self.config.norm_eps, self.dtype, name=name)

  def transformer(self, heads: int, name: str):
    c = self.config
    return self.transformer_cls(heads, c.norm_num_groups, c.transformer_layers_per_block, c.use_linear_projection,
                                self.dtype, name=name)


class DownBlock(nn.Module):
  """`layers_per_block` x (ResNet [+ Transformer2D]), then a stride-2 conv; returns the skips too."""
  builder: _Builder
  channels: int
  heads: int
  cross_attention: bool
  downsample: bool

  @nn.compact
  def __call__(self, x, temb, context):
    b, skips = self.builder, []
    for j in range(b.config.layers_per_block):
      x = b.resnet(self.channels, f"resnets_{j}")(x, temb)
      if self.cross_attention:
        x = b.transformer(self.heads, f"attentions_{j}")(x, context)
      skips.append(x)
    if self.downsample:
      x = Downsample2D(self.channels, b.config.downsample_padding, b.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  builder: _Builder
  heads: int

  @nn.compact
  def __call__(self, x, temb, context):
    b, channels = self.builder, x.shape[-1]
    x = b.resnet(channels, "resnets_0")(x, temb)
    x = b.transformer(self.heads, "attentions_0")(x, context)
    return b.resnet(channels, "resnets_1")(x, temb)


class UpBlock(nn.Module):
  """`layers_per_block + 1` x (concat a skip, ResNet [+ Transformer2D]), then nearest 2x + conv."""
  builder: _Builder
  channels: int
  heads: int
  cross_attention: bool
  upsample: bool

  @nn.compact
  def __call__(self, x, temb, context, skips):
    b = self.builder
    for j in range(b.config.layers_per_block + 1):
      x = b.resnet(self.channels, f"resnets_{j}")(jnp.concatenate([x, skips.pop()], axis=-1), temb)
      if self.cross_attention:
        x = b.transformer(self.heads, f"attentions_{j}")(x, context)
    if self.upsample:  # to the next skip's size (2x unless odd sizes were rounded up on the way down)
      x = Upsample2D(self.channels, b.dtype, name="upsamplers_0")(x, skips[-1].shape[1:3])
    return x


class UNet2DConditionModel(nn.Module):
  config: UNetConfig = UNetConfig()
  dtype: jnp.dtype = jnp.float32
  remat: bool = False  # rematerialise each ResNet and Transformer2D block in the backward pass

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    c, dtype = self.config, self.dtype
    builder = _Builder(c, dtype, self.remat)
    heads, channels = c.heads(), c.block_out_channels
    last = len(channels) - 1
    context = encoder_hidden_states.astype(dtype)
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(timesteps, channels[0], c.flip_sin_to_cos, c.freq_shift).astype(dtype)
    temb = TimestepEmbedding(4 * channels[0], dtype, name="time_embedding")(temb)

    x = conv3x3(channels[0], dtype, "conv_in")(sample.astype(dtype))
    skips = [x]
    for i, block_type in enumerate(c.down_block_types):
      x, block_skips = DownBlock(builder, channels[i], heads[i], block_type == CROSS_ATTN_DOWN, i < last,
                                 name=f"down_blocks_{i}")(x, temb, context)
      skips += block_skips
    x = MidBlock(builder, heads[-1], name="mid_block")(x, temb, context)
    for i, block_type in enumerate(c.up_block_types):
      x = UpBlock(builder, channels[last - i], heads[last - i], block_type == CROSS_ATTN_UP, i < last,
                  name=f"up_blocks_{i}")(x, temb, context, skips)
    x = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, dtype=dtype, name="conv_norm_out")(x))
    return conv3x3(c.out_channels, dtype, "conv_out")(x).astype(jnp.float32)
