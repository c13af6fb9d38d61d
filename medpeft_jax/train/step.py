"""The jitted train step: gradients and optimizer state for the method's trainable leaves only.

Frozen base parameters are a plain (non-donated) input: no gradient, no optimizer state, and — since
methods train on activations — no weight-gradient computation for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from medpeft_jax.peft import Method


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  peft: Any  # what trains (method.init)
  opt_state: Any
  batch_stats: Any  # {} for models without BatchNorm
  rng: jax.Array


def init_train_state(method: Method, variables, optimizer: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  init_rng, rng = jax.random.split(rng)
  peft = method.init(init_rng, variables["params"])
  batch_stats = jax.tree.map(jnp.copy, variables.get("batch_stats", {}))  # the step donates its state
  return TrainState(jnp.zeros((), jnp.int32), peft, optimizer.init(peft), batch_stats, rng)


def softmax_cross_entropy(logits, batch, label_smoothing: float = 0.0):
  labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, labels).mean()


def make_train_step(model, method: Method, optimizer: optax.GradientTransformation, *,
                    loss_fn: Callable = softmax_cross_entropy, update_batch_stats: bool = True,
                    jit: bool = True):
  """Returns `step(state, params, batch) -> (state, metrics)`; `batch` has "image" and "label".

  `update_batch_stats`: BatchNorm normalises with batch statistics and updates its running ones
  (train mode); False keeps them frozen and normalises with them.
  """

  def step(state: TrainState, params, batch):
    rng, dropout_rng = jax.random.split(state.rng)
    variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    mutable = ["batch_stats"] if state.batch_stats and update_batch_stats else False
    train = bool(mutable) or not state.batch_stats

    def loss(peft):
      out = method.apply(model, variables, peft, batch["image"], train=train, rngs={"dropout": dropout_rng},
                         mutable=mutable)
      logits, updates = out if mutable else (out, {"batch_stats": state.batch_stats})
      return loss_fn(logits, batch), (logits, updates["batch_stats"])

    (value, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.peft)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.peft)
    state = state.replace(step=state.step + 1, peft=optax.apply_updates(state.peft, updates),
                          opt_state=opt_state, batch_stats=batch_stats, rng=rng)
    metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
               "grad_norm": optax.tree.norm(grads)}
    return state, metrics

  return jax.jit(step, donate_argnums=0) if jit else step
