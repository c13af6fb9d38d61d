"""The sweep runner: models x methods x datasets x regimes x seeds, with a learning-rate search.

For each (model, method, dataset) the learning rate is either fixed by the config (`lr.<method>`) or
searched: every candidate of `lr_search.grid` trains once (seed `lr_search.seed`, the sweep's largest
regime, `lr_search.total_steps` steps) and the best validation macro-F1 wins — the paper tuned the
LR per method on validation; PEFT prefers ~10x higher LRs than full fine-tuning, hence separate
grids. Then every regime x seed trains with it. Each run is one `train_and_evaluate` in its own
folder (so a killed run resumes where it was); finished runs are skipped on re-runs; a failing
run is recorded (status "failed") and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import pathlib
import subprocess
import time
import traceback
from collections.abc import Callable

import ml_collections
from absl import logging
from tqdm import tqdm

from medpeft_jax import models, presets
from medpeft_jax.bench.store import ResultsStore, run_key
from medpeft_jax.models.weights.readers import find_checkpoint_file
from medpeft_jax.train import trainer

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

  def key(self) -> tuple:
    return run_key(dataclasses.asdict(self))

  def folder(self) -> str:
    tag = "search_" if self.kind == "lr_search" else ""
    return f"{self.model}/{self.dataset}/{self.method}/{tag}r{self.regime:g}_s{self.seed}_lr{self.lr:g}"


def lr_candidates(bench, method: str) -> tuple[float, ...]:
  if method in bench.lr:
    return (float(bench.lr[method]),)
  grid = bench.lr_search.grid
  return tuple(float(x) for x in (grid[method] if method in grid else grid["default"]))


def run_config(bench, spec: RunSpec) -> ml_collections.ConfigDict:
  """The classification config of one run: the bench's `run` template with the run's coordinates."""
  c = ml_collections.ConfigDict(bench.run.to_dict())
  c.model, c.method, c.dataset, c.regime, c.seed, c.lr = (spec.model, spec.method, spec.dataset, spec.regime,
                                                          spec.seed, spec.lr)
  c.peft = presets.preset(spec.model, trainer.peft_method_name(spec.method))
  if bench.smoke:  # the template's tiny sizes are those of its own model's family
    c.model_overrides = presets.TINY_MODELS[models.get_spec(spec.model).family]
  c.weights = bench.weights.get(spec.model, "")
  c.manual_dir = bench.manual_dirs.get(spec.dataset, "")
  c.dataset_options = bench.dataset_options.get(spec.dataset, {})
  if spec.kind == "lr_search" and bench.lr_search.total_steps:
    c.total_steps = bench.lr_search.total_steps
  c.progress = False
  return c


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
  path = pathlib.Path(weights)
  file = find_checkpoint_file(path) if path.is_dir() else path
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
  sweep goes on, every record is appended as soon as its run ends."""

  def __init__(self, workdir, total: int):
    self.workdir = pathlib.Path(workdir)
    self.store = ResultsStore(self.workdir / "results.jsonl")
    self.finished = self.store.finished()
    self.bar = tqdm(total=total, desc="sweep", unit="run")

  def run(self, spec: RunSpec, config, execute: Callable[[pathlib.Path], dict],
          summary: Callable[[dict], str]) -> dict:
    """`execute(folder)` does the run and returns its record fields; `summary(record)` is its log line."""
    self.bar.set_postfix_str(f"{spec.model} {spec.dataset} {spec.method} r{spec.regime:g} s{spec.seed}")
    if spec.key() in self.finished:
      self.bar.update(1)
      return self.finished[spec.key()]
    folder = self.workdir / "runs" / spec.folder()
    start = time.perf_counter()
    try:
      fields = execute(folder)
      record = {**base_record(spec, config, folder, time.perf_counter() - start), **fields}
      self.bar.write(f"{spec.kind:9s} {spec.model} {spec.dataset} {spec.method} regime {spec.regime:g} seed "
                     f"{spec.seed} lr {spec.lr:g}: {summary(record)} ({record['wall_time_s']:.0f} s)")
    except Exception as e:  # noqa: BLE001  (a failed run is a result, not the end of the sweep)
      logging.error("Run %s failed:\n%s", spec, traceback.format_exc())
      record = {**base_record(spec, config, folder, time.perf_counter() - start), "status": "failed",
                "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"}
      self.bar.write(f"FAILED {spec}: {type(e).__name__}: {e}")
    self.store.append(record)
    self.bar.update(1)
    return record

  def close(self) -> None:
    self.bar.close()


def _classification_fields(config, results: dict) -> dict:
  return {"dataset_size": results["dataset_size"], "metrics": results["test"], "validation": results["validation"],
          "trainable_params": results["trainable_params"], "total_params": results["total_params"],
          "step_time_s": results["step_time_s"], "peak_memory_bytes": results["peak_memory_bytes"],
          "adapter_bytes": results["adapter_bytes"], "checkpoint_sha256": checkpoint_hashes(config.weights)}


def run_sweep(bench: ml_collections.ConfigDict, workdir) -> list[dict]:
  """Runs every missing run of the sweep into `workdir` (results.jsonl + runs/); returns the records."""
  if bench.get("task", "classification") == "t2i":
    from medpeft_jax.bench import t2i  # noqa: PLC0415  (it builds on this module)
    return t2i.run_t2i_sweep(bench, workdir)
  largest = max(bench.regimes)
  cells = [(m, d, meth) for m in bench.models for d in bench.datasets for meth in bench.methods]
  searches = {cell: lr_candidates(bench, cell[2]) for cell in cells}
  total = sum((len(c) if len(c) > 1 else 0) + len(bench.regimes) * len(bench.seeds) for c in searches.values())
  sweep = Sweep(workdir, total)

  def run(spec: RunSpec) -> dict:
    config = run_config(bench, spec)
    return sweep.run(spec, config,
                     lambda folder: _classification_fields(config, trainer.train_and_evaluate(config, folder)),
                     lambda record: f"test macro-F1 {record['metrics']['f1_macro']:.4f}")

  records = []
  for model, dataset, method in cells:
    candidates = searches[(model, dataset, method)]
    lr = candidates[0]
    if len(candidates) > 1:
      trials = [run(RunSpec("lr_search", model, method, dataset, largest, bench.lr_search.seed, c))
                for c in candidates]
      ok = [t for t in trials if t["status"] == "ok"]
      if ok:  # best validation macro-F1; ties go to the smaller learning rate
        lr = max(ok, key=lambda t: (t["validation"]["f1_macro"], -t["lr"]))["lr"]
      records += trials
    for regime in bench.regimes:
      for seed in bench.seeds:
        records.append(run(RunSpec("final", model, method, dataset, float(regime), int(seed), lr)))
  sweep.close()
  return records
