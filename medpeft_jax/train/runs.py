"""Runs trained together: K runs that differ only in seed, learning rate and data order, as one program.

The train state gains a leading run axis (`stack`); the step is vmapped over it with the frozen base
and the method's derived tensors shared (`vmapped_step`); each run draws its own batches
(`StackedBatches`); the learning rate is per run because the schedule is data in the optimizer state
(train/optim.py), so runs with other learning rates are the same program. `shard_runs` puts the run axis
on a mesh axis, so a sweep on a pod can be one SPMD program with its runs spread over devices; the
classification trainer does so with `config.mesh.runs` rows of ('data', 'fsdp') devices (tests/test_runs.py).
Opt-in (`train/loop.py` `Task.runs`): it pays where one run under-uses the device (small models, small
batches); a large model wants the devices for FSDP instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def stack(trees: Sequence[Any]) -> Any:
  """One pytree with a leading run axis from K pytrees of the same structure (states of K runs)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, runs: int) -> list:
  """The K per-run pytrees of a stacked one."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(runs)]


def vmapped_step(step: Callable) -> Callable:
  """`step(state, params, batch, derived)` over a stacked state and stacked batches, jitted once.

  `step` is the plain (un-jitted) step of train/step.py; the base parameters and derived tensors are
  shared by every run (not copied per run), the state is donated as in a single run's step.
  """
  return jax.jit(jax.vmap(step, in_axes=(0, None, 0, None)), donate_argnums=0)


class StackedBatches:
  """K runs' batch sources as one (`loop.Batches`): each run keeps its own order and position.

  `place` puts the stacked host batch on devices (e.g. split over the batch axes behind the run axis).
  """

  def __init__(self, sources: Sequence[Any], place: Callable[[dict], dict] | None = None):
    self.sources, self.place = list(sources), place

  def next(self, step: int) -> dict:
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[source.next(step) for source in self.sources])
    return self.place(stacked) if self.place else stacked

  def state(self) -> list:
    return [source.state() for source in self.sources]

  def restore(self, state: list) -> None:
    if len(state) != len(self.sources):
      raise ValueError(f"The checkpoint holds the batch positions of {len(state)} runs; this job trains "
                       f"{len(self.sources)} together. Resume with the same runs, or use another workdir.")
    for source, each in zip(self.sources, state):
      source.restore(each)


def shard_runs(tree: Any, mesh: Mesh, axis: str = "runs") -> Any:
  """Places a stacked pytree with its run axis over mesh axis `axis` (the rest of each leaf replicated)."""
  size = mesh.shape[axis]
  for leaf in jax.tree.leaves(tree):
    if leaf.shape[0] % size:
      raise ValueError(f"{leaf.shape[0]} runs cannot be spread evenly over mesh axis {axis!r} of size {size}; "
                       "train a multiple of it together.")
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(axis)))


class PerRunEvaluators:
  """One evaluator per run as one loop evaluator over a stacked state (`loop.Evaluator`).

  A run whose evaluator asked to stop (early stopping) is no longer evaluated, so its best state and
  records are those it would have had alone (its entry is None); training ends when every run asked.
  """

  def __init__(self, evaluators: Sequence[Any]):
    self.evaluators = list(evaluators)
    self.name = self.evaluators[0].name

  @staticmethod
  def _stopped(evaluator) -> bool:
    return bool(getattr(evaluator, "stop_requested", False))

  @property
  def stopped_runs(self) -> list[bool]:
    return [self._stopped(e) for e in self.evaluators]

  @property
  def stop_requested(self) -> bool:
    return all(self.stopped_runs)

  def due(self, step: int, total_steps: int) -> bool:
    return self.evaluators[0].due(step, total_steps)

  def __call__(self, state, step: int) -> list:
    return [None if self._stopped(e) else e(one, step)
            for e, one in zip(self.evaluators, unstack(state, len(self.evaluators)))]

  def state(self) -> list:
    return [e.state() for e in self.evaluators]

  def restore(self, state: list) -> None:
    for evaluator, each in zip(self.evaluators, state):
      evaluator.restore(each)
