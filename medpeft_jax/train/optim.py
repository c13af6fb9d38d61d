"""AdamW whose learning-rate schedule is data in the optimizer state, not constants in the program.

The peak learning rate, warmup and total steps live in the state as arrays and are read by the
update, so runs that differ only in them (an LR search, regimes with other step counts, seeds) run
one compiled program. Only the schedule's shape (`kind`), clipping and weight decay are static.
The update never reads a construction-time value of `peak`, `warmup` or `total`: they enter through
`init` alone (tests/test_loop.py checks that a reused program follows a new state's schedule).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

KINDS = ("cosine", "constant")


class ScheduleState(NamedTuple):
  count: jax.Array  # updates applied so far
  peak: jax.Array  # float32 peak learning rate
  warmup: jax.Array  # int32 linear-warmup steps
  total: jax.Array  # int32 steps of the whole schedule


def learning_rate(count, peak, warmup, total, kind: str):
  """The schedule at update `count` (0-based): linear warmup from 0, then cosine to 0 (or constant).

  optax.warmup_cosine_decay_schedule(0, peak, warmup, max(total, warmup + 1), end_value=0), written
  over arrays so that `peak`, `warmup` and `total` may be traced values.
  """
  if kind == "constant":
    return jnp.asarray(peak, jnp.float32)
  count, warmup = jnp.asarray(count, jnp.float32), jnp.asarray(warmup, jnp.float32)
  decay_steps = jnp.maximum(jnp.asarray(total, jnp.float32), warmup + 1) - warmup
  progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
  ramp = peak * count / jnp.maximum(warmup, 1.0)
  return jnp.where(count < warmup, ramp, peak * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def scale_by_runtime_schedule(peak: float, warmup: int, total: int, kind: str) -> optax.GradientTransformation:
  """Multiplies updates by -lr(count); the schedule's numbers come from the state (see module doc)."""
  if kind not in KINDS:
    raise ValueError(f"Unknown schedule kind {kind!r}; valid: {', '.join(KINDS)}.")

  def init(params):
    del params
    return ScheduleState(jnp.zeros((), jnp.int32), jnp.asarray(peak, jnp.float32), jnp.asarray(warmup, jnp.int32),
                         jnp.asarray(total, jnp.int32))

  def update(updates, state: ScheduleState, params=None):
    del params
    lr = learning_rate(state.count, state.peak, state.warmup, state.total, kind)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The static part of the optimizer (hashable: it keys compiled programs); the schedule is runtime."""

  grad_clip: float | None = 1.0
  weight_decay: float = 1e-4
  kind: str = "cosine"

  def build(self, peak: float, warmup: int = 0, total: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping, Adam, decoupled weight decay, then the runtime schedule (as optax.adamw)."""
    parts = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip else []
    parts += [optax.scale_by_adam(), optax.add_decayed_weights(self.weight_decay),
              scale_by_runtime_schedule(peak, warmup, total, self.kind)]
    return optax.chain(*parts)
