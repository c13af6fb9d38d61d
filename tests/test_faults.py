"""Bad inputs and faults get one clear error naming the file/field, the expected value and the fix —
never a silent wrong result, a raw library exception, or something wrong written (no training here)."""

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from absl import flags

from configs import bench as bench_config
from configs import classify, t2i
from medpeft_jax import config_checks, peft
from medpeft_jax.bench.store import ResultsStore, config_hash, run_key
from medpeft_jax.config_args import UnknownFieldError, define_config_file, suggest_key
from medpeft_jax.models.weights.readers import CorruptFileError, read_checkpoint
from medpeft_jax.peft.adapters import (
  CONFIG,
  WEIGHTS,
  AdapterMismatchError,
  NonFiniteAdapterError,
  check_adapter,
  load_adapter,
  save_adapter,
)
from medpeft_jax.workdir import WorkdirLock, WorkdirLockedError

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---- truncated or corrupt weight files ----

def _safetensors(path):
  safetensors.numpy.save_file({"a": np.ones((4, 5), np.float32), "b": np.zeros(3, np.float32)}, path)
  return path.read_bytes()


@pytest.mark.parametrize("keep, expected", [
    (-7, r"expected 212 bytes, found 205 \(truncated\)"),  # the data cut short: "cannot reshape" before
    (100, r"header needs 120 bytes but the file has 100"),  # the JSON header cut short
    (5, r"expected at least 8 bytes .* found 5")])
def test_truncated_safetensors_names_file_size_and_fix(tmp_path, keep, expected):
  data = _safetensors(tmp_path / "full.safetensors")
  assert len(data) == 212
  path = tmp_path / "model.safetensors"
  path.write_bytes(data[:keep])
  with pytest.raises(CorruptFileError, match=expected) as e:
    read_checkpoint(path)
  assert str(path) in str(e.value) and "re-download" in str(e.value)


def test_truncated_torch_zip_is_corrupt_not_called_unsafe(tmp_path):
  path = tmp_path / "model.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02}q\x00." + bytes(4000))
  path.write_bytes(path.read_bytes()[:3000])
  with pytest.raises(CorruptFileError, match=r"model\.pth is a truncated zip archive.*re-download"):
    read_checkpoint(path)


def test_download_folder_with_broken_config_json_names_the_line(tmp_path):
  _safetensors(tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text('{\n  "hidden_size": 768,\n  "oops"\n}')
  with pytest.raises(CorruptFileError, match=r"config\.json is not valid JSON \(line 4, .*re-download"):
    read_checkpoint(tmp_path)


# ---- adapter folders ----

def _adapter(value=1.0):
  method = peft.get_method("lora")
  trained = {"params": {"head/kernel": np.full((4, 3), value, np.float32),
                        "head/bias": np.zeros(3, np.float32)},
             "adapters": {"blocks_0/attn/query": {"lora_a": np.ones((2, 4), np.float32),
                                                  "lora_b": np.zeros((4, 2), np.float32)}}}
  return method, trained


def _saved(tmp_path, **kwargs):
  method, trained = _adapter()
  save_adapter(tmp_path / "a", method, trained, base_model="vit_b16", **kwargs)
  return tmp_path / "a"


def test_adapter_stores_class_names_and_preprocessing(tmp_path):
  folder = _saved(tmp_path, class_names=["benign", "malignant", "normal"],
                  preprocessing={"image_size": 224, "mean": np.array([0.5] * 3), "std": (0.25, 0.25, 0.25)})
  adapter = load_adapter(folder)
  assert adapter.class_names == ("benign", "malignant", "normal")
  assert adapter.preprocessing == {"image_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3}
  check_adapter(adapter, base_model="vit_b16", class_names=["benign", "malignant", "normal"])  # a match
  old = load_adapter(_saved(tmp_path / "old"))  # saved without them: None, not a guess
  assert old.class_names is None and old.preprocessing is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_names=["a", "b"]),
     r"trained on classes \['a', 'b', 'c'\] but the data has \['a', 'b'\]; evaluate it on data with"),
    (dict(class_names=["c", "b", "a"]), r"has \['c', 'b', 'a'\] \(the same classes in another order\)"),
    (dict(base_model="resnet50"), r"trained on base model 'vit_b16' but is applied to 'resnet50'")])
