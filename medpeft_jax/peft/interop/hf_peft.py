"""Imports Hugging Face PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors/.bin).

The adapter's module names are mapped to ours through the same layouts as the base checkpoints
(`keymaps`), and its factors converted: linear lora_A (r, in) -> A (in, r), lora_B (out, r) -> B (r, out);
conv lora_A (r, in, kh, kw) -> A (kh, kw, in, r), lora_B (out, r, 1, 1) -> B (r, out).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from medpeft_jax.models.weights.keymaps import LAYOUTS
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.models.zoo import get_spec
from medpeft_jax.peft.lora import LoRA

_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _our_module(family: str, module: str, shape) -> str | None:
  """Our module path for a source module, through the first layout that knows its weight name."""
  for layout in LAYOUTS[family]:
    out, unexpected, _ = layout.convert({f"{module}.weight": np.zeros(shape, np.float32)})
    if not unexpected and len(out) == 1:
      (path,) = out
      return path.removeprefix("params/").removesuffix("/kernel")
  return None


def load_hf_peft_lora(path: str | os.PathLike, model_name: str):
  """Returns `(LoRA method, peft params)` for one of our models; the base model loads separately."""
  folder = pathlib.Path(path)
  config = json.loads((folder / "adapter_config.json").read_text())
  if config.get("peft_type") != "LORA" or config.get("use_dora"):
    raise ValueError(f"{folder} is not a plain LoRA adapter (peft_type={config.get('peft_type')}, "
                     f"use_dora={config.get('use_dora')}).")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise ValueError(f"{folder}: per-module ranks/alphas (rank_pattern/alpha_pattern) are not supported.")
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key, value in read_checkpoint(folder).tensors.items():
    m = _LORA_KEY.fullmatch(key)
    if m:
      factors.setdefault(m[1], {})[m[2]] = value
  if not factors:
    raise ValueError(f"{folder} holds no lora_A/lora_B weights.")
  family = get_spec(model_name).family
  adapters = {}
  for module, f in factors.items():
    a, b = f["A"], f["B"]
    weight_shape = (b.shape[0], *a.shape[1:])
    ours = _our_module(family, module, weight_shape)
    if ours is None:
      raise ValueError(f"LoRA module {module!r} maps to no {model_name} parameter.")
    if a.ndim == 4:
      a, b = a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
    else:
      a, b = a.T, b.T
    adapters[ours] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  method = LoRA(targets="|".join(re.escape(p) for p in sorted(adapters)), rank=int(config["r"]),
                alpha=float(config["lora_alpha"]), rslora=bool(config.get("use_rslora", False)), head=None)
  return method, {"params": {}, "adapters": adapters}
