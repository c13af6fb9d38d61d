"""The text-to-image sweep: U-Net strategies x datasets x regimes x seeds, each run trained, sampled, scored.

One run chains what launch.train_t2i, launch.generate and launch.fid do: `train_t2i` fine-tunes the
U-Net; its adapter is merged and, for each sampling seed of `fid.seeds`, the prompts of `fid.num_images`
test images (a fixed seeded choice per dataset) are sampled; each sample set is scored by FID and
KID against those test images, whose Inception features are computed once per dataset. The record
is the classification sweep's (same store, same resume rules) with
`"metrics": {"fid": mean over sampling seeds, "fid_std", "kid", "kid_std", "fid_per_seed", ...}`,
so launch.report ranks it, lower first. Sample sets already written are reused on a re-run.
"""

from __future__ import annotations

import functools
import pathlib

import ml_collections
import numpy as np

from medpeft_jax import config_checks, data, peft, presets
from medpeft_jax.bench.sweep import RunSpec, Sweep
from medpeft_jax.diffusion import cache as latent_cache
from medpeft_jax.diffusion import fid
from medpeft_jax.diffusion.pipeline import StableDiffusion, generate_to_folder
from medpeft_jax.models.weights.inception import load_fid_inception
from medpeft_jax.train import t2i


def run_config(bench, spec: RunSpec) -> ml_collections.ConfigDict:
  """The t2i training config of one run: the bench's `run` template with the run's coordinates."""
  c = ml_collections.ConfigDict(bench.run.to_dict())
  c.method, c.dataset, c.regime, c.seed, c.lr = spec.method, spec.dataset, spec.regime, spec.seed, spec.lr
  c.pipeline = bench.pipeline
  c.manual_dir = bench.manual_dirs.get(spec.dataset, "")
  c.dataset_options = config_checks.dataset_options(bench, spec.dataset)
  c.caption = bench.captions.get(spec.dataset, c.caption)
  c.progress = False
  return c


class RealSet:
  """A dataset's FID reference: `num_images` test images (seeded choice), their prompts and features."""

  def __init__(self, bench, dataset: str, folder: pathlib.Path, inception):
    run = bench.run
    builder = data.load(dataset, data_dir=run.data_dir, manual_dir=bench.manual_dirs.get(dataset) or None,
                        **config_checks.dataset_options(bench, dataset))
    source = latent_cache.PromptSource(builder, bench.fid.split, bench.captions.get(dataset, run.caption))
    n = min(bench.fid.num_images, len(source))
    if n < 2:
      raise ValueError(f"FID needs at least 2 {bench.fid.split} images of {dataset}; it has {len(source)}.")
    chosen = np.sort(np.random.default_rng(bench.fid.choice_seed).permutation(len(source))[:n])
    self.prompts = [source[i]["prompt"] for i in chosen]
    file = folder / f"{dataset}_{bench.fid.split}_{run.image_size}px_{n}.npz"
    if not file.is_file():
      folder.mkdir(parents=True, exist_ok=True)
      images = latent_cache.uint8_images(source, chosen, run.image_size)
      np.savez(file, images=images, features=fid.inception_features(*inception, images, bench.fid.batch_size))
    with np.load(file) as npz:
      self.features = npz["features"]


def score_samples(bench, sd: StableDiffusion, inception, real: RealSet, unet_params, folder: pathlib.Path) -> dict:
  """Samples the real set's prompts once per sampling seed; FID and KID of each set against the real one."""
  f, per_seed, kids = bench.fid, [], []
  for seed in f.seeds:
    out = folder / f"samples_seed{seed}"
    if (out / "images.npz").is_file():
      images = fid.load_images(out / "images.npz")
    else:
      images = generate_to_folder(sd, real.prompts, out, steps=f.steps, guidance=f.guidance, size=bench.run.image_size,
                                  seed=int(seed), sampler=f.sampler or None, batch_size=f.batch_size,
                                  unet_params=unet_params)
    features = fid.inception_features(*inception, images, f.batch_size)
    per_seed.append(fid.fid_from_features(real.features, features))
    kids.append(fid.kernel_inception_distance(real.features, features, subsets=f.kid_subsets,
                                              subset_size=f.kid_subset_size)[0])
  return {"fid": float(np.mean(per_seed)), "fid_std": float(np.std(per_seed)), "fid_per_seed": per_seed,
          "kid": float(np.mean(kids)), "kid_std": float(np.std(kids)), "num_images": len(real.prompts),
          "sampling_seeds": [int(s) for s in f.seeds]}


def run_t2i_sweep(bench: ml_collections.ConfigDict, workdir) -> list[dict]:
  """Runs every missing (method, dataset, regime, seed) of a `task="t2i"` sweep; returns the records."""
  workdir = pathlib.Path(workdir)
  if not bench.fid.weights:
    raise ValueError("fid.weights is empty: give the FID Inception weights "
                     "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth), a local file.")
  model, = bench.models
  cells = [(d, m, r, s) for d in bench.datasets for m in bench.methods for r in bench.regimes for s in bench.seeds]
  for dataset, method, regime, seed in cells:  # every run's config is valid before the first one starts
    config_checks.check_t2i(run_config(bench, RunSpec("final", model, method, dataset, float(regime), int(seed), 0.0)))
  with Sweep(workdir, len(cells)) as sweep:
    return _run_cells(bench, sweep, cells, model, workdir)


def _run_cells(bench, sweep: Sweep, cells, model: str, workdir: pathlib.Path) -> list[dict]:
  @functools.cache  # loaded by the first run that is not finished yet: a re-run of a done sweep loads nothing
  def scorers():
    return StableDiffusion.load(bench.pipeline), load_fid_inception(bench.fid.weights)[:2]

  reals: dict[str, RealSet] = {}
  records = []
  for dataset, method, regime, seed in cells:
    lr = float(bench.lr.get(method) or presets.default_lr(method, "t2i"))
    spec = RunSpec("final", model, method, dataset, float(regime), int(seed), lr)
    config = run_config(bench, spec)

    def execute(folder: pathlib.Path, config=config, dataset=dataset) -> dict:
      results = t2i.train_t2i(config, folder / "train")
      sd, inception = scorers()
      if dataset not in reals:
        reals[dataset] = RealSet(bench, dataset, workdir / "fid_real", inception)
      adapter = peft.load_adapter(folder / "train" / "adapter")
      unet_params = adapter.method.merge(sd.unet.params, adapter.trainable)
      metrics = score_samples(bench, sd, inception, reals[dataset], unet_params, folder)
      return {"dataset_size": results["dataset_size"], "metrics": metrics,
              **{k: results[k] for k in ("trainable_params", "total_params", "step_time_s",
                                         "xla_memory_estimate_bytes", "adapter_bytes", "probe_loss_start",
                                         "probe_loss_end")}}

    records.append(sweep.run(spec, config, execute, lambda r: f"FID {r['metrics']['fid']:.4g}"))
  return records
