"""Reads PyTorch `.pth`/`.bin` checkpoints without torch and without running their pickles.

A torch checkpoint is a pickle (inside a zip archive since torch 1.6, or followed by raw storages in
the older "legacy" format) whose globals rebuild tensors from storages. A plain `pickle.load` would
import and call any global the file names — `os.system` included. This unpickler resolves only the
globals a state dict needs (ordered dicts, tensor/parameter rebuilders, storage types) to harmless
local stand-ins and refuses everything else before it is called.

`load_torch_checkpoint(path)` returns the same structure `torch.load` would, with numpy arrays in place
of tensors (bfloat16 via ml_dtypes).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle references something other than tensors and containers."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A storage named by the pickle; its bytes are attached after unpickling (legacy) or on demand."""

  key: str
  dtype: np.dtype
  numel: int
  view: tuple[int, int] | None = None  # (offset, numel) into the root storage (legacy views)


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, path: str, legacy: bool):
    super().__init__(file)
    self._path = path
    self._legacy = legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"Refusing to read {self._path}: its pickle references `{module}.{name}`, which is not a "
          "tensor, storage or container. Only plain state dicts are read without torch; if you trust "
          "the file, re-save its state dict with torch (`torch.save(model.state_dict(), path)`) or "
          "convert it to safetensors.") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"Refusing to read {self._path}: unknown persistent id {pid!r}.")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"Refusing to read {self._path}: {storage_type!r} is not a storage type.")
    key = str(key)
    root = self.storages.setdefault(key, _Storage(key, storage_type.dtype, int(numel)))
    view = pid[5] if self._legacy and len(pid) > 5 else None
    if view is None:
      return root
    _view_key, offset, view_numel = view
    return _Storage(key, storage_type.dtype, int(view_numel), view=(int(offset), int(view_numel)))


def _materialise(obj: Any, storage_bytes) -> Any:
  """Replaces every `_LazyTensor` in a nested structure by a numpy array (keeping container types)."""
  if isinstance(obj, _LazyTensor):
    st = obj.storage
    flat = np.frombuffer(storage_bytes(st.key), dtype=st.dtype)
    if st.view is not None:
      flat = flat[st.view[0]:st.view[0] + st.view[1]]
    view = np.lib.stride_tricks.as_strided(
        flat[obj.offset:], shape=obj.shape, strides=[s * flat.itemsize for s in obj.stride])
    return np.array(view)  # copies into its own, contiguous memory
  if isinstance(obj, dict):
    out = type(obj)((k, _materialise(v, storage_bytes)) for k, v in obj.items())
    if getattr(obj, "__dict__", None):
      out.__dict__.update(obj.__dict__)  # e.g. the `_metadata` torch attaches to state dicts
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storage_bytes) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ValueError(f"{path} is a zip archive but not a torch checkpoint (no single data.pkl inside).")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in zf.namelist():
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, legacy=False)
    obj = unpickler.load()
    cache: dict[str, bytes] = {}

    def storage_bytes(key):
      if key not in cache:
        raw = zf.read(f"{prefix}data/{key}")
        if byteorder != "little":
          dt = unpickler.storages[key].dtype
          raw = np.frombuffer(raw, dt.newbyteorder(">")).astype(dt).tobytes()
        cache[key] = raw
      return cache[key]

    return _materialise(obj, storage_bytes)


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    header = lambda: _RestrictedUnpickler(f, path, legacy=True).load()
    try:
      magic = header()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      if isinstance(e, UnsafeCheckpointError):
        raise
      raise ValueError(f"{path} is neither a zip nor a legacy torch checkpoint: {e}") from None
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path} is not a torch checkpoint (bad magic number {magic!r}).")
    if header() != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy torch checkpoint protocol.")
    header()  # sys_info: endianness and type sizes, little-endian assumed as torch does
    unpickler = _RestrictedUnpickler(f, path, legacy=True)
    obj = unpickler.load()
    keys = header()
    data = {}
    for key in keys:
      st = unpickler.storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      data[str(key)] = f.read(numel * st.dtype.itemsize)
  return _materialise(obj, data.__getitem__)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a torch checkpoint (zip or legacy format) into numpy arrays, executing no pickled code.

  Raises `UnsafeCheckpointError` when the pickle names any global other than ordered dicts, tensor
  rebuilders and storage types (for example a pickled model object, or a malicious `os.system`).
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
