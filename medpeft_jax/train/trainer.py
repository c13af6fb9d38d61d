"""Classification fine-tuning: `train_and_evaluate(config, workdir) -> results`, a driver of train/loop.py.

One run = one model x method x dataset x regime x seed (configs/classify.py). It trains with AdamW
(warmup + cosine, gradient clipping; the schedule is runtime data, train/optim.py) under an explicit
('data', 'fsdp') sharding with parameters created already placed, evaluates on the validation split
every epoch (or `eval_every` steps), keeps the adapter with the best validation macro-F1 (with its
class names and preprocessing) and evaluates it on the test split. The loop (train/loop.py) gives
exact resume, finite-or-nothing checks, logs and checkpoints. Everything lands in `workdir`:
checkpoints/, best_adapter/, metrics.jsonl, tensorboard/, run_identity.json, results.json.
`train_together` trains runs that differ only in seed and learning rate as one vmapped program
(train/runs.py), each with the records it would have alone.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from medpeft_jax import config_checks, data, models, peft, presets
from medpeft_jax.fileio import fingerprint
from medpeft_jax.models.weights.readers import checkpoint_file
from medpeft_jax.train import linear_probe, logs, loop, optim, runs, sharding
from medpeft_jax.train.metrics import classification_metrics
from medpeft_jax.train.programs import PROGRAMS, xla_memory_estimate
from medpeft_jax.train.step import classification_loss, init_train_state, make_train_step, per_example_weights
from medpeft_jax.workdir import WorkdirLock

# Config fields that do not change what a run computes: a resume may differ in them.
_BOOKKEEPING = frozenset({"progress", "log_every", "keep_checkpoints", "profile_steps", "eval_batch_size",
                          "plugins", "num_classes", "data_dir", "manual_dir", "weights"})


def model_overrides(config) -> dict:
  """Module fields from the config; lists (as configs store them) become tuples, so the module hashes."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model_overrides).items()}
  overrides["dtype"] = jnp.dtype(config.dtype)
  if config.remat:
    overrides["remat"] = True
  return overrides


def build_model(config, num_classes: int, placement: sharding.Placement | None = None):
  """The model and its variables: pre-trained weights (`init="pretrained"`, `weights` required) or random.

  With a `placement`, the variables are created (random) or put (pre-trained) already sharded, so a
  large model is never whole on one device.
  """
  spec = models.get_spec(config.model)
  size = config.image_size or spec.image_size
  model = spec.build(num_classes=num_classes, **model_overrides(config))

  def placed(abstract):
    return variable_shardings(placement, abstract) if placement else None

  if config.init == "pretrained":
    if not config.weights:
      raise ValueError(f"config.weights is empty, and {config.model} starts from pre-trained weights "
                       f"({spec.weights}). Give --config.weights=PATH, or --config.init=random to train from a "
                       "random initialisation (the paper's `scratch`).")
    model, variables, report = models.load_pretrained(config.model, config.weights, num_classes=num_classes,
                                                      image_size=size, **model_overrides(config))
    logs.log_info("%s", report)
    return model, (jax.device_put(variables, placed(variables)) if placement else variables)
  if config.init != "random":
    raise ValueError(f"config.init must be 'pretrained' or 'random', not {config.init!r}.")
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed), dummy)
  return model, jax.jit(init, out_shardings=placed(abstract))(jax.random.PRNGKey(config.seed), dummy)


def variable_shardings(placement: sharding.Placement, variables):
  return {collection: placement.params(tree) for collection, tree in variables.items()}


def weights_fingerprint(path: str) -> list | None:
  """The checkpoint file's name, size and mtime: another base under the same path is another run (a resume
  must not continue an adapter on other weights)."""
  return fingerprint(checkpoint_file(path)) if path else None


def class_weights(split: data.Split) -> np.ndarray:
  """Inverse class frequency, normalised to mean 1 (absent classes weigh 0)."""
  counts = split.class_counts().astype(np.float64)
  w = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
  return w / w[counts > 0].mean()


