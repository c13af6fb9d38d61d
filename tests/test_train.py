"""The classification trainer: every method learns, resumes exactly, shards consistently."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sklearn.metrics
from absl import flags

from configs import classify
from medpeft_jax import models, peft, presets
from medpeft_jax.train import adapters_io, metrics, trainer
from medpeft_jax.train.step import classification_loss, init_train_state, make_train_step, per_example_weights

flags.FLAGS.mark_as_parsed()
REPO = pathlib.Path(__file__).resolve().parent.parent


# --- metrics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_match_scikit_learn(num_classes):
  rng = np.random.default_rng(num_classes)
  labels = rng.integers(0, num_classes, 200)
  logits = rng.normal(size=(200, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  logits[:10] = np.round(logits[:10])  # some ties
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ours = metrics.classification_metrics(labels, probs)
  pred = probs.argmax(1)
  assert ours["f1_macro"] == pytest.approx(sklearn.metrics.f1_score(labels, pred, average="macro"))
  assert ours["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(labels, pred))
  assert ours["balanced_accuracy"] == pytest.approx(sklearn.metrics.balanced_accuracy_score(labels, pred))
  auc = (sklearn.metrics.roc_auc_score(labels, probs[:, 1]) if num_classes == 2
         else sklearn.metrics.roc_auc_score(labels, probs, multi_class="ovr"))
  assert ours["auc"] == pytest.approx(auc)
  assert ours["confusion_matrix"] == sklearn.metrics.confusion_matrix(labels, pred).tolist()
  per_class = sklearn.metrics.f1_score(labels, pred, average=None)
  assert list(ours["f1_per_class"].values()) == pytest.approx(per_class)


# --- the train step ------------------------------------------------------------------------------------

def _tiny_vit(**kw):
  model = models.create_model("vit_b16", num_classes=3, **{**presets.TINY_MODELS["vit"], **kw})
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), jnp.float32)
  return model, model.init(jax.random.PRNGKey(0), x), {"image": x, "label": jnp.arange(8) % 3}


def test_grad_accumulation_and_remat_give_the_same_updates():
  model, variables, batch = _tiny_vit()
  remat_model, _, _ = _tiny_vit(remat=True)
  method, optimizer = peft.get_method("lora", rank=4), optax.sgd(0.1)
  results = []
  for m, accum in ((model, 1), (model, 2), (remat_model, 1)):
    state = init_train_state(method, variables, optimizer, jax.random.PRNGKey(1))
    step = make_train_step(m, method, optimizer, grad_accum=accum)
    for _ in range(2):
      state, out = step(state, variables["params"], batch)
    results.append((float(out["loss"]), state.trainable))
  for loss, trained in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained, results[0][1])


def test_class_weighted_loss():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
  batch = {"label": jnp.array([0, 0, 1])}
  per_example = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], 2))
  weights = per_example_weights(batch["label"], [1.0, 3.0])  # runtime data, not a program constant
  weighted = classification_loss()(logits, {**batch, "weight": jnp.asarray(weights)})
  expected = (per_example[0] + per_example[1] + 3 * per_example[2]) / 5
  assert float(weighted) == pytest.approx(float(expected))
  smoothed = classification_loss(label_smoothing=0.1)(logits, batch)
  assert float(smoothed) != pytest.approx(float(per_example.mean()))


# --- smoke runs on an easy synthetic dataset ---------------------------------------------------------------

def smoke_config(easy, model="vit_b16", method="lora", **overrides):
  config = classify.get_config(f"model={model},method={method},dataset=image_folder,smoke=True")
  config.manual_dir, config.data_dir = easy["manual_dir"], easy["data_dir"]
  config.epochs, config.progress = 3, False
  config.update(overrides)
  return config


METHODS = [("vit_b16", m) for m in ("full", "linear", "bias", "norm", "attention", "lora", "dora", "ssf",
                                    "adaptformer", "vpt", "svdiff", "scratch")]
METHODS += [("resnet50", m) for m in ("bias", "norm", "ssf", "tsa")] + [("mobilenet_v2", "lora")]


@pytest.mark.parametrize("model,method", METHODS, ids=[f"{a}-{b}" for a, b in METHODS])
def test_every_method_learns(easy, tmp_path, model, method):
  options = {"lr": {"full": 1e-3, "linear": 1e-2, "vpt": 1e-2}.get(method, 3e-3)}
  if model == "mobilenet_v2":
    # A random tiny MobileNetV2 at 32 px reaches 1x1 feature maps: train-mode BatchNorm over a batch
    # of 8 is too noisy to learn from there, so this run keeps the running statistics.
    options = {"lr": 1e-2, "bn_mode": "frozen"}
  results = trainer.train_and_evaluate(smoke_config(easy, model, method, **options), tmp_path)
  train = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
  assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
  assert results["test"]["accuracy"] >= 0.6  # chance is 1/3
  assert results["dataset_size"] == 54 and results["trainable_params"] > 0
  assert (tmp_path / "best_adapter" / "adapter_config.json").is_file()
  assert any((tmp_path / "tensorboard").iterdir())


def test_same_seed_same_results_and_evaluate_export(easy, tmp_path):
  config = smoke_config(easy, "resnet50", "bias", epochs=2)
  first = trainer.train_and_evaluate(config, tmp_path / "a")
  second = trainer.train_and_evaluate(config, tmp_path / "b")
  assert first["test"] == second["test"] and first["validation"] == second["validation"]
  adapter = "best_adapter/adapter_model.safetensors"
  assert (tmp_path / "a" / adapter).read_bytes() == (tmp_path / "b" / adapter).read_bytes()
  # launch.evaluate's library call reproduces the run's test metrics from the adapter folder alone.
  assert adapters_io.evaluate_adapter(tmp_path / "a" / "best_adapter", "test") == first["test"]
  meta = adapters_io.export_merged(tmp_path / "a" / "best_adapter", tmp_path / "merged.safetensors")
  assert meta["num_classes"] == 3 and (tmp_path / "merged.safetensors").stat().st_size > 0


def test_non_finite_loss_stops_naming_the_step(easy, tmp_path):
  with pytest.raises(FloatingPointError, match=r"Non-finite training loss .* at step \d+ \(learning rate there .*no checkpoint was written"):
    trainer.train_and_evaluate(smoke_config(easy, method="full", lr=1e30, grad_clip=1e30), tmp_path)


# --- processes: kill and resume, simulated devices, two processes -----------------------------------------

def _launch(easy, workdir, *extra, env=None, method="lora", **popen):
  command = [sys.executable, "-m", "launch.train", "--config",
             f"configs/classify.py:model=vit_b16,method={method},dataset=image_folder,smoke=True",
             f"--config.manual_dir={easy['manual_dir']}", f"--config.data_dir={easy['data_dir']}",
             "--config.epochs=3", "--config.progress=False", f"--workdir={workdir}", *extra]
  return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _finish(process, timeout=600):
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-3000:]
  return out


def _train_losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def test_resume_after_kill_is_bitwise_identical(easy, tmp_path):
  reference = trainer.train_and_evaluate(smoke_config(easy), tmp_path / "reference")
  process = _launch(easy, tmp_path / "killed")
  jsonl = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and len(_train_losses(tmp_path / "killed") if jsonl.exists() else []) < 7:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)  # mid-epoch (an epoch is 6 steps; checkpoints every 4 and 6)
  process.wait()
  assert 0 < len(_train_losses(tmp_path / "killed")) < 18, "the run was not interrupted mid-way"
  _finish(_launch(easy, tmp_path / "killed"))
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
  assert resumed["test"] == reference["test"] and resumed["validation"] == reference["validation"]
  assert _train_losses(tmp_path / "killed") == _train_losses(tmp_path / "reference")
  adapter = "best_adapter/adapter_model.safetensors"
  assert (tmp_path / "killed" / adapter).read_bytes() == (tmp_path / "reference" / adapter).read_bytes()


def test_8_simulated_devices_match_1_device(easy, tmp_path):
  reference = _launch(easy, tmp_path / "one", "--config.epochs=1")
  sharded = _launch(easy, tmp_path / "eight", "--config.epochs=1", "--config.mesh.data=4",
                    "--config.mesh.fsdp=2", "--config.mesh.min_shard_size=64",
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  _finish(reference)
  out = _finish(sharded)
  assert "Mesh {'data': 4, 'fsdp': 2}" in out and " 0 of " not in out  # some leaves really are sharded
  np.testing.assert_allclose(_train_losses(tmp_path / "eight"), _train_losses(tmp_path / "one"), rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "linear"])  # linear: the probe on features gathered from both
def test_two_processes_match_one(easy, tmp_path, method):
  port = 20000 + os.getpid() % 20000 + (method == "linear")
  common = ("--config.epochs=1", f"--coordinator=127.0.0.1:{port}", "--num_processes=2")
  workers = [_launch(easy, tmp_path / "two", *common, f"--process_id={i}", method=method) for i in range(2)]
  reference = _launch(easy, tmp_path / "one", "--config.epochs=1", "--config.mesh.data=2", method=method,
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  for w in workers:
    _finish(w)
  _finish(reference)
  np.testing.assert_allclose(_train_losses(tmp_path / "two"), _train_losses(tmp_path / "one"), rtol=1e-4)
