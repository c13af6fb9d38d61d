"""The jitted train step: gradients and optimizer state for the method's trainable leaves only.

Frozen base parameters are a plain (non-donated) input: no gradient, no optimizer state, and — since
methods train on activations — no weight-gradient computation for them. With `grad_accum = k` a
step splits its batch into k micro-batches, sums their gradients in a `lax.scan` (BatchNorm
statistics carried through), and applies one update: the memory of a micro-batch, the maths of
the whole batch.

One signature for every task: `step(state, params, batch, derived) -> (state, metrics)`, where
`derived` is the method's derived tensors (`method.derived_state(params)`, SV-Diff's SVD). Class
weights are runtime data: a batch may carry a per-example "weight" (the loss is then the weighted
mean), so runs with other class balances share one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medpeft_jax.peft import Method


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any  # what trains (method.init)
  opt_state: Any
  batch_stats: Any  # {} for models without BatchNorm
  rng: jax.Array  # a raw uint32 key (checkpointable)
  method_state: Any = flax.struct.field(default_factory=dict)  # method.init_step_state (AdaLoRA); {} for most


def init_train_state(method: Method, variables, optimizer: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  init_rng, rng = jax.random.split(rng)
  trainable = method.init(init_rng, variables["params"])
  batch_stats = jax.tree.map(jnp.copy, variables.get("batch_stats", {}))  # the step donates its state
  return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), batch_stats, rng,
                    method.init_step_state(trainable))


def classification_loss(label_smoothing: float = 0.0) -> Callable:
  """Softmax cross-entropy, optionally label-smoothed; weighted by the batch's "weight" when it has one."""

  def loss_fn(logits, batch):
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    if "weight" not in batch:
      return losses.mean()
    w = batch["weight"].astype(jnp.float32)
    return jnp.sum(losses * w) / jnp.sum(w)

  return loss_fn


def per_example_weights(labels, class_weights) -> np.ndarray:
  """The batch's "weight" entry for `class_weights` (one per class)."""
  return np.asarray(class_weights, np.float32)[np.asarray(labels)]


softmax_cross_entropy = classification_loss()


def make_train_step(model, method: Method, optimizer: optax.GradientTransformation, *,
                    loss_fn: Callable = softmax_cross_entropy, update_batch_stats: bool = True,
                    grad_accum: int = 1, jit: bool = True):
  """Returns `step(state, params, batch, derived=None) -> (state, metrics)`; `batch` has "image" and "label".

  `derived`: the method's derived tensors (`method.derived_state(params)`, SV-Diff's SVD), computed
  once by the caller; None recomputes them inside the step (free for every method without any).
  `update_batch_stats`: BatchNorm normalises with batch statistics and updates its running ones
  (train mode); False keeps them frozen and normalises with them. `jit=False` returns the plain
  function, for callers that jit it with explicit shardings.
  """

  def micro_step(trainable, params, derived, batch_stats, batch, rng):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    mutable = ["batch_stats"] if batch_stats and update_batch_stats else False
    train = bool(mutable) or not batch_stats

    def loss(trainable):
      out = method.apply(model, variables, trainable, batch["image"], train=train, rngs={"dropout": rng},
                         mutable=mutable, derived=derived)
      logits, updates = out if mutable else (out, {"batch_stats": batch_stats})
      return loss_fn(logits, batch) + method.loss_term(trainable), (logits, updates["batch_stats"])

    (value, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    return grads, value, correct, batch_stats

  def step(state: TrainState, params, batch, derived=None):
    rng, step_rng = jax.random.split(state.rng)
    if derived is None:
      derived = method.derived_state(params)
    if grad_accum == 1:
      grads, value, correct, batch_stats = micro_step(state.trainable, params, derived, state.batch_stats, batch,
                                                      step_rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def body(carry, xs):
        grads, value, correct, batch_stats = carry
        mb, i = xs
        rng_i = jax.random.fold_in(step_rng, i)
        g, v, c, batch_stats = micro_step(state.trainable, params, derived, batch_stats, mb, rng_i)
        return (jax.tree.map(jnp.add, grads, g), value + v, correct + c, batch_stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats)
      (grads, value, correct, batch_stats), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      value = value / grad_accum
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable, method_state = method.after_update(optax.apply_updates(state.trainable, updates), grads,
                                                  state.method_state, state.step + 1)
    state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, batch_stats=batch_stats,
                          rng=rng, method_state=method_state)
    metrics = {"loss": value, "accuracy": correct / batch["label"].shape[0],
               "grad_norm": optax.tree.norm(grads)}
    return state, metrics

  if grad_accum < 1 or not isinstance(grad_accum, int):
    raise ValueError(f"grad_accum must be a positive integer, not {grad_accum!r}.")
  return jax.jit(step, donate_argnums=0) if jit else step
