"""The results store: an append-only JSONL file, one record per finished (or failed) run.

Record schema (README, "Results store"):
  model, method, dataset, regime (float in (0, 1]), seed (training seed), lr (main learning rate),
  dataset_size (training images used), metrics ({"f1_macro", "accuracy", "balanced_accuracy", "auc",
  ..., "confusion_matrix"}; or {"fid", ...} for generation), validation (the same on validation),
  trainable_params, total_params, step_time_s, xla_memory_estimate_bytes (XLA memory analysis),
  adapter_bytes, status ("ok" | "failed"), error (when failed), kind ("final" | "lr_search"),
  config (the run's full config), versions (package versions), git_commit, checkpoint_sha256
  ({file: sha256} of the pre-trained weights read), workdir, wall_time_s, finished_at.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
from typing import Any

KEY_FIELDS = ("kind", "model", "method", "dataset", "regime", "seed", "lr")


def config_hash(config: Any) -> str:
  """A short hash of a run's full config (a dict or ConfigDict; as stored, so tuples hash like lists)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  text = json.dumps(config if config is not None else {}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(record: dict) -> tuple:
  """Identity of a run: its coordinates plus the hash of its full `config`.

  Two records with the same key are the same experiment; runs made under different configs
  (another protocol, other data or weights) never share a key.
  """
  return (*(record.get(k) for k in KEY_FIELDS), config_hash(record.get("config")))


class ResultsStore:
  """Appends records atomically (one locked write per line); never rewrites earlier lines.

  Reading de-duplicates by `run_key`, so a run recorded twice (two sweeps on one workdir) counts once.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def append(self, record: dict) -> None:
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(self.path, "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
      fcntl.flock(f, fcntl.LOCK_UN)

  def lines(self) -> list[dict]:
    """Every record as written, duplicates included."""
    if not self.path.exists():
      return []
    out = []
    for n, line in enumerate(self.path.read_text().splitlines(), 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:  # a line cut by a crash mid-write: say where, keep the rest
          raise ValueError(f"{self.path}:{n} is not a JSON record ({e}); delete that line to continue.") from e
    return out

  def records(self) -> list[dict]:
    """One record per run key: the latest successful one, else the latest failure (in file order)."""
    latest: dict[tuple, dict] = {}
    for record in self.lines():
      key = run_key(record)
      kept = latest.get(key)
      if kept is None or record.get("status") == "ok" or kept.get("status") != "ok":
        latest.pop(key, None)
        latest[key] = record
    return list(latest.values())

  def finished(self) -> dict[tuple, dict]:
    """The latest successful record of every run key."""
    return {run_key(r): r for r in self.records() if r.get("status") == "ok"}
