"""Exports a U-Net LoRA adapter in diffusers' naming, loadable by other tools without us.

Writes `pytorch_lora_weights.safetensors` with keys `unet.<diffusers module>.lora_A.weight` (r, in)
and `.lora_B.weight` (out, r) — the layout `StableDiffusionPipeline.load_lora_weights` and
`UNet2DConditionModel.load_lora_adapter(..., prefix="unet")` read. diffusers assumes alpha = rank
there, so our scale alpha/r (or alpha/sqrt(r)) is folded into B: the exported update is exact.
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
from safetensors.numpy import save_file

from medpeft_jax.peft.lora import DoRA, LoRA

FILE = "pytorch_lora_weights.safetensors"
# Our "<list attribute>_<index>" path components, back to diffusers' "<list attribute>.<index>".
_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|"
                    r"to_out|net|layers)_(\d+)$")


def diffusers_module(path: str) -> str:
  """`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0` -> `down_blocks.0.attentions.1...to_out.0`."""
  return ".".join(_LISTS.sub(r"\1.\2", part) for part in path.split("/"))


def export_unet_lora(method: LoRA, peft: dict, out: str | os.PathLike) -> pathlib.Path:
  if not isinstance(method, LoRA) or isinstance(method, DoRA):
    raise TypeError(f"Only plain LoRA adapters export to diffusers' format (got {method.name}).")
  if method.init_weights != "default":  # PiSSA's update is s·(A·B - A0·B0): not one A·B pair
    raise TypeError(f"A LoRA with init_weights={method.init_weights!r} does not export to diffusers' format: its "
                    "update subtracts the principal factors A0·B0 from the frozen base. Merge it instead "
                    "(launch.export).")
  tensors = {}
  for module, adapter in peft["adapters"].items():
    a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
    if a.ndim != 2:
      raise ValueError(f"{module}: only linear LoRA layers export (A has shape {a.shape}).")
    key = f"unet.{diffusers_module(module)}"
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray((method.scale * b).T)
  if peft["params"]:
    raise ValueError(f"The adapter also trains base leaves ({sorted(peft['params'])[:3]}...), which "
                     "diffusers' LoRA format cannot hold.")
  folder = pathlib.Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / FILE))
  return folder / FILE