@functools.cache
def make_predict(model, method):
  """A jitted `(trainable, params, batch_stats, images, derived=None) -> class probabilities` (eval mode)."""

  def predict(trainable, params, batch_stats, images, derived=None):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = method.apply(model, variables, trainable, images, train=False, derived=derived)
    return jax.nn.softmax(logits.astype(jnp.float32))

  return jax.jit(predict)


def evaluate_split(predict, trainable, params, batch_stats, split: data.Split, *, image_size: int, mean, std,
                   batch_size: int, workers: int, mesh) -> dict:
  """Metrics of the model with `trainable` on a whole split (all processes, padding masked out)."""
  loader = data.eval_loader(split, image_size=image_size, mean=mean, std=std, batch_size=batch_size,
                            worker_count=workers)
  probs, labels, masks = [], [], []
  for local in loader:
    batch = sharding.global_batch(local, mesh)
    p = predict(trainable, params, batch_stats, batch["image"])
    gathered = multihost_utils.process_allgather((p, batch["label"], batch["mask"]), tiled=True)
    probs.append(np.asarray(gathered[0]))
    labels.append(np.asarray(gathered[1]))
    masks.append(np.asarray(gathered[2]))
  keep = np.concatenate(masks) > 0
  return classification_metrics(np.concatenate(labels)[keep], np.concatenate(probs)[keep], split.class_names)


def load_dataset(config):
  """Builds the dataset once: process 0 first, the others after it (they share data_dir)."""
  load = functools.partial(data.load, config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir or None,
                           **config_checks.set_options(config.dataset, config.dataset_options))
  if jax.process_index() == 0:
    builder = load()
  multihost_utils.sync_global_devices("dataset built")
  return builder if jax.process_index() == 0 else load()


class GrainBatches:
  """The grain loader's batches with per-example class weights; resumable by iterator state.

  Global arrays over `mesh`, or (mesh None) this process's share as numpy, for `runs.StackedBatches`.
  """

  def __init__(self, loader, mesh, weights: np.ndarray):
    self.iterator, self.mesh, self.weights = iter(loader), mesh, weights

  def next(self, step: int) -> dict:
    del step  # the iterator's own position is the step's (restored with it)
    local = next(self.iterator)
    local["weight"] = per_example_weights(local["label"], self.weights)
    return sharding.global_batch(local, self.mesh) if self.mesh is not None else local

  def state(self) -> str:
    return self.iterator.get_state().decode()

  def restore(self, state: str) -> None:
    self.iterator.set_state(state.encode())