def test_adapter_applied_to_other_classes_or_model_names_both_sides(tmp_path, kwargs, message):
  adapter = load_adapter(_saved(tmp_path, class_names=["a", "b", "c"]))
  with pytest.raises(AdapterMismatchError, match=message) as e:
    check_adapter(adapter, **kwargs)
  assert str(tmp_path / "a") in str(e.value)


def test_adapter_without_class_names_is_checked_by_its_head_size(tmp_path):
  adapter = load_adapter(_saved(tmp_path))
  check_adapter(adapter, class_names=["x", "y", "z"])
  with pytest.raises(AdapterMismatchError, match=r"a 3-class head but the data has 2 classes \['x', 'y'\]"):
    check_adapter(adapter, class_names=["x", "y"])


def test_adapter_config_that_is_not_json_names_file_and_line(tmp_path):
  folder = _saved(tmp_path)
  (folder / CONFIG).write_text('{"method": "lora",\n')
  with pytest.raises(CorruptFileError, match=r"adapter_config\.json is not valid JSON \(line 2, .*re-save"):
    load_adapter(folder)


def test_truncated_adapter_weights_name_file_and_expected_size(tmp_path):
  folder = _saved(tmp_path)
  data = (folder / WEIGHTS).read_bytes()
  (folder / WEIGHTS).write_bytes(data[:-10])
  expected = rf"adapter_model\.safetensors .*expected {len(data):,} bytes, found {len(data) - 10:,}.*re-save"
  with pytest.raises(CorruptFileError, match=expected):
    load_adapter(folder)


def test_adapter_tensor_in_unknown_section_is_named(tmp_path):
  folder = _saved(tmp_path)
  zeros = np.zeros(3, np.float32)
  safetensors.numpy.save_file({"params/head/bias": zeros, "optimizer/mu": zeros}, folder / WEIGHTS)
  with pytest.raises(CorruptFileError, match=r"tensor 'optimizer/mu' is not under one of params/, adapters/, "
                                             r"batch_stats/"):
    load_adapter(folder)


def test_nan_adapter_is_refused_on_load_and_never_saved(tmp_path):
  folder = _saved(tmp_path)
  tensors = safetensors.numpy.load_file(folder / WEIGHTS)
  tensors["params/head/kernel"][0, 0] = np.nan
  safetensors.numpy.save_file(tensors, folder / WEIGHTS)
  expected = (r"adapter_model\.safetensors: tensor params/head/kernel holds NaN weights .*diverged run; "
              r"retrain with a lower learning rate")
  with pytest.raises(NonFiniteAdapterError, match=expected):
    load_adapter(folder)
  method, trained = _adapter(np.inf)
  with pytest.raises(NonFiniteAdapterError, match=r"Not saving .*head/kernel holds infinite weights"):
    save_adapter(tmp_path / "inf", method, trained, base_model="vit_b16")
  assert not (tmp_path / "inf").exists()  # nothing written


# ---- results store ----

def _record(seed=0, status="ok", **config):
  return {"kind": "final", "model": "vit_b16", "method": "lora", "dataset": "ham10000", "regime": 1.0,
          "seed": seed, "lr": 1e-3, "status": status,
          "config": {"batch_size": 64, "peft": {"rank": 8}, **config}}


def test_store_counts_a_run_recorded_twice_once(tmp_path):
  store = ResultsStore(tmp_path / "results.jsonl")
  for record in (_record(), _record(seed=1), {**_record(), "finished_at": "later"}):  # 2 sweeps, 1 workdir
    store.append(record)
  assert len(store.lines()) == 3
  records = store.records()
  assert [r["seed"] for r in records] == [1, 0] and records[1]["finished_at"] == "later"  # the latest kept
  assert len(store.finished()) == 2


def test_store_never_merges_runs_made_under_different_configs(tmp_path):
  store = ResultsStore(tmp_path / "results.jsonl")
  store.append(_record())
  store.append(_record(epochs=100))  # same coordinates, another protocol
  assert len(store.records()) == 2


