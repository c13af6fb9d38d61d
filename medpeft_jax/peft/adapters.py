"""Adapter files: what a method trains, plus BatchNorm statistics, beside a small JSON config.

  save_adapter(dir, method, peft, batch_stats, base_model="vit_b16")  ->  bytes written
  adapter = load_adapter(dir)            # Adapter(method, peft, batch_stats, config)
  bank = AdapterBank(model, variables); bank.add("ham", adapter); bank.apply("ham", images)

A directory holds `adapter_model.safetensors` (flat '/'-joined names under `params/`, `adapters/`
and `batch_stats/`) and `adapter_config.json` (method name, hyperparameters, base model, free
metadata) — the shape of a Hugging Face PEFT adapter folder. BatchNorm statistics are saved because
a method that trains with batch statistics changes them (cf. Hugging Face PEFT issue #1732).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from medpeft_jax.peft.core import Method, flatten, get_method, unflatten

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Adapter:
  method: Method
  peft: Any
  batch_stats: Any | None
  config: dict


def save_adapter(directory: str | os.PathLike, method: Method, peft, batch_stats=None, *,
                 base_model: str, **metadata) -> int:
  """Writes the adapter; returns the size of the weights file in bytes."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {f"params/{k}": v for k, v in peft["params"].items()}
  tensors.update({f"adapters/{k}": v for k, v in flatten(peft["adapters"]).items()})
  if batch_stats:
    tensors.update({f"batch_stats/{k}": v for k, v in flatten(batch_stats).items()})
  tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in tensors.items()}
  config = {"format_version": FORMAT_VERSION, "method": method.name,
            "hyperparameters": dataclasses.asdict(method), "base_model": base_model, **metadata}
  # Write to temporary names, then rename: a crash never leaves a half-written adapter behind.
  tmp_weights, tmp_config = directory / f".{WEIGHTS}.tmp", directory / f".{CONFIG}.tmp"
  safetensors.numpy.save_file(tensors, tmp_weights)
  tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  tmp_weights.replace(directory / WEIGHTS)
  tmp_config.replace(directory / CONFIG)
  return (directory / WEIGHTS).stat().st_size


def load_adapter(directory: str | os.PathLike) -> Adapter:
  directory = pathlib.Path(directory)
  if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
    raise FileNotFoundError(f"{directory} is not an adapter folder: expected {CONFIG} and {WEIGHTS}.")
  config = json.loads((directory / CONFIG).read_text())
  if config.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{directory}: unsupported adapter format {config.get('format_version')!r}.")
  method = get_method(config["method"], **config["hyperparameters"])
  peft: dict[str, dict] = {"params": {}, "adapters": {}}
  batch_stats = {}
  for name, value in safetensors.numpy.load_file(directory / WEIGHTS).items():
    section, path = name.split("/", 1)
    value = jax.numpy.asarray(value)
    if section == "params":
      peft["params"][path] = value
    elif section == "adapters":  # `{module path}/{leaf}`; leaf names have no '/'
      module, leaf = path.rsplit("/", 1)
      peft["adapters"].setdefault(module, {})[leaf] = value
    else:
      batch_stats[path] = value
  return Adapter(method, peft, unflatten(batch_stats) if batch_stats else None, config)


class AdapterBank:
  """Several adapters on one frozen base model, switched by name."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables
    self.adapters: dict[str, Adapter] = {}

  def add(self, name: str, adapter: Adapter | str | os.PathLike) -> None:
    self.adapters[name] = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)

  def variables_for(self, name: str):
    adapter = self._get(name)
    if adapter.batch_stats is None:
      return self.variables
    return {**self.variables, "batch_stats": adapter.batch_stats}

  def apply(self, name: str, *inputs, **kwargs):
    adapter = self._get(name)
    return adapter.method.apply(self.model, self.variables_for(name), adapter.peft, *inputs, **kwargs)

  def _get(self, name: str) -> Adapter:
    if name not in self.adapters:
      raise KeyError(f"No adapter {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}.")
    return self.adapters[name]
