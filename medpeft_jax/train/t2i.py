"""Text-to-image fine-tuning of the Stable Diffusion U-Net: `train_t2i(config, workdir) -> results`.

A driver of train/loop.py. One run = one U-Net strategy x dataset x regime x seed (configs/t2i.py).
The text encoder and VAE stay frozen and run once: the training split is encoded into a latent/text
cache under `cache_dir` (diffusion/cache.py), shared by every run. A step samples latents from the
cached posteriors, noises them at uniform random timesteps and regresses the schedule's target
(optionally min-SNR weighted); AdamW at a constant learning rate (runtime data, train/optim.py)
after grad-norm clipping; optional EMA of the trainable leaves.

Batches are a pure function of (seed, step) — one seeded permutation of the regime per epoch — and
the state carries the RNG, so a run killed at any point resumes to the bit-identical result. A fixed
probe (the first `probe_size` training examples, fixed noise and timesteps) measures the loss before
training and at every checkpoint: a number that falls when training works, unlike the per-step loss,
which swings with the sampled timesteps. Writes checkpoints/, adapter/ (the EMA weights when on; LoRA
also as diffusers' pytorch_lora_weights.safetensors), metrics.jsonl, tensorboard/, results.json.
"""

from __future__ import annotations

import functools
import pathlib
import statistics

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from medpeft_jax import config_checks, data, peft, presets
from medpeft_jax.data.pipeline import step_rows
from medpeft_jax.data.regimes import regime_indices
from medpeft_jax.diffusion import cache as latent_cache
from medpeft_jax.diffusion.pipeline import StableDiffusion
from medpeft_jax.diffusion.schedule import NoiseSchedule, diffusion_loss
from medpeft_jax.fileio import fingerprint
from medpeft_jax.models.weights import diffusers as sd_weights
from medpeft_jax.peft.interop.diffusers import export_unet_lora
from medpeft_jax.train import logs, loop, optim, sharding
from medpeft_jax.train.programs import PROGRAMS, xla_memory_estimate
from medpeft_jax.workdir import WorkdirLock

_BOOKKEEPING = frozenset({"progress", "log_every", "keep_checkpoints", "probe_size", "plugins", "data_dir",
                          "manual_dir", "cache_dir", "pipeline"})
_CACHED = ("latent_mean", "latent_logvar", "text")


@flax.struct.dataclass
class T2IState:
  step: jax.Array
  trainable: dict
  opt_state: dict
  ema: dict  # {} when EMA is off
  rng: jax.Array  # a raw uint32 key (checkpointable)
  method_state: dict = flax.struct.field(default_factory=dict)  # method.init_step_state; {} for most


def make_t2i_step(unet, method: peft.Method, optimizer, schedule: NoiseSchedule, scaling_factor: float, *,
                  min_snr_gamma: float = 0.0, ema_decay: float = 0.0):
  """`step(state, params, batch, derived) -> (state, metrics)` (batch: latent_mean/latent_logvar/text), and
  `loss_fn(trainable, params, batch, derived, rng)`."""

  def loss_fn(trainable, params, batch, derived, rng):
    latent_rng, loss_rng = jax.random.split(rng)
    x0 = latent_cache.sample_latents(batch["latent_mean"], batch["latent_logvar"], latent_rng, scaling_factor)
    context = batch["text"].astype(jnp.float32)
    predict = lambda noisy, t: method.apply(unet, {"params": params}, trainable, noisy, t, context,
                                            derived=derived)
    return diffusion_loss(schedule, predict, x0, loss_rng, min_snr_gamma)

  def step(state: T2IState, params, batch, derived):
    rng, step_rng = jax.random.split(state.rng)
    objective = lambda trainable, *args: loss_fn(trainable, *args) + method.loss_term(trainable)  # noqa: E731
    value, grads = jax.value_and_grad(objective)(state.trainable, params, batch, derived, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    new, method_state = method.after_update(optax.apply_updates(state.trainable, updates), grads,
                                            state.method_state, state.step + 1)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, new) if ema_decay else state.ema
    state = state.replace(step=state.step + 1, trainable=new, opt_state=opt_state, ema=ema, rng=rng,
                          method_state=method_state)
    return state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  return step, loss_fn


