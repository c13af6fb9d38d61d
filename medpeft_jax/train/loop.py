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
  learning_rate: Callable[[int], float]  # the schedule at a 1-based step, for logs and errors
  hint: str = ""  # what to change after a non-finite value, besides the learning rate
  on_start: Callable[[Any], None] | None = None  # called with the fresh state of a run that does not resume


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
    out = [(at, {k: float(v) for k, v in m.items()}) for at, m in self.items]
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


def run(task: Task, workdir, settings: LoopSettings, logger: logs.RunLogger) -> LoopResult:
  """Trains `task` to `task.total_steps` in `workdir`, resuming from its last checkpoint; see module doc."""
  workdir = pathlib.Path(workdir)
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
    logger.truncate(latest)
    logs.log_info("Resumed from the checkpoint at step %d.", latest)
  else:
    logger.truncate(-1)  # records of an attempt that died before its first checkpoint
    if task.on_start:
      task.on_start(state)

  step, total = int(state.step), task.total_steps

  def stop_requested() -> bool:
    return any(getattr(e, "stop_requested", False) for e in task.evaluators)

  last_finite = latest
  bar = tqdm(total=total, initial=step, desc=task.name, unit="step",
             disable=jax.process_index() != 0 or not settings.progress)
  pending = _Pending()

  def stop(what: str, at: int) -> FloatingPointError:
    bar.close()
    kept = (f"the last finite checkpoint (step {last_finite}) is kept in {checkpoints.directory}"
            if last_finite is not None else "no checkpoint was written")
    return FloatingPointError(
        f"{what} at step {at} (learning rate there {task.learning_rate(at):.3g}). Stopped; {kept}, and no adapter "
        f"or result was written from it. Lower the learning rate{task.hint}.")

  def read_back() -> None:
    for at, metrics in pending.read():
      if not math.isfinite(metrics["loss"]):
        raise stop(f"Non-finite training loss ({metrics['loss']})", at)
      if at % settings.log_every == 0 or at == total:
        logger.write(at, "train", {**metrics, "lr": task.learning_rate(at)})
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")

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
      raise stop(f"Non-finite trainable values ({', '.join(non_finite_leaves(state.trainable))})", step)
    for evaluator in due:
      metrics = evaluator(state, step)
      logger.write(step, evaluator.name, metrics)
      scalars = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)][:4]
      bar.write(f"step {step}: {evaluator.name} {', '.join(scalars)}")
    # Evaluations need no checkpoint of their own: a run resumed from an earlier one repeats them exactly
    # (batches and evaluators are restored with the state). An early stop is checkpointed, so it stays stopped.
    if checkpointing or stop_requested():
      checkpoints.save(step, state, {"batches": task.batches.state(),
                                     "evaluators": {e.name: e.state() for e in task.evaluators}})
      last_finite = step
    pending.restart_clock()
  read_back()
  bar.close()
  if step < total:
    logs.log_info("Stopped early at step %d of %d (an evaluator asked to stop).", step, total)
  return LoopResult(state, pending.pace(), latest, step)
