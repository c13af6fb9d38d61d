"""OFT (Qiu et al. 2023): a learned block-diagonal orthogonal rotation R of each target's input features.

  y = op(x·R),  R = diag(R_1, ..., R_n), R_i = Cayley(Q_i), Q_i skew-symmetric (block × block)
Only the upper triangles of the Q_i train (zero at init: R = I, the base model). The Cayley transform
is Hugging Face PEFT's default Neumann series I + 2Q + 2Q² + 2Q³ + Q⁴ (`cayley_neumann_terms=5`; 0 for
the exact (I - Q)(I + Q)⁻¹). Training rotates the activations (a block-diagonal matmul), never a
kernel; `merge` folds W' = R·W exactly, which keeps the angles between a layer's filters (OFT's point).
A conv's input channels are rotated at every pixel, so one R acts on each tap: W'[t] = R·W[t]. For
1x1 convs that is HF's OFT; for larger kernels HF rotates the flattened kh·kw·in patch instead, so
those do not convert. The block size is adjusted to the nearest divisor of the layer's input width,
as HF does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from medpeft_jax.peft.core import AdapterCall, Flat, Method, register
from medpeft_jax.peft.lora import _kernel, kernel_modules


def fitted_block_size(width: int, block_size: int) -> int:
  """The divisor of `width` nearest `block_size` (the lower one on ties), as HF's adjust_oft_parameters."""
  if block_size >= width:
    return width
  higher = next(b for b in range(block_size, width + 1) if width % b == 0)
  lower = next(b for b in range(block_size, 0, -1) if width % b == 0 or b == 1)
  return lower if block_size - lower <= higher - block_size else higher


def cayley(q, neumann_terms: int = 0):
  """The rotations (I - Q)(I + Q)⁻¹ of skew-symmetric blocks q (..., b, b), or with `neumann_terms` > 0
  Hugging Face OFT's series for them, I + 2Q + 2Q² + ... + Q^(terms-1), term for term."""
  eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
  if neumann_terms == 0:  # X (I + Q) = I - Q
    solved = jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2))
    return jnp.swapaxes(solved, -1, -2)
  r = eye
  if neumann_terms > 1:
    r = r + 2 * q
  if neumann_terms > 2:
    power = q @ q
    r = r + 2 * power
    for _ in range(3, neumann_terms - 1):
      power = power @ q
      r = r + 2 * power
    r = r + power @ q
  return r


def rotate_blocks(x, r):
  """x·diag(R_1, ..., R_n) over x's last axis, for blocks r (n, b, b)."""
  n, b, _ = r.shape
  return jnp.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], n, b), r.astype(x.dtype)).reshape(x.shape)


def checked_inputs(call: AdapterCall, width: int, method: str):
  """The call's inputs, which a rotation of `width` features must match (a grouped conv's do not)."""
  x = call.inputs
  if x.shape[-1] != width:
    raise ValueError(f"{method} target {call.path!r} takes {x.shape[-1]} input features but its kernel has "
                     f"{width} (a grouped convolution); exclude it from the targets regex.")
  return x


@register("oft")
@dataclasses.dataclass(frozen=True)
class OFT(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  block_size: int = 32
  cayley_neumann_terms: int = 5  # 0: the exact Cayley transform

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    width = _kernel(flat, module).shape[-2]
    b = fitted_block_size(width, self.block_size)
    return {"skew": jnp.zeros((width // b, b * (b - 1) // 2), jnp.float32)}

  def rotation(self, skew):
    """The blocks R_i, (n, b, b), of upper triangles `skew` (n, b(b-1)/2); x·R_i rotates a block."""
    b = round((1 + math.sqrt(1 + 8 * skew.shape[-1])) / 2)
    rows, cols = np.triu_indices(b, 1)
    q = jnp.zeros((skew.shape[0], b, b), skew.dtype).at[:, rows, cols].set(skew)
    return cayley(q - jnp.swapaxes(q, -1, -2), self.cayley_neumann_terms)

  def call_adapter(self, adapter, call: AdapterCall):
    r = self.rotation(adapter["skew"])
    rotated = rotate_blocks(checked_inputs(call, r.shape[0] * r.shape[1], "OFT"), r)
    return call.next_fun(rotated, *call.args[1:], **call.kwargs)

  def fold_adapter(self, flat, path, adapter):
    w, r = flat[f"{path}/kernel"], self.rotation(adapter["skew"])
    n, b, _ = r.shape
    blocks = w.reshape(*w.shape[:-2], n, b, w.shape[-1])
    rotated = jnp.einsum("nkc,...nco->...nko", r, blocks)
    return {**flat, f"{path}/kernel": rotated.reshape(w.shape).astype(w.dtype)}
