"""GLoRA (Chavan et al. 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning").

A target W0 (.., in, out) with bias b0 becomes, as the paper's f(x) = (W0 + W0⊙A + B)x + W0·C + b0⊙D + E + b0,
  W = W0 + W0⊙A + B,   b = b0 + b0⊙D + E + Σ W0·C
with each support tensor in the form its field names (the paper searches them per layer; here one
form per component, the authors' `eval_config` strings, "constant" called "scalar"):
  A, B (weight scale, shift)  "lora" (rank `rank`), "vector" (one value per output), "scalar", "none"
  C (prompt, a vector over the inputs)  "lora" ((in, r)·(r, 1)), "vector", "none"
  D, E (bias scale, shift)    "vector", "scalar", "none"
Trained on the activations (../shared/DESIGN.md): A as a vector/scalar scales x·W0 = y - b0; A as LoRA
(Σ_k a_k⁺ ⊙ ((x ⊙ a_k⁻)·W0)) runs W0 once per rank on scaled inputs — r extra passes through the layer,
which is why A defaults to "vector"; B as LoRA is a LoRA; B as a vector/scalar is b · (x·1) (the window
sum for a conv); C, D, E are a bias. For a conv, A's LoRA input factor is per input channel (shared
by the taps: a per-tap scale cannot run on the activations) and C sums over the taps. A module
without a bias gets no C, D, E (nothing to fold them into; a BatchNorm after it would cancel a shift).
Init as the authors' code (github.com/Arnav0400/ViT-Slim, GLoRA): LoRA input-side factors Xavier-
uniform, everything else zero, so training starts at the base model; `merge` folds W and b exactly.
Grouped convs are refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, register
from medpeft_jax.peft.lora import _delta, _down, _kernel, kernel_modules

FORMS = {"a": ("lora", "vector", "scalar", "none"), "b": ("lora", "vector", "scalar", "none"),
         "c": ("lora", "vector", "none"), "d": ("vector", "scalar", "none"),
         "e": ("vector", "scalar", "none")}


def _xavier(rng, shape, fan_in, fan_out):
  bound = math.sqrt(6 / (fan_in + fan_out))
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


@register("glora")
@dataclasses.dataclass(frozen=True)
class GLoRA(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{key}|{value}|{attn_out}|{mlp}|{conv}"}
  targets: str = r"(.*/)?(attn/(query|key|value|out)|mlp/fc[12])"
  rank: int = 4
  a: str = "vector"
  b: str = "lora"
  c: str = "vector"
  d: str = "vector"
  e: str = "vector"

  def __post_init__(self):
    for field, forms in FORMS.items():
      if getattr(self, field) not in forms:
        raise ValueError(f"glora {field}={getattr(self, field)!r}: expected one of {forms}.")

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def init_adapter(self, rng, module: str, flat: Flat):
    w = _kernel(flat, module)
    *taps, n_in, n_out = w.shape
    r, ka, kb, kc = self.rank, *jax.random.split(rng, 3)
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    out = {}
    for name, form in (("a", self.a), ("b", self.b)):
      if form == "lora":
        side = (n_in, r) if name == "a" else (*taps, n_in, r)
        out[f"{name}_in"] = _xavier(ka if name == "a" else kb, side, math.prod(side[:-1]), r)
        out[f"{name}_out"] = zeros(r, n_out)
      elif form != "none":
        out[name] = zeros(*((n_out,) if form == "vector" else ()))
    if f"{module}/bias" not in flat:
      return out
    if self.c == "lora":
      out["c_in"], out["c_out"] = zeros(n_in, r), _xavier(kc, (r,), r, 1)
    elif self.c == "vector":
      out["c"] = zeros(n_in)
    for name, form in (("d", self.d), ("e", self.e)):
      if form != "none":
        out[name] = zeros(*((n_out,) if form == "vector" else ()))
    return out

  @staticmethod
  def _prompt(adapter):
    """C (in,), or None."""
    if "c_in" in adapter:
      return adapter["c_in"] @ adapter["c_out"]
    return adapter.get("c")

  def _bias_delta(self, adapter, w, b0):
    """b - b0 = b0⊙D + E + Σ W0·C (zero where the forms are none)."""
    delta = jnp.zeros(w.shape[-1], jnp.float32)
    if "d" in adapter:
      delta = delta + b0 * adapter["d"]
    if "e" in adapter:
      delta = delta + adapter["e"]
    c = self._prompt(adapter)
    if c is not None:
      delta = delta + jnp.einsum("...io,i->o", w, c)
    return delta

  def call_adapter(self, adapter, call: AdapterCall):
    y, x = call.original(), call.inputs
    w = call.base[f"{call.path}/kernel"]
    b0 = call.base.get(f"{call.path}/bias")
    out = y
    if "a_in" in adapter:  # Σ_k a_out[k] ⊙ ((x ⊙ a_in[:, k]) · W0): rank k as a leading batch axis
      scaled = jnp.moveaxis(x[..., None] * adapter["a_in"].astype(x.dtype), -1, 0)
      z = _down(call.module, w.astype(x.dtype), scaled)
      out = out + jnp.einsum("k...o,ko->...o", z, adapter["a_out"].astype(z.dtype)).astype(y.dtype)
    elif "a" in adapter:
      plain = y - b0.astype(y.dtype) if b0 is not None else y
      out = out + plain * adapter["a"].astype(y.dtype)
    if "b_in" in adapter:
      z = _down(call.module, adapter["b_in"].astype(x.dtype), x)
      out = out + (z @ adapter["b_out"].astype(z.dtype)).astype(y.dtype)
    elif "b" in adapter:  # every weight of an output shifted by b: b · (the input summed over its window)
      ones = jnp.ones((*w.shape[:-1], 1), x.dtype)
      out = out + (_down(call.module, ones, x) * adapter["b"].astype(x.dtype)).astype(y.dtype)
    if b0 is not None:
      out = out + self._bias_delta(adapter, w, b0).astype(y.dtype)
    return out

  def fold_adapter(self, flat, path, adapter):
    w, b0 = flat[f"{path}/kernel"], flat.get(f"{path}/bias")
    new = w
    if "a_in" in adapter:
      new = new + w * _delta(adapter["a_in"], adapter["a_out"]).astype(w.dtype)
    elif "a" in adapter:
      new = new + w * adapter["a"].astype(w.dtype)
    if "b_in" in adapter:
      new = new + _delta(adapter["b_in"], adapter["b_out"]).astype(w.dtype)
    elif "b" in adapter:
      new = new + jnp.broadcast_to(adapter["b"], w.shape[-1:]).astype(w.dtype)
    out = {**flat, f"{path}/kernel": new}
    if b0 is not None:
      out[f"{path}/bias"] = b0 + self._bias_delta(adapter, w, b0).astype(b0.dtype)
    return out
