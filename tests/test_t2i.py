"""The text-to-image benchmark end to end on a tiny pipeline and real Br35H images; exact resume."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
from absl import flags

from configs import paper_table4
from configs import t2i as t2i_config
from medpeft_jax import assets, bench, presets
from medpeft_jax.models.weights import diffusers as sd_weights
from medpeft_jax.train import t2i
from tests import sd_fakes
from tests.test_inception import fid_inception_without_download

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny pipeline whose U-Net has every block kind (one layer each) and 24 real Br35H slices."""
  root = tmp_path_factory.mktemp("t2i")
  sd_fakes.write_pipeline(root / "pipe", layers_per_block=1)
  for label in ("no", "yes"):
    (root / "br35h" / label).mkdir(parents=True)
    for f in sorted((assets.asset_path("br35h") / label).iterdir())[:12]:
      shutil.copy(f, root / "br35h" / label / f.name)
  torch.save(fid_inception_without_download().state_dict(), root / "inception.pth")
  return root


def run_config(setup, method, **fields):
  c = t2i_config.get_config(f"method={method},dataset=image_folder,seed=0,smoke=True")
  c.pipeline, c.manual_dir = str(setup / "pipe"), str(setup / "br35h")
  c.data_dir, c.cache_dir = str(setup / "tfds"), str(setup / "cache")
  c.caption, c.progress = "a brain MRI, tumour: {label}", False
  c.update(fields)
  return c


def test_sweep_trains_samples_scores_and_reports(setup, tmp_path):
  c = paper_table4.sweep(["full", "bias", "lora"], ["image_folder"], [1.0], [0], smoke=True)
  c.pipeline, c.fid.weights = str(setup / "pipe"), str(setup / "inception.pth")
  c.manual_dirs["image_folder"] = str(setup / "br35h")
  c.captions["image_folder"] = "a brain MRI, tumour: {label}"
  c.run.data_dir, c.run.cache_dir = str(setup / "tfds"), str(setup / "cache")
  c.run.total_steps, c.run.checkpoint_every = 6, 6
  c.lr.update({"full": 1e-4, "bias": 1e-2, "lora": 1e-2})  # a few steps must move the tiny U-Net
  records = bench.run_sweep(c, tmp_path)

  assert [r["status"] for r in records] == ["ok"] * 3, [r.get("error") for r in records]
  for r in records:
    assert r["probe_loss_end"] < r["probe_loss_start"], r["method"]  # fixed-noise probe: training learns
    m = r["metrics"]
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and np.isfinite(m["kid"]) and m["num_images"] >= 2
    assert (pathlib.Path(r["workdir"]) / "samples_seed0" / "grid.png").is_file()
  by_method = {r["method"]: r for r in records}
  assert by_method["full"]["trainable_params"] == by_method["full"]["total_params"]
  assert by_method["bias"]["trainable_params"] < by_method["lora"]["trainable_params"]
  assert (pathlib.Path(by_method["lora"]["workdir"]) / "train/adapter/pytorch_lora_weights.safetensors").is_file()
  # Samples from the fine-tuned U-Nets differ from one another.
  samples = [np.load(f"{r['workdir']}/samples_seed0/images.npz")["images"] for r in records]
  assert not np.array_equal(samples[0], samples[1])
  # A re-run finds every run finished: nothing is trained again.
  assert bench.run_sweep(c, tmp_path) == records
  markdown = bench.write_report(records, tmp_path / "report", metric="fid")
  assert "FID" in markdown and all(name in markdown for name in ("full", "bias", "lora"))
  assert any((tmp_path / "report").glob("*.csv"))


def test_every_strategy_initialises_on_the_tiny_unet(setup):
  _, params, _ = sd_weights.load_component(setup / "pipe", "unet")
  total = sum(x.size for x in jax.tree.leaves(params))
  counts = {}
  for name in presets.PRESETS["unet"]:
    method = presets.build_method(presets.UNET, name)
    counts[name] = method.count(params, method.init(jax.random.key(0), params)).trainable
  assert counts["full"] == total
  assert 0 < counts["norm"] < counts["bias"] < counts["difffit"] < counts["attention"] < counts["bias_norm_attention"]
  assert 0 < counts["svdiff"] < counts["lora"] < counts["full"]


def test_killed_run_resumes_bit_identically(setup, tmp_path, monkeypatch):
  """SV-Diff (frozen SVD state) with EMA and min-SNR: a crash after step 5 of 6, then a re-run."""
  config = run_config(setup, "svdiff", total_steps=6, checkpoint_every=2, ema_decay=0.9, min_snr_gamma=5.0)
  reference = t2i.train_t2i(config, tmp_path / "reference")

  calls = {"n": 0}
  real_global_batch = t2i.sharding.global_batch

  def crash_at_sixth_batch(local, mesh):
    calls["n"] += 1
    if calls["n"] == 6:
      raise KeyboardInterrupt("simulated kill")
    return real_global_batch(local, mesh)

  monkeypatch.setattr(t2i.sharding, "global_batch", crash_at_sixth_batch)
  with pytest.raises(KeyboardInterrupt):
    t2i.train_t2i(config, tmp_path / "killed")
  assert [r["step"] for r in _train(tmp_path / "killed")] == [1, 2, 3, 4, 5]  # step 5 is past the last checkpoint
  monkeypatch.undo()
  resumed = t2i.train_t2i(config, tmp_path / "killed")

  assert _train(tmp_path / "killed") == _train(tmp_path / "reference")
  adapter = "adapter/adapter_model.safetensors"
  assert (tmp_path / "killed" / adapter).read_bytes() == (tmp_path / "reference" / adapter).read_bytes()
  assert resumed["probe_loss_end"] == reference["probe_loss_end"]
  assert reference["trainable_params"] == sum(
      min(np.prod(s[:-1]), s[-1]) for s in _kernel_shapes(setup))


def _train(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if json.loads(line)["split"] == "train"]


def _kernel_shapes(setup):
  _, params, _ = sd_weights.load_component(setup / "pipe", "unet")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [x.shape for path, x in flat if path[-1].key == "kernel"]
