"""Stable Diffusion's `AutoencoderKL` (the VAE) in Flax linen (NHWC), configured from a diffusers config.

Names as diffusers' with list indices joined by "_": encoder/{conv_in, down_blocks_{i}/{resnets_{j},
downsamplers_0/conv}, mid_block/{resnets_0, attentions_0/{group_norm,to_q,to_k,to_v,to_out_0},
resnets_1}, conv_norm_out, conv_out}, quant_conv, post_quant_conv, decoder/{conv_in, mid_block,
up_blocks_{i}/{resnets_{j}, upsamplers_0/conv}, conv_norm_out, conv_out}.
`encode(images in [-1, 1]) -> (mean, logvar)` of the latent Gaussian; `decode(latents) -> images`;
latents for the U-Net are `sample * scaling_factor` (0.18215). SD v1.5: 83,653,863 parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from medpeft_jax.models.layers import Conv
from medpeft_jax.models.sd_layers import Downsample2D, ResnetBlock2D, Upsample2D, attention, conv3x3


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  @classmethod
  def from_dict(cls, d: dict) -> VAEConfig:
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      if any(t != allowed for t in d.get(key, ())):
        raise ValueError(f"Unsupported VAE {key} {d[key]}: only {allowed} is built.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


class VAEAttention(nn.Module):
  """Single-head self-attention over positions with a GroupNorm in front and a residual."""
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    y = attention(dense("to_q")(y), dense("to_k")(y), dense("to_v")(y), heads=1)
    return dense("to_out_0")(y).reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
    x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(c, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class _Stage(nn.Module):
  """One encoder (down) or decoder (up) block: ResNets, then a resampling conv unless last."""
  channels: int
  layers: int
  groups: int
  resample: str | None  # "down", "up" or None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


def _out(x, groups, features, dtype):
  x = nn.silu(nn.GroupNorm(groups, epsilon=1e-6, dtype=dtype, name="conv_norm_out")(x))
  return conv3x3(features, dtype, "conv_out")(x)


class Encoder(nn.Module):
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = conv3x3(c.block_out_channels[0], self.dtype, "conv_in")(x)
    last = len(c.block_out_channels) - 1
    for i, ch in enumerate(c.block_out_channels):
      x = _Stage(ch, c.layers_per_block, c.norm_num_groups, "down" if i < last else None, self.dtype,
                 name=f"down_blocks_{i}")(x)
    x = VAEMidBlock(c.norm_num_groups, self.dtype, name="mid_block")(x)
    return _out(x, c.norm_num_groups, 2 * c.latent_channels, self.dtype)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    c = self.config
    channels = c.block_out_channels[::-1]
    x = conv3x3(channels[0], self.dtype, "conv_in")(z)
    x = VAEMidBlock(c.norm_num_groups, self.dtype, name="mid_block")(x)
    for i, ch in enumerate(channels):
      x = _Stage(ch, c.layers_per_block + 1, c.norm_num_groups, "up" if i < len(channels) - 1 else None,
                 self.dtype, name=f"up_blocks_{i}")(x)
    return _out(x, c.norm_num_groups, c.out_channels, self.dtype)


class AutoencoderKL(nn.Module):
  config: VAEConfig = VAEConfig()
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, self.dtype)
    self.decoder = Decoder(c, self.dtype)
    self.quant_conv = Conv(2 * c.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = Conv(c.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, images):
    """Images (B, H, W, 3) in [-1, 1] -> (mean, logvar) of the latent distribution, float32."""
    moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    """Unscaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3), nominally in [-1, 1], float32."""
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

  def _posterior(self, images, rng):
    mean, logvar = self.encode(images)
    return mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)

  def __call__(self, images, rng=None):
    """Reconstruction (of the latent mean, or of a sample when `rng` is given): init and tests."""
    return self.decode(self._posterior(images, rng))

  def latents(self, images, rng=None):
    """What the U-Net trains on: a posterior sample (or the mean) times `scaling_factor`."""
    return self._posterior(images, rng) * self.config.scaling_factor
