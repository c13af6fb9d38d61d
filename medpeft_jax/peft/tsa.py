"""TSA (Li et al. CVPR 2022): parallel 1x1 conv adapters beside convolutions, zero-initialised.

y = conv(x, W) + conv1x1(x, α), the 1x1 conv with W's stride. It reads the input pixel under one tap
of W — the centre of an odd kernel padded (k-1)/2 each side (every 3x3/pad-1 and 1x1/pad-0 conv
here), the first of an unpadded even kernel (a patchify conv: ConvNeXt's 4x4/4 stem, 2x2/2
downsampling) — so `merge` adds α to that tap, exactly; `apply` refuses any other padding. A dense
layer is a 1x1 conv (ConvNeXt writes its pointwise convs so): y = x·W + x·α, merged as W + α.
The paper's ResNet-50 setting puts one on every main-path conv of layer1-4 (not the shortcuts): 10.6M.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


def _tap(k: int) -> int:
  """The kernel tap a 1x1 conv with the same stride reads: the centre (odd k) or the first (even k)."""
  return k // 2 if k % 2 else 0


def _checked_strides(module, path) -> tuple[int, ...]:
  """The conv's strides, after checking that a 1x1 conv with them reads the pixel under `_tap`."""
  kernel = tuple(module.kernel_size)
  strides = module.strides or 1
  strides = (strides,) * len(kernel) if isinstance(strides, int) else tuple(strides)
  pad = module.padding
  if pad == "SAME" and set(strides) == {1}:
    low = [(k - 1) // 2 for k in kernel]
  elif pad == "VALID":
    low = [0] * len(kernel)
  elif isinstance(pad, int):
    low = [pad] * len(kernel)
  elif isinstance(pad, str):
    low = None  # strided SAME pads by input size: not centred in general
  else:
    low = [p if isinstance(p, int) else p[0] for p in pad]
  groups = getattr(module, "feature_group_count", 1)
  if low is None or groups != 1 or any(lo != _tap(k) for k, lo in zip(kernel, low)):
    raise ValueError(f"TSA target {path!r} is not a dense conv whose 1x1 adapter reads one kernel tap "
                     f"(kernel {kernel}, padding {pad}, groups {groups}): expected an odd kernel padded "
                     "(k-1)/2 or an unpadded even one; exclude it from the targets regex.")
  return strides


@register("tsa")
@dataclasses.dataclass(frozen=True)
class TSA(Method):
  ROLE_DEFAULTS = {"targets": "{conv}"}
  targets: str = r"layer\d/block\d+/conv\d"  # ResNet main-path convs (a model's `conv` role replaces it)

  def adapter_modules(self, flat: Flat) -> list[str]:
    modules = select(module_paths(flat), self.targets, f"{self.name} targets")
    for m in modules:
      if flat.get(f"{m}/kernel") is None or flat[f"{m}/kernel"].ndim not in (2, 4):
        raise ValueError(f"TSA target {m!r} is neither a 2-D convolution nor a dense layer.")
    return modules

  def init_adapter(self, rng, module: str, flat: Flat):
    cin, cout = flat[f"{module}/kernel"].shape[-2:]
    return {"alpha": jnp.zeros((cin, cout), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    x = call.inputs
    if hasattr(call.module, "kernel_size"):
      sh, sw = _checked_strides(call.module, call.path)
      x = x[:, ::sh, ::sw, :]
    return y + x.astype(y.dtype) @ adapter["alpha"].astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    tap = tuple(_tap(k) for k in w.shape[:-2])
    return {**flat, f"{path}/kernel": w.at[tap].add(adapter["alpha"].astype(w.dtype))}
