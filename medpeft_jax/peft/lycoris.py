"""LoHa and LoKr (LyCORIS; Hugging Face PEFT `LoHaConfig`/`LoKrConfig`) on dense and convolution kernels.

Both learn a full-rank-capable update ΔW of a kernel W (in, out) or (kh, kw, in, out), s = alpha / r:
  LoHa: ΔW = s · (W1b·W1a) ⊙ (W2b·W2a),   W1b, W2b (.., in, r) input side, W1a, W2a (r, out)
  LoKr: ΔW = s · W1 ⊗ W2,                  W1 (c, a), W2 (.., d, b), in = c·d, out = a·b; W1 = W1b·W1a and
                                           W2 = W2b·W2a when they are decomposed (HF's shape rules)
Leaves carry Hugging Face PEFT's names in our layout (input axes first, a conv's taps leading), so the
converter is a transpose. HF forms ΔW and runs `F.linear(x, ΔW)`, whose backward builds ΔW's weight-sized
gradient xᵀ·dy — the cost of full fine-tuning (../shared/DESIGN.md). Here neither trains through a
kernel: LoHa's ΔW is the rank-r² product of two Khatri-Rao factors, [W1b ∘ W2b]·[W1a ∘ W2a], so it runs
as a LoRA of rank r² on the activations; LoKr reshapes the input channels to (c, d), runs W2 on each
of the c groups (a conv with W's stride/padding) and mixes the groups with W1. `merge` folds ΔW.
Init as HF: W2b (LoHa) or W1 (LoKr) zero, so training starts at the base model. Convolutions use HF's
default `use_effective_conv2d=False` layout; grouped (depthwise) convs are an error, as for LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, register
from medpeft_jax.peft.lora import _delta, _down, _kernel, kernel_modules


def kaiming_uniform(rng, shape):
  """U(±1/sqrt(fan_in)), torch's kaiming_uniform(a=sqrt(5)); fan_in = all axes but the last (our layout)."""
  bound = 1 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """dimension = m·n with m <= n, m as close to `factor` (-1: to sqrt(dimension)) as divisors allow;
  Hugging Face PEFT's / LyCORIS's rule, so that adapter shapes match theirs."""
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  factor = dimension if factor == -1 else factor
  m, n = 1, dimension
  while m < n:
    new_m = m + 1
    while dimension % new_m:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > m + n or new_m > factor:
      break
    m, n = new_m, new_n
  return (n, m) if m > n else (m, n)


@dataclasses.dataclass(frozen=True)
class _Lycoris(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  rank: int = 8
  alpha: float = 8.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    return y + (self.scale * self._update(adapter, call)).astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    return {**flat, f"{path}/kernel": w + (self.scale * self._delta_weight(adapter, w.shape)).astype(w.dtype)}


@register("loha")
@dataclasses.dataclass(frozen=True)
class LoHa(_Lycoris):
  """Low-rank Hadamard product (Hyeon-Woo et al. 2022, FedPara)."""

  def init_adapter(self, rng, module: str, flat: Flat):
    w = _kernel(flat, module)
    k1, k2, k3 = jax.random.split(rng, 3)
    r, out = self.rank, w.shape[-1]
    return {"w1_a": kaiming_uniform(k1, (r, out)), "w1_b": kaiming_uniform(k2, (*w.shape[:-1], r)),
            "w2_a": kaiming_uniform(k3, (r, out)), "w2_b": jnp.zeros((*w.shape[:-1], r), jnp.float32)}

  def _update(self, adapter, call: AdapterCall):
    # ΔW[k, o] = Σ_rs (w1_b[k,r]·w2_b[k,s])·(w1_a[r,o]·w2_a[s,o]): a rank-r² LoRA on the activations.
    down = jnp.einsum("...r,...s->...rs", adapter["w1_b"], adapter["w2_b"])
    down = down.reshape(*down.shape[:-2], -1)
    up = jnp.einsum("ro,so->rso", adapter["w1_a"], adapter["w2_a"]).reshape(-1, adapter["w1_a"].shape[-1])
    x = _down(call.module, down, call.inputs)
    return x @ up.astype(x.dtype)

  def _delta_weight(self, adapter, shape):
    return _delta(adapter["w1_b"], adapter["w1_a"]) * _delta(adapter["w2_b"], adapter["w2_a"])


@register("lokr")
@dataclasses.dataclass(frozen=True)
class LoKr(_Lycoris):
  """Low-rank Kronecker product (Edalati et al. 2022; LyCORIS)."""

  decompose_both: bool = False  # also factor W1 as W1b·W1a (when the rank is small enough)
  decompose_factor: int = -1  # -1: split each dimension near its square root

  def shapes(self, w_shape) -> tuple[int, int, int, int, bool, bool]:
    """(a, b, c, d, w1 decomposed, w2 decomposed) for a kernel, by Hugging Face PEFT's rules."""
    c, d = factorization(w_shape[-2], self.decompose_factor)
    a, b = factorization(w_shape[-1], self.decompose_factor)
    return a, b, c, d, self.decompose_both and self.rank < max(a, c) / 2, self.rank < max(b, d) / 2

  def init_adapter(self, rng, module: str, flat: Flat):
    w = _kernel(flat, module)
    a, b, c, d, split1, split2 = self.shapes(w.shape)
    r, taps = self.rank, w.shape[:-2]
    k1, k2, k3 = jax.random.split(rng, 3)
    out = {"w1_a": jnp.zeros((r, a), jnp.float32), "w1_b": kaiming_uniform(k1, (c, r))} if split1 else {
        "w1": jnp.zeros((c, a), jnp.float32)}
    if split2:
      return {**out, "w2_a": kaiming_uniform(k2, (r, b)), "w2_b": kaiming_uniform(k3, (*taps, d, r))}
    return {**out, "w2": kaiming_uniform(k2, (*taps, d, b))}

  @staticmethod
  def _w1(adapter):
    return adapter["w1"] if "w1" in adapter else adapter["w1_b"] @ adapter["w1_a"]

  @staticmethod
  def _w2(adapter):
    return adapter["w2"] if "w2" in adapter else _delta(adapter["w2_b"], adapter["w2_a"])

  def _update(self, adapter, call: AdapterCall):
    w1, x = self._w1(adapter), call.inputs
    c = w1.shape[0]
    # Input channel p·d + q -> group p, channel q; the c groups become a leading batch axis of W2's op.
    groups = jnp.moveaxis(x.reshape(*x.shape[:-1], c, x.shape[-1] // c), -2, 0)
    if "w2" in adapter:
      z = _down(call.module, adapter["w2"], groups)
    else:
      z = _down(call.module, adapter["w2_b"], groups)
      z = z @ adapter["w2_a"].astype(z.dtype)
    z = jnp.moveaxis(z, 0, -2)  # (..., c, b)
    out = jnp.einsum("...pb,pa->...ab", z, w1.astype(z.dtype))
    return out.reshape(*out.shape[:-2], -1)  # output channel i·b + j

  def _delta_weight(self, adapter, shape):
    w1, w2 = self._w1(adapter), self._w2(adapter)
    return jnp.einsum("pa,...qb->...pqab", w1, w2).reshape(shape)