class PermutationBatches:
  """Cached latents of the regime, a pure function of the step (`data.pipeline.step_rows`): nothing to restore."""

  def __init__(self, cached: dict, indices: np.ndarray, batch_size: int, seed: int, mesh):
    self.cached, self.indices, self.batch_size, self.seed, self.mesh = cached, indices, batch_size, seed, mesh

  def next(self, step: int) -> dict:
    rows = self.indices[step_rows(len(self.indices), self.batch_size, self.seed, step)]
    return sharding.global_batch(gather(self.cached, rows), self.mesh)

  def state(self) -> None:
    return None

  def restore(self, state) -> None:
    del state


def gather(arrays: dict, rows: np.ndarray) -> dict:
  return {k: np.ascontiguousarray(arrays[k][rows]) for k in _CACHED}


class ProbeLoss:
  """The fixed-noise loss of the probe examples, at the start and at every checkpoint (of the EMA when on)."""

  name = "probe"

  def __init__(self, every: int, loss):
    self.every, self.loss, self.start = every, loss, None

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every == 0 or step == total_steps

  def weights(self, state):
    return state.ema if state.ema else state.trainable

  def __call__(self, state, step: int) -> dict:
    return {"loss": self.loss(self.weights(state))}

  def state(self) -> dict:
    return {"start": self.start}

  def restore(self, state: dict) -> None:
    self.start = state["start"]


def load_training_cache(config, load_sd) -> dict:
  """The encoded training split (built once, by process 0 first)."""
  builder = data.load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir or None,
                      **config_checks.set_options(config.dataset, config.dataset_options))
  build = functools.partial(latent_cache.cached_split, builder, "train", pipeline=config.pipeline,
                            size=config.image_size, cache_dir=config.cache_dir, load_sd=load_sd,
                            caption=config.caption)
  if jax.process_index() == 0:
    out = build()
  multihost_utils.sync_global_devices("latent cache built")
  return out if jax.process_index() == 0 else build()


def train_t2i(config: ml_collections.ConfigDict, workdir) -> dict:
  """Fine-tunes the U-Net with `config.method`; writes the adapter and results.json; returns the results.

  Holds the workdir's lock throughout: a second run on the same workdir stops at once.
  """
  config_checks.check_t2i(config)  # loads the plugins; before anything is built or written
  with WorkdirLock(workdir):
    return _train_t2i(config, pathlib.Path(workdir))


