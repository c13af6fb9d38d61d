"""Runs trained together (a leading run axis, train/runs.py) equal the same runs trained apart."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import bench as bench_config
from configs import classify
from medpeft_jax import bench, models, peft, presets
from medpeft_jax.data.pipeline import step_rows
from medpeft_jax.train import logs, loop, optim, runs, trainer
from medpeft_jax.train.step import init_train_state, make_train_step
from tests.test_model_parity import _random_vit_npz
from tests.test_train import REPO, smoke_config

LRS, SEEDS, TOTAL = (1e-3, 3e-3, 1e-2), (0, 1, 2), 6
SETTINGS = loop.LoopSettings(log_every=1, checkpoint_every=3, progress=False)


class ArrayBatches:
  """A run's batches: its own epoch order of an in-memory set (`step_rows` with the run's seed)."""

  def __init__(self, images, labels, seed, batch_size=8):
    self.images, self.labels, self.seed, self.batch_size = images, labels, seed, batch_size

  def next(self, step):
    rows = step_rows(len(self.labels), self.batch_size, self.seed, step)
    return {"image": self.images[rows], "label": self.labels[rows]}

  def state(self):
    return None

  def restore(self, state):
    del state


@pytest.fixture(scope="module")
def setup():
  model = models.create_model("vit_b16", num_classes=3, **presets.TINY_MODELS["vit"])
  rng = np.random.default_rng(0)
  images = rng.standard_normal((24, 32, 32, 3)).astype(np.float32)
  labels = (np.arange(24) % 3).astype(np.int32)
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  # SSF everywhere but on the attention keys: a shift of the keys cannot change a softmax, so its gradient is
  # rounding noise that Adam normalises into lr-sized steps, different in any two programs.
  method = peft.get_method("ssf", after=r".*/(query|value|out|fc1|fc2|norm\d?)")
  spec = optim.OptimizerSpec(1.0, 1e-4, "cosine")
  plain_step = make_train_step(model, method, spec.build(1e-3), jit=False)  # the schedule comes from the state

  def state(lr, seed):
    return init_train_state(method, variables, spec.build(lr, warmup=1, total=TOTAL), jax.random.key(seed))

  return dict(images=images, labels=labels, params=variables["params"], state=state,
              apart=jax.jit(plain_step, donate_argnums=0), together=runs.vmapped_step(plain_step))


def task(setup, state, step, batches, names=(), lrs=LRS[:1]):
  schedule = lambda at: [float(optim.learning_rate(at - 1, lr, 1, TOTAL, "cosine")) for lr in lrs]
  return loop.Task("test", state, step, setup["params"], {}, batches, [], TOTAL, {"test": 1},
                   schedule if names else (lambda at: schedule(at)[0]), runs=names)


def losses(workdir):
  return [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def test_runs_together_equal_runs_apart(setup, tmp_path):
  apart = []
  for lr, seed in zip(LRS, SEEDS):
    workdir = tmp_path / f"apart_{seed}"
    workdir.mkdir()
    batches = ArrayBatches(setup["images"], setup["labels"], seed)
    result = loop.run(task(setup, setup["state"](lr, seed), setup["apart"], batches, lrs=(lr,)), workdir, SETTINGS,
                      logs.RunLogger(workdir))
    apart.append((result.state, losses(workdir)))

  names = tuple(f"lr={lr},seed={seed}" for lr, seed in zip(LRS, SEEDS))
  workdirs = [tmp_path / f"together_{seed}" for seed in SEEDS]
  for w in [*workdirs, tmp_path / "together"]:
    w.mkdir()
  stacked = runs.stack([setup["state"](lr, seed) for lr, seed in zip(LRS, SEEDS)])
  batches = runs.StackedBatches([ArrayBatches(setup["images"], setup["labels"], seed) for seed in SEEDS])
  result = loop.run(task(setup, stacked, setup["together"], batches, names, LRS), tmp_path / "together", SETTINGS,
                    [logs.RunLogger(w) for w in workdirs])

  assert result.last_step == TOTAL
  for (alone, alone_losses), with_others, workdir in zip(apart, runs.unstack(result.state, len(LRS)), workdirs):
    # Each run's records are its own: the same losses step by step, the same trained leaves (float tolerance:
    # vmap batches the matmuls differently).
    np.testing.assert_allclose(losses(workdir), alone_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), with_others.trainable,
                 alone.trainable)
    assert int(with_others.step) == TOTAL
  # The runs really differ (their own learning rate, seed and data order), so the check above is not vacuous.
  first, last = (jax.tree.leaves(s.trainable["adapters"]) for s in (apart[0][0], apart[-1][0]))
  assert not any(np.allclose(a, b) for a, b in zip(first, last) if np.abs(a).max() > 0)


def test_a_diverging_run_is_named(setup, tmp_path):
  lrs = (1e-3, 1e6)
  names = ("calm", "wild")
  stacked = runs.stack([setup["state"](lr, 0) for lr in lrs])
  batches = runs.StackedBatches([ArrayBatches(setup["images"], setup["labels"], 0) for _ in lrs])
  for n in names:
    (tmp_path / n).mkdir()
  with pytest.raises(FloatingPointError, match=r"in run wild at step \d+ \(learning rate there [0-9.e+]+\)"):
    loop.run(task(setup, stacked, setup["together"], batches, names, lrs), tmp_path, SETTINGS,
             [logs.RunLogger(tmp_path / n) for n in names])


def two_runs(easy, weights, **overrides):
  """Two seeds x learning rates of a pre-trained tiny ViT + LoRA at regime 0.5 (each seed its own subset)."""
  return [smoke_config(easy, "vit_b16", "lora", init="pretrained", weights=str(weights), regime=0.5, seed=seed, lr=lr,
                       epochs=2, **overrides) for seed, lr in ((0, 3e-3), (1, 1e-2))]


SPREAD_SCRIPT = """
import json, pathlib, sys
from absl import logging
from tests.test_runs import two_runs
logging.use_absl_handler(); logging.set_verbosity(logging.INFO)  # the trainer's "Mesh ..." line
from medpeft_jax.train import trainer
easy, out = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])
configs = two_runs(easy, out / "vit.npz")
for c in configs:
  c.mesh.runs = 2
