"""(IA)³ (Liu et al. 2022): learned per-feature scaling of activations (Hugging Face PEFT `IA3Config`).

A target module's output is scaled per output feature, y = op(x) ⊙ l; a target that is also a
`feedforward` module has its input scaled instead, y = op(x ⊙ l) (as HF: the paper scales the
feed-forward's inner activations, which are the input of its second layer). l starts at 1, so
training starts at the base model. `merge` folds l into the kernel exactly: output scaling
multiplies the kernel's output axis and the bias, input scaling the kernel's input axis (a conv's
zero padding stays zero). On a CNN the convolutions are feedforward: an output scale placed before a
train-mode BatchNorm would be normalised away. Input scaling of a grouped conv is refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, register
from medpeft_jax.peft.lora import _kernel, kernel_modules


@register("ia3")
@dataclasses.dataclass(frozen=True)
class IA3(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{key}|{value}|{mlp}|{conv}",
                                             "feedforward": "{mlp}|{conv}"}
  OPTIONAL_ROLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"feedforward"})
  targets: str = r"(.*/)?(attn/(key|value)|mlp/fc[12])"
  feedforward: str | None = r"(.*/)?mlp/fc[12]"  # the targets whose input (not output) is scaled

  def is_feedforward(self, module: str) -> bool:
    return self.feedforward is not None and re.fullmatch(self.feedforward, module) is not None

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    w = _kernel(flat, module)
    return {"scale": jnp.ones(w.shape[-2] if self.is_feedforward(module) else w.shape[-1], jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    scale = adapter["scale"]
    if not self.is_feedforward(call.path):
      y = call.original()
      return y * scale.astype(y.dtype)
    x = call.inputs
    if x.shape[-1] != scale.shape[0]:
      raise ValueError(f"IA3 feedforward target {call.path!r} takes {x.shape[-1]} input features but its "
                       f"kernel has {scale.shape[0]} (a grouped convolution); exclude it from `feedforward`.")
    return call.next_fun(x * scale.astype(x.dtype), *call.args[1:], **call.kwargs)

  def fold_adapter(self, flat, path, adapter):
    scale, w = adapter["scale"], flat[f"{path}/kernel"]
    if self.is_feedforward(path):
      return {**flat, f"{path}/kernel": w * scale[:, None].astype(w.dtype)}
    out = {**flat, f"{path}/kernel": w * scale.astype(w.dtype)}
    if f"{path}/bias" in flat:
      out[f"{path}/bias"] = flat[f"{path}/bias"] * scale.astype(w.dtype)
    return out
