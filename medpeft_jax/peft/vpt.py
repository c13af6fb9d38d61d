"""VPT (Jia et al. 2022): learned prompt tokens fed to the ViT encoder blocks.

Shallow: `num_tokens` prompts inserted after the class token before the first selected block.
Deep: every selected block gets its own prompts, replacing the previous block's. The class token
stays at position 0, so the model's pooling is unchanged. Prompts ~ N(0, 0.02) (VPT has no identity
initialisation) and cannot be folded: `merge` raises, adapters save and load as files.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


@register("vpt")
@dataclasses.dataclass(frozen=True)
class VPT(Method):
  targets: str = r"block\d+"  # the encoder blocks (EncoderBlock modules)
  num_tokens: int = 10
  deep: bool = False
  width_from: str = r"pos_embed"  # a (..., D) leaf giving the token width
  num_prefix_tokens: int = 1  # tokens kept in front of the prompts (the class token)
  init_std: float = 0.02

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
    n = self.num_prefix_tokens
    keep = x[:, n:] if first else x[:, n + self.num_tokens:]
    return call.next_fun(jnp.concatenate([x[:, :n], p, keep], axis=1), *rest, **call.kwargs)
