"""The results store: an append-only JSONL file, one record per finished (or failed) run.

Record schema (README, "Results store"):
  model, method, dataset, regime (float in (0, 1]), seed (training seed), lr (main learning rate),
  dataset_size (training images used), metrics ({"f1_macro", "accuracy", "balanced_accuracy", "auc",
  ..., "confusion_matrix"}; or {"fid", ...} for generation), validation (the same on validation),
  trainable_params, total_params, step_time_s, peak_memory_bytes (XLA memory analysis),
  adapter_bytes, status ("ok" | "failed"), error (when failed), kind ("final" | "lr_search"),
  config (the run's full config), versions (package versions), git_commit, checkpoint_sha256
  ({file: sha256} of the pre-trained weights read), workdir, wall_time_s, finished_at.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib

KEY_FIELDS = ("kind", "model", "method", "dataset", "regime", "seed", "lr")


def run_key(record: dict) -> tuple:
  """Identity of a run: two records with the same key are the same experiment."""
  return tuple(record.get(k) for k in KEY_FIELDS)


class ResultsStore:
  """Appends records atomically (one locked write per line); never rewrites earlier lines."""

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

  def records(self) -> list[dict]:
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

  def finished(self) -> dict[tuple, dict]:
    """The latest successful record of every run key."""
    return {run_key(r): r for r in self.records() if r.get("status") == "ok"}