def _train_t2i(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  logs.quiet_libraries()
  logger = logs.RunLogger(workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  placement = sharding.Placement(mesh, config.mesh.rules, config.mesh.min_shard_size)
  replicated = sharding.NamedSharding(mesh, sharding.P())

  cached = load_training_cache(config, lambda: StableDiffusion.load(config.pipeline))
  indices = regime_indices(np.zeros(cached["meta"]["examples"], np.int32), config.regime, config.seed)
  if len(indices) < config.batch_size:
    raise ValueError(f"{len(indices)} training examples (regime {config.regime}) do not fill one batch "
                     f"of config.batch_size={config.batch_size}.")
  unet, params, report = sd_weights.load_component(config.pipeline, "unet", dtype=jnp.dtype(config.dtype),
                                                   remat=config.remat)
  logs.log_info("%s", report)
  params = jax.device_put(params, placement.params(params))
  schedule_file = pathlib.Path(config.pipeline) / "scheduler" / "scheduler_config.json"
  schedule = NoiseSchedule.from_config(schedule_file) if schedule_file.is_file() else NoiseSchedule()
  method = presets.build_method(presets.UNET, config.method, **dict(config.peft)).for_run(config.total_steps)
  lr = config.lr or presets.default_lr(config.method, "t2i")
  optimizer_spec = optim.OptimizerSpec(config.grad_clip, config.weight_decay, "constant")
  optimizer = optimizer_spec.build(lr)
  step_fn, loss_fn = make_t2i_step(unet, method, optimizer, schedule, cached["meta"]["scaling_factor"],
                                   min_snr_gamma=config.min_snr_gamma, ema_decay=config.ema_decay)

  def init(rng):
    init_rng, rng = jax.random.split(rng)
    trainable = method.init(init_rng, params)
    return T2IState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable),
                    jax.tree.map(jnp.copy, trainable) if config.ema_decay else {}, rng, method.init_step_state(trainable))

  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  state_sh = placement.state(abstract, placement.trainable(abstract.trainable))
  state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
  derived = jax.jit(method.derived_state, out_shardings=placement.derived(
      jax.eval_shape(method.derived_state, params)))(params)  # one program for all the decompositions
  params_sh = jax.tree.map(lambda x: x.sharding, params)
  derived_sh = jax.tree.map(lambda x: x.sharding, derived)
  batch_sh = sharding.batch_sharding(mesh)
  shapes = {k: jax.ShapeDtypeStruct((config.batch_size, *cached[k].shape[1:]), cached[k].dtype, sharding=batch_sh)
            for k in _CACHED}
  statics = (unet, method, optimizer_spec, schedule, cached["meta"]["scaling_factor"], config.min_snr_gamma,
             config.ema_decay)
  train_step, compile_s = PROGRAMS.compile_once(
      statics, lambda: step_fn, (state, params, shapes, derived), in_shardings=(state_sh, params_sh, batch_sh, derived_sh),
      out_shardings=(state_sh, replicated), donate_argnums=0, name=f"U-Net + {config.method} train step")
  probe_batch = jax.device_put(gather(cached, indices[:min(config.probe_size, len(indices))]), replicated)
  probe, _ = PROGRAMS.compile_once(statics, lambda: functools.partial(loss_fn, rng=jax.random.PRNGKey(0)),
                                   (state.trainable, params, probe_batch, derived), name="probe loss")
  probe_loss = ProbeLoss(config.checkpoint_every,
                         lambda trainable: float(probe(trainable, params, probe_batch, derived)))

  count = method.count(params, state.trainable)
  logs.log_info("U-Net + %s on %s (regime %s: %d training examples, %d steps of %d, lr %g): %s", config.method,
                config.dataset, config.regime, len(indices), config.total_steps, config.batch_size, lr, count)

  def on_start(state):
    probe_loss.start = probe_loss(state, 0)["loss"]
    logger.write(0, "probe", {"loss": probe_loss.start})

  identity = {**{k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING},
              "dataset_size": len(indices), "lr": lr, "unet_file": fingerprint(report.source),
              "cache": cached["meta"], "probe_examples": int(min(config.probe_size, len(indices)))}
  task = loop.Task(name=f"t2i {config.method}", state=state, step=train_step, params=params, derived=derived,
                   batches=PermutationBatches(cached, indices, config.batch_size, config.seed, mesh),
                   evaluators=[probe_loss], total_steps=config.total_steps, identity=identity,
                   learning_rate=lambda at: lr, on_start=on_start,
                   hint=f"; gradients are clipped to global norm {config.grad_clip:g}" if config.grad_clip else "")
  result = loop.run(task, workdir, loop.LoopSettings(config.log_every, config.checkpoint_every,
                                                     config.keep_checkpoints, config.progress), logger)

  final = probe_loss.weights(result.state)
  end_probe = probe_loss.loss(final)
  adapter_bytes = 0
  final = multihost_utils.process_allgather(final, tiled=True)  # every process gathers; process 0 writes
  if jax.process_index() == 0:
    adapter_bytes = peft.save_adapter(workdir / "adapter", method, final, base_model=presets.UNET,
                                      step=config.total_steps, config=config.to_dict())
    if config.method == "lora":
      export_unet_lora(method, final, workdir / "adapter")
  multihost_utils.sync_global_devices("adapter saved")
  losses = [r["loss"] for r in logger.records() if r["split"] == "train"]
  results = {
      "model": presets.UNET, "method": config.method, "dataset": config.dataset,
      "dataset_size": len(indices), "regime": config.regime, "seed": config.seed, "lr": lr,
      "steps": config.total_steps, "probe_loss_start": probe_loss.start, "probe_loss_end": end_probe,
      "train_loss_last": statistics.mean(losses[-10:]) if losses else None,
      "trainable_params": count.trainable, "total_params": count.total, "step_time_s": result.step_time_s,
      "xla_memory_estimate_bytes": xla_memory_estimate(train_step), "compile_time_s": compile_s,
      "adapter_bytes": adapter_bytes,
  }
  if jax.process_index() == 0:
    logs.write_json(workdir / "results.json", results)
  logger.close()
  return results

