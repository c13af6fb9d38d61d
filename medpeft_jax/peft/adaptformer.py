"""AdaptFormer (Chen et al. 2022): a bottleneck beside each ViT MLP block.

MLP'(x) = MLP(x) + s·up(ReLU(down(x))), x being the block's normalised input, so the layer computes
x + MLP(LN(x)) + s·up(ReLU(down(LN(x)))). down is kaiming-uniform, up is zero (identity at init).
The ReLU makes it unfoldable: `merge` raises, adapters save and load as files.
The paper's counts (ViT-B/L/H 0.1M/0.3M/0.5M) imply a bottleneck of 6 (medpeft_jax.presets);
AdaptFormer's own default is 64.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from medpeft_jax.peft.core import AdapterCall, Flat, Method, module_paths, register, select


def input_width(flat: Flat, module: str) -> int:
  """Input features of a block: the first dimension of its first kernel (in natural order)."""
  kernels = sorted(p for p in flat if p.startswith(module + "/") and p.endswith("/kernel"))
  if not kernels:
    raise ValueError(f"Cannot tell the width of {module!r}: it has no kernels.")
  return flat[kernels[0]].shape[0]


@register("adaptformer")
@dataclasses.dataclass(frozen=True)
class AdaptFormer(Method):
  ROLE_DEFAULTS = {"targets": "{mlp_block}"}
  targets: str = r"(.*/)?mlp"  # the ViT MLP blocks (MlpBlock modules)
  bottleneck: int = 64
  scale: float = 0.1

  def adapter_modules(self, flat: Flat) -> list[str]:
    return select(module_paths(flat, enclosing=True), self.targets, f"{self.name} targets")

  def init_adapter(self, rng, module: str, flat: Flat):
    d = input_width(flat, module)
    bound = 1 / math.sqrt(d)
    return {"down": jax.random.uniform(rng, (d, self.bottleneck), jnp.float32, -bound, bound),
            "down_bias": jnp.zeros((self.bottleneck,), jnp.float32),
            "up": jnp.zeros((self.bottleneck, d), jnp.float32),
            "up_bias": jnp.zeros((d,), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    x = call.inputs
    y = call.original()
    c = lambda n: adapter[n].astype(y.dtype)
    h = jax.nn.relu(x @ c("down") + c("down_bias"))
    return y + self.scale * (h @ c("up") + c("up_bias"))
