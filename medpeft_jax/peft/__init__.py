"""PEFT methods as pure transforms of Flax parameter pytrees (see core.py for the contract).

  method = peft.get_method("lora", targets=r".*attn/(query|value)", rank=16)
  trainable = method.init(rng, variables["params"])
  logits = method.apply(model, variables, trainable, images, train=False)
  merged_params = method.merge(variables["params"], trainable)
"""

from medpeft_jax.peft import adaptformer, difffit, lora, selective, ssf, svdiff, tsa, vpt  # noqa: F401  (register)
from medpeft_jax.peft.adapters import Adapter, AdapterBank, load_adapter, save_adapter
from medpeft_jax.peft.core import METHODS, MergeError, Method, ParamCount, get_method

__all__ = ["METHODS", "Adapter", "AdapterBank", "MergeError", "Method", "ParamCount", "get_method",
           "load_adapter", "save_adapter"]
