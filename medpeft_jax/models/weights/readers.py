"""Reads checkpoint files and folders into flat `{name: numpy array}` dicts, without torch.

Formats: safetensors (single or sharded, bfloat16 included), PyTorch `.pth`/`.pt`/`.bin` (through
the restricted unpickler in `torch_pickle`) and `.npz` (original/big_vision ViT). A folder may be a
Hugging Face or timm download (`model.safetensors` or `pytorch_model.bin`, plus `config.json`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from medpeft_jax.fileio import CorruptFileError, read_json, read_safetensors  # noqa: F401  (re-exported)
from medpeft_jax.models.weights.torch_pickle import load_torch_checkpoint

# Preferred files in a checkpoint folder, in order (Hugging Face / timm download layouts).
_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin", "open_clip_pytorch_model.bin")
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "params")


@dataclasses.dataclass
class Checkpoint:
  tensors: dict[str, np.ndarray]
  files: list[str]
  config: dict[str, Any] | None = None  # the folder's config.json, when there is one


def flatten_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
  """Finds the state dict in a loaded torch object and flattens nesting with '.'."""
  for key in _WRAPPER_KEYS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  flat: dict[str, np.ndarray] = {}

  def walk(prefix, o):
    if isinstance(o, np.ndarray):
      flat[prefix] = o
    elif isinstance(o, dict):
      for k, v in o.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)

  walk("", obj)
  if not flat:
    raise ValueError(f"{source} holds no tensors.")
  if all(k.startswith("module.") for k in flat):  # saved from DataParallel/DDP
    flat = {k[len("module."):]: v for k, v in flat.items()}
  return flat


def read_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
      raise CorruptFileError(f"{path} is not a complete .npz archive ({e}); re-download it.") from None
  if path.name.endswith(".index.json"):  # sharded Hugging Face checkpoint
    shards = sorted(set(read_json(path, "re-download it")["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(read_file(path.parent / shard))
    return out
  with open(path, "rb") as f:
    zip_magic = f.read(4) == b"PK\x03\x04"
  if zip_magic and not zipfile.is_zipfile(path):  # torch's zip format, cut before its central directory
    raise CorruptFileError(f"{path} is a truncated zip archive: expected its central directory at the end of "
                           f"the file's {path.stat().st_size:,} bytes; re-download or re-save it.")
  return flatten_state_dict(load_torch_checkpoint(path), str(path))


def find_checkpoint_file(folder: pathlib.Path) -> pathlib.Path:
  for name in _FOLDER_FILES:
    if (folder / name).is_file():
      return folder / name
  candidates = sorted(p for p in folder.iterdir() if p.suffix in _SUFFIXES)
  if len(candidates) != 1:
    found = ", ".join(p.name for p in candidates) or "none"
    raise FileNotFoundError(
        f"Cannot tell which checkpoint to read in {folder}: expected one of {', '.join(_FOLDER_FILES)} "
        f"or a single file ending in {', '.join(_SUFFIXES)} (found: {found}). Pass the file's path.")
  return candidates[0]


def checkpoint_file(path: str | os.PathLike) -> pathlib.Path:
  """The weights file a checkpoint path names: the path itself, or a download folder's preferred file."""
  path = pathlib.Path(path).expanduser()
  return find_checkpoint_file(path) if path.is_dir() else path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
  """Reads a checkpoint file, or the checkpoint inside a Hugging Face/timm download folder."""
  path = pathlib.Path(path)
  config = None
  if path.is_dir():
    if (path / "config.json").is_file():
      config = read_json(path / "config.json", "re-download it")
    path = find_checkpoint_file(path)
  elif path.suffix not in _SUFFIXES and not path.name.endswith(".index.json"):
    raise ValueError(f"{path}: unknown checkpoint format; expected a folder or a file ending in "
                     f"{', '.join(_SUFFIXES)}.")
  return Checkpoint(read_file(path), [str(path)], config)
