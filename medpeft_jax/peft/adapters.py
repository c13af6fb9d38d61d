"""Adapter files: what a method trains, plus BatchNorm statistics, beside a small JSON config.

  save_adapter(dir, method, trainable, batch_stats, base_model="vit_b16", class_names=[...],
               preprocessing={"image_size": 224, "mean": [...], "std": [...]})  ->  bytes written
  adapter = load_adapter(dir)  # Adapter(method, trainable, batch_stats, config), .class_names, .preprocessing
  check_adapter(adapter, base_model="vit_b16", class_names=builder_classes)   # mismatch: AdapterMismatchError
  bank = AdapterBank(model, variables); bank.add("ham", adapter); bank.apply("ham", images)
  bank.apply_mixed(["ham", "isic", "ham"], images)   # one adapter per example, one compiled forward

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
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from medpeft_jax.fileio import CorruptFileError, read_json, read_safetensors
from medpeft_jax.peft.core import Method, flatten, get_method, unflatten

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FORMAT_VERSION = 1
SECTIONS = ("params", "adapters", "batch_stats")
PREPROCESSING_KEYS = ("image_size", "mean", "std")
_RESAVE = "re-save the adapter from its training run (or copy the folder again)"


class NonFiniteAdapterError(ValueError):
  """An adapter holding NaN or infinite weights: the run that saved it diverged."""


class AdapterMismatchError(ValueError):
  """An adapter applied to another base model or to data with other classes than it was trained for."""


@dataclasses.dataclass
class Adapter:
  method: Method
  trainable: Any  # what the method trains: {"params": ..., "adapters": ...}
  batch_stats: Any | None
  config: dict
  path: str | None = None  # the folder it was loaded from

  @property
  def base_model(self) -> str | None:
    return self.config.get("base_model")

  @property
  def class_names(self) -> tuple[str, ...] | None:
    """The classes of the head's outputs, in order; None for adapters saved without them."""
    names = self.config.get("class_names")
    return None if names is None else tuple(names)

  @property
  def preprocessing(self) -> dict | None:
    """{"image_size", "mean", "std"} the adapter was trained with; None when not recorded."""
    return self.config.get("preprocessing")

  @property
  def num_classes(self) -> int | None:
    if self.class_names is not None:
      return len(self.class_names)
    kernel = self.trainable["params"].get("head/kernel")
    return None if kernel is None else int(kernel.shape[-1])

  def __str__(self) -> str:
    return self.path or f"{self.method.name} adapter"

  def save(self, directory: str | os.PathLike) -> int:
    """`save_adapter` with this adapter's own metadata (e.g. one made by `peft.combine_adapters`)."""
    meta = {k: v for k, v in self.config.items() if k not in ("format_version", "method", "hyperparameters")}
    if "base_model" not in meta:
      raise ValueError(f"Adapter {self} has no base_model in its config; use save_adapter(..., base_model=).")
    return save_adapter(directory, self.method, self.trainable, self.batch_stats,
                        base_model=meta.pop("base_model"), class_names=meta.pop("class_names", None),
                        preprocessing=meta.pop("preprocessing", None), **meta)


def _check_finite(tensors: dict[str, np.ndarray], source: str, advice: str) -> None:
  for name, value in tensors.items():
    if value.dtype.kind == "V":  # ml_dtypes' bfloat16 and float8 types
      value = value.astype(np.float32)
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      kind = "NaN" if np.isnan(value).any() else "infinite"
      bad = np.count_nonzero(~np.isfinite(value))
      raise NonFiniteAdapterError(f"{source}: tensor {name} holds {kind} weights ({bad} of {value.size} "
                                  f"values); {advice}")


def save_adapter(directory: str | os.PathLike, method: Method, trainable, batch_stats=None, *,
                 base_model: str, class_names: Sequence[str] | None = None,
                 preprocessing: dict | None = None, **metadata) -> int:
  """Writes the adapter; returns the size of the weights file in bytes.

  `class_names` (the head's outputs, in order) and `preprocessing` ({"image_size", "mean", "std"}) are
  stored so that evaluation and export can check them against the data (`check_adapter`). Non-finite
  weights are refused before anything is written.
  """
  directory = pathlib.Path(directory)
  tensors = {f"params/{k}": v for k, v in trainable["params"].items()}
  tensors.update({f"adapters/{k}": v for k, v in flatten(trainable["adapters"]).items()})
  if batch_stats:
    tensors.update({f"batch_stats/{k}": v for k, v in flatten(batch_stats).items()})
  tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in tensors.items()}
  _check_finite(tensors, f"Not saving the adapter to {directory}",
                "the run diverged; retrain with a lower learning rate.")
  config = {"format_version": FORMAT_VERSION, "method": method.name,
            "hyperparameters": dataclasses.asdict(method), "base_model": base_model, **metadata}
  if class_names is not None:
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
      raise TypeError(f"save_adapter: class_names must be a list of str, not {class_names!r}.")
    config["class_names"] = list(class_names)
  if preprocessing is not None:
    if set(preprocessing) != set(PREPROCESSING_KEYS):
      raise ValueError(f"save_adapter: preprocessing must have exactly the keys {list(PREPROCESSING_KEYS)}, "
                       f"not {sorted(preprocessing)}.")
    config["preprocessing"] = {"image_size": int(preprocessing["image_size"]),
                               "mean": [float(x) for x in np.ravel(preprocessing["mean"])],
                               "std": [float(x) for x in np.ravel(preprocessing["std"])]}
  directory.mkdir(parents=True, exist_ok=True)
  # Write to temporary names, then rename: a crash never leaves a half-written adapter behind.
  tmp_weights, tmp_config = directory / f".{WEIGHTS}.tmp", directory / f".{CONFIG}.tmp"
  safetensors.numpy.save_file(tensors, tmp_weights)
  tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  tmp_weights.replace(directory / WEIGHTS)
  tmp_config.replace(directory / CONFIG)
  return (directory / WEIGHTS).stat().st_size


