"""The one training loop: restore-or-init, step, periodic actions (log, evaluate, checkpoint, profile).

A task (classification: train/trainer.py; text-to-image: train/t2i.py) plugs in a `Task`: its
compiled step `step(state, params, batch, derived) -> (state, metrics)`, its batches and its
evaluators (big_vision's evaluators are the model: each is due at some steps and returns metrics).
The loop owns what must be the same for every task:
  - exact resume: the state, the batch source's position and every evaluator's state are
    checkpointed together; re-running a killed run ends bit-identical to an uninterrupted one;
  - one run per workdir: a checkpoint made by a different run (another model, method, class set,
    learning rate, ...) is an error naming the differing fields, never a shape error or a silent mix;
  - finite or nothing: the loss of every step is read back (in windows, so the host prepares the
    next batch while the device steps) and the trainable state is checked before anything is
    evaluated or written; a non-finite value stops the run naming the step, the learning rate and
    the last finite checkpoint, and no checkpoint, best adapter or result is written from it;
  - a progress bar, metrics.jsonl + TensorBoard, the loop's pace per step, and an optional
    `jax.profiler` trace of a step range.
Runs trained together (`Task.runs`, train/runs.py): the state, each batch and every metric carry a
leading run axis; each run logs to its own logger and a non-finite value names the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from medpeft_jax.train import logs
from medpeft_jax.train.checkpoints import Checkpoints, all_finite, non_finite_leaves

IDENTITY_FILE = "run_identity.json"


class Batches(Protocol):
  """Where a task's batches come from: a global batch per 0-based step, and a resumable position."""

  def next(self, step: int) -> dict: ...

  def state(self) -> Any: ...  # JSON-able, saved with each checkpoint

  def restore(self, state: Any) -> None: ...


class Evaluator(Protocol):
  """A periodic action that returns metrics (logged under `name`) and may keep a JSON-able state.

  An evaluator may also end training early (early stopping): the loop stops after a checkpoint once
  any evaluator's `stop_requested` is true (it is part of the evaluator's checkpointed state).
  """

  name: str

  def due(self, step: int, total_steps: int) -> bool: ...

  def __call__(self, state, step: int) -> dict: ...

  def state(self) -> Any: ...

  def restore(self, state: Any) -> None: ...


@dataclasses.dataclass
class Task:
  """What a task plugs into the loop."""

  name: str  # shown on the progress bar
  state: Any  # the initial train state, already sharded (replaced by the checkpoint's on resume)
  step: Callable  # compiled: (state, params, batch, derived) -> (state, {"loss": ..., ...})
  params: Any  # the frozen base, sharded
  derived: Any  # the method's derived tensors ({} for most methods), sharded
  batches: Batches
  evaluators: Sequence[Evaluator]
  total_steps: int
  identity: dict  # what makes this run this run (a resume must match it)
  learning_rate: Callable[[int], Any]  # the schedule at a 1-based step (one value per run), for logs and errors
  hint: str = ""  # what to change after a non-finite value, besides the learning rate
  on_start: Callable[[Any], None] | None = None  # called with the fresh state of a run that does not resume
  # Names of runs trained together (train/runs.py); empty for one run. With runs, the state, batches and
  # step metrics have a leading axis of this length, evaluators return one metrics dict per run (None for a
  # run they no longer evaluate; an evaluator's `stopped_runs[i]` marks a run that stopped early, whose
  # later steps are neither logged nor checked), and `learning_rate` one value per run.
  runs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  log_every: int = 10
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  progress: bool = True
  profile_steps: tuple[int, int] | None = None  # [start, stop) 1-based steps traced to <workdir>/profile


@dataclasses.dataclass
class LoopResult:
  state: Any
  step_time_s: float | None  # median loop pace per step (input pipeline included; eval and saving excluded)
  resumed_from: int | None
  last_step: int  # total_steps, or the step an early stop ended at


