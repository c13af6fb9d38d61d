"""Datasets (tfds builders over local files), splits, data regimes and grain input pipelines.

  builder = data.load("ham10000", data_dir="~/tensorflow_datasets", manual_dir="~/downloads/ham10000")
  train = data.Split(builder, "train", regime=0.1, seed=0)
  loader = data.train_loader(train, image_size=224, mean=spec.mean, std=spec.std, batch_size=64, seed=0)
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib

import tensorflow_datasets as tfds
from absl import logging

from medpeft_jax.data import source
from medpeft_jax.data.builders import DATASETS, ImageConfig, MedicalImageBuilder
from medpeft_jax.data.pipeline import Split, eval_loader, train_loader
from medpeft_jax.data.regimes import PAPER_REGIMES, regime_indices

__all__ = ["DATASETS", "PAPER_REGIMES", "ImageConfig", "Split", "eval_loader", "load", "make_config",
           "regime_indices", "train_loader"]

_OPTIONS = {f.name for f in dataclasses.fields(ImageConfig)} - {
    "name", "version", "release_notes", "supported_versions", "description", "tags", "classes", "source"}


def make_config(name: str, manual_dir: str | os.PathLike | None = None, **options) -> ImageConfig:
  """The builder config for `options` (see ImageConfig) and the source folder, data-defined classes read.

  Its name is the options that differ from the default plus `_src<key>`, the source's identity (its
  resolved path and a stat-only fingerprint of its files, `medpeft_jax.data.source`): builds from
  other options, another folder or changed files sit side by side under data_dir, never mixed up.
  """
  cls = DATASETS.get(name)
  unknown = set(options) - _OPTIONS
  if unknown:
    raise TypeError(f"Unknown dataset option(s) {sorted(unknown)}; valid: {sorted(_OPTIONS)}.")
  base = cls.BUILDER_CONFIGS[0]
  config = dataclasses.replace(base, **options)
  root = cls.source_root(manual_dir)
  classes = tuple(cls.discover_classes(root, config))
  src = source.fingerprint(root)
  parts = [f"{k}{str(v).lower()}" for k, v in sorted(options.items()) if getattr(base, k) != v]
  return dataclasses.replace(config, name=f"{'_'.join(parts) or base.name}_src{src.key}", source=src,
                             classes=classes if classes != cls.CLASSES else ())


def load(name: str, *, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
         **options) -> MedicalImageBuilder:
  """Builds dataset `name` from local files once per source state and returns the builder.

  A later call with the same options and an unchanged source folder reuses the build; another folder,
  or a file added, removed or modified in it, makes a new build (logged, with the difference).
  Read splits with `builder.as_data_source(split)` or through `Split`. `options`: see ImageConfig.
  """
  config = make_config(name, manual_dir, **options)
  data_dir = pathlib.Path(data_dir).expanduser().resolve()
  if data_dir.is_relative_to(config.source.path):
    raise ValueError(f"{name}: data_dir {data_dir} is inside the source folder {config.source.path}: each "
                     "build would change the files it is identified by. Put data_dir outside it.")
  builder = DATASETS.get(name)(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  _log_build(builder)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=config.source.path))
  return builder


def _log_build(builder: MedicalImageBuilder) -> None:
  """Says whether the build is reused or made anew, and when anew because the source's files changed."""
  here, src = pathlib.Path(builder.data_dir), builder.builder_config.source
  if here.exists():
    logging.info("%s: reusing the build %s, made from %s.", builder.name, here, src.describe())
    return
  options = builder.builder_config.name.rsplit("_src", 1)[0]
  older = [(d, s) for d in here.parent.parent.glob(f"{glob.escape(options)}_src*/{here.name}")
           if (s := source.Source.read(d)) is not None and s.path == src.path]
  if not older:
    logging.info("%s: building from %s into %s.", builder.name, src.describe(), here)
    return
  old_dir, old = max(older, key=lambda o: o[0].stat().st_mtime)
  logging.warning("%s: the files in %s changed since the build %s was made from them (%d files, %s bytes "
                  "then; %d files, %s bytes now): building anew into %s. Delete %s if you no longer need it.",
                  builder.name, src.path, old_dir, old.files, f"{old.bytes:,}", src.files, f"{src.bytes:,}",
                  here, old_dir)
