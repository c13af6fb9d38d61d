"""VeRA (Kopiczko et al. 2024): one frozen random pair A, B shared by every layer, per-layer vectors.

  y = op(x) + Λb · (Λd · (x·A)) · B,   A (fan_in, r), B (r, out) slices of the shared pair
Only Λd (r) and Λb (out) train. A and B (Kaiming-uniform, as Hugging Face PEFT) are sized for the
largest target and regenerated from `seed` (`derived_state`: nothing random is saved with an adapter);
each layer uses their leading rows/columns, as HF. A conv reads A's first kh·kw·in rows as a
(kh, kw, in, r) kernel run with the conv's own stride and padding (HF has VeRA on linear layers only).
Λb starts at 0, so training starts at the base model; `merge` folds W + (A·Λd)·(Λb·B).
Adapters imported from Hugging Face carry torch's projections instead: pass them as `derived=`
(`medpeft_jax.peft.interop.hf_peft`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, Params, flatten, register
from medpeft_jax.peft.lora import _delta, _down, _kernel, kernel_modules

A, B = "vera_A", "vera_B"  # the derived shared projections (no module: replicated when sharded)


def _kaiming(key, shape):
  """U(±sqrt(6 / fan_in)), fan_in = shape[0] (torch's kaiming_uniform with gain sqrt(2), as HF's VeRA)."""
  return jax.random.uniform(key, shape, jnp.float32, -1, 1) * math.sqrt(6 / shape[0])


@register("vera")
@dataclasses.dataclass(frozen=True)
class VeRA(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  rank: int = 256
  d_initial: float = 0.1
  seed: int = 0  # of the shared projections

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def derived_state(self, params: Params) -> Flat:
    flat = flatten(params)
    kernels = [_kernel(flat, m).shape for m in self.adapter_modules(flat)]
    fan_in, out = max(math.prod(s[:-1]) for s in kernels), max(s[-1] for s in kernels)
    ka, kb = jax.random.split(jax.random.key(self.seed))
    return {A: _kaiming(ka, (fan_in, self.rank)), B: _kaiming(kb, (self.rank, out))}

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    return {"lambda_d": jnp.full((self.rank,), self.d_initial, jnp.float32),
            "lambda_b": jnp.zeros((_kernel(flat, module).shape[-1],), jnp.float32)}

  @staticmethod
  def _factors(base: Flat, kernel_shape, adapter):
    """This layer's slices of the shared pair, with Λd and Λb folded in: (.., in, r), (r, out)."""
    a, b = base[A], base[B]
    fan_in, out = math.prod(kernel_shape[:-1]), kernel_shape[-1]
    rank = adapter["lambda_d"].shape[0]
    if a.shape[0] < fan_in or b.shape[1] < out or a.shape[1] != rank:
      raise ValueError(f"VeRA projections A {a.shape}, B {b.shape} cannot serve a kernel "
                       f"{tuple(kernel_shape)} at rank {rank}; pass the projections made for this model.")
    a = a[:fan_in].reshape(*kernel_shape[:-1], -1) * adapter["lambda_d"]
    return a, b[:, :out] * adapter["lambda_b"]

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    a, b = self._factors(call.base, call.base[f"{call.path}/kernel"].shape, adapter)
    x = _down(call.module, a, call.inputs)
    return y + (x @ b.astype(x.dtype)).astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    a, b = self._factors(flat, w.shape, adapter)
    return {**flat, f"{path}/kernel": w + _delta(a, b).astype(w.dtype)}
