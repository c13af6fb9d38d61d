"""LoRA (Hu et al. 2022) and DoRA (Liu et al. 2024) on dense and convolution kernels.

Dense kernel W (in, out):       y = x·W + s·(x·A)·B,            A (in, r), B (r, out)
Conv kernel W (kh, kw, in, out): y = conv(x, W) + s·conv(x, A)·B, A (kh, kw, in, r) with W's stride
                                 and padding, B (r, out) a 1x1 conv — as Hugging Face PEFT.
s = alpha / r (or alpha / sqrt(r) with rsLoRA). A ~ U(±1/sqrt(fan_in)), B = 0, so training starts
at the base model. `merge` folds W + s·A·B (for convs, into every tap: einsum over the rank).
A target that selects a grouped (depthwise) conv is an error, as in Hugging Face PEFT.

PiSSA (Meng et al. 2024; `init_weights="pissa"`, HF `init_lora_weights="pissa"`): A0·B0 = the kernel's top-r
singular triplets / s (the kernel reshaped to (kh·kw·in, out)), and A, B start there. HF moves them out
of the base (W_res = W - s·A0·B0); our base is frozen and shared, so A0, B0 are the method's derived
state and the adapter runs y = x·W + s·(x·A·B - x·A0·B0): the same function, exactly the base at
init, and `merge` folds W + s·(A·B - A0·B0). OLoRA (Büyükakyüz 2024; `init_weights="olora"`, HF
`init_lora_weights="olora"`) is the same with HF's A0, B0: the first r rows of R and columns of Q in
the QR decomposition of the (out, kh·kw·in) weight, unscaled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, Params, flatten, module_paths, register, select


def _kernel(flat: Flat, module: str):
  if f"{module}/kernel" not in flat:
    raise ValueError(f"LoRA target {module!r} has no kernel; target dense or convolution modules.")
  return flat[f"{module}/kernel"]


def kernel_modules(flat: Flat, targets: str, what: str) -> list[str]:
  """The modules `targets` selects, each checked to have a (dense or conv) kernel."""
  modules = select(module_paths(flat), targets, what)
  for m in modules:
    _kernel(flat, m)
  return modules


def _down(module, a, x):
  """x·A for a dense module, conv(x, A) with the module's own stride/padding for a conv."""
  if a.ndim == 2:
    return x @ a.astype(x.dtype)
  groups = getattr(module, "feature_group_count", 1)
  if groups != 1:
    raise ValueError(f"Adapter target {'/'.join(module.path)!r} is a grouped convolution "
                     f"(feature_group_count={groups}); these are not supported (as in Hugging Face PEFT). "
                     "Exclude it from the targets regex.")
  down = module.clone(parent=None, features=a.shape[-1], use_bias=False)
  return down.apply({"params": {"kernel": a}}, x)


def _delta(a, b):
  """The dense-equivalent weight update A·B in the kernel's own layout."""
  return jnp.einsum("...ir,ro->...io", a, b)


