"""The model zoo: Flax linen classifiers registered by name, and torch-free weight import.

  model = create_model("vit_b16", num_classes=7)
  model, variables, report = load_pretrained("vit_b16", "/ckpt/vit-base-patch16-224-in21k", num_classes=7)

Every model maps NHWC float images to float32 logits (pooled features when `num_classes == 0`),
takes `train=` (BatchNorm models need `mutable=["batch_stats"]` when training) and a compute `dtype`
(e.g. `jnp.bfloat16`; parameters stay float32). Parameter paths are documented in each module.
"""

from medpeft_jax.models.weights.loader import CheckpointMismatchError, LoadReport, load_pretrained
from medpeft_jax.models.zoo import (
  MODELS,
  ROLE_NAMES,
  ModelSpec,
  classifiers,
  create_model,
  get_spec,
  imagenet_classes,
  register_model,
)

__all__ = ["MODELS", "ROLE_NAMES", "CheckpointMismatchError", "classifiers", "LoadReport", "ModelSpec", "create_model", "get_spec",
           "imagenet_classes", "load_pretrained", "register_model"]
