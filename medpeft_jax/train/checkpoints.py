"""Orbax checkpoints of a train state plus JSON extras; only finite states are ever written or restored."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (one fused reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def non_finite_leaves(tree, limit: int = 5) -> list[str]:
  """Paths of (up to `limit`) floating-point leaves holding NaN or inf, for error messages."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(x))):
      out.append(jax.tree_util.keystr(path))
      if len(out) == limit:
        break
  return out


class Checkpoints:
  """Synchronous orbax checkpoints of the train state plus JSON extras (batch-iterator state, evaluators)."""

  def __init__(self, directory: pathlib.Path, keep: int):
    self.directory = directory.absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, extra: dict) -> None:
    if not bool(all_finite(state)):  # the loop checks first; this guards every other caller
      raise FloatingPointError(f"Refusing to checkpoint a non-finite state at step {step}: "
                               f"{non_finite_leaves(state)}.")
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, abstract_state):
    """The state at `step`, placed as `abstract_state`'s shardings, and its extras; a non-finite one is an error."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             extra=ocp.args.JsonRestore()))
    if not bool(all_finite(out["state"])):
      raise FloatingPointError(
          f"The checkpoint {self.directory / str(step)} holds non-finite values ({non_finite_leaves(out['state'])}); "
          f"it was written by a diverged run. Delete {self.directory} to start over (with a lower learning rate).")
    return out["state"], out["extra"]
