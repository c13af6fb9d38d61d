"""Torch-free loading of a diffusers-format Stable Diffusion folder (`runwayml/stable-diffusion-v1-5` layout).

  unet/{config.json, diffusion_pytorch_model.safetensors}    vae/{same}
  text_encoder/{config.json, model.safetensors}               tokenizer/{vocab.json, merges.txt, ...}
  scheduler/scheduler_config.json
(`.bin` PyTorch pickles are read too, by our restricted unpickler.) Each component is built from its
own `config.json`, so tiny test pipelines and other SD 1.x/2.x variants load the same way. Renaming
is one rule — list indices join their module name (`down_blocks.0` -> `down_blocks_0`), `weight`
becomes `kernel` (convs OIHW -> HWIO, linears transposed), `scale` or `embedding` by what the Flax
module holds — and every tensor is accounted for in a `LoadReport`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medpeft_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from medpeft_jax.models.unet import UNet2DConditionModel, UNetConfig
from medpeft_jax.models.vae import AutoencoderKL, VAEConfig
from medpeft_jax.models.weights.loader import CheckpointMismatchError, LoadReport
from medpeft_jax.models.weights.readers import read_file

HUB_NAME = "stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/stable-diffusion-v1-5)"
_IGNORED = re.compile(r"(text_model\.)?embeddings\.position_ids")  # a buffer some transformers versions saved
# Pre-0.14 diffusers VAE attention names.
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How to build one diffusers component (a subfolder such as `unet/`) and where its weights are."""

  config_cls: Any
  model_cls: Any
  weight_files: tuple[str, ...]
  dummy_inputs: Callable  # config -> inputs for `init`, to read parameter shapes (any valid size)


def _unet_inputs(c: UNetConfig):
  side = 2 ** len(c.block_out_channels)
  return (jnp.zeros((1, side, side, c.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, c.cross_attention_dim)))


def _vae_inputs(c: VAEConfig):
  side = 2 ** len(c.block_out_channels)
  return (jnp.zeros((1, side, side, c.in_channels)),)


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
COMPONENTS = {
    "unet": ComponentSpec(UNetConfig, UNet2DConditionModel, _DIFFUSERS_WEIGHTS, _unet_inputs),
    "vae": ComponentSpec(VAEConfig, AutoencoderKL, _DIFFUSERS_WEIGHTS, _vae_inputs),
    "text_encoder": ComponentSpec(CLIPTextConfig, CLIPTextModel, ("model.safetensors", "pytorch_model.bin"),
                                  lambda c: (jnp.zeros((1, c.max_position_embeddings), jnp.int32),)),
}


def flax_path(key: str) -> str:
  """diffusers/transformers key -> our '/'-joined path (before the weight -> kernel/scale rename)."""
  parts = key.removeprefix("text_model.").split(".")
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(_LEGACY.get(p, p) if out and out[-1].startswith("attentions_") else p)
  return "/".join(out)


def _convert(value: np.ndarray, leaf: str, want: tuple) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 4 and len(want) == 2:  # a 1x1 conv stored where we use a linear
      value = value[:, :, 0, 0]
    if value.ndim == 2 and len(want) == 4:  # a linear stored where we use a 1x1 conv
      value = value[:, :, None, None]
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def convert_state(state: dict[str, np.ndarray], shapes: dict[str, Any], report: LoadReport) -> dict[str, np.ndarray]:
  """Renames and converts a PyTorch state dict onto `shapes` ({path: ShapeDtypeStruct}), filling `report`."""
  values = {}
  for key, value in state.items():
    if _IGNORED.fullmatch(key):
      report.ignored.append(key)
      continue
    stem, _, leaf = flax_path(key).rpartition("/")
    names = ("bias",) if leaf == "bias" else ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
    target = next((f"{stem}/{n}" for n in names if f"{stem}/{n}" in shapes), None)
    if target is None:
      report.unexpected.append(key)
      continue
    want = shapes[target].shape
    converted = _convert(np.asarray(value), target.rpartition("/")[2], want)
    if converted.shape != tuple(want):
      report.mismatched.append((target, tuple(converted.shape), tuple(want)))
      continue
    values[target] = converted.astype(shapes[target].dtype)
    report.loaded.append(target)
  report.missing.extend(p for p in shapes if p not in values)
  return values


def missing_error(folder: pathlib.Path, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"No {what} in {folder}. Download the diffusers-format pipeline {HUB_NAME} (unet/, vae/, "
      "text_encoder/, tokenizer/, scheduler/; e.g. `huggingface-cli download` on a machine with network) "
      "and pass its folder. Nothing is fetched at run time.")


def load_component(folder: str | os.PathLike, name: str, *, dtype=jnp.float32, strict: bool = True,
                   **model_kwargs) -> tuple[nn.Module, dict, LoadReport]:
  """Builds `name` ("unet", "vae", "text_encoder") from `folder/name/config.json` and loads its weights.

  Returns `(model, params, report)`; params are float32 jax arrays (`dtype` is the compute dtype).
  """
  if name not in COMPONENTS:
    raise ValueError(f"Unknown component {name!r}; known: {sorted(COMPONENTS)}.")
  spec, root = COMPONENTS[name], pathlib.Path(folder) / name
  if not (root / "config.json").is_file():
    raise missing_error(pathlib.Path(folder), f"{name}/config.json")
  config = spec.config_cls.from_dict(json.loads((root / "config.json").read_text()))
  file = next((root / f for f in spec.weight_files if (root / f).is_file()), None)
  if file is None:
    raise missing_error(pathlib.Path(folder), f"{name} weights ({' or '.join(spec.weight_files)})")
  model = spec.model_cls(config, dtype=dtype, **model_kwargs)
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), *spec.dummy_inputs(config))["params"], sep="/")
  report = LoadReport(str(file), "diffusers")
  values = convert_state(read_file(file), shapes, report)
  if strict and not report.ok:
    raise CheckpointMismatchError(report)
  if report.missing:  # non-strict: the missing leaves keep a fresh initialisation
    fresh = traverse_util.flatten_dict(
        jax.jit(model.init)(jax.random.key(0), *spec.dummy_inputs(config))["params"], sep="/")
    values.update({p: fresh[p] for p in report.missing})
  params = traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in values.items()}, sep="/")
  return model, params, report


@functools.cache
def _tokenizer(path: str):
  from transformers import CLIPTokenizer  # import lazily: a few seconds, only generation needs it
  return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(folder: str | os.PathLike):
  """transformers' `CLIPTokenizer` from `folder/tokenizer` (local files only)."""
  path = pathlib.Path(folder) / "tokenizer"
  if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
    raise missing_error(pathlib.Path(folder), "tokenizer/vocab.json and tokenizer/merges.txt")
  return _tokenizer(str(path))


def tokenize(tokenizer, prompts: list[str], length: int = 77) -> np.ndarray:
  """Token ids padded/truncated to `length`, as the SD pipeline does (int32, (len(prompts), length))."""
  out = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)
