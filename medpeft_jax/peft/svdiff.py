"""SV-Diff (Han et al. 2023): spectral shifts of every kernel's singular values.

Each selected kernel W, reshaped to 2-D (a conv's (kh, kw, in, out) to (kh·kw·in, out), the same
singular values as PyTorch's (out, in·kh·kw)), is decomposed once, W = U·diag(σ)·Vᵀ; training
learns δ (one per singular value, zero at init) and the module runs with U·diag(relu(σ + δ))·Vᵀ.
U, σ, Vᵀ are the method's derived state (`derived_state`), computed once and passed back by the
caller; at SD v1.5 they hold 1.26x the kernels' size (4.0 GiB in float32). Unlike the activation-side
methods, SV-Diff trains through the rebuilt kernel, so each step forms that kernel's gradient, as the
authors' code does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import (
  AdapterCall,
  Flat,
  Method,
  Params,
  flatten,
  module_paths,
  register,
  select,
  unflatten,
)

_FACTORS = ("svd_u", "svd_s", "svd_vt")


@register("svdiff")
@dataclasses.dataclass(frozen=True)
class SVDiff(Method):
  """Spectral shifts on every dense/conv kernel `targets` selects (default: all of them)."""

  targets: str = r".*"

  def adapter_modules(self, flat: Flat) -> list[str]:
    trained = set(self.trainable_paths(flat))  # a head trained in place is not also shifted
    kernels = [m for m in module_paths(flat)
               if f"{m}/kernel" in flat and flat[f"{m}/kernel"].ndim >= 2 and f"{m}/kernel" not in trained]
    return select(kernels, self.targets, "svdiff targets")

  def derived_state(self, params: Params) -> Flat:
    flat = flatten(params)
    out = {}
    for m in self.adapter_modules(flat):
      w = flat[f"{m}/kernel"]
      u, s, vt = jnp.linalg.svd(w.reshape(-1, w.shape[-1]).astype(jnp.float32), full_matrices=False)
      out.update({f"{m}/svd_u": u, f"{m}/svd_s": s, f"{m}/svd_vt": vt})
    return out

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    w = flat[f"{module}/kernel"]
    return {"delta": jnp.zeros(min(w.size // w.shape[-1], w.shape[-1]), jnp.float32)}

  def _kernel(self, flat: Flat, path: str, adapter) -> jax.Array:
    u, s, vt = (flat[f"{path}/{name}"] for name in _FACTORS)
    w = flat[f"{path}/kernel"]
    return ((u * jax.nn.relu(s + adapter["delta"])) @ vt).reshape(w.shape).astype(w.dtype)

  def call_adapter(self, adapter, call: AdapterCall):
    own = {k[len(call.path) + 1:]: v for k, v in call.base.items()
           if k.startswith(call.path + "/") and k.rsplit("/", 1)[-1] not in _FACTORS}
    own["kernel"] = self._kernel(call.base, call.path, adapter)
    return call.module.clone(parent=None).apply({"params": unflatten(own)}, *call.args, **call.kwargs)

  def fold_adapter(self, flat, path, adapter):
    return {**flat, f"{path}/kernel": self._kernel(flat, path, adapter)}
