"""SSF (Lian et al. 2022): a per-channel scale and shift after selected operations.

y = op(x) ⊙ γ + β, with γ ~ N(1, 0.02) and β ~ N(0, 0.02). Trained on the activations; `merge`
folds it into the op's own leaves, exactly, whatever the op: everything linear in the output
(`kernel`, `scale`) is multiplied by γ, and `bias` becomes bias ⊙ γ + β. On a ViT the ops are every
dense layer and LayerNorm; on a CNN every BatchNorm (a scale/shift placed before a train-mode
BatchNorm would be normalised away).
"""

from __future__ import annotations

import dataclasses

import jax

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


@register("ssf")
@dataclasses.dataclass(frozen=True)
class SSF(Method):
  ROLE_DEFAULTS = {"after": "{query}|{key}|{value}|{attn_out}|{mlp}|{norm}"}  # after every op (on a CNN: every BN)
  after: str = r"(.*/)?(query|key|value|out|fc1|fc2|norm\d?)"
  init_std: float = 0.02

  def adapter_modules(self, flat: Flat) -> list[str]:
    return select(module_paths(flat), self.after, f"{self.name} `after`")

  def init_adapter(self, rng, module: str, flat: Flat):
    leaves = [flat[f"{module}/{n}"] for n in ("kernel", "scale", "bias") if f"{module}/{n}" in flat]
    if not leaves:
      raise ValueError(f"SSF cannot follow {module!r}: it has no kernel, scale or bias.")
    c = leaves[0].shape[-1]
    k1, k2 = jax.random.split(rng)
    return {"scale": 1 + self.init_std * jax.random.normal(k1, (c,)),
            "shift": self.init_std * jax.random.normal(k2, (c,))}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    return y * adapter["scale"].astype(y.dtype) + adapter["shift"].astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    if f"{path}/bias" not in flat:
      raise ValueError(f"Cannot fold SSF's shift into {path!r}: it has no bias.")
    out = dict(flat)
    for name in ("kernel", "scale"):
      if f"{path}/{name}" in flat:
        out[f"{path}/{name}"] = flat[f"{path}/{name}"] * adapter["scale"]
    out[f"{path}/bias"] = flat[f"{path}/bias"] * adapter["scale"] + adapter["shift"]
    return out
