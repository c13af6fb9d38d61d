"""FacT (Jie & Deng, AAAI 2023, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer").

The weight increments of all adapted layers are slices of one tensor, factored with a pair U (d, r),
V (r, d) shared by every layer and a small core per d×d slice. A layer whose kernel maps a·d inputs to
b·d outputs (a ViT's q, k, v, out: 1×1 slices; fc1: 1×4; fc2: 4×1) has a core S (a·r, b·r) and
  ΔW = s · diag_a(U) · S · diag_b(V),   y = op(x) + s · V(op_S(U(x)))
with U applied to each of the input's a chunks and V to each of the output's b chunks:
  - TT (`variant="tt"`, tensor-train): S is free, r×r per slice (the paper's Σ cores);
  - TK (`variant="tk"`, Tucker): every r×r block of S is C ×₃ p, one core C (r, r, r) shared by all layers
    and one p (r) per slice (the paper's factor P, 12 rows per ViT block). Each d×d block of fc1/fc2 is
    one slice, as the paper's tensor; the authors' code interleaves the four slices' columns instead.
A convolution (kh, kw, a·d, b·d) gets a core per tap, S (kh, kw, a·r, b·r), run with the conv's stride and
padding between the pointwise U and V (exact: U commutes with the conv); grouped convs are refused.
d (`width`) defaults to the gcd of the targets' channel counts (768 on ViT-B). V starts at 0, so training
starts at the base model; `merge` folds ΔW exactly. Inits as the authors' code (github.com/JieShibo/
PETL-ViT, FacT/fact_tt.py, fact_tk.py): U, S torch-Linear uniform; C, P Xavier-uniform. Their 0.1
dropout on the r-dim activations is left out (a regulariser, not part of the function).

U, V (and TK's C) are stored once, with the first adapted module's leaves; `apply` and `merge` hand them
to every layer, so saved adapters, counts and optimizer state hold them once.
Counts (no head) on ViT-B/16: TT 1536·r + 144·r² (r = 8: 21,504; r = 4: 8,448, as the abstract's "8K");
TK 1536·r + r³ + 144·r (r = 32, the authors' CIFAR setting: 86,528).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, Params, flatten, register
from medpeft_jax.peft.lora import _down, _kernel, kernel_modules

VARIANTS = ("tt", "tk")


@register("fact")
@dataclasses.dataclass(frozen=True)
class FacT(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{key}|{value}|{attn_out}|{mlp}|{conv}"}
  targets: str = r"(.*/)?(attn/(query|key|value|out)|mlp/fc[12])"
  variant: str = "tt"
  rank: int = 8
  scale: float = 1.0  # the paper's s
  width: int = 0  # d of the shared factors; 0: the gcd of the targets' channel counts

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"fact variant={self.variant!r}: expected one of {VARIANTS}.")

  def shared_leaves(self) -> tuple[str, ...]:
    return ("u", "v", "c") if self.variant == "tk" else ("u", "v")

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def blocks(self, flat: Flat) -> tuple[int, dict[str, tuple[tuple[int, ...], int, int]]]:
    """(d, {module: (taps, a, b)}): each target's kernel as a×b slices of d×d per tap."""
    kernels = {m: _kernel(flat, m).shape for m in self.adapter_modules(flat)}
    d = self.width or math.gcd(*(n for s in kernels.values() for n in s[-2:]))
    wrong = [f"{m} {tuple(s)}" for m, s in kernels.items() if s[-2] % d or s[-1] % d]
    if wrong:
      raise ValueError(f"fact width={d}: the channels of {', '.join(wrong[:3])} are not multiples of it; "
                       "set width to a common divisor of the targets' channel counts (0 picks their gcd).")
    return d, {m: (tuple(s[:-2]), s[-2] // d, s[-1] // d) for m, s in kernels.items()}

  def init(self, rng, params: Params) -> Params:
    k_shared, rng = jax.random.split(rng)
    trainable = super().init(rng, params)
    d, _ = self.blocks(flatten(params))
    ku, kc = jax.random.split(k_shared)
    r = self.rank
    shared = {"u": _uniform(ku, (d, r), 1 / math.sqrt(d)), "v": jnp.zeros((r, d), jnp.float32)}
    if self.variant == "tk":
      shared["c"] = _uniform(kc, (r, r, r), math.sqrt(3) / r)  # torch's Xavier: fan_in = fan_out = r²
    owner = next(iter(trainable["adapters"]))
    trainable["adapters"][owner] = {**trainable["adapters"][owner], **shared}
    return trainable

  def init_adapter(self, rng, module: str, flat: Flat):
    _, blocks = self.blocks(flat)
    taps, a, b = blocks[module]
    r = self.rank
    if self.variant == "tt":
      fan_in = math.prod(taps) * a * r
      return {"core": _uniform(rng, (*taps, a * r, b * r), 1 / math.sqrt(fan_in))}
    slices = sum(math.prod(t) * i * o for t, i, o in blocks.values())  # the rows of the paper's P
    return {"p": _uniform(rng, (*taps, a, b, r), math.sqrt(6 / (slices + r)))}

  def _core(self, adapter):
    """S (.., a·r, b·r): TT's own, or TK's blocks C ×₃ p."""
    if self.variant == "tt":
      return adapter["core"]
    s = jnp.einsum("ijl,...abl->...aibj", adapter["c"], adapter["p"])
    return s.reshape(*s.shape[:-4], s.shape[-4] * s.shape[-3], s.shape[-2] * s.shape[-1])

  def _with_shared(self, trainable: Params) -> Params:
    adapters = trainable["adapters"]
    owners = [m for m, a in adapters.items() if "u" in a]
    if len(owners) != 1:
      raise ValueError(f"A fact adapter holds its shared factors U, V in exactly one module; found "
                       f"{len(owners)} ({owners[:3]}). It was not made by fact.init.")
    shared = {k: adapters[owners[0]][k] for k in self.shared_leaves()}
    return {**trainable, "adapters": {m: {**a, **shared} for m, a in adapters.items()}}

  def apply(self, model, variables, trainable, *inputs, **kwargs):
    return super().apply(model, variables, self._with_shared(trainable), *inputs, **kwargs)

  def merge(self, params, trainable, derived=None):
    return super().merge(params, self._with_shared(trainable), derived)

  def call_adapter(self, adapter, call: AdapterCall):
    y, x = call.original(), call.inputs
    u, v = adapter["u"].astype(x.dtype), adapter["v"].astype(x.dtype)
    (d, r), lead = u.shape, x.shape[:-1]
    z = (x.reshape(*lead, -1, d) @ u).reshape(*lead, -1)
    z = _down(call.module, self._core(adapter).astype(x.dtype), z)
    out = (z.reshape(*z.shape[:-1], -1, r) @ v).reshape(*z.shape[:-1], -1)
    return y + (self.scale * out).astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    u, v, s = adapter["u"], adapter["v"], self._core(adapter)
    r, taps = u.shape[1], s.shape[:-2]
    s = s.reshape(*taps, s.shape[-2] // r, r, s.shape[-1] // r, r)
    delta = jnp.einsum("ip,...apbq,qj->...aibj", u, s, v).reshape(w.shape)
    return {**flat, f"{path}/kernel": w + (self.scale * delta).astype(w.dtype)}


def _uniform(rng, shape, bound):
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)
