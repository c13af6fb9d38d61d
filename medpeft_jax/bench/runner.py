"""The sweep runner: models x methods x datasets x regimes x seeds, with a learning-rate search.

For each (model, method, dataset) the learning rate is either fixed by the config (`lr.<method>`) or
searched: every candidate of `lr_search.grid` trains once (seed `lr_search.seed`, regime
`lr_search.regime` (0: the sweep's largest), `lr_search.total_steps` steps (0: the runs' own schedule,
and then the winner is adopted as that seed's final run)) and the best validation macro-F1 wins — the paper tuned the
LR per method on validation; PEFT prefers ~10x higher LRs than full fine-tuning, hence separate
grids. Then every regime x seed trains with it. Each run is one `train_and_evaluate` in its own
folder (so a killed run resumes where it was); finished runs are skipped on re-runs; a failing
run is recorded (status "failed") and the sweep goes on. With `runs_together`, the runs that differ
only in seed (a regime's seeds) or learning rate (an LR search) train as one vmapped program
(`trainer.train_together`), each with the record it would have alone, marked `trained_together`.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from medpeft_jax import config_checks, models, presets
from medpeft_jax.bench.store import config_hash
from medpeft_jax.bench.sweep import RunSpec, Sweep, checkpoint_hashes
from medpeft_jax.train import trainer


def lr_candidates(bench, method: str) -> tuple[float, ...]:
  """The learning rate `lr.<method>` fixes, else the method's search grid."""
  fixed = config_checks.fixed_lr(bench, method)
  if fixed:
    return (fixed,)
  grid = bench.lr_search.grid
  return tuple(float(x) for x in (grid[method] if grid.get(method) else grid["default"]))


def run_config(bench, spec: RunSpec) -> ml_collections.ConfigDict:
  """The classification config of one run: the bench's `run` template with the run's coordinates."""
  c = ml_collections.ConfigDict(bench.run.to_dict())
  run = presets.variant(spec.method)  # "scratch": full from a random initialisation
  c.model, c.method, c.init, c.dataset, c.regime, c.seed, c.lr = (
      spec.model, run["method"], run["init"], spec.dataset, spec.regime, spec.seed, spec.lr)
  c.peft = presets.config_fields(spec.model, run["method"])
  if bench.smoke:  # the template's tiny sizes are those of its own model's family; tiny models start random
    c.model_overrides = presets.TINY_MODELS[models.get_spec(spec.model).family]
    c.init = "random"
  c.weights = bench.weights.get(spec.model, "")
  c.manual_dir = bench.manual_dirs.get(spec.dataset, "")
  c.dataset_options = config_checks.dataset_options(bench, spec.dataset)
  if spec.kind == "lr_search" and bench.lr_search.total_steps:
    c.total_steps = bench.lr_search.total_steps
  c.progress = False
  return c


def _classification_fields(config, results: dict) -> dict:
  return {"dataset_size": results["dataset_size"], "metrics": results["test"], "validation": results["validation"],
          "trainable_params": results["trainable_params"], "total_params": results["total_params"],
          "step_time_s": results["step_time_s"], "xla_memory_estimate_bytes": results["xla_memory_estimate_bytes"],
          "adapter_bytes": results["adapter_bytes"], "checkpoint_sha256": checkpoint_hashes(config.weights if config.init == "pretrained" else ""),
          "best_step": results["best_step"], "last_step": results["last_step"],
          "compile_time_s": results["compile_time_s"]}


def run_classification_sweep(bench: ml_collections.ConfigDict, workdir) -> list[dict]:
  """Runs every missing run of the sweep into `workdir` (results.jsonl + runs/); returns the records."""
  largest = float(bench.lr_search.get("regime") or max(bench.regimes))  # where the LR search trains
  cells = [(m, d, meth) for m in bench.models for d in bench.datasets for meth in bench.methods]
  searches = {cell: lr_candidates(bench, cell[2]) for cell in cells}
  for model, dataset, method in cells:  # every run's config is valid before the first one starts
    config_checks.check_classify(run_config(bench, RunSpec("final", model, method, dataset, largest, 0,
                                                           searches[(model, dataset, method)][0])))
  total = sum((len(c) if len(c) > 1 else 0) + len(bench.regimes) * len(bench.seeds) for c in searches.values())
  with Sweep(workdir, total) as sweep:
    return _run_cells(bench, sweep, cells, searches, largest)


def _train(configs, folders, group) -> list[dict]:
  """Runs apart, or (2+ runs that may: `trainer.check_together`) as one vmapped program."""
  if len(configs) > 1:
    results = trainer.train_together(configs, folders, group)
  else:
    results = [trainer.train_and_evaluate(configs[0], folders[0])]
  return [{**_classification_fields(c, r), **({"trained_together": len(configs)} if len(configs) > 1 else {})}
          for c, r in zip(configs, results)]


def _run_cells(bench, sweep: Sweep, cells, searches, largest) -> list[dict]:
  summary = lambda record: f"test macro-F1 {record['metrics']['f1_macro']:.4f}"  # noqa: E731

  def run_all(specs: list[RunSpec]) -> list[dict]:
    """The runs, together where `runs_together` is on and they may (same everything but seed and lr)."""
    configs = [run_config(bench, spec) for spec in specs]
    if bench.get("runs_together", False) and len(specs) > 1:
      try:
        trainer.check_together(configs)
      except ValueError as why:  # e.g. scratch runs (each seed its own base): apart, said once per group
        logging.info("Training %s apart: %s", specs[0].method, why)
      else:
        try:
          return sweep.run_group(specs, configs, _train, summary, record_failure=False)
        except Exception as e:  # noqa: BLE001  (one diverging run, or regime subsets of other sizes, stops a group:
          # apart, each run gets the record it would have had alone: the diverging one fails, the others not)
          logging.warning("Training %s runs together failed (%s: %s); training them apart.", specs[0].method,
                          type(e).__name__, e)
    return [sweep.run_group([spec], [config], _train, summary)[0] for spec, config in zip(specs, configs)]

  records = []
  for model, dataset, method in cells:
    candidates, trials = searches[(model, dataset, method)], []
    lr = candidates[0]
    if len(candidates) > 1:
      trials = run_all([RunSpec("lr_search", model, method, dataset, largest, bench.lr_search.seed, c)
                        for c in candidates])
      ok = [t for t in trials if t["status"] == "ok"]
      if ok:  # best validation macro-F1; ties go to the smaller learning rate
        lr = max(ok, key=lambda t: (t["validation"]["f1_macro"], -t["lr"]))["lr"]
      records += trials
    winner = next((t for t in trials if t["status"] == "ok" and t["lr"] == lr), None) if len(candidates) > 1 else None
    for regime in bench.regimes:
      pending = []
      for seed in bench.seeds:
        spec = RunSpec("final", model, method, dataset, float(regime), int(seed), lr)
        config = run_config(bench, spec)
        if (winner and float(regime) == largest and int(seed) == bench.lr_search.seed
                and config_hash(config) == config_hash(winner["config"])):
          records.append(sweep.adopt(spec, config, winner))  # the same run: trained once
        else:
          pending.append(spec)
      records += run_all(pending) if pending else []
  return records
