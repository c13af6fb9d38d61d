"""Policy in one home: method settings per model family, learning rates, run variants, tiny test models.

`medpeft_jax.peft` knows nothing about models; this module joins the two. Which layers a method adapts
comes from the model: each model declares its roles (`models.ROLE_NAMES`: query/key/value projections,
MLPs, norms, main-path convs, ...) and each method's `ROLE_DEFAULTS` refer to roles, so a new method or a
new model family needs no entry here. `PRESETS` holds only the paper's hyperparameters, inferred from its
parameter counts (../shared/reference/paper_protocol.md):
  ViT: LoRA r16 (alpha 16) on query/value (the roles); AdaptFormer bottleneck 6, s = 0.1; SSF after every
       dense layer and LayerNorm (roles); BitFit on the dense/conv biases (LayerNorm biases excluded).
  ResNet: TSA on the main-path convs of layer1-4 (the `conv` role); SSF after every BatchNorm; bias = BN betas.
  CNNs: LoRA r8 on the `conv` role (MobileNetV2: every non-depthwise conv).
  Stable Diffusion U-Net (family "unet"): the paper's 8 text-to-image strategies, no head; a closed table.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from medpeft_jax import models, peft

_CNN_LORA = dict(rank=8)

# Counts at SD v1.5 shapes, ours vs the paper's (tests/test_unet_peft.py): bias 343,684 (0.34M: every
# bias, GroupNorm and LayerNorm ones included), norm 200,320 (0.2M), LoRA r4 on attn1/attn2
# to_q/k/v/out 797,184 (0.8M), attention 267,239,360 (every parameter under `attentions_*`), DiffFit
# 481,284 (paper 0.58M, which is ours plus the 100,160 norm biases counted a second time, once under
# "bias" and once under "norm"), SV-Diff 222,696 (0.22M: one shift per singular value of every kernel).
PRESETS: dict[str, dict[str, dict]] = {
    "vit": {
        "lora": dict(rank=16, alpha=16),
        "dora": dict(rank=16, alpha=16),
        "adaptformer": dict(bottleneck=6, scale=0.1),
        "vpt": dict(num_tokens=10),
    },
    "resnet": {"lora": _CNN_LORA, "dora": _CNN_LORA},
    "mobilenet_v2": {"lora": _CNN_LORA, "dora": _CNN_LORA},
    "unet": {
        "full": dict(head=None),
        "attention": dict(targets=r"(.*/)?attentions_\d+/.*", head=None),
        "bias": dict(include_norm_bias=True, head=None),
        "norm": dict(head=None),
        "bias_norm_attention": dict(),
        "lora": dict(targets=r".*/attn[12]/(to_q|to_k|to_v|to_out_0)", rank=4, alpha=4, head=None),
        "svdiff": dict(head=None),
        "difffit": dict(),
    },
}
EXACT_TABLES = frozenset({"unet"})  # the paper's strategies exactly (their counts are the paper's)
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
    "convnext": dict(depths=(1, 1), dims=(8, 16), kernel_size=3),
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


_ROLE = re.compile(r"\{([a-z_]+)\}")
_NOTHING = "(?!)"  # matches nothing: a role the model does not have


def role_defaults(model_name: str, method_name: str) -> dict[str, str]:
  """The method's `ROLE_DEFAULTS` templates filled in with the model's role regexes.

  A model that declares no roles keeps the method's own defaults. Alternatives naming only roles the
  model lacks are dropped, so the regexes stay readable in configs and records.
  """
  spec, cls = models.get_spec(model_name), peft.METHODS.get(method_name)
  if not spec.roles:
    return {}
  resolved = {}
  for field, template in cls.ROLE_DEFAULTS.items():
    used = _ROLE.findall(template)
    unknown = sorted(set(used) - set(models.ROLE_NAMES))
    if unknown:
      raise ValueError(f"PEFT method {method_name!r}: ROLE_DEFAULTS[{field!r}] = {template!r} names unknown "
                       f"role(s) {unknown}; roles are {', '.join(models.ROLE_NAMES)}.")
    if not any(role in spec.roles for role in used) and field not in cls.OPTIONAL_ROLE_FIELDS:
      raise ValueError(
          f"{method_name} on {model_name}: its `{field}` default adapts the model's "
          f"{' / '.join(used)} layers, and {model_name} declares none of them (its roles: "
          f"{', '.join(spec.roles) or 'none'}). Set the field (--config.peft.{field}=REGEX over module paths) "
          f"or declare the roles in the model's register_model(roles=...).")
    fill = lambda text: _ROLE.sub(lambda m: f"(?:{spec.roles[m[1]]})" if m[1] in spec.roles else _NOTHING, text)
    if "(" in template:  # alternatives inside groups: keep the structure, absent roles match nothing
      resolved[field] = fill(template)
    else:
      kept = [alt for alt in template.split("|") if all(role in spec.roles for role in _ROLE.findall(alt))]
      resolved[field] = "|".join(map(fill, kept)) or _NOTHING
  return resolved


def preset(model_name: str, method_name: str) -> dict:
  """The default hyperparameters of `method_name` on `model_name`: its role defaults, then the paper's.

  A family in EXACT_TABLES (the U-Net) takes its table's strategies exactly as the paper defines them;
  its other methods go by its roles. A model without a classification head trains none."""
  peft.METHODS.get(method_name)  # unknown method names fail here, listing the valid ones
  spec = models.get_spec(model_name)
  table = PRESETS.get(spec.family, {})
  if spec.family in EXACT_TABLES and method_name in table:
    return dict(table[method_name])
  out = {**role_defaults(model_name, method_name), **table.get(method_name, {})}
  return {**out, "head": None} if spec.task != "classification" else out


def config_fields(model_name: str, method_name: str) -> dict:
  """A config's `peft` section: every hyperparameter with a plain default, so each is settable from the
  command line (--config.peft.init_weights=pissa, --config.peft.deep=True), then the preset on the model."""
  plain = {f.name: f.default for f in dataclasses.fields(peft.METHODS.get(method_name))
           if isinstance(f.default, (bool, int, float, str))}
  return {**plain, **preset(model_name, method_name)}


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
