"""Datasets (tfds builders over local files), splits, data regimes and grain input pipelines.

  builder = data.load("ham10000", data_dir="~/tensorflow_datasets", manual_dir="~/downloads/ham10000")
  train = data.Split(builder, "train", regime=0.1, seed=0)
  loader = data.train_loader(train, image_size=224, mean=spec.mean, std=spec.std, batch_size=64, seed=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

import tensorflow_datasets as tfds

from medpeft_jax.data.builders import DATASETS, ImageConfig, MedicalImageBuilder
from medpeft_jax.data.pipeline import Split, eval_loader, train_loader
from medpeft_jax.data.regimes import PAPER_REGIMES, regime_indices

__all__ = ["DATASETS", "PAPER_REGIMES", "ImageConfig", "Split", "eval_loader", "load", "make_config",
           "regime_indices", "train_loader"]

_OPTIONS = {f.name for f in dataclasses.fields(ImageConfig)} - {
    "name", "version", "release_notes", "supported_versions", "description", "tags", "classes"}


def make_config(name: str, manual_dir: str | os.PathLike | None = None, **options) -> ImageConfig:
  """The builder config for `options` (see ImageConfig), with data-defined class names read first.

  Its name encodes the options (and a hash of data-defined classes), so different builds of one
  dataset are cached side by side under data_dir.
  """
  cls = DATASETS.get(name)
  unknown = set(options) - _OPTIONS
  if unknown:
    raise TypeError(f"Unknown dataset option(s) {sorted(unknown)}; valid: {sorted(_OPTIONS)}.")
  base = cls.BUILDER_CONFIGS[0]
  config = dataclasses.replace(base, **options)
  classes = tuple(cls.discover_classes(pathlib.Path(manual_dir) if manual_dir else None, config))
  parts = [f"{k}{str(v).lower()}" for k, v in sorted(options.items()) if getattr(base, k) != v]
  if classes != cls.CLASSES:
    parts.append("classes" + hashlib.sha1("\n".join(classes).encode()).hexdigest()[:10])
  return dataclasses.replace(config, name="_".join(parts) or base.name,
                             classes=classes if classes != cls.CLASSES else ())


def load(name: str, *, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
         **options) -> MedicalImageBuilder:
  """Builds dataset `name` from local files once (later calls reuse it) and returns the builder.

  Read splits with `builder.as_data_source(split)` or through `Split`. `options`: see ImageConfig.
  """
  cls = DATASETS.get(name)
  config = make_config(name, manual_dir, **options)
  if config == cls.BUILDER_CONFIGS[0]:
    config = config.name  # tfds refuses a new config object named like a predefined one
  builder = cls(data_dir=os.fspath(os.path.expanduser(data_dir)), config=config, file_format="array_record")
  manual = os.fspath(os.path.expanduser(manual_dir)) if manual_dir else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder
