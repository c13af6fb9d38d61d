"""DiffFit (Xie et al. 2023): bias + normalisation tuning plus new scales γ on residual branches.

Every bias and every norm scale trains in place; each selected residual branch (by default the
self-attention, cross-attention and feed-forward branches of the U-Net's transformer blocks) gets a
per-channel γ, initialised to 1, multiplying its output: `x + γ ⊙ branch(x)`. The paper's 0.58M for
SD v1.5 implies per-channel vectors (scalars would add 48). γ trains on the activations and `merge`
folds it into the branch's output layer (kernel and bias columns).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


@register("difffit")
@dataclasses.dataclass(frozen=True)
class DiffFit(Method):
  train: str = r"(.*/)?bias|(.*/)?[^/]*norm[^/]*/scale"  # the base leaves trained in place
  branches: str = r"(.*/)?transformer_blocks_\d+/(attn1|attn2|ff)"  # modules whose output γ scales
  output_layer: str = r"to_out_0|net_2"  # inside a branch, the layer γ folds into
  head: str | None = None

  def trainable_paths(self, flat: Flat) -> list[str]:
    return sorted(set(select(flat, self.train, "difffit `train`")) | set(super().trainable_paths(flat)))

  def adapter_modules(self, flat: Flat) -> list[str]:
    return select(module_paths(flat, enclosing=True), self.branches, "difffit `branches`")

  def _output(self, flat: Flat, branch: str) -> str:
    layers = sorted({p[len(branch) + 1:].rsplit("/", 1)[0] for p in flat if p.startswith(branch + "/")})
    found = [layer for layer in layers if "/" not in layer and re.fullmatch(self.output_layer, layer)]
    if len(found) != 1:
      raise ValueError(f"DiffFit needs exactly one output layer matching {self.output_layer!r} directly "
                       f"under {branch!r}; found {found or layers}.")
    return f"{branch}/{found[0]}"

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    return {"gamma": jnp.ones(flat[f"{self._output(flat, module)}/kernel"].shape[-1], jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    return y * adapter["gamma"].astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    out, layer = dict(flat), self._output(flat, path)
    for leaf in ("kernel", "bias"):
      if f"{layer}/{leaf}" in flat:
        out[f"{layer}/{leaf}"] = flat[f"{layer}/{leaf}"] * adapter["gamma"]
    return out
