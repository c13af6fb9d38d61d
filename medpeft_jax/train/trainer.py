"""Classification fine-tuning: `train_and_evaluate(config, workdir) -> metrics`.

One run = one model x method x dataset x regime x seed (configs/classify.py). It trains with AdamW
(warmup + cosine, gradient clipping) under an explicit ('data', 'fsdp') sharding, evaluates on the
validation split every epoch, keeps the adapter with the best validation macro-F1 and evaluates it
on the test split. Checkpoints (orbax: trainable leaves, optimizer state, BatchNorm statistics, step,
RNG, data-iterator state, best-so-far) make a killed run resume to exactly the result of an
uninterrupted one. Everything lands in `workdir`: checkpoints/, best_adapter/, metrics.jsonl,
tensorboard/, results.json.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from medpeft_jax import data, models, peft, presets
from medpeft_jax.train import logs, sharding
from medpeft_jax.train.metrics import classification_metrics
from medpeft_jax.train.step import TrainState, classification_loss, init_train_state, make_train_step

# PEFT prefers learning rates about 10x higher than full fine-tuning (the paper tuned them per method).
DEFAULT_LR = {"full": 1e-4}
PEFT_LR = 1e-3


class ProgramCache:
  """In-process cache of a trainer's compiled programs, keyed by its config minus `not_in_program`.

  A sweep's runs that differ only in regime or seed then trace and compile once (tracing a model's
  train step costs seconds). The key holds every other config field, including any added later, plus
  values derived from the data. Two entries: the sweep runner finishes one (model, method) before the next.
  """

  def __init__(self, not_in_program: frozenset, size: int = 2):
    self.not_in_program, self.size = not_in_program, size
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def key(self, config, **derived) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in self.not_in_program}
    return json.dumps({**fields, **derived}, sort_keys=True, default=str)

  def get(self, key: str):
    if key in self._entries:
      self._entries.move_to_end(key)
      logs.log_info("Reusing the programs compiled for an earlier run of the same configuration.")
    return self._entries.get(key)

  def put(self, key: str, programs) -> None:
    self._entries[key] = programs
    while len(self._entries) > self.size:
      self._entries.popitem(last=False)


# Config fields that never enter the compiled programs: where the data and weights are (their values
# are arguments), the regime and seed, and bookkeeping.
_PROGRAMS = ProgramCache(frozenset({
    "regime", "seed", "weights", "dataset", "data_dir", "manual_dir", "dataset_options", "workers", "epochs",
    "total_steps", "num_classes", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "progress"}))


def default_lr(method: str) -> float:
  return DEFAULT_LR.get(method, PEFT_LR)


def peft_method_name(method: str) -> str:
  """`scratch` is full training from a random initialisation; every other name is a PEFT method."""
  return "full" if method == "scratch" else method


def build_model(config, num_classes: int):
  """The model and its variables: pre-trained weights from `config.weights`, or random for scratch."""
  overrides = dict(config.model_overrides)
  overrides["dtype"] = jnp.dtype(config.dtype)
  if config.remat:
    overrides["remat"] = True
  spec = models.get_spec(config.model)
  size = config.image_size or spec.image_size
  if config.weights and config.method != "scratch":
    model, variables, report = models.load_pretrained(config.model, config.weights, num_classes=num_classes,
                                                      image_size=size, **overrides)
    logs.log_info("%s", report)
    return model, variables
  if config.method != "scratch":
    logs.log_info("No `weights` given: %s starts from a random initialisation.", config.model)
  model = spec.build(num_classes=num_classes, **overrides)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(config.seed), dummy)
  return model, variables


def make_optimizer(config, total_steps: int):
  """AdamW with linear warmup and cosine decay to 0, after global-norm gradient clipping."""
  lr = config.lr or default_lr(config.method)
  warmup = min(int(config.warmup_fraction * total_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                          optax.adamw(schedule, weight_decay=config.weight_decay))
  return optimizer, schedule, lr


def class_weights(split: data.Split) -> np.ndarray:
  """Inverse class frequency, normalised to mean 1 (absent classes weigh 0)."""
  counts = split.class_counts().astype(np.float64)
  w = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
  return w / w[counts > 0].mean()


def memory_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


class Checkpoints:
  """Synchronous orbax checkpoints of the train state plus JSON extras (iterator state, best)."""

  def __init__(self, directory: pathlib.Path, keep: int):
    self.manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                   enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, extra: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, abstract_state):
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             extra=ocp.args.JsonRestore()))
    return out["state"], out["extra"]


class StepMetrics:
  """The metrics of steps dispatched but not yet read back, so the host prepares the next batch meanwhile.

  `read_back()` (at log, evaluation and checkpoint steps) logs them, stops at the first non-finite
  loss naming its step and the last good checkpoint (before any checkpoint is written after it), and
  times the loop's pace per step (input pipeline included; evaluation and saving excluded).
  """

  def __init__(self, logger: logs.RunLogger, bar, *, log_every: int, total_steps: int, lr_at, last_good,
               checkpoint_dir: pathlib.Path, hint: str):
    self.logger, self.bar, self.log_every, self.total_steps, self.lr_at = logger, bar, log_every, total_steps, lr_at
    self.last_good, self.checkpoint_dir, self.hint = last_good, checkpoint_dir, hint
    self.pending: list = []
    self.step_times: list[float] = []  # seconds per step of each read-back window
    self.window_start = time.perf_counter()

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def read_back(self) -> None:
    for at, metrics in self.pending:
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        self.bar.close()
        raise FloatingPointError(
            f"Non-finite training loss ({loss}) at step {at}. Stopped; the last good checkpoint "
            f"(step {self.last_good}) is kept in {self.checkpoint_dir}. {self.hint}")
      if at % self.log_every == 0 or at == self.total_steps:
        self.logger.write(at, "train", {**{k: float(v) for k, v in metrics.items()}, "lr": self.lr_at(at)})
    if self.pending:
      now = time.perf_counter()
      self.step_times.append((now - self.window_start) / len(self.pending))
      self.window_start = now
      self.bar.set_postfix(loss=f"{loss:.4f}")
    self.pending.clear()

  def saved(self, step: int) -> None:
    """A checkpoint at `step` was written: the next good state to point to, and a fresh timing window."""
    self.last_good = step
    self.window_start = time.perf_counter()

  def step_time(self) -> float | None:
    """Median seconds per step over the read-back windows (the first, with compilation warm-up, dropped)."""
    return statistics.median(self.step_times[1:] or self.step_times) if self.step_times else None


def make_predict(model, method):
  """A jitted `(peft, params, batch_stats, images, frozen=None) -> class probabilities` (eval mode)."""

  def predict(peft_params, params, batch_stats, images, frozen=None):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = method.apply(model, variables, peft_params, images, train=False, frozen=frozen)
    return jax.nn.softmax(logits.astype(jnp.float32))

  return jax.jit(predict)


def evaluate_split(predict, peft_params, params, batch_stats, split: data.Split, *, image_size: int, spec,
                   batch_size: int, workers: int, mesh) -> dict:
  """Metrics of the model with `peft_params` on a whole split (all processes, padding masked out)."""
  loader = data.eval_loader(split, image_size=image_size, mean=spec.mean, std=spec.std, batch_size=batch_size,
                            worker_count=workers)
  probs, labels, masks = [], [], []
  for local in loader:
    batch = sharding.global_batch(local, mesh)
    p = predict(peft_params, params, batch_stats, batch["image"])
    gathered = multihost_utils.process_allgather((p, batch["label"], batch["mask"]), tiled=True)
    probs.append(np.asarray(gathered[0]))
    labels.append(np.asarray(gathered[1]))
    masks.append(np.asarray(gathered[2]))
  keep = np.concatenate(masks) > 0
  return classification_metrics(np.concatenate(labels)[keep], np.concatenate(probs)[keep], split.class_names)


def _load_dataset(config):
  """Builds the dataset once: process 0 first, the others after it (they share data_dir)."""
  load = functools.partial(data.load, config.dataset, data_dir=config.data_dir,
                           manual_dir=config.manual_dir or None, **dict(config.dataset_options))
  if jax.process_index() == 0:
    builder = load()
  multihost_utils.sync_global_devices("dataset built")
  return builder if jax.process_index() == 0 else load()


def _summary(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains, evaluates the best-on-validation adapter on test, writes results.json; returns it."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logs.quiet_libraries()
  logger = logs.RunLogger(workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  replicated = NamedSharding(mesh, P())

  builder = _load_dataset(config)
  train_split = data.Split(builder, "train", regime=config.regime, regime_seed=config.seed)
  val_split, test_split = data.Split(builder, "validation"), data.Split(builder, "test")
  spec = models.get_spec(config.model)
  size = config.image_size or spec.image_size
  model, variables = build_model(config, train_split.num_classes)
  method = presets.build_method(config.model, peft_method_name(config.method), **dict(config.peft))

  steps_per_epoch = len(train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(train_split)} training images do not fill one batch of {config.batch_size}.")
  total_steps = config.total_steps or config.epochs * steps_per_epoch
  eval_every = config.eval_every or steps_per_epoch
  optimizer, schedule, lr = make_optimizer(config, total_steps)
  weights = class_weights(train_split) if config.class_weighted else None
  loss_fn = classification_loss(config.label_smoothing, weights)
  step_fn = make_train_step(model, method, optimizer, loss_fn=loss_fn,
                            update_batch_stats=config.bn_mode == "train", grad_accum=config.grad_accum,
                            jit=False)

  params = variables["params"]
  state = init_train_state(method, variables, optimizer, jax.random.PRNGKey(config.seed))
  shard = functools.partial(sharding.tree_shardings, mesh=mesh, min_size=config.mesh.min_shard_size)
  frozen = jax.jit(method.frozen_state)(params)  # {} except for SV-Diff
  state_sh, params_sh, frozen_sh = shard(state), shard(params), shard(frozen)
  state, params, frozen = (jax.device_put(state, state_sh), jax.device_put(params, params_sh),
                           jax.device_put(frozen, frozen_sh))
  leaves = jax.tree.leaves((state_sh, params_sh))
  logs.log_info("Mesh %s; %d of %d state and parameter leaves sharded over 'fsdp'.", dict(mesh.shape),
                sum(s.spec != P() for s in leaves), len(leaves))
  key = _PROGRAMS.key(config, method=peft_method_name(config.method),  # scratch runs full's program
                      total_steps=total_steps, num_classes=train_split.num_classes,
                      class_weights=None if weights is None else weights.tolist(),
                      devices=[str(d) for d in mesh.devices.flat])
  cached = _PROGRAMS.get(key)
  if cached:
    (train_step, predict), compile_s = cached, 0.0
  else:
    batch_sh = sharding.batch_sharding(mesh)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sh),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh)}
    start = time.perf_counter()
    train_step = jax.jit(step_fn, in_shardings=(state_sh, params_sh, batch_sh, frozen_sh),
                         out_shardings=(state_sh, replicated), donate_argnums=0).lower(
                             state, params, batch_spec, frozen).compile()
    compile_s = time.perf_counter() - start
    logs.log_info("Compiled the train step in %.1f s (XLA memory estimate %.0f MiB).", compile_s,
                  memory_bytes(train_step) / 2**20)
    predict = make_predict(model, method)
    _PROGRAMS.put(key, (train_step, predict))

  evaluate = functools.partial(evaluate_split, functools.partial(predict, frozen=frozen), image_size=size,
                               spec=spec, mesh=mesh,
                               batch_size=config.eval_batch_size or config.batch_size, workers=config.workers)
  count = method.count(params, state.peft)
  logs.log_info("%s + %s on %s (regime %s: %d training images, %d steps of %d): %s\n%s", config.model,
                config.method, config.dataset, config.regime, len(train_split), total_steps,
                config.batch_size, count, logs.parameter_overview(params, state.peft))

  checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  loader = data.train_loader(train_split, image_size=size, mean=spec.mean, std=spec.std,
                             batch_size=config.batch_size, seed=config.seed, worker_count=config.workers)
  iterator = iter(loader)
  best = {"f1_macro": -1.0, "step": 0, "validation": {}}
  latest = checkpoints.latest()
  if latest is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    state, extra = checkpoints.restore(latest, abstract)
    iterator.set_state(extra["iterator"].encode())
    best = extra["best"]
    logger.truncate(latest)
    logs.log_info("Resumed from the checkpoint at step %d.", latest)

  step = int(state.step)
  bar = tqdm(total=total_steps, initial=step, desc=f"{config.method} {config.dataset}", unit="step",
             disable=jax.process_index() != 0 or not config.progress)
  pending = StepMetrics(logger, bar, log_every=config.log_every, total_steps=total_steps,
                        lr_at=lambda at: float(schedule(at - 1)), last_good=latest,
                        checkpoint_dir=workdir / "checkpoints", hint=f"Lower the learning rate (was {lr:g}) or "
                                                                    "enable gradient clipping.")

  while step < total_steps:
    batch = sharding.global_batch(next(iterator), mesh)
    state, metrics = train_step(state, params, batch, frozen)
    step += 1
    pending.add(step, metrics)
    bar.update(1)
    evaluating = step % eval_every == 0 or step == total_steps
    checkpointing = evaluating or step % config.checkpoint_every == 0
    if step % config.log_every == 0 or checkpointing:
      pending.read_back()
    if evaluating:
      val = evaluate(state.peft, params, state.batch_stats, val_split)
      logger.write(step, "validation", val)
      bar.write(f"step {step}: validation macro-F1 {val['f1_macro']:.4f}, accuracy {val['accuracy']:.4f}")
      if val["f1_macro"] > best["f1_macro"]:
        best = {"f1_macro": val["f1_macro"], "step": step, "validation": _summary(val)}
        if jax.process_index() == 0:
          peft.save_adapter(workdir / "best_adapter", method, state.peft, state.batch_stats,
                            base_model=config.model, step=step, config=config.to_dict())
        multihost_utils.sync_global_devices("best adapter saved")
    if checkpointing:
      checkpoints.save(step, state, {"iterator": iterator.get_state().decode(), "best": best})
      pending.saved(step)
  bar.close()

  adapter = peft.load_adapter(workdir / "best_adapter")
  test = evaluate(adapter.peft, params, adapter.batch_stats or {}, test_split)
  logger.write(total_steps, "test", test)
  results = {
      "model": config.model, "method": config.method, "dataset": config.dataset,
      "dataset_size": len(train_split), "regime": config.regime, "seed": config.seed, "lr": lr,
      "best_step": best["step"], "validation": best["validation"], "test": test,
      "trainable_params": count.trainable, "total_params": count.total,
      "step_time_s": pending.step_time(),
      "peak_memory_bytes": memory_bytes(train_step), "compile_time_s": compile_s,
      "adapter_bytes": (workdir / "best_adapter" / peft.adapters.WEIGHTS).stat().st_size,
  }
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(logs._plain(results), indent=2) + "\n")
  logger.close()
  del iterator
  return results

