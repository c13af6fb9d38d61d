"""Shared test set-up: one persistent XLA compilation cache for the whole run (subprocesses too).

Set before jax is imported, as environment variables, so `python -m launch.*` subprocesses inherit
them. CI points JAX_COMPILATION_CACHE_DIR at one directory for the whole run.
"""

import os
import pathlib

_DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "medpeft_jax" / "xla"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_DEFAULT_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
