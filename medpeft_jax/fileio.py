"""Reading files that may be truncated or garbled (a copy cut short, a crash mid-write): JSON and
safetensors, each failure a CorruptFileError naming the file, what is wrong and the fix.

Shared by the checkpoint readers (models/weights) and the adapter files (peft/adapters.py), which
must not depend on each other.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CorruptFileError(ValueError):
  """A weights, adapter or config file that is truncated or not in the format its name says."""


def read_json(path: pathlib.Path, fix: str) -> Any:
  """Parses a JSON file; a broken one is a CorruptFileError naming the file, the line and `fix`."""
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
    raise CorruptFileError(f"{path} is not valid JSON ({where}); {fix}.") from None


def read_safetensors(path: str | os.PathLike, fix: str = "re-download or re-save it"
                     ) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (8-byte header length, JSON header, raw little-endian data).

  A truncated or garbled file is a CorruptFileError saying how many bytes were expected and `fix`.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size

  def corrupt(what: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a complete safetensors file: {what}; {fix}.")

  if size < 8:
    raise corrupt(f"expected at least 8 bytes (the header length), found {size}")
  data = np.memmap(path, dtype=np.uint8, mode="r")
  n = int(np.frombuffer(data[:8], dtype="<u8")[0])
  base = 8 + n
  if base > size:
    raise corrupt(f"its header needs {base:,} bytes but the file has {size:,} (truncated, or not "
                  "safetensors)")
  try:
    header = json.loads(bytes(data[8:base]))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise corrupt(f"its header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise corrupt("its header is not a JSON object")
  header.pop("__metadata__", None)
  expected = base + max((int(info["data_offsets"][1]) for info in header.values()), default=0)
  if size < expected:
    raise corrupt(f"expected {expected:,} bytes, found {size:,} (truncated)")
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    needed = dtype.itemsize * math.prod(info["shape"])
    if end - start != needed:
      raise corrupt(f"tensor {name} of shape {info['shape']} and dtype {info['dtype']} needs {needed:,} "
                    f"bytes, its header gives it {end - start:,}")
    out[name] = np.array(np.frombuffer(data[base + start:base + end], dtype=dtype).reshape(info["shape"]))
  return out


def fingerprint(path: str | os.PathLike) -> list:
  """[name, size, mtime] of a file: cheap, and different when the file under a path is replaced."""
  stat = pathlib.Path(path).stat()
  return [pathlib.Path(path).name, stat.st_size, int(stat.st_mtime)]