def test_store_keeps_a_success_over_a_later_failure_of_the_same_run(tmp_path):
  store = ResultsStore(tmp_path / "results.jsonl")
  for record in (_record(status="failed"), _record(), _record(status="failed")):
    store.append(record)
  assert [r["status"] for r in store.records()] == ["ok"]


def test_config_hash_is_that_of_the_stored_config():
  config = ml_collections.ConfigDict({"regimes": (0.1, 1.0), "lr": 1e-3, "peft": {"targets": ("a", "b")}})
  stored = json.loads(json.dumps(config.to_dict()))  # tuples come back as lists
  assert config_hash(config) == config_hash(config.to_dict()) == config_hash(stored)
  assert run_key({**_record(), "config": stored})[-1] == config_hash(config)
  config.lr = 3e-3
  assert config_hash(config) != config_hash(stored)


# ---- one writer per workdir ----

def test_second_workdir_lock_is_refused_naming_the_holder(tmp_path):
  with WorkdirLock(tmp_path / "w"):
    holder = json.loads((tmp_path / "w" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    expected = (rf"in use by process {os.getpid()} on {socket.gethostname()} running `.*pytest.*`.*wait for "
                r"it to finish or use another --workdir")
    with pytest.raises(WorkdirLockedError, match=expected):
      with WorkdirLock(tmp_path / "w"):
        pass
    assert json.loads((tmp_path / "w" / ".lock").read_text()) == holder  # the first holder's file untouched
  with WorkdirLock(tmp_path / "w"):  # released on exit
    pass


def test_workdir_lock_of_a_killed_process_is_released(tmp_path):
  script = ("import sys, time; from medpeft_jax.workdir import WorkdirLock\n"
            f"with WorkdirLock({str(tmp_path)!r}):\n  print('locked', flush=True); time.sleep(60)\n")
  child = subprocess.Popen([sys.executable, "-c", script, "--workdir", str(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirLockedError, match=rf"process {child.pid} on .* running `.*--workdir "):
      with WorkdirLock(tmp_path):
        pass
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  with WorkdirLock(tmp_path):  # kill -9 leaves no stale lock
    pass


def test_workdir_lock_is_taken_by_process_zero_only(tmp_path, monkeypatch):
  with WorkdirLock(tmp_path):
    monkeypatch.setattr("jax.process_index", lambda: 1)
    with WorkdirLock(tmp_path):  # another process of the same job: shares the workdir
      pass
  assert (tmp_path / ".lock").read_text() == ""  # released by the holder, not by process 1


# ---- strict configs ----

def _parse(argv, monkeypatch):
  """Parses a `python -m launch.X ...` command line as the launchers do, in-process."""
  monkeypatch.chdir(REPO)
  argv = ["launch", *shlex.split(argv)[3:]]
  values = flags.FlagValues()
  holder = define_config_file("config", "config", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  return holder.value


def _commands(text):
  """Every `python -m launch.bench --config configs/bench.py:...` command in `text`, continuations joined."""
  lines = [" ".join(line.split()) for line in text.replace("\\\n", " ").splitlines()]
  return [line for line in lines if line.startswith("python -m launch.bench --config configs/bench.py:")]


SWEEP_COMMANDS = _commands((REPO / "README.md").read_text()) + _commands(bench_config.__doc__)


@pytest.mark.parametrize("command", SWEEP_COMMANDS)
def test_readme_sweep_commands_parse(command, monkeypatch):
  config = _parse(command, monkeypatch)
  for arg in shlex.split(command):
    if arg.startswith("--config."):
      path, value = arg[len("--config."):].split("=", 1)
      node = config
      for part in path.split("."):
        node = node[part]
      assert str(node) == value or node == float(value), arg


def test_sweep_sections_are_settable_and_unset_by_default(monkeypatch):
  assert len(SWEEP_COMMANDS) >= 2
  options = "--config.dataset_options.ham10000"
  config = _parse(f"python -m launch.bench --config configs/bench.py:datasets=ham10000 --config.lr.lora=1e-3 "
                  f"{options}.max_side=256 {options}.on_bad_image=skip {options}.near_duplicates=True",
                  monkeypatch)
  assert config_checks.fixed_lr(config, "lora") == 1e-3 and config_checks.fixed_lr(config, "full") is None
  assert config_checks.fixed_lr(config, "scratch") is None
  assert config_checks.dataset_options(config, "ham10000") == {"max_side": 256, "on_bad_image": "skip",
                                                                "near_duplicates": True}
  assert config_checks.dataset_options(config, "fitzpatrick17k") == {}  # its default label_set "3" is unset
  assert config.weights.resnet50 == "" and config.manual_dirs.busi == ""


@pytest.mark.parametrize("argument, message", [
    ("--config.learning_rate=1e-3",
     r"--config\.learning_rate: config has no field 'learning_rate'\. Did you mean lr\?"),
    ("--config.mesh.dat=2", r"config\.mesh has no field 'dat'\. Did you mean data\? Valid: data, fsdp"),
    ("--config.lr.rank=2", r"config\.lr is a float, it has no field 'rank'")])
def test_unknown_config_field_suggests_the_right_one(argument, message, monkeypatch):
  with pytest.raises(UnknownFieldError, match=message):
    _parse(f"python -m launch.train --config configs/classify.py:smoke=True {argument}", monkeypatch)


def test_unknown_config_argument_suggests_the_right_one(monkeypatch):
  with pytest.raises(UnknownFieldError, match=r"\(after ':'\) has no field 'modle'\. Did you mean model\?"):
    _parse("python -m launch.train --config configs/classify.py:modle=vit_b16", monkeypatch)
  assert suggest_key("bs", ["batch_size", "bn_mode"]) == "batch_size"
  assert suggest_key("zzz", ["batch_size"]) is None


@pytest.mark.parametrize("field, value, message", [
    ("grad_clip", 0.0, r"config\.grad_clip=0\.0 .*expected a positive .*0 clips every gradient to zero"),
    ("bn_mode", "frozn", r"config\.bn_mode='frozn' is not valid; valid values: train, frozen"),
    ("regime", 1.5, r"config\.regime=1\.5 .*expected a fraction in \(0, 1\]"),
    ("dtype", "float17", r"config\.dtype='float17' is not valid; valid values: float32, bfloat16"),
    ("batch_size", 0, r"config\.batch_size=0 .*expected an integer >= 1"),
    ("grad_accum", 3, r"config\.grad_accum=3 .*divides batch_size=8"),
    ("epochs", 0, r"config\.epochs=0 .*>= 1 \(or set total_steps > 0\)"),
    ("lr", -1e-3, r"config\.lr=-0\.001 .*>= 0"),
    ("warmup_fraction", 1.0, r"config\.warmup_fraction=1\.0 .*\[0, 1\)"),
    ("label_smoothing", -0.1, r"config\.label_smoothing=-0\.1 .*\[0, 1\)"),
    ("eval_batch_size", -1, r"config\.eval_batch_size=-1"),
    ("checkpoint_every", 0, r"config\.checkpoint_every=0 .*a number of steps >= 1"),
    ("eval_every", -1, r"config\.eval_every=-1 .*>= 0 \(0: every epoch\)"),
    ("method", "loar", r"config\.method='loar' is not valid; valid values: .*lora.*scratch"),
    ("model", "vit_b61", r"config\.model='vit_b61' is not valid; valid values: .*vit_b16"),
    ("dataset", "ham1000", r"config\.dataset='ham1000' is not valid; valid values: .*ham10000"),
    ("init", "randon", r"config\.init='randon' is not valid; valid values: pretrained, random")])
def test_classify_config_is_checked_up_front(field, value, message):
  config_checks.check_classify(classify.get_config("smoke=True"))
  config = classify.get_config("smoke=True")
  config[field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_classify(config)


def test_classify_epochs_may_be_zero_with_a_step_budget():
  config = classify.get_config("smoke=True")
  config.epochs, config.total_steps = 0, 10
  config_checks.check_classify(config)


@pytest.mark.parametrize("field, value, message", [
    ("method", "lora_xl", r"config\.method='lora_xl' is not valid; valid values: adalora, .*loha.*svdiff"),
    ("image_size", 20, r"config\.image_size=20 .*multiple of 8"),
    ("grad_clip", 0.0, r"grad_clip=0 clips every gradient to zero"),
    ("ema_decay", 1.0, r"config\.ema_decay=1\.0 .*\[0, 1\)")])
def test_t2i_config_is_checked_up_front(field, value, message):
  config_checks.check_t2i(t2i.get_config("smoke=True"))
  config = t2i.get_config("smoke=True")
  config[field] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_t2i(config)


def test_dataset_option_typo_is_checked():
  config = classify.get_config("smoke=True")
  config.dataset_options = {"on_bad_image": "skipp"}
  with pytest.raises(config_checks.ConfigError, match=r"dataset_options\.on_bad_image='skipp' .*error, skip"):
    config_checks.check_classify(config)


def test_adapter_for_another_model_or_head_is_an_error_naming_what_does_not_fit():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from medpeft_jax import models, presets  # noqa: PLC0415

  def tiny(num_classes, width=32):
    model = models.create_model("vit_b16", num_classes=num_classes, **{**presets.TINY_MODELS["vit"], "width": width})
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

  method = peft.get_method("lora", rank=2)
  model3, variables3 = tiny(3)
  trainable = method.init(jax.random.key(1), variables3["params"])
  model2, variables2 = tiny(2)
  with pytest.raises(ValueError, match=r"does not fit the model: .*head/bias \(3,\) \(model: \(2,\)\)"):
    method.apply(model2, variables2, trainable, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"does not fit the model"):
    method.merge(tiny(3, width=16)[1]["params"], trainable)


def test_regime_outside_zero_one_is_refused_in_the_config():
  config = classify.get_config("regime=1.5")
  with pytest.raises(config_checks.ConfigError, match=r"config.regime=1.5 .* \(0, 1\]"):
    config_checks.check_classify(config)


def test_train_command_sets_dataset_options_and_init(monkeypatch):
  config = _parse("python -m launch.train --config configs/classify.py:dataset=image_folder "
                  "--config.dataset_options.on_bad_image=skip --config.init=random", monkeypatch)
  assert config.dataset_options.on_bad_image == "skip" and config.init == "random"
  assert config_checks.set_options("image_folder", config.dataset_options) == {"on_bad_image": "skip"}


def test_second_sweep_on_a_workdir_stops_before_writing(tmp_path):
  from medpeft_jax import bench  # noqa: PLC0415

  config = bench_config.sweep(["vit_b16"], ["linear"], ["image_folder"], [1.0], [0], smoke=True)
  config.manual_dirs["image_folder"] = str(tmp_path / "unused")
  with WorkdirLock(tmp_path), pytest.raises(WorkdirLockedError, match=r"is in use by process \d+"):
    bench.run_sweep(config, tmp_path)
  assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "runs").exists()


def _cell_record(seed, lr=1e-3, f1=0.8, epochs=2):
  return {"kind": "final", "status": "ok", "model": "m", "method": "lora", "dataset": "d", "regime": 1.0,
          "seed": seed, "lr": lr, "dataset_size": 10, "metrics": {"f1_macro": f1},
          "config": {"seed": seed, "lr": lr, "epochs": epochs}}


@pytest.mark.parametrize("records, message", [
    ([_cell_record(0), _cell_record(1, lr=3e-3)], r"made under 2 different configs \(learning rates \[0.001, 0.003\]\)"),
    ([_cell_record(0), _cell_record(1, epochs=10)], r"made under 2 different configs"),
    ([_cell_record(0), _cell_record(0, f1=0.7)], r"seed\(s\) \[0\] recorded more than once"),
    ([_cell_record(0), _cell_record(1, f1=float("nan"))], r"f1_macro is not finite for seed\(s\) \[1\]")])
def test_report_never_pools_protocols_seeds_twice_or_nan(records, message, tmp_path):
  from medpeft_jax import bench  # noqa: PLC0415

  with pytest.raises(ValueError, match=message):
    bench.write_report(records, tmp_path)
  assert bench.write_report([_cell_record(0), _cell_record(1, f1=0.7)], tmp_path)  # one protocol, two seeds: fine