@register("lora")
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  """Low-rank adapters on the dense/conv modules whose paths `targets` fully matches."""

  ROLE_DEFAULTS = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  rank: int = 8
  alpha: float | None = None  # None: alpha = rank (scale 1)
  rslora: bool = False
  init_weights: str = "default"  # or "pissa", "olora" (a field named `init` would hide Method.init)
  INITS: ClassVar[tuple[str, ...]] = ("default", "pissa", "olora")

  def __post_init__(self):
    if self.init_weights not in self.INITS:
      raise ValueError(f"{self.name} init_weights={self.init_weights!r}: expected one of {self.INITS}.")

  @property
  def scale(self) -> float:
    alpha = self.rank if self.alpha is None else self.alpha
    return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def adapter_modules(self, flat: Flat) -> list[str]:
    return select(module_paths(flat), self.targets, f"{self.name} targets")

  def _initial_factors(self, w):
    """A0 (.., in, r), B0 (r, out) the adapter starts from: PiSSA's s·A0·B0 = the rank-r truncated SVD of W;
    OLoRA's A0·B0 = (Q_r R_r)ᵀ from the QR of Wᵀ (HF's `olora_init`)."""
    mat = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
    if self.rank > min(mat.shape):
      raise ValueError(f"{self.init_weights} rank {self.rank} exceeds the rank bound {min(mat.shape)} of a kernel "
                       f"{w.shape}.")
    if self.init_weights == "olora":
      q, r = jnp.linalg.qr(mat.T)
      return r[:self.rank].T.reshape(*w.shape[:-1], self.rank), q[:, :self.rank].T
    u, sv, vt = jnp.linalg.svd(mat, full_matrices=False)
    root = jnp.sqrt(sv[:self.rank] / self.scale)
    return (u[:, :self.rank] * root).reshape(*w.shape[:-1], self.rank), root[:, None] * vt[:self.rank]

  def derived_state(self, params: Params) -> Flat:
    if self.init_weights == "default":
      return {}
    flat = flatten(params)
    out = {}
    for m in self.adapter_modules(flat):
      out[f"{m}/init_a0"], out[f"{m}/init_b0"] = self._initial_factors(_kernel(flat, m))
    return out

  def init_adapter(self, rng, module: str, flat: Flat):
    w = _kernel(flat, module)
    if self.init_weights != "default":
      return dict(zip("ab", self._initial_factors(w)))
    shape_in, out = w.shape[:-1], w.shape[-1]
    bound = 1 / math.sqrt(math.prod(shape_in))  # kaiming_uniform(a=sqrt(5)), as PEFT and nn.Linear
    a = jax.random.uniform(rng, (*shape_in, self.rank), jnp.float32, -bound, bound)
    return {"a": a, "b": jnp.zeros((self.rank, out), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    update = _down(call.module, adapter["a"], call.inputs) @ adapter["b"].astype(y.dtype)
    if self.init_weights != "default":
      a0, b0 = call.base[f"{call.path}/init_a0"], call.base[f"{call.path}/init_b0"]
      update = update - _down(call.module, a0, call.inputs) @ b0.astype(y.dtype)
    return y + (self.scale * update).astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    delta = _delta(adapter["a"], adapter["b"])
    if self.init_weights != "default":
      delta = delta - _delta(flat[f"{path}/init_a0"], flat[f"{path}/init_b0"])
    return {**flat, f"{path}/kernel": w + self.scale * delta.astype(w.dtype)}


@register("dora")
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """Weight-decomposed LoRA: W' = m · (W + s·A·B) / ||W + s·A·B||, norms per output feature.

  As in Hugging Face PEFT, the norm is treated as a constant in the backward pass (the paper's
  memory-saving choice), so no weight gradient of W is ever formed.
  """

  INITS: ClassVar[tuple[str, ...]] = ("default",)

  def init_adapter(self, rng, module, flat):
    adapter = super().init_adapter(rng, module, flat)
    return {**adapter, "m": _column_norm(_kernel(flat, module))}

  def _rescale(self, adapter, w):
    norm = _column_norm(w + self.scale * _delta(adapter["a"], adapter["b"]))
    return adapter["m"] / jax.lax.stop_gradient(norm)

  def call_adapter(self, adapter, call: AdapterCall):
    # (x·W + b)·r + s·(x·A·B)·r + b·(1 - r) = x·W'·r + b, r = m / ||W'||: no subtraction of b, so
    # at init (r = 1 up to an ulp, B = 0) the output is y up to rounding.
    y = call.original()
    r = self._rescale(adapter, call.base[f"{call.path}/kernel"]).astype(y.dtype)
    update = _down(call.module, adapter["a"], call.inputs) @ adapter["b"].astype(y.dtype)
    out = y * r + (self.scale * update).astype(y.dtype) * r
    bias = call.base.get(f"{call.path}/bias")
    return out + bias.astype(y.dtype) * (1 - r) if bias is not None else out

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    merged = (w + self.scale * _delta(adapter["a"], adapter["b"])) * self._rescale(adapter, w)
    return {**flat, f"{path}/kernel": merged.astype(w.dtype)}


def _column_norm(w):
  """L2 norm of each output feature's weights (all axes but the last)."""
  return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(w.ndim - 1))))
