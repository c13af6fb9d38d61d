"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"): OFT whose
rotation is a product of m block-diagonal rotations interleaved with butterfly permutations, plus a learned
scale per output.

  y = op(x·M)·s + bias·(1 - s),  M = M_{m-1}···M_0,  M_i = P_i·diag(R_i1, ..., R_in)·P_iᵀ
OFT's block-diagonal R mixes features only inside a block of b; the butterfly permutations P_i (P_0 = I)
regroup the features between factors, so m factors of b×b blocks mix them across b·2^(m-1) (all of them
with m = log2(n) + 1), as the FFT's butterfly does: the reach of blocks of b·2^(m-1) for m·n·b² parameters,
not n·b²·2^(m-1). The scale s gives back the per-filter magnitude a pure rotation keeps fixed.
Hugging Face PEFT's parametrisation, tensor for tensor: each block trains as a full b×b matrix A (zero at
init) through the exact Cayley transform of its skew part, R = (I - Q)(I + Q)⁻¹ with Q = (A - Aᵀ)/2, and s
starts at 1 (the base model); A's symmetric half is inert, but HF counts it and so do we. Training rotates
the activations (permutations and block matmuls, never a kernel) and scales the bias-free output; `merge`
folds W' = (M·W)·s exactly, leaving the bias alone (as HF). m = 1 is OFT with the exact Cayley and s.
A conv's input channels are rotated at every pixel, so M acts on each tap; HF rotates the flattened
kh·kw·in patch instead, so only 1x1 convs convert. Grouped convs are refused.
Blocks (HF's rules): m > 1 needs even blocks with b·2^(m-1) dividing the input width. `block_num`, when set,
gives width / block_num blocks and refuses widths that do not fit, as HF; `block_size` is adjusted to the
nearest size that fits (as OFT does; HF's BOFT refuses instead, so such an adapter does not export).
Without its CUDA extension (any CPU) HF's BOFT silently drops to one butterfly factor; ours has none.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, register
from medpeft_jax.peft.lora import _kernel, kernel_modules
from medpeft_jax.peft.oft import cayley, checked_inputs, fitted_block_size, rotate_blocks


def butterfly(x, blocks: int, half: int, inverse: bool = False):
  """x[..., perm] for HF's `block_butterfly_perm` (in each of `blocks` groups of features, the chunks of
  `half` features in even-then-odd order), or x[..., argsort(perm)] with `inverse`: a reshape and a
  transpose, whose gradient is one too (a gather's would be a scatter). A group holds an even number of
  chunks (b·2^i features in chunks of b/2)."""
  pairs = x.shape[-1] // (blocks * 2 * half)
  grouped = (blocks, 2, pairs, half) if inverse else (blocks, pairs, 2, half)
  return jnp.swapaxes(x.reshape(*x.shape[:-1], *grouped), -3, -2).reshape(x.shape)


@register("boft")
@dataclasses.dataclass(frozen=True)
class BOFT(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  block_size: int = 4
  block_num: int = 0  # when set, the number of blocks per layer instead of `block_size` (HF's boft_block_num)
  n_butterfly_factor: int = 2  # m; 1 is OFT (exact Cayley) with the output scale

  def __post_init__(self):
    if self.n_butterfly_factor < 1 or self.block_num < 0 or (self.block_size < 1 and not self.block_num):
      raise ValueError(f"BOFT needs n_butterfly_factor >= 1 and block_size >= 1 (or block_num >= 1); got "
                       f"n_butterfly_factor={self.n_butterfly_factor}, block_size={self.block_size}, "
                       f"block_num={self.block_num}.")

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def block_size_for(self, width: int, module: str) -> int:
    """The block size of a target with `width` input features (see the module docstring's rules)."""
    m = self.n_butterfly_factor
    if self.block_num:
      b = width // self.block_num if width % self.block_num == 0 else 0
    elif m == 1:
      return fitted_block_size(width, self.block_size)
    else:  # b = 2c with c·2^m dividing the width
      b = 2 * fitted_block_size(width >> m, max(self.block_size // 2, 1)) if width % 2 ** m == 0 else 0
    if b and (m == 1 or (b % 2 == 0 and width % (b * 2 ** (m - 1)) == 0)):
      return b
    split = f"block_num={self.block_num}" if self.block_num else f"any block size near {self.block_size}"
    raise ValueError(f"BOFT target {module!r} has {width} input features, which {split} cannot split into "
                     f"{m} butterfly factor(s) (blocks of size b{', even,' if m > 1 else ''} with "
                     f"b·2^{m - 1} dividing the width). Exclude it from the targets regex, lower "
                     "n_butterfly_factor, or choose a block_size/block_num that fits it.")

  def init_adapter(self, rng, module: str, flat: Flat):
    del rng
    kernel = _kernel(flat, module)
    width = kernel.shape[-2]
    b = self.block_size_for(width, module)
    return {"r": jnp.zeros((self.n_butterfly_factor, width // b, b, b), jnp.float32),
            "s": jnp.ones((kernel.shape[-1],), jnp.float32)}

  def rotate(self, r, x):
    """x·M for the factors' blocks r (m, n, b, b): x·M_{m-1} first, each factor permuted in and out."""
    m, n, b, _ = r.shape
    blocks = cayley(0.5 * (r - jnp.swapaxes(r, -1, -2)))
    for i in reversed(range(m)):  # P_0 = I
      x = butterfly(x, n >> i, b // 2, inverse=True) if i else x  # x·P_i
      x = rotate_blocks(x, blocks[i])
      x = butterfly(x, n >> i, b // 2) if i else x  # ·P_iᵀ
    return x

  def call_adapter(self, adapter, call: AdapterCall):
    r, s = adapter["r"], adapter["s"]
    x = self.rotate(r, checked_inputs(call, r.shape[1] * r.shape[2], "BOFT"))
    y = call.next_fun(x, *call.args[1:], **call.kwargs)
    bias = call.base.get(f"{call.path}/bias")  # HF scales the bias-free output: y·s + b·(1 - s)
    return y * s.astype(y.dtype) + (0 if bias is None else (bias * (1 - s)).astype(y.dtype))

  def fold_adapter(self, flat, path, adapter):
    w, r = flat[f"{path}/kernel"], adapter["r"]
    rotation = self.rotate(r, jnp.eye(w.shape[-2], dtype=r.dtype))  # the rows of I·M
    folded = jnp.einsum("ij,...jo->...io", rotation, w) * adapter["s"]
    return {**flat, f"{path}/kernel": folded.astype(w.dtype)}