trainer.train_together(configs, [out / f"spread_{i}" for i in range(2)], out / "spread_group")
"""


def test_sweep_runs_trained_together_have_the_records_of_runs_trained_apart(easy, tmp_path):
  """`train_together` writes each run the records `train_and_evaluate` writes it alone (each seed its own
  subset and data order) — on one device, and with the two runs spread over a ('runs', 'data') mesh of 4
  simulated devices (a subprocess, run beside the rest)."""
  np.savez(tmp_path / "vit.npz", **_random_vit_npz(np.random.default_rng(0)))
  spread = subprocess.Popen([sys.executable, "-c", SPREAD_SCRIPT, json.dumps({k: str(v) for k, v in easy.items()}),
                             str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  configs = two_runs(easy, tmp_path / "vit.npz")
  apart = [trainer.train_and_evaluate(c, tmp_path / f"apart_{i}") for i, c in enumerate(configs)]
  together = trainer.train_together(configs, [tmp_path / f"together_{i}" for i in range(2)], tmp_path / "group")
  log = spread.communicate(timeout=600)[0]
  assert spread.returncode == 0, log[-3000:]
  assert "Mesh {'runs': 2, 'data': 2, 'fsdp': 1}" in log, log[-3000:]
  spread = [json.loads((tmp_path / f"spread_{i}" / "results.json").read_text()) for i in range(2)]
  for kind, results in (("together", together), ("spread", spread)):
    for i, (alone, with_other) in enumerate(zip(apart, results)):
      assert with_other.pop("trained_together") == 2
      for key in ("dataset_size", "seed", "lr", "best_step", "last_step", "trainable_params"):
        assert with_other[key] == alone[key], (kind, key)
      for key in ("accuracy", "f1_macro", "auc"):
        assert with_other["test"][key] == pytest.approx(alone["test"][key], abs=1e-4), (kind, key)
      records = [[r for r in map(json.loads, (tmp_path / f"{k}_{i}" / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train"] for k in ("apart", kind)]
      assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]]
      np.testing.assert_allclose([r["loss"] for r in records[1]], [r["loss"] for r in records[0]], rtol=1e-4)
      adapters = [peft.load_adapter(tmp_path / f"{k}_{i}" / "best_adapter") for k in ("apart", kind)]
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), adapters[1].trainable,
                   adapters[0].trainable)
  # The two runs really differ (seed, subset, learning rate), so the equalities above are not vacuous.
  assert apart[0]["validation"] != apart[1]["validation"]


def test_runs_that_do_not_divide_the_mesh_rows_are_refused(easy, tmp_path):
  configs = two_runs(easy, tmp_path / "vit.npz")
  configs[0].mesh.runs = 3
  with pytest.raises(ValueError, match=r"2 runs trained together cannot spread evenly over config.mesh.runs=3"):
    trainer._mesh(configs[0], 2)
  with pytest.raises(ValueError, match=r"config.mesh.runs=3 does not divide the 1 devices"):
    trainer._mesh(configs[0], 3)
  assert dict(trainer._mesh(configs[0], 1).shape) == {"data": 1, "fsdp": 1}  # a run alone takes every device


def test_runs_that_differ_in_more_than_seed_and_lr_train_apart(easy, tmp_path):
  configs = [smoke_config(easy, "vit_b16", "lora", init="pretrained", weights="w.npz", seed=s, batch_size=b)
             for s, b in ((0, 8), (1, 4))]
  with pytest.raises(ValueError, match=r"may differ only in seed and lr; these also differ in \['batch_size'\]"):
    trainer.check_together(configs)
  with pytest.raises(ValueError, match="init='random'.*train apart"):
    trainer.check_together([smoke_config(easy, "vit_b16", "lora", seed=s) for s in (0, 1)])


def test_a_sweep_trains_a_regimes_seeds_and_its_lr_candidates_together(easy, tmp_path):
  """`runs_together`: the LR search's candidates, then the regime's two seeds, each as one program; every run
  has its own record (marked when trained together), and a re-run finds them finished."""
  np.savez(tmp_path / "vit.npz", **_random_vit_npz(np.random.default_rng(0)))
  c = bench_config.sweep(["vit_b16"], ["lora"], ["image_folder"], [0.5], [0, 1])
  c.run = classify.get_config("model=vit_b16,smoke=True")  # smoke sizes, but from the tiny pre-trained weights
  c.weights["vit_b16"], c.manual_dirs["image_folder"], c.run.data_dir = (
      str(tmp_path / "vit.npz"), easy["manual_dir"], easy["data_dir"])
  c.run.epochs, c.runs_together = 1, True
  c.lr_search.grid["default"], c.lr_search.total_steps, c.lr_search.seed = (1e-3, 1e30), 3, 5
  records = bench.run_sweep(c, tmp_path / "sweep")
  # The 1e30 candidate diverges: the group stops, and its runs train apart, so that only that one fails (as
  # apart); then the regime's two seeds train together with the winner.
  assert [(r["kind"], r["status"], r.get("trained_together")) for r in records] == [
      ("lr_search", "ok", None), ("lr_search", "failed", None), ("final", "ok", 2), ("final", "ok", 2)]
  assert "Non-finite" in records[1]["error"] and {r["lr"] for r in records[2:]} == {1e-3}
  records = [r for r in records if r["status"] == "ok"]
  assert {r["config"]["init"] for r in records} == {"pretrained"}
  assert len({r["workdir"] for r in records}) == 3 and all((pathlib.Path(r["workdir"]) / "results.json").is_file()
                                                           for r in records)
  assert [r for r in bench.run_sweep(c, tmp_path / "sweep") if r["status"] == "ok"] == records  # nothing retrains


class StopAfter:
  """Evaluates every 2 steps; asks to stop after `n` evaluations (n=0: never)."""

  name = "validation"

  def __init__(self, n):
    self.n, self.calls = n, 0

  @property
  def stop_requested(self):
    return bool(self.n) and self.calls >= self.n

  def due(self, step, total):
    return step % 2 == 0

  def __call__(self, state, step):
    self.calls += 1
    return {"step_seen": float(step)}

  def state(self):
    return self.calls

  def restore(self, state):
    self.calls = state


def test_a_run_that_stops_early_stops_alone(setup, tmp_path):
  """Run a stops after its first evaluation (step 2), run b trains on: a's records end at 2, as alone."""
  names, lrs = ("a", "b"), (1e-3, 3e-3)
  for n in names:
    (tmp_path / n).mkdir()
  evaluators = runs.PerRunEvaluators([StopAfter(1), StopAfter(0)])
  stacked = runs.stack([setup["state"](lr, 0) for lr in lrs])
  batches = runs.StackedBatches([ArrayBatches(setup["images"], setup["labels"], s) for s in (0, 1)])
  t = task(setup, stacked, setup["together"], batches, names, lrs)
  t.evaluators = [evaluators]
  result = loop.run(t, tmp_path, SETTINGS, [logs.RunLogger(tmp_path / n) for n in names])
  assert result.last_step == TOTAL
  records = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
             for n in names}
  assert [(r["split"], r["step"]) for r in records["a"]] == [("train", 1), ("train", 2), ("validation", 2)]
  assert [r["step"] for r in records["b"] if r["split"] == "validation"] == [2, 4, 6]
  assert [r["step"] for r in records["b"] if r["split"] == "train"] == list(range(1, TOTAL + 1))