class Validation:
  """Validation metrics every `every` steps (and at the end); the best macro-F1 so far is saved as an adapter.

  `patience` > 0: training stops after that many evaluations in a row without a better macro-F1.
  """

  name = "validation"

  def __init__(self, every: int, evaluate, save_best, patience: int = 0):
    self.every, self.evaluate, self.save_best, self.patience = every, evaluate, save_best, patience
    self.best = {"f1_macro": -1.0, "step": 0, "validation": {}, "since_best": 0}

  @property
  def stop_requested(self) -> bool:
    return bool(self.patience) and self.best["since_best"] >= self.patience

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every == 0 or step == total_steps

  def __call__(self, state, step: int) -> dict:
    metrics = self.evaluate(state.trainable, state.batch_stats)
    if metrics["f1_macro"] > self.best["f1_macro"]:
      self.best = {"f1_macro": metrics["f1_macro"], "step": step, "since_best": 0,
                   "validation": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
      self.save_best(state, step)
    else:
      self.best["since_best"] += 1
      if self.stop_requested:
        self.best["stopped_at"] = step
    return metrics

  def state(self) -> dict:
    return self.best

  def restore(self, state: dict) -> None:
    self.best = {"since_best": 0, **state}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains, evaluates the best-on-validation adapter on test, writes results.json; returns it.

  Holds the workdir's lock throughout: a second run on the same workdir stops at once.
  """
  config_checks.check_classify(config)  # loads the plugins; before anything is built or written
  with WorkdirLock(workdir):
    return _train([config], [pathlib.Path(workdir)], pathlib.Path(workdir))[0]


# What runs trained together may differ in (logging, checkpointing and profiling are the group's, so equal).
_PER_RUN = frozenset({"seed", "lr"})


def check_together(configs) -> None:
  """Runs train together (one vmapped program, train/runs.py) only when they differ in seed and learning
  rate alone and share one pre-trained base; anything else is an error naming what differs."""
  if len(configs) < 2:
    raise ValueError(f"Training together takes 2 or more runs, not {len(configs)}.")
  first = configs[0].to_dict()
  for other in configs[1:]:
    d = other.to_dict()
    differ = sorted(k for k in set(first) | set(d) if k not in _PER_RUN and first.get(k) != d.get(k))
    if differ:
      raise ValueError(f"Runs trained together may differ only in seed and lr; these also differ in {differ} "
                       f"({', '.join(f'{k}: {first.get(k)!r} vs {d.get(k)!r}' for k in differ[:3])}). Train them apart.")
  if configs[0].init != "pretrained":
    raise ValueError("Runs trained together share one frozen base, so they start from pre-trained weights; runs "
                     f"with init={configs[0].init!r} (each seed its own random base) train apart.")
  if configs[0].method == "linear" and configs[0].get("linear_on_features", False):
    raise ValueError("The linear probe on cached features trains apart (its steps are a head's matmul: nothing "
                     "to share); set linear_on_features=False to train it together.")


def train_together(configs, workdirs, group_dir) -> list[dict]:
  """K runs that differ only in seed and learning rate, trained as one program; returns their results.

  Each run gets what it would get alone in its own workdir (metrics.jsonl, best_adapter/, results.json:
  its own data order, regime subset, initialisation, learning rate and early stop), up to float rounding
  (tests/test_runs.py). The shared train state and its checkpoints live in `group_dir`, so a killed
  group resumes as one.
  """
  for config in configs:
    config_checks.check_classify(config)
  check_together(configs)
  for folder in map(pathlib.Path, workdirs):
    if (folder / "checkpoints").exists() or (folder / loop.IDENTITY_FILE).exists():
      raise ValueError(f"{folder} holds a run trained alone (checkpoints/ or {loop.IDENTITY_FILE}); a group keeps "
                       f"its state in {group_dir}. Resume it alone, or delete {folder} to train it in the group.")
  with contextlib.ExitStack() as locks:
    for folder in (group_dir, *workdirs):
      locks.enter_context(WorkdirLock(folder))
    return _train(list(configs), [pathlib.Path(w) for w in workdirs], pathlib.Path(group_dir))


def _stacked(shardings):
  """The shardings of a stacked pytree: each leaf's own, behind a run axis split over the mesh's 'runs'
  axis (unsplit where the mesh has none)."""
  def stacked(s):
    return sharding.NamedSharding(s.mesh, sharding.P("runs" if "runs" in s.mesh.shape else None, *s.spec))
  return jax.tree.map(stacked, shardings)


def _mesh(config, runs: int):
  """The run's mesh; `runs` trained together spread over `config.mesh.runs` rows of devices."""
  rows = config.mesh.get("runs", 1)
  if runs == 1:  # a run trained alone (e.g. a sweep's fallback) takes the rows' devices as data
    return sharding.make_mesh(config.mesh.data * rows if config.mesh.data > 0 else -1, config.mesh.fsdp)
  if runs % rows:
    raise ValueError(f"{runs} runs trained together cannot spread evenly over config.mesh.runs={rows} rows of "
                     f"devices; set config.mesh.runs to a divisor of {runs} (1: every run on every device).")
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, runs=rows)


