"""PEFT methods as pure transforms of Flax parameter pytrees (see core.py for the contract).

  method = peft.get_method("lora", targets=r".*attn/(query|value)", rank=16)
  trainable = method.init(rng, variables["params"])
  logits = method.apply(model, variables, trainable, images, train=False)
  merged_params = method.merge(variables["params"], trainable)
"""

import importlib
import pkgutil

from medpeft_jax.peft.adapters import (
  Adapter,
  AdapterBank,
  AdapterMismatchError,
  NonFiniteAdapterError,
  check_adapter,
  load_adapter,
  save_adapter,
)
from medpeft_jax.peft.core import METHODS, AdapterCall, MergeError, Method, ParamCount, get_method

# Every module of this package but the core, the adapter files, several-adapter tools and the converters is a
# method file that registers itself: a new method is its file (plus its test), with no list to edit here.
for _module in pkgutil.iter_modules(__path__):
  if _module.name not in ("core", "adapters", "multi", "arithmetic", "interop"):
    importlib.import_module(f"{__name__}.{_module.name}")

from medpeft_jax.peft.arithmetic import COMBINATIONS, combine, combine_adapters, compose
from medpeft_jax.peft.multi import AdapterStack, apply_mixed, mixed_forward, stack_adapters

__all__ = ["COMBINATIONS", "METHODS", "Adapter", "AdapterBank", "AdapterCall", "AdapterMismatchError",
           "AdapterStack", "MergeError", "Method", "NonFiniteAdapterError", "ParamCount", "apply_mixed",
           "check_adapter", "combine", "combine_adapters", "compose", "get_method", "load_adapter",
           "mixed_forward", "save_adapter", "stack_adapters"]