class _Pending:
  """Metrics of steps dispatched but not read back yet; read back in windows to time the loop's pace."""

  def __init__(self):
    self.items: list = []
    self.windows: list[float] = []
    self.start = time.perf_counter()

  def read(self) -> list[tuple[int, dict]]:
    out = [(at, {k: np.asarray(v, np.float64) for k, v in m.items()}) for at, m in self.items]
    if self.items:
      now = time.perf_counter()
      self.windows.append((now - self.start) / len(self.items))
      self.start = now
    self.items = []
    return out

  def restart_clock(self) -> None:
    self.start = time.perf_counter()

  def pace(self) -> float | None:
    """Median seconds per step over the windows (the first, with compilation warm-up, dropped)."""
    return statistics.median(self.windows[1:] or self.windows) if self.windows else None


def _check_identity(workdir: pathlib.Path, identity: dict, resuming: bool) -> None:
  """A resumed run must be the run that wrote the checkpoints; names every differing field."""
  path = workdir / IDENTITY_FILE
  plain = json.loads(json.dumps(logs.plain(identity), sort_keys=True))
  if path.is_file() and resuming:
    stored = json.loads(path.read_text())
    differ = sorted(k for k in set(stored) | set(plain) if stored.get(k) != plain.get(k))
    if differ:
      shown = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, now {plain.get(k)!r}" for k in differ[:6])
      raise ValueError(f"{workdir} holds checkpoints of a different run ({shown}). Use another --workdir, or "
                       f"delete {workdir / 'checkpoints'} to start this run from scratch there.")
  elif jax.process_index() == 0:
    path.write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n")


def _per_run(values, runs: tuple[str, ...]) -> list:
  """One entry per run: `values` itself for a single run, else its run axis unstacked (dicts by key)."""
  if not runs:
    return [values]
  if isinstance(values, dict):
    return [{k: v[i] for k, v in values.items()} for i in range(len(runs))]
  if len(values) != len(runs):
    raise ValueError(f"Expected one value per run ({len(runs)}: {', '.join(runs)}), got {len(values)}.")
  return list(values)


