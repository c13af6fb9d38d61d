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
_CLASSIFIER_SVDIFF = dict(head=r"head/.*")  # SV-Diff (a U-Net method in the paper): shifts + a trained head

PRESETS: dict[str, dict[str, dict]] = {
    "vit": {
        "lora": dict(targets=r".*attn/(query|value)", rank=16, alpha=16),
        "dora": dict(targets=r".*attn/(query|value)", rank=16, alpha=16),
        "adaptformer": dict(bottleneck=6, scale=0.1),
        "ssf": dict(after=r"(.*/)?(query|key|value|out|fc1|fc2|norm\d?)"),
        "vpt": dict(num_tokens=10),
        "svdiff": _CLASSIFIER_SVDIFF,
    },
    "resnet": {
        "tsa": dict(targets=r"layer\d/block\d+/conv\d"),
        "ssf": _CNN_SSF,
        "lora": dict(targets=r"layer\d/block\d+/conv\d", rank=8),
        "dora": dict(targets=r"layer\d/block\d+/conv\d", rank=8),
        "svdiff": _CLASSIFIER_SVDIFF,
    },
    "mobilenet_v2": {
        "tsa": dict(targets=r".*(expand|project|final)_conv"),  # the pointwise convs
        "ssf": _CNN_SSF,
        "lora": dict(targets=r".*(stem|expand|project|final)_conv", rank=8),  # never the depthwise ones
        "dora": dict(targets=r".*(stem|expand|project|final)_conv", rank=8),
        "svdiff": _CLASSIFIER_SVDIFF,
    },
}


# The paper's text-to-image strategies on the Stable Diffusion U-Net (text encoder and VAE frozen; no
# head). Counts at SD v1.5 shapes, ours vs the paper's: bias 343,684 (0.34M: every bias, GroupNorm and
# LayerNorm ones included), norm 200,320 (0.2M), LoRA r4 on attn1/attn2 to_q/k/v/out 797,184 (0.8M),
# attention 267,239,360 (every parameter under `attentions_*`), DiffFit 481,284 (paper 0.58M, which is
# ours plus the 100,160 norm biases counted a second time, once under "bias" and once under "norm"),
# SV-Diff 222,696 (0.22M: one shift per singular value of every dense and conv kernel).
UNET_PRESETS: dict[str, dict] = {
    "full": dict(head=None),
    "attention": dict(targets=r"(.*/)?attentions_\d+/.*", head=None),
    "bias": dict(include_norm_bias=True, head=None),
    "norm": dict(head=None),
    "bias_norm_attention": dict(),
    "lora": dict(targets=r".*/attn[12]/(to_q|to_k|to_v|to_out_0)", rank=4, alpha=4, head=None),
    "svdiff": dict(),
    "difffit": dict(),
}


def unet_method(method_name: str, **overrides) -> peft.Method:
  """One of the paper's U-Net strategies (UNET_PRESETS) with optional overrides."""
  if method_name not in UNET_PRESETS:
    raise ValueError(f"Unknown U-Net strategy {method_name!r}; known: {sorted(UNET_PRESETS)}.")
  return peft.get_method(method_name, **{**UNET_PRESETS[method_name], **overrides})


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
