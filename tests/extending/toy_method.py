"""A new PEFT method in one file: a learned scale per output channel of every kernel (IA3-style).

  y = op(x) * s        (s: one value per output channel, 1 at init, so training starts at the base)
  merge: kernel * s, bias * s   (exact: the scale is linear in the op's output)

Registered as "channel_scale" on import; `plugins=tests.extending.toy_method` makes every launcher
import it. It trains on activations (the scale multiplies the module's output), so no frozen kernel
ever gets a weight gradient.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


@register("channel_scale")
@dataclasses.dataclass(frozen=True)
class ChannelScale(Method):
  # On a registered model: its convs and dense layers, whatever their names (`models.ROLE_NAMES`).
  ROLE_DEFAULTS = {"targets": "{conv}|{query}|{key}|{value}|{attn_out}|{mlp}"}
  targets: str = r"(?!head).*"  # without a model's roles: every module with a kernel but the head

  def adapter_modules(self, flat: Flat) -> list[str]:
    return select([m for m in module_paths(flat) if f"{m}/kernel" in flat], self.targets, "channel_scale targets")

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    return {"scale": jnp.ones(flat[f"{module}/kernel"].shape[-1], jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    return y * adapter["scale"].astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    out = {**flat, f"{path}/kernel": flat[f"{path}/kernel"] * adapter["scale"]}
    if f"{path}/bias" in flat:
      out[f"{path}/bias"] = flat[f"{path}/bias"] * adapter["scale"]
    return out