def _zero_non_finite(state, stopped: list[bool]):
  """A stopped run trains on with the others but nothing of it is used any more: its non-finite values (if
  it diverged after its stop) become 0 so that the shared checkpoint stays finite."""
  mask = np.asarray(stopped)

  def clean(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    drop = jnp.asarray(mask).reshape((-1,) + (1,) * (x.ndim - 1)) & ~jnp.isfinite(x)
    return jnp.where(drop, jnp.zeros((), x.dtype), x)

  return jax.tree.map(clean, state)


def run(task: Task, workdir, settings: LoopSettings, logger: logs.RunLogger | Sequence[logs.RunLogger]) -> LoopResult:
  """Trains `task` to `task.total_steps` in `workdir`, resuming from its last checkpoint; see module doc.

  `logger`: one per run when `task.runs` is set (each run's records as if it had trained alone).
  """
  workdir = pathlib.Path(workdir)
  loggers = list(logger) if task.runs else [logger]
  if len(loggers) != max(len(task.runs), 1):
    raise ValueError(f"{len(task.runs)} runs need as many loggers, not {len(loggers)}.")
  label = lambda i: f" in run {task.runs[i]}" if task.runs else ""
  checkpoints = Checkpoints(workdir / "checkpoints", settings.keep_checkpoints)
  latest = checkpoints.latest()
  _check_identity(workdir, task.identity, latest is not None)
  state = task.state
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, extra = checkpoints.restore(latest, abstract)
    task.batches.restore(extra["batches"])
    for evaluator in task.evaluators:
      evaluator.restore(extra["evaluators"][evaluator.name])
    for each in loggers:
      each.truncate(latest)
    logs.log_info("Resumed from the checkpoint at step %d.", latest)
  else:
    for each in loggers:
      each.truncate(-1)  # records of an attempt that died before its first checkpoint
    if task.on_start:
      task.on_start(state)

  step, total = int(np.max(state.step)), task.total_steps  # runs trained together share their step

  def stop_requested() -> bool:
    return any(getattr(e, "stop_requested", False) for e in task.evaluators)

  def stopped(i: int) -> bool:
    """Run i stopped early while others train on: nothing of it is logged or checked any more."""
    return any(e.stopped_runs[i] for e in task.evaluators if hasattr(e, "stopped_runs"))

  last_finite = latest
  bar = tqdm(total=total, initial=step, desc=task.name, unit="step",
             disable=jax.process_index() != 0 or not settings.progress)
  pending = _Pending()

  def stop(what: str, at: int, i: int = 0) -> FloatingPointError:
    bar.close()
    kept = (f"the last finite checkpoint (step {last_finite}) is kept in {checkpoints.directory}"
            if last_finite is not None else "no checkpoint was written")
    lr = float(_per_run(task.learning_rate(at), task.runs)[i])
    return FloatingPointError(
        f"{what}{label(i)} at step {at} (learning rate there {lr:.3g}). Stopped; {kept}, and no adapter "
        f"or result was written from it. Lower the learning rate{task.hint}.")

  def read_back() -> None:
    for at, metrics in pending.read():
      per_run = [{k: float(v) for k, v in m.items()} for m in _per_run(metrics, task.runs)]
      for i, m in enumerate(per_run):
        if not math.isfinite(m["loss"]) and not stopped(i):
          raise stop(f"Non-finite training loss ({m['loss']})", at, i)
      if at % settings.log_every == 0 or at == total:
        for i, (each, m, lr) in enumerate(zip(loggers, per_run, _per_run(task.learning_rate(at), task.runs))):
          if not stopped(i):
            each.write(at, "train", {**m, "lr": float(lr)})
      bar.set_postfix(loss=" ".join(f"{m['loss']:.4f}" for m in per_run))

  tracing = False
  while step < total and not stop_requested():
    if settings.profile_steps and step + 1 == settings.profile_steps[0]:
      jax.profiler.start_trace(str(workdir / "profile"))
      tracing = True
    batch = task.batches.next(step)
    state, metrics = task.step(state, task.params, batch, task.derived)
    step += 1
    pending.items.append((step, metrics))
    bar.update(1)
    if tracing and (step + 1 == settings.profile_steps[1] or step == total):
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tracing = False
      logs.log_info("Profile of steps %d-%d written to %s.", settings.profile_steps[0], step, workdir / "profile")
    due = [e for e in task.evaluators if e.due(step, total)]
    checkpointing = step % settings.checkpoint_every == 0 or step == total
    if step % settings.log_every == 0 or due or checkpointing:
      read_back()
    if not (due or checkpointing):
      continue
    if not bool(all_finite(state.trainable)):
      trainable = ([jax.tree.map(lambda x, i=i: x[i], state.trainable) for i in range(len(task.runs))]
                   if task.runs else [state.trainable])
      bad = [i for i, t in enumerate(trainable) if not bool(all_finite(t)) and not stopped(i)]
      if bad:
        raise stop(f"Non-finite trainable values ({', '.join(non_finite_leaves(trainable[bad[0]]))})", step, bad[0])
    for evaluator in due:
      for i, (each, metrics) in enumerate(zip(loggers, _per_run(evaluator(state, step), task.runs))):
        if metrics is None:  # a run that stopped early is no longer evaluated
          continue
        each.write(step, evaluator.name, metrics)
        scalars = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)][:4]
        bar.write(f"step {step}: {evaluator.name}{label(i)} {', '.join(scalars)}")
    # Evaluations need no checkpoint of their own: a run resumed from an earlier one repeats them exactly
    # (batches and evaluators are restored with the state). An early stop is checkpointed, so it stays stopped.
    if checkpointing or stop_requested():
      if task.runs and any(map(stopped, range(len(task.runs)))):
        state = _zero_non_finite(state, [stopped(i) for i in range(len(task.runs))])
      checkpoints.save(step, state, {"batches": task.batches.state(),
                                     "evaluators": {e.name: e.state() for e in task.evaluators}})
      last_finite = step
    pending.restart_clock()
  read_back()
  bar.close()
  if step < total:
    logs.log_info("Stopped early at step %d of %d (an evaluator asked to stop).", step, total)
  return LoopResult(state, pending.pace(), latest, step)
