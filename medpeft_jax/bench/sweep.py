"""What every sweep shares: a run's coordinates, the run/skip/record loop, and what a record carries.

`Sweep.run(spec, config, execute, summary)` runs one run into `<workdir>/runs/<spec.folder()>` unless
results.jsonl already holds it (same coordinates and config hash: bench/store.py), records a failure
and goes on, and appends every record as soon as its run ends. The classification sweep
(bench/runner.py) and the text-to-image sweep (bench/t2i.py) are drivers of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import pathlib
import subprocess
import time
import traceback
from collections.abc import Callable

from absl import logging
from tqdm import tqdm

from medpeft_jax.bench.store import ResultsStore, config_hash, run_key
from medpeft_jax.models.weights.readers import checkpoint_file
from medpeft_jax.workdir import WorkdirLock

PACKAGES = ("medpeft-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "numpy")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  kind: str  # "final" or "lr_search"
  model: str
  method: str
  dataset: str
  regime: float
  seed: int
  lr: float

  def key(self, config) -> tuple:
    """The results store's key of this run under `config` (coordinates + config hash)."""
    return run_key({**dataclasses.asdict(self), "config": config.to_dict()})

  def folder(self, config) -> str:
    """Its folder under runs/: the coordinates, and the config hash (another config is another run)."""
    tag = "search_" if self.kind == "lr_search" else ""
    return (f"{self.model}/{self.dataset}/{self.method}/{tag}r{self.regime:g}_s{self.seed}_lr{self.lr:g}_"
            f"{config_hash(config)[:8]}")


@functools.cache
def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def checkpoint_hashes(weights: str) -> dict[str, str]:
  if not weights:
    return {}
  file = checkpoint_file(weights)
  return {str(file): _sha256(str(file))}


@functools.cache
def git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=pathlib.Path(__file__).resolve().parent)
    return out.stdout.strip() or None if out.returncode == 0 else None
  except OSError:
    return None


def versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def base_record(spec: RunSpec, config, workdir: pathlib.Path, wall: float) -> dict:
  """What every record holds: the run's coordinates, config, software versions and timing."""
  return {**dataclasses.asdict(spec), "status": "ok", "config": config.to_dict(), "versions": versions(),
          "git_commit": git_commit(), "workdir": str(workdir), "wall_time_s": round(wall, 2),
          "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


class Sweep:
  """Runs each spec once: finished runs (in results.jsonl) are skipped, a failure is recorded and the
  sweep goes on, every record is appended as soon as its run ends. A context manager holding the
  workdir's lock: a second sweep on the same workdir stops at once instead of racing this one."""

  def __init__(self, workdir, total: int):
    self.workdir = pathlib.Path(workdir)
    self.lock = WorkdirLock(self.workdir)
    self.total = total

  def __enter__(self) -> Sweep:
    self.lock.__enter__()
    self.store = ResultsStore(self.workdir / "results.jsonl")
    self.finished = self.store.finished()
    self.bar = tqdm(total=self.total, desc="sweep", unit="run")
    return self

  def __exit__(self, *exc) -> None:
    self.bar.close()
    self.lock.__exit__(*exc)

  def adopt(self, spec: RunSpec, config, record: dict) -> dict:
    """Records an identical run already made under another kind (the LR search's winner, trained with the
    final runs' own schedule, is the final run of its regime and seed) instead of training it again."""
    if spec.key(config) not in self.finished:
      self.store.append({**record, "kind": spec.kind, "adopted_from": record["kind"]})
      self.finished[spec.key(config)] = self.store.finished()[spec.key(config)]
    self.bar.update(1)
    return self.finished[spec.key(config)]

  def run(self, spec: RunSpec, config, execute: Callable[[pathlib.Path], dict],
          summary: Callable[[dict], str]) -> dict:
    """`execute(folder)` does the run and returns its record fields; `summary(record)` is its log line."""
    return self.run_group([spec], [config], lambda configs, folders, group: [execute(folders[0])], summary)[0]

  def run_group(self, specs: list[RunSpec], configs: list, execute: Callable[..., list[dict]],
                summary: Callable[[dict], str], record_failure: bool = True) -> list[dict]:
    """Runs the specs not finished yet as one `execute(configs, folders, group_folder)` call (runs trained
    together keep their shared state and checkpoints in `group_folder`), recording each run. A failure fails
    every run of the call: recorded, or (record_failure=False) raised for the caller to train them apart."""
    records = {i: self.finished[spec.key(config)] for i, (spec, config) in enumerate(zip(specs, configs))
               if spec.key(config) in self.finished}
    self.bar.update(len(records))
    todo = [i for i in range(len(specs)) if i not in records]
    if todo:
      spec = specs[todo[0]]
      self.bar.set_postfix_str(f"{spec.model} {spec.dataset} {spec.method} r{spec.regime:g} s{spec.seed}"
                               + (f" (+{len(todo) - 1} together)" if len(todo) > 1 else ""))
      folders = [self.workdir / "runs" / specs[i].folder(configs[i]) for i in todo]
      relative = "".join(str(f.relative_to(self.workdir)) for f in folders)  # the sweep folder may move
      group = self.workdir / "groups" / hashlib.sha256(relative.encode()).hexdigest()[:16]
      start = time.perf_counter()
      try:
        results = execute([configs[i] for i in todo], folders, group)
        wall = (time.perf_counter() - start) / len(todo)  # a group's wall time shared out per run
        done = [{**base_record(specs[i], configs[i], folder, wall), **fields}
                for i, folder, fields in zip(todo, folders, results)]
        for record in done:
          self.bar.write(f"{record['kind']:9s} {record['model']} {record['dataset']} {record['method']} regime "
                         f"{record['regime']:g} seed {record['seed']} lr {record['lr']:g}: {summary(record)} "
                         f"({record['wall_time_s']:.0f} s)")
      except Exception as e:  # noqa: BLE001  (a failed run is a result, not the end of the sweep)
        if not record_failure:
          raise
        logging.error("Run(s) %s failed:\n%s", [specs[i] for i in todo], traceback.format_exc())
        wall = time.perf_counter() - start
        done = [{**base_record(specs[i], configs[i], folder, wall), "status": "failed",
                 "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"}
                for i, folder in zip(todo, folders)]
        self.bar.write(f"FAILED {[specs[i] for i in todo]}: {type(e).__name__}: {e}")
      for i, record in zip(todo, done):
        records[i] = json.loads(json.dumps(record))  # as stored (tuples as lists): a re-run returns equal records
        self.store.append(records[i])
        self.bar.update(1)
    return [records[i] for i in range(len(specs))]
