"""Selective methods: train a regex-chosen subset of the base leaves (plus the head), nothing new.

Defaults follow our model naming (medpeft_jax/models); `medpeft_jax.presets` sets them per
architecture. Regexes fully match '/'-joined parameter paths such as `block3/attn/query/bias`.
"""

from __future__ import annotations

import dataclasses

from medpeft_jax.peft.core import Flat, Method, register, select


@dataclasses.dataclass(frozen=True)
class Selective(Method):
  targets: str | None = None
  exclude: str | None = None

  def excluded(self) -> str | None:
    return self.exclude

  def trainable_paths(self, flat: Flat) -> list[str]:
    chosen = select(flat, self.targets, f"{self.name} targets", self.excluded())
    return sorted(set(chosen) | set(super().trainable_paths(flat)))


@register("full")
@dataclasses.dataclass(frozen=True)
class Full(Selective):
  """Full fine-tuning: every parameter."""

  targets: str | None = r".*"


@register("linear")
@dataclasses.dataclass(frozen=True)
class Linear(Selective):
  """Linear probing: the new head only."""


@register("bias")
@dataclasses.dataclass(frozen=True)
class Bias(Selective):
  """Bias tuning: TinyTL on a CNN (every bias = the BatchNorm betas) and BitFit on a ViT.

  The paper's ViT counts exclude LayerNorm biases (`exclude`); `include_norm_bias=True` keeps them.
  """

  targets: str | None = r"(.*/)?bias"
  exclude: str | None = r"(.*/)?[^/]*norm[^/]*/bias"
  include_norm_bias: bool = False

  def excluded(self) -> str | None:
    return None if self.include_norm_bias else self.exclude


@register("norm")
@dataclasses.dataclass(frozen=True)
class Norm(Selective):
  """Normalisation tuning: scale and bias of every BatchNorm / LayerNorm / GroupNorm."""

  ROLE_DEFAULTS = {"targets": "{norm}/(scale|bias)"}
  targets: str | None = r"(.*/)?[^/]*(norm|bn)[^/]*/(scale|bias)"


@register("attention")
@dataclasses.dataclass(frozen=True)
class Attention(Selective):
  """Attention tuning: every parameter of the attention blocks and the position embedding."""

  ROLE_DEFAULTS = {"targets": "{attention}/.*|{position}"}
  targets: str | None = r"(.*/)?attn/.*|pos_embed"


@register("bias_norm_attention")
@dataclasses.dataclass(frozen=True)
class BiasNormAttention(Selective):
  """The union of bias, norm and attention tuning (the paper's SD strategy); defaults for the U-Net."""

  targets: str | None = r"(.*/)?bias|(.*/)?[^/]*norm[^/]*/scale|(.*/)?attentions_\d+/.*"
  head: str | None = None
