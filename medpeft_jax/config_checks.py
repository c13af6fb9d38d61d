"""Up-front checks of run configs, and the "unset" values of the sweep config's pre-populated sections.

  check_classify(config)   # configs/classify.py; before anything is built or written
  check_t2i(config)        # configs/t2i.py

Each failure is one ConfigError (a ValueError) naming `config.<field>`, the bad value and the valid
values: a typo must not silently change what runs (a `bn_mode` typo used to freeze BatchNorm,
`grad_clip=0` to stop training).

Sweep configs (configs/bench.py) list every registered model, dataset and method under `weights`,
`manual_dirs`, `lr` and `dataset_options`, so that each entry is settable from the command line; ""
and 0.0 and a dataset's default options there mean "not set". Read them with `fixed_lr` and
`dataset_options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import ml_collections
from ml_collections import config_dict

from medpeft_jax import data, models, peft, plugins, presets

BN_MODES = ("train", "frozen")
DTYPES = ("float32", "bfloat16")
INITS = ("pretrained", "random")
ON_BAD_IMAGE = ("error", "skip")
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


class ConfigError(ValueError):
  """A config field outside its valid values."""


def _one_of(config, field: str, valid: Iterable[str]) -> None:
  valid = list(valid)
  if field in config and config[field] not in valid:
    raise ConfigError(f"config.{field}={config[field]!r} is not valid; valid values: {', '.join(valid)}.")


def _within(config, field: str, ok: Callable[[float], bool], expected: str, why: str = "") -> None:
  if field not in config:
    return
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
    why = f"; {why}" if why else ""
    raise ConfigError(f"config.{field}={value!r} is out of range: expected {expected}{why}.")


def _check_common(config) -> None:
  plugins.load(config.get("plugins", ""))  # what they register is valid
  _one_of(config, "dataset", data.DATASETS.names())
  _one_of(config, "dtype", DTYPES)
  _within(config, "regime", lambda v: 0 < v <= 1, "a fraction in (0, 1]")
  _within(config, "grad_clip", lambda v: v > 0, "a positive global-norm bound",
          "grad_clip=0 clips every gradient to zero (nothing trains) and a negative bound flips them; use a "
          "positive value (1.0 is usual)")
  _within(config, "batch_size", lambda v: v >= 1, "an integer >= 1")
  _within(config, "lr", lambda v: v >= 0, ">= 0 (0: the method's default learning rate)")
  _within(config, "weight_decay", lambda v: v >= 0, ">= 0")
  for field in ("log_every", "checkpoint_every"):  # the loop acts when step % every == 0
    _within(config, field, lambda v: v >= 1, "a number of steps >= 1")
  _within(config, "eval_every", lambda v: v >= 0, "a number of steps >= 0 (0: every epoch)")
  _within(config, "keep_checkpoints", lambda v: v >= 1, "an integer >= 1")
  for axis in ("data", "fsdp"):
    if "mesh" in config and axis in config.mesh and not (config.mesh[axis] == -1 or config.mesh[axis] >= 1):
      raise ConfigError(f"config.mesh.{axis}={config.mesh[axis]!r} is out of range: expected -1 (all the "
                        "remaining devices) or a device count >= 1.")
  options = config.get("dataset_options") or {}
  if "on_bad_image" in options and options["on_bad_image"] not in ON_BAD_IMAGE:
    raise ConfigError(f"config.dataset_options.on_bad_image={options['on_bad_image']!r} is not valid; valid "
                      f"values: {', '.join(ON_BAD_IMAGE)}.")
  if "max_side" in options and not options["max_side"] >= 1:
    raise ConfigError(f"config.dataset_options.max_side={options['max_side']!r} is out of range: expected a "
                      "number of pixels >= 1.")


def check_classify(config: ml_collections.ConfigDict) -> None:
  """Validates a classification config (configs/classify.py) before anything is built."""
  _check_common(config)
  _one_of(config, "model", models.classifiers())
  _one_of(config, "method", [*peft.METHODS.names(), *presets.VARIANTS])
  _one_of(config, "bn_mode", BN_MODES)
  _one_of(config, "init", INITS)
  _within(config, "eval_batch_size", lambda v: v >= 0, "an integer >= 0 (0: batch_size)")
  _within(config, "patience", lambda v: v >= 0, "a number of evaluations >= 0 (0: no early stopping)")
  _within(config, "grad_accum", lambda v: v >= 1 and config.batch_size % v == 0,
          f"an integer >= 1 that divides batch_size={config.get('batch_size')}")
  _within(config, "total_steps", lambda v: v >= 0, "an integer >= 0 (0: use epochs)")
  _within(config, "min_steps", lambda v: v >= 0, "an integer >= 0 (a floor on epochs x steps per epoch)")
  if config.get("total_steps", 0) <= 0:
    _within(config, "epochs", lambda v: v >= 1, "an integer >= 1 (or set total_steps > 0)")
  _within(config, "warmup_fraction", lambda v: 0 <= v < 1, "a fraction in [0, 1)")
  _within(config, "label_smoothing", lambda v: 0 <= v < 1, "a fraction in [0, 1)")
  _within(config, "image_size", lambda v: v >= 0, "a number of pixels >= 0 (0: the model's own size)")
  _within(config, "workers", lambda v: v >= 0, "an integer >= 0")
  _within(config, "cache_images_mb", lambda v: v >= 0, "a size in MiB >= 0 (0: no cache)")


def check_t2i(config: ml_collections.ConfigDict) -> None:
  """Validates a text-to-image config (configs/t2i.py) before anything is built."""
  _check_common(config)
  _one_of(config, "method", peft.METHODS.names())  # the paper's 8 strategies, or any method by the U-Net's roles
  _within(config, "total_steps", lambda v: v >= 1, "an integer >= 1")
  _within(config, "image_size", lambda v: v >= 8 and v % 8 == 0,
          "a positive multiple of 8 (the VAE downsamples by 8)")
  _within(config, "ema_decay", lambda v: 0 <= v < 1, "a decay in [0, 1) (0: no EMA)")
  _within(config, "min_snr_gamma", lambda v: v >= 0, ">= 0 (0: no min-SNR weighting)")
  _within(config, "probe_size", lambda v: v >= 1, "an integer >= 1")


def dataset_options_section(dataset: str) -> ml_collections.ConfigDict:
  """`dataset`'s build options (see ImageConfig) at their defaults, each settable from the command line.

  A None default (e.g. near_duplicates) becomes a typed placeholder: None until set.
  """
  base = data.DATASETS.get(dataset).BUILDER_CONFIGS[0]
  section = {}
  for field in dataclasses.fields(base):
    if field.name in data._OPTIONS:  # noqa: SLF001  (the data package's list of user-set options)
      value = getattr(base, field.name)
      section[field.name] = (value if value is not None else
                             config_dict.placeholder(_TYPES[str(field.type).split("|")[0].strip()]))
  return ml_collections.ConfigDict(section)


def set_options(dataset: str, options) -> dict:
  """The entries of a dataset-options section that differ from the dataset's defaults (what data.load takes)."""
  base = data.DATASETS.get(dataset).BUILDER_CONFIGS[0]
  return {k: v for k, v in dict(options or {}).items() if not hasattr(base, k) or getattr(base, k) != v}


def dataset_options(bench, dataset: str) -> dict:
  """The options of `bench.dataset_options.<dataset>` that differ from the dataset's defaults."""
  return set_options(dataset, bench.dataset_options.get(dataset))


def fixed_lr(bench, method: str) -> float | None:
  """The learning rate `bench.lr.<method>` fixes, or None (0.0, the default: search or use the default)."""
  value = bench.lr.get(method) or 0.0
  if value < 0:
    raise ConfigError(f"config.lr.{method}={value!r} is out of range: expected a learning rate > 0, or 0 to "
                      "search.")
  return float(value) or None