def _train(configs: list, workdirs: list[pathlib.Path], loop_dir: pathlib.Path) -> list[dict]:
  """One run (`configs` of one) or runs trained together; see `train_and_evaluate` and `train_together`."""
  logs.quiet_libraries()
  together, config = len(configs) > 1, configs[0]  # the shared settings are the first run's (check_together)
  for workdir in workdirs:
    workdir.mkdir(parents=True, exist_ok=True)
  loggers = [logs.RunLogger(workdir) for workdir in workdirs]
  mesh = _mesh(config, len(configs))
  placement = sharding.Placement(mesh, config.mesh.rules, config.mesh.min_shard_size)

  builder = load_dataset(config)
  train_splits = [data.Split(builder, "train", regime=c.regime, regime_seed=c.seed) for c in configs]
  val_split, test_split = data.Split(builder, "validation"), data.Split(builder, "test")
  for split in (*train_splits, val_split, test_split) if config.get("cache_images_mb", 0) else ():
    split.cache_decoded(config.cache_images_mb << 20)
  train_split = train_splits[0]
  spec = models.get_spec(config.model)
  size = config.image_size or spec.image_size
  preprocessing = {"image_size": size, "mean": list(spec.mean), "std": list(spec.std)}
  model, variables = build_model(config, train_split.num_classes, placement)
  params = variables["params"]
  method = presets.build_method(config.model, config.method, **dict(config.peft))

  steps_per_epoch = len(train_split) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(train_split)} training images (regime {config.regime}) do not fill one batch of "
                     f"config.batch_size={config.batch_size}; lower the batch size or use a larger regime.")
  if len({len(split) for split in train_splits}) > 1:
    raise ValueError(f"The runs' regime subsets differ in size ({[len(s) for s in train_splits]} images), so their "
                     "step budgets differ; train them apart.")
  # The paper's budget is in epochs; a floor of steps keeps tiny regimes (a few batches an epoch) trainable.
  total_steps = config.total_steps or max(config.epochs * steps_per_epoch, config.get("min_steps", 0))
  method = method.for_run(total_steps)  # e.g. AdaLoRA's rank budget follows the run's length
  name = presets.variant_name(config.method, config.init)
  lrs = [c.lr or presets.default_lr(name) for c in configs]
  warmup = min(int(config.warmup_fraction * total_steps), max(total_steps - 1, 0))
  optimizer_spec = optim.OptimizerSpec(config.grad_clip, config.weight_decay, "cosine")
  optimizers = [optimizer_spec.build(lr, warmup, total_steps) for lr in lrs]  # the same update; their own state
  class_weights_ = [class_weights(split) if config.class_weighted else np.ones(split.num_classes, np.float32)
                    for split in train_splits]

  derived_sh = placement.derived(jax.eval_shape(method.derived_state, params))
  derived = jax.jit(method.derived_state, out_shardings=derived_sh)(params)  # {} except for SV-Diff
  inits = [functools.partial(init_train_state, method, variables, optimizer) for optimizer in optimizers]
  abstract = jax.eval_shape(inits[0], jax.random.PRNGKey(config.seed))
  state_sh = placement.state(abstract, placement.trainable(abstract.trainable))
  states = [jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(c.seed)) for init, c in zip(inits, configs)]
  leaves = jax.tree.leaves(state_sh)
  logs.log_info("Mesh %s; %d of %d state leaves sharded over 'fsdp'.", dict(mesh.shape),
                sum(s.spec != sharding.P() for s in leaves), len(leaves))

  batch_sh = sharding.batch_sharding(mesh)
  splits = {"validation": val_split, "test": test_split}
  eval_batch = config.eval_batch_size or config.batch_size
  if config.method == "linear" and config.get("linear_on_features", False):
    # The frozen trunk runs once per image (train/linear_probe.py); only the head steps.
    trunk, trunk_variables = linear_probe.trunk_of(spec, model_overrides(config), variables)
    key = {"model": config.model, "overrides": str(model_overrides(config)), "init": config.init,
           "weights": config.weights, "seed": config.seed if config.init == "random" else None, "size": size}
    features = {name: linear_probe.split_features(key, trunk, trunk_variables, split, image_size=size, mean=spec.mean,
                                                  std=spec.std, batch_size=eval_batch, mesh=mesh)
                for name, split in {"train": train_split, **splits}.items()}
    width = features["train"][0].shape[-1]
    batch_spec = {"features": jax.ShapeDtypeStruct((config.batch_size, width), jnp.float32, sharding=batch_sh)}
    statics = ("linear probe on features", optimizer_spec, config.label_smoothing)
    make_step = functools.partial(linear_probe.make_head_step, optimizers[0], config.label_smoothing)
    step_params = {}
    sources = [linear_probe.FeatureBatches(*features["train"], config.batch_size, config.seed, mesh,
                                           class_weights_[0])]

    def evaluate_on(trainable, batch_stats, name):
      del batch_stats  # the trunk ran in evaluation mode with the base statistics
      return linear_probe.evaluate_features(trainable, *features[name], train_split.class_names)
  else:
    batch_spec = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sh)}
    statics = (model, method, optimizer_spec, config.label_smoothing, config.bn_mode, config.grad_accum)
    make_step = functools.partial(make_train_step, model, method, optimizers[0],
                                  loss_fn=classification_loss(config.label_smoothing),
                                  update_batch_stats=config.bn_mode == "train", grad_accum=config.grad_accum,
                                  jit=False)
    step_params = params
    sources = [GrainBatches(data.train_loader(split, image_size=size, mean=spec.mean, std=spec.std,
                                              batch_size=config.batch_size, seed=c.seed, worker_count=config.workers),
                            None if together else mesh, weights)
               for split, c, weights in zip(train_splits, configs, class_weights_)]
    predict = functools.partial(make_predict(model, method), derived=derived)

    def evaluate_on(trainable, batch_stats, name):
      return evaluate_split(predict, trainable, params, batch_stats, splits[name], image_size=size, mean=spec.mean,
                            std=spec.std, mesh=mesh, batch_size=eval_batch, workers=config.workers)
  batch_spec.update({"label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh),
                     "weight": jax.ShapeDtypeStruct((config.batch_size,), jnp.float32, sharding=batch_sh)})
  step_params_sh = jax.tree.map(lambda x: x.sharding, step_params)
  scalar_sh = sharding.NamedSharding(mesh, sharding.P())
  if together:  # a leading run axis on the state, the batches and the metrics (train/runs.py)
    state = runs.stack(states)
    state_sh, batch_sh = _stacked(state_sh), _stacked(batch_sh)
    state = jax.device_put(state, state_sh)
    batch_spec = {k: jax.ShapeDtypeStruct((len(configs), *v.shape), v.dtype, sharding=batch_sh)
                  for k, v in batch_spec.items()}
    statics, plain = (*statics, "runs", len(configs)), make_step
    make_step = lambda: jax.vmap(plain(), in_axes=(0, None, 0, None))  # noqa: E731
    scalar_sh = _stacked(scalar_sh)
    batches = runs.StackedBatches(
        sources, place=lambda stacked: {k: jax.make_array_from_process_local_data(batch_sh, v)
                                        for k, v in stacked.items()})
  else:
    state, batches = states[0], sources[0]
  train_step, compile_s = PROGRAMS.compile_once(
      statics, make_step, (state, step_params, batch_spec, derived),
      in_shardings=(state_sh, step_params_sh, batch_sh, derived_sh),
      out_shardings=(state_sh, scalar_sh), donate_argnums=0,
      name=f"{config.model} + {config.method} train step" + (f" ({len(configs)} runs together)" if together else ""))

  count = method.count(params, states[0].trainable)
  logs.log_info("%s + %s (init %s) on %s (regime %s: %d training images, %d steps of %d, lr %s): %s\n%s",
                config.model, config.method, config.init, config.dataset, config.regime, len(train_split),
                total_steps, config.batch_size, ", ".join(f"{lr:g}" for lr in lrs), count,
                logs.parameter_overview(params, states[0].trainable))

  def save_best(workdir, run_config, run_split):
    def save(state, step):
      # Every process takes part in gathering leaves sharded over other processes; process 0 writes.
      trainable, batch_stats = multihost_utils.process_allgather((state.trainable, state.batch_stats), tiled=True)
      if jax.process_index() == 0:
        peft.save_adapter(workdir / "best_adapter", method, trainable, batch_stats, base_model=config.model,
                          step=step, config=run_config.to_dict(), class_names=list(run_split.class_names),
                          preprocessing=preprocessing)
      multihost_utils.sync_global_devices("best adapter saved")
    return save

  validations = [Validation(config.eval_every or steps_per_epoch,
                            lambda trainable, stats: evaluate_on(trainable, stats, "validation"),
                            save_best(workdir, c, split), config.get("patience", 0))
                 for workdir, c, split in zip(workdirs, configs, train_splits)]
  identities = [{**{k: v for k, v in c.to_dict().items() if k not in _BOOKKEEPING},
                 "weights_file": weights_fingerprint(c.weights) if c.init == "pretrained" else None,
                 "build": builder.builder_config.name, "class_names": list(split.class_names),
                 "dataset_size": len(split), "total_steps": total_steps, "lr": lr}
                for c, split, lr in zip(configs, train_splits, lrs)]
  clip = (f"; gradients are clipped to global norm {config.grad_clip:g}" if config.grad_clip
          else " or enable gradient clipping (config.grad_clip)")
  schedule = [lambda at, lr=lr: float(optim.learning_rate(at - 1, lr, warmup, total_steps, "cosine")) for lr in lrs]
  names = tuple(f"seed {c.seed}, lr {lr:g}" for c, lr in zip(configs, lrs)) if together else ()
  task = loop.Task(
      name=f"{name} {config.dataset}" + (f" x{len(configs)}" if together else ""), state=state, step=train_step,
      params=step_params, derived=derived, batches=batches,
      evaluators=[runs.PerRunEvaluators(validations) if together else validations[0]], total_steps=total_steps,
      identity={"runs": identities} if together else identities[0],
      learning_rate=(lambda at: [f(at) for f in schedule]) if together else schedule[0], hint=clip, runs=names)
  start, stop = config.profile_steps
  result = loop.run(task, loop_dir, loop.LoopSettings(config.log_every, config.checkpoint_every,
                                                      config.keep_checkpoints, config.progress,
                                                      (start, stop) if stop > start else None),
                    loggers if together else loggers[0])

  out = []
  for c, workdir, logger, split, validation, lr in zip(configs, workdirs, loggers, train_splits, validations, lrs):
    adapter = peft.load_adapter(workdir / "best_adapter")
    test = evaluate_on(adapter.trainable, adapter.batch_stats or {}, "test")
    logger.write(total_steps, "test", test, replace=True)
    results = {
        "model": c.model, "method": name, "dataset": c.dataset,
        "dataset_size": len(split), "regime": c.regime, "seed": c.seed, "lr": lr,
        "best_step": validation.best["step"],
        "last_step": validation.best.get("stopped_at") or result.last_step,
        "validation": validation.best["validation"], "test": test,
        "trainable_params": count.trainable, "total_params": count.total,
        # Together: the group's pace shared out per run (K runs per step).
        "step_time_s": result.step_time_s / len(configs) if result.step_time_s else result.step_time_s,
        "xla_memory_estimate_bytes": xla_memory_estimate(train_step),
        "compile_time_s": compile_s,
        "adapter_bytes": (workdir / "best_adapter" / peft.adapters.WEIGHTS).stat().st_size,
        **({"trained_together": len(configs)} if together else {}),
    }
    if jax.process_index() == 0:
      logs.write_json(workdir / "results.json", results)
    logger.close()
    out.append(results)
  return out
