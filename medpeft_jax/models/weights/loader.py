"""Loads a checkpoint into a registered model's variables, with a report of what did not fit.

The checkpoint's layout is detected from its key names, its tensors are renamed and converted
(`keymaps`), and the result is compared with the model's own variable shapes (`jax.eval_shape`, so
nothing large is initialised for nothing):
  - the classification head is re-initialised when absent or shaped for another `num_classes`,
    and dropped when `num_classes == 0`;
  - a ViT position embedding trained at another resolution is resampled to the model's grid, as the
    model's `pos_interpolation` says its source does (e.g. DINOv2's 518-px grid, bicubically);
  - missing or shape-mismatched tensors anywhere else raise `CheckpointMismatchError` (`strict`), and so
    do converted weights the model has no place for (layer scale, registers, CLIP's pre-norm loaded
    into a plain ViT): dropping them would silently change the network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medpeft_jax.models.vit import resample_pos_embed
from medpeft_jax.models.weights.keymaps import detect_layout
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.models.zoo import ModelSpec, get_spec

_HEAD = re.compile(r"params/head/.*")
_POS_EMBED = "params/pos_embed"
# The model field a Hugging Face folder's `layer_norm_eps` sets, per family (ConvNeXt: only its final norm).
_CONFIG_EPS_FIELD = {"vit": "norm_eps", "convnext": "head_norm_eps"}


@dataclasses.dataclass
class LoadReport:
  source: str
  layout: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # (path, ckpt, model)
  reinitialized: list[str] = dataclasses.field(default_factory=list)  # the head, fresh
  resampled: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)  # source keys deliberately unused
  unplaced: list[str] = dataclasses.field(default_factory=list)  # converted, but the model has no such variable

  @property
  def ok(self) -> bool:
    return not (self.missing or self.mismatched or self.unplaced)

  def __str__(self) -> str:
    lines = [f"Loaded {len(self.loaded)} tensors from {self.source} ({self.layout} layout)."]
    for label, items in (("missing (left at init)", self.missing), ("unexpected (unused)", self.unexpected),
                         ("re-initialised", self.reinitialized), ("resampled", self.resampled),
                         ("ignored", self.ignored),
                         ("not in the model (another variant of it? see models.MODELS)", self.unplaced)):
      if items:
        lines.append(f"  {label}: {_summarise(items)}")
    for path, got, want in self.mismatched:
      lines.append(f"  shape mismatch: {path}: checkpoint {got} vs model {want}")
    return "\n".join(lines)


def _summarise(items, n=8):
  return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


class CheckpointMismatchError(ValueError):

  def __init__(self, report: LoadReport):
    super().__init__(f"The checkpoint does not fit the model:\n{report}")
    self.report = report


def _missing_path_error(spec: ModelSpec, path) -> FileNotFoundError:
  return FileNotFoundError(
      f"No checkpoint at {path}. For {spec.name}, download {spec.weights}, put it there (a file, or "
      "the downloaded folder), and pass its path. Nothing is fetched at run time.")


def _fresh_leaves(model: nn.Module, dummy, rng, paths: list[str]) -> dict[str, np.ndarray]:
  """Initialises only `paths`: jit prunes the initialisers of every other variable."""

  def init(rng):
    flat = traverse_util.flatten_dict(model.init(rng, dummy, train=False), sep="/")
    return {p: flat[p] for p in paths}

  return {p: np.asarray(v) for p, v in jax.jit(init)(rng).items()}


def load_pretrained(name: str, path: str | os.PathLike, *, num_classes: int, image_size: int | None = None,
                    rng: jax.Array | None = None, strict: bool = True, **overrides):
  """Builds model `name` and fills it from the checkpoint at `path` (a file or a download folder).

  Returns `(model, variables, report)`; `variables` holds `params` (and `batch_stats` for CNNs) as
  float32 numpy arrays (host memory; `jax.device_put` them where they belong). `image_size` sets the input resolution the variables are shaped for (the
  model's pre-training size by default). `overrides` set model fields such as `dtype`; a Hugging
  Face folder's `layer_norm_eps` is applied (`_CONFIG_EPS_FIELD`) unless that field is given.
  """
  spec = get_spec(name)
  if not pathlib.Path(path).exists():
    raise _missing_path_error(spec, path)
  ckpt = read_checkpoint(path)
  eps_field = _CONFIG_EPS_FIELD.get(spec.family)
  if eps_field and ckpt.config and "layer_norm_eps" in ckpt.config:
    overrides.setdefault(eps_field, ckpt.config["layer_norm_eps"])
  model = spec.build(num_classes=num_classes, **overrides)
  layout = detect_layout(spec.family, ckpt.tensors)
  converted, unexpected, ignored = layout.convert(ckpt.tensors)
  report = LoadReport(ckpt.files[0], layout.name, unexpected=unexpected, ignored=ignored)

  size = image_size or spec.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  rng = jax.random.key(0) if rng is None else rng
  template = traverse_util.flatten_dict(
      jax.eval_shape(functools.partial(model.init, train=False), rng, dummy), sep="/")

  values: dict[str, np.ndarray] = {}
  for p, want in template.items():
    got = converted.get(p)
    if got is None:
      (report.reinitialized if _HEAD.fullmatch(p) else report.missing).append(p)
    elif got.shape == want.shape:
      values[p] = got.astype(want.dtype)
      report.loaded.append(p)
    elif p == _POS_EMBED:
      values[p] = np.asarray(resample_pos_embed(jnp.asarray(got, jnp.float32), want.shape[1],
                                                model.num_pos_prefix, model.pos_interpolation))
      report.resampled.append(f"{p} {got.shape} -> {want.shape}")
      report.loaded.append(p)
    elif _HEAD.fullmatch(p):
      report.reinitialized.append(p)
    else:
      report.mismatched.append((p, got.shape, want.shape))
  for p in converted.keys() - template.keys():
    # A checkpoint head with no head in the model (num_classes == 0) is dropped on purpose.
    (report.ignored if _HEAD.fullmatch(p) else report.unplaced).append(p)

  if strict and not report.ok:
    raise CheckpointMismatchError(report)
  values.update(_fresh_leaves(model, dummy, rng, [p for p in template if p not in values]))
  # Host arrays: the caller places them (sharded over devices, or on one), so a large model is never
  # first materialised whole on a single device.
  variables = traverse_util.unflatten_dict({p: np.asarray(v) for p, v in values.items()}, sep="/")
  return model, variables, report
