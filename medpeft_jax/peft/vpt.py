"""VPT (Jia et al. 2022): learned prompt tokens fed to the ViT encoder blocks.

Shallow: `num_tokens` prompts inserted after the prefix tokens (class and register tokens) before the
first selected block. Deep: every selected block gets its own prompts, replacing the previous block's.
The prefix tokens keep their positions (the prompts go after all of them, as timm's and DINOv2's VPT
put them after the class and register tokens), so class-token pooling is unchanged; how many there are
is read from the parameters (`prefix_tokens`), so a model with registers or without a class token
(SigLIP) needs no setting. Prompts ~ N(0, 0.02) (VPT has no identity initialisation) and cannot be
folded: `merge` raises, adapters save and load as files.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


@register("vpt")
@dataclasses.dataclass(frozen=True)
class VPT(Method):
  ROLE_DEFAULTS = {"targets": "{block}"}
  targets: str = r"block\d+"  # the encoder blocks (EncoderBlock modules)
  num_tokens: int = 10
  deep: bool = False
  width_from: str = r"pos_embed"  # a (..., D) leaf giving the token width
  # The (1, n, D) token parameters placed before the patch tokens (a ViT's class and register tokens): the
  # prompts go after all of them, their n's summed (0 when none matches: SigLIP).
  prefix_tokens: str = r"cls_token|reg_token"
  init_std: float = 0.02

  def num_prefix_tokens(self, flat: Flat) -> int:
    """Tokens in front of the prompts: the sum of the `prefix_tokens` leaves' token counts."""
    return sum(flat[p].shape[-2] for p in flat if re.fullmatch(self.prefix_tokens, p))

  def adapter_modules(self, flat: Flat) -> list[str]:
    blocks = select(module_paths(flat, enclosing=True), self.targets, f"{self.name} targets")
    return blocks if self.deep else blocks[:1]

  def init_adapter(self, rng, module: str, flat: Flat):
    (width_leaf,) = select(flat, self.width_from, f"{self.name} width_from")[:1]
    d = flat[width_leaf].shape[-1]
    return {"prompts": self.init_std * jax.random.normal(rng, (self.num_tokens, d), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    x, *rest = call.args
    first = call.path == self.adapter_modules(call.base)[0]
    p = jnp.broadcast_to(adapter["prompts"].astype(x.dtype), (x.shape[0], *adapter["prompts"].shape))
    n = self.num_prefix_tokens(call.base)
    keep = x[:, n:] if first else x[:, n + self.num_tokens:]
    return call.next_fun(jnp.concatenate([x[:, :n], p, keep], axis=1), *rest, **call.kwargs)
