"""Shared test set-up: one persistent XLA compilation cache for the whole run (subprocesses too).

Set before jax is imported, as environment variables, so `python -m launch.*` subprocesses inherit
them. CI points JAX_COMPILATION_CACHE_DIR at one directory for the whole run.
"""

import os
import pathlib

import pytest

_DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "medpeft_jax" / "xla"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_DEFAULT_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def easy(tmp_path_factory):
  """3 classes told apart by their dominant colour (24 images each): any working method beats chance.

  Built once here, so that concurrent subprocesses only read it.
  """
  import numpy as np  # noqa: PLC0415  (jax must not be imported before the cache settings above)
  from PIL import Image  # noqa: PLC0415

  from medpeft_jax import data  # noqa: PLC0415

  root = tmp_path_factory.mktemp("easy")
  rng = np.random.default_rng(0)
  for c, name in enumerate(("red", "green", "blue")):
    (root / name).mkdir()
    for i in range(24):
      a = rng.integers(0, 110, (36, 36, 3)).astype(np.uint8)
      a[..., c] += 120
      Image.fromarray(a).save(root / name / f"{i}.png")
  paths = {"manual_dir": str(root), "data_dir": str(tmp_path_factory.mktemp("easy_tfds"))}
  data.load("image_folder", **paths)
  return paths


@pytest.fixture(scope="session")
def br35h_data_dir(tmp_path_factory):
  """Br35H built once (stored at max side 128, as the notebook and the main job build it)."""
  from medpeft_jax import data  # noqa: PLC0415

  data_dir = tmp_path_factory.mktemp("br35h_tfds")
  data.load("br35h", data_dir=data_dir, max_side=128)
  return data_dir