def load_adapter(directory: str | os.PathLike) -> Adapter:
  """Reads an adapter folder; truncated, garbled or non-finite files are errors naming the file."""
  directory = pathlib.Path(directory)
  if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
    raise FileNotFoundError(f"{directory} is not an adapter folder: expected {CONFIG} and {WEIGHTS}.")
  config = read_json(directory / CONFIG, _RESAVE)
  if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
    version = config.get("format_version") if isinstance(config, dict) else None
    raise ValueError(f"{directory / CONFIG}: unsupported adapter format {version!r} (expected "
                     f"format_version {FORMAT_VERSION}); {_RESAVE}.")
  missing = [k for k in ("method", "hyperparameters", "base_model") if k not in config]
  if missing:
    raise CorruptFileError(f"{directory / CONFIG} lacks {missing}; {_RESAVE}.")
  method = get_method(config["method"], **config["hyperparameters"])
  tensors = read_safetensors(directory / WEIGHTS, _RESAVE)
  _check_finite(tensors, str(directory / WEIGHTS), "this adapter was saved from a diverged run; retrain with "
                "a lower learning rate.")
  trainable: dict[str, dict] = {"params": {}, "adapters": {}}
  batch_stats = {}
  for name, value in tensors.items():
    section, _, path = name.partition("/")
    if section not in SECTIONS or not path or (section == "adapters" and "/" not in path):
      raise CorruptFileError(f"{directory / WEIGHTS}: tensor {name!r} is not under one of "
                             f"{', '.join(s + '/' for s in SECTIONS)} (adapters/ as "
                             "adapters/<module>/<leaf>); "
                             f"the file was not written by save_adapter: {_RESAVE}.")
    value = jax.numpy.asarray(value)
    if section == "params":
      trainable["params"][path] = value
    elif section == "adapters":  # `{module path}/{leaf}`; leaf names have no '/'
      module, leaf = path.rsplit("/", 1)
      trainable["adapters"].setdefault(module, {})[leaf] = value
    else:
      batch_stats[path] = value
  return Adapter(method, trainable, unflatten(batch_stats) if batch_stats else None, config, str(directory))


def check_adapter(adapter: Adapter, *, base_model: str | None = None, class_names: Sequence[str] | None = None
                  ) -> None:
  """Refuses to apply `adapter` to another base model or to data with other classes, naming both sides.

  Adapters saved without class names are checked by their head's size only.
  """
  if base_model is not None and adapter.base_model is not None and adapter.base_model != base_model:
    raise AdapterMismatchError(f"Adapter {adapter} was trained on base model {adapter.base_model!r} but is "
                               f"applied to {base_model!r}; use the base model it was trained on.")
  if class_names is None:
    return
  data = [str(c) for c in class_names]
  if adapter.class_names is not None and list(adapter.class_names) != data:
    order = " (the same classes in another order)" if sorted(adapter.class_names) == sorted(data) else ""
    trained = list(adapter.class_names)
    raise AdapterMismatchError(f"Adapter {adapter} was trained on classes {trained} but the data has "
                               f"{data}{order}; evaluate it on data with the same classes.")
  if adapter.class_names is None and adapter.num_classes is not None and adapter.num_classes != len(data):
    raise AdapterMismatchError(f"Adapter {adapter} has a {adapter.num_classes}-class head but the data has "
                               f"{len(data)} classes {data}; evaluate it on data with the same classes.")


class AdapterBank:
  """Several adapters on one frozen base model, switched by name, or mixed within a batch (`apply_mixed`)."""

  def __init__(self, model, variables):
    self.model, self.variables = model, variables
    self.adapters: dict[str, Adapter] = {}
    self._stack = None
    self._forwards: dict = {}

  def add(self, name: str, adapter: Adapter | str | os.PathLike) -> None:
    self.adapters[name] = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    self._stack = None

  def apply_mixed(self, names: Sequence[str], *inputs, **kwargs):
    """Example i runs with adapter `names[i]`, in one jitted forward over all the bank's adapters (stacked
    once: they must share one method and one head size; `medpeft_jax.peft.multi`). Other mixes reuse it."""
    from medpeft_jax.peft import multi  # here: multi builds on this module

    if self._stack is None:
      self._stack = multi.stack_adapters(self.adapters, self.variables)
    key = tuple(sorted(kwargs.items()))
    if key not in self._forwards:
      self._forwards[key] = multi.mixed_forward(self.model, **kwargs)
    return self._forwards[key](self.variables, self._stack, self._stack.index(names), *inputs)

  def variables_for(self, name: str):
    adapter = self._get(name)
    if adapter.batch_stats is None:
      return self.variables
    return {**self.variables, "batch_stats": adapter.batch_stats}

  def apply(self, name: str, *inputs, **kwargs):
    adapter = self._get(name)
    return adapter.method.apply(self.model, self.variables_for(name), adapter.trainable, *inputs, **kwargs)

  def _get(self, name: str) -> Adapter:
    if name not in self.adapters:
      raise KeyError(f"No adapter {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}.")
    return self.adapters[name]
