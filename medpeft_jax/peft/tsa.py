"""TSA (Li et al. CVPR 2022): parallel 1x1 conv adapters beside convolutions, zero-initialised.

y = conv(x, W) + conv1x1(x, α), the 1x1 conv with W's stride. It reads the input pixel under W's
centre tap, so `merge` adds α to that tap — exact when W's padding centres the kernel ((k-1)/2 on
each side, as every 3x3/pad-1 and 1x1/pad-0 conv here; otherwise `apply` refuses the target). The
paper's ResNet-50 setting puts one on every main-path conv of layer1-4 (not the shortcuts): 10.6M.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


def _centred_strides(module, path) -> tuple[int, ...]:
  """The conv's strides, after checking that a 1x1 conv with them reads its centre tap's pixel."""
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
  if low is None or groups != 1 or any(k % 2 == 0 or lo != (k - 1) // 2 for k, lo in zip(kernel, low)):
    raise ValueError(f"TSA target {path!r} is not a dense conv with a centred kernel (kernel {kernel}, "
                     f"padding {pad}, groups {groups}); exclude it from the targets regex.")
  return strides


@register("tsa")
@dataclasses.dataclass(frozen=True)
class TSA(Method):
  targets: str = r"layer\d/block\d+/conv\d"  # ResNet main-path convs; see medpeft_jax.presets

  def adapter_modules(self, flat: Flat) -> list[str]:
    modules = select(module_paths(flat), self.targets, f"{self.name} targets")
    for m in modules:
      if flat.get(f"{m}/kernel") is None or flat[f"{m}/kernel"].ndim != 4:
        raise ValueError(f"TSA target {m!r} is not a 2-D convolution.")
    return modules

  def init_adapter(self, rng, module: str, flat: Flat):
    _, _, cin, cout = flat[f"{module}/kernel"].shape
    return {"alpha": jnp.zeros((cin, cout), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    sh, sw = _centred_strides(call.module, call.path)
    y = call.original()
    x = call.inputs[:, ::sh, ::sw, :]
    return y + x.astype(y.dtype) @ adapter["alpha"].astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    kh, kw = w.shape[0] // 2, w.shape[1] // 2
    return {**flat, f"{path}/kernel": w.at[kh, kw].add(adapter["alpha"].astype(w.dtype))}
