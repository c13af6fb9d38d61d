"""Run logs: a JSONL of every metric, TensorBoard event files, and absl log lines (process 0 only)."""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import pathlib

import jax
import numpy as np
from absl import logging


def plain(value):
  """`value` with arrays as lists and non-finite floats as strings: what JSON can hold."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf
  return value


class RunLogger:
  """Appends `{"step", "split", **metrics}` records; `truncate(step)` drops records after a resume point."""

  def __init__(self, workdir: pathlib.Path):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    self._tb_dir = workdir / "tensorboard"

  def _writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (a light, tensorflow-free writer)

      self._tb = SummaryWriter(str(self._tb_dir))
    return self._tb

  def write(self, step: int, split: str, metrics: dict, replace: bool = False) -> None:
    """Appends a record; `replace=True` first drops earlier records of `split` (written once per run)."""
    if not self.active:
      return
    record = {"step": int(step), "split": split, **plain(metrics)}
    if replace and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["split"] != split]
      self.path.write_text("".join(line + "\n" for line in kept))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer().add_scalar(f"{split}/{k}", v, int(step))

  def truncate(self, step: int) -> None:
    """Keeps only records up to `step` (re-running the same steps after a resume rewrites them)."""
    if not self.active or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def records(self) -> list[dict]:
    return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def parameter_overview(params, peft) -> str:
  """Trainable / total parameters per top-level module, then the totals."""
  from medpeft_jax.peft.core import flatten  # noqa: PLC0415

  total: dict[str, int] = {}
  for path, leaf in flatten(params).items():
    total[path.split("/")[0]] = total.get(path.split("/")[0], 0) + int(np.prod(np.shape(leaf)))
  trainable: dict[str, int] = {}
  for path, leaf in {**peft["params"], **flatten(peft["adapters"])}.items():
    top = path.split("/")[0]
    trainable[top] = trainable.get(top, 0) + int(np.prod(np.shape(leaf)))
  rows = [f"  {name:28s} {trainable.get(name, 0):>13,} / {total.get(name, 0):>13,}"
          for name in sorted(set(total) | set(trainable))]
  return "\n".join(["  module                       trainable /         total", *rows])


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (one line per array written); warnings still pass."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "tensorflow_datasets", "etils"))


def quiet_libraries() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def log_info(message: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(message, *args)


def write_json(path: str | os.PathLike, data) -> None:
  """Writes `data` as indented JSON atomically (a temporary file, then a rename): never half a file."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(plain(data), indent=2) + "\n")
  tmp.replace(path)


def print_json(data, out: str | os.PathLike | None = None) -> str:
  """Prints `data` as indented JSON (what the launch/ mains report) and writes it to `out` if given."""
  text = json.dumps(plain(data), indent=2)
  if out:
    pathlib.Path(out).write_text(text + "\n")
  print(text)
  return text
