"""The paper's method settings per architecture family, and parameter counts at full size.

`medpeft_jax.peft` knows nothing about models; this module joins the two. The settings are inferred
from the paper's parameter counts (../shared/reference/paper_protocol.md):
  ViT: LoRA r16 (alpha 16) on query/value; AdaptFormer bottleneck 6, s = 0.1; SSF after every dense
       layer and LayerNorm; BitFit on the dense/conv biases (LayerNorm biases excluded).
  ResNet: TSA on the main-path convs of layer1-4; SSF after every BatchNorm; bias = BN betas.
  MobileNetV2: TSA and LoRA on the dense (non-grouped) convs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from medpeft_jax import models, peft

_CNN_SSF = dict(after=r"(.*/)?([a-z]+_)?bn\d?")  # after every BatchNorm

PRESETS: dict[str, dict[str, dict]] = {
    "vit": {
        "lora": dict(targets=r".*attn/(query|value)", rank=16, alpha=16),
        "dora": dict(targets=r".*attn/(query|value)", rank=16, alpha=16),
        "adaptformer": dict(bottleneck=6, scale=0.1),
        "ssf": dict(after=r"(.*/)?(query|key|value|out|fc1|fc2|norm\d?)"),
        "vpt": dict(num_tokens=10),
    },
    "resnet": {
        "tsa": dict(targets=r"layer\d/block\d+/conv\d"),
        "ssf": _CNN_SSF,
        "lora": dict(targets=r"layer\d/block\d+/conv\d", rank=8),
        "dora": dict(targets=r"layer\d/block\d+/conv\d", rank=8),
    },
    "mobilenet_v2": {
        "tsa": dict(targets=r".*(expand|project|final)_conv"),  # the pointwise convs
        "ssf": _CNN_SSF,
        "lora": dict(targets=r".*(stem|expand|project|final)_conv", rank=8),  # never the depthwise ones
        "dora": dict(targets=r".*(stem|expand|project|final)_conv", rank=8),
    },
}


# Tiny versions of each family for CPU tests and smoke runs (32 px inputs).
TINY_MODELS: dict[str, dict] = {
    "vit": dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4),
    "resnet": dict(width=8, stage_sizes=(1, 1, 1, 1)),
    "mobilenet_v2": dict(width_mult=0.25),
}


def preset(model_name: str, method_name: str) -> dict:
  """The default hyperparameters of `method_name` on `model_name` (empty: the method's defaults)."""
  peft.METHODS.get(method_name)  # unknown method names fail here, listing the valid ones
  return dict(PRESETS.get(models.get_spec(model_name).family, {}).get(method_name, {}))


def build_method(model_name: str, method_name: str, **overrides) -> peft.Method:
  return peft.get_method(method_name, **{**preset(model_name, method_name), **overrides})


def count_parameters(model_name: str, method: peft.Method, num_classes: int,
                     image_size: int | None = None, **model_overrides) -> peft.ParamCount:
  """Trainable and total parameters at the model's full-size shapes (`jax.eval_shape`, no weights)."""
  spec = models.get_spec(model_name)
  model = spec.build(num_classes=num_classes, **model_overrides)
  size = image_size or spec.image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  rng = jax.random.key(0)
  params = jax.eval_shape(functools.partial(model.init, train=False), rng, x)["params"]
  return method.count(params, jax.eval_shape(method.init, rng, params))
