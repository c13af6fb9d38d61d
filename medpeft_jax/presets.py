"""Policy in one home: method settings per model family, learning rates, run variants, tiny test models.

`medpeft_jax.peft` knows nothing about models; this module joins the two. The paper's settings are
inferred from its parameter counts (../shared/reference/paper_protocol.md):
  ViT: LoRA r16 (alpha 16) on query/value; AdaptFormer bottleneck 6, s = 0.1; SSF after every dense
       layer and LayerNorm; BitFit on the dense/conv biases (LayerNorm biases excluded).
  ResNet: TSA on the main-path convs of layer1-4; SSF after every BatchNorm; bias = BN betas.
  MobileNetV2: TSA and LoRA on the dense (non-grouped) convs.
  Stable Diffusion U-Net (family "unet"): the paper's 8 text-to-image strategies, no head.
A method not in its family's table runs with the method's own defaults; a family in `CLOSED_FAMILIES`
accepts only the methods of its table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from medpeft_jax import models, peft
from medpeft_jax.registry import UnknownNameError

_CNN_SSF = dict(after=r"(.*/)?([a-z]+_)?bn\d?")  # after every BatchNorm
_CLASSIFIER_SVDIFF = dict(head=r"head/.*")  # SV-Diff (a U-Net method in the paper): shifts + a trained head

# Counts at SD v1.5 shapes, ours vs the paper's (tests/test_unet_peft.py): bias 343,684 (0.34M: every
# bias, GroupNorm and LayerNorm ones included), norm 200,320 (0.2M), LoRA r4 on attn1/attn2
# to_q/k/v/out 797,184 (0.8M), attention 267,239,360 (every parameter under `attentions_*`), DiffFit
# 481,284 (paper 0.58M, which is ours plus the 100,160 norm biases counted a second time, once under
# "bias" and once under "norm"), SV-Diff 222,696 (0.22M: one shift per singular value of every kernel).
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
    "unet": {
        "full": dict(head=None),
        "attention": dict(targets=r"(.*/)?attentions_\d+/.*", head=None),
        "bias": dict(include_norm_bias=True, head=None),
        "norm": dict(head=None),
        "bias_norm_attention": dict(),
        "lora": dict(targets=r".*/attn[12]/(to_q|to_k|to_v|to_out_0)", rank=4, alpha=4, head=None),
        "svdiff": dict(),
        "difffit": dict(),
    },
}
CLOSED_FAMILIES = frozenset({"unet"})  # the paper's strategies only
UNET = "stable_diffusion_unet"  # the registered name of the Stable Diffusion v1.5 U-Net

# Run variants: names a sweep uses for a method run differently. "scratch" = full training from a
# random initialisation (the config's `init="random"`), not a method of its own.
VARIANTS: dict[str, dict] = {"scratch": dict(method="full", init="random")}

# Learning rates. Classification: PEFT prefers ~10x higher than full fine-tuning (the paper tuned them
# per method). Text-to-image: the paper's constant 1e-5 full, 1e-4 PEFT; SV-Diff's shifts take the
# authors' own 1e-3 (Han et al. 2023): a shift moves one singular value, a far smaller step per unit.
DEFAULT_LR = {"classification": ({"full": 1e-4, "scratch": 1e-3}, 1e-3), "t2i": ({"full": 1e-5, "svdiff": 1e-3}, 1e-4)}
# The search grids of a sweep (per method; "default" for the rest), on validation.
LR_GRIDS = {"full": (3e-5, 1e-4, 3e-4), "scratch": (3e-4, 1e-3, 3e-3), "linear": (1e-3, 3e-3, 1e-2),
            "default": (3e-4, 1e-3, 3e-3)}

# Tiny versions of each family for CPU tests and smoke runs (32 px inputs).
TINY_MODELS: dict[str, dict] = {
    "vit": dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4),
    "resnet": dict(width=8, stage_sizes=(1, 1, 1, 1)),
    "mobilenet_v2": dict(width_mult=0.25),
}


def variant(name: str) -> dict:
  """`{"method": ..., "init": ...}` for a sweep's method name (a registered method, or a variant)."""
  return dict(VARIANTS.get(name, dict(method=name, init="pretrained")))


def variant_name(method: str, init: str = "pretrained") -> str:
  """The inverse of `variant`: "scratch" for ("full", "random"), else the method's own name."""
  return next((name for name, v in VARIANTS.items() if v == dict(method=method, init=init)), method)


def default_lr(name: str, task: str = "classification") -> float:
  """The default learning rate of a method or variant name (see `variant_name`) for `task`."""
  table, fallback = DEFAULT_LR[task]
  return table.get(name, fallback)


def lr_grid(method: str) -> tuple[float, ...]:
  return tuple(LR_GRIDS.get(method, LR_GRIDS["default"]))


def preset(model_name: str, method_name: str) -> dict:
  """The default hyperparameters of `method_name` on `model_name` (empty: the method's own defaults)."""
  peft.METHODS.get(method_name)  # unknown method names fail here, listing the valid ones
  family = models.get_spec(model_name).family
  table = PRESETS.get(family, {})
  if family in CLOSED_FAMILIES and method_name not in table:
    raise UnknownNameError(f"{model_name} takes the strategies {', '.join(sorted(table))}; "
                           f"{method_name!r} is not one of them.")
  return dict(table.get(method_name, {}))


def build_method(model_name: str, method_name: str, **overrides) -> peft.Method:
  """The method with its preset for the model's family, then `overrides` (every lookup fails alike)."""
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
