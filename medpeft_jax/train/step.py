"""The jitted train step: gradients and optimizer state for the method's trainable leaves only.

Frozen base parameters are a plain (non-donated) input: no gradient, no optimizer state, and — since
methods train on activations — no weight-gradient computation for them. With `grad_accum = k` a
step splits its batch into k micro-batches, sums their gradients in a `lax.scan` (BatchNorm
statistics carried through), and applies one update: the memory of a micro-batch, the maths of
the whole batch.
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
  rng: jax.Array  # a raw uint32 key (checkpointable)


def init_train_state(method: Method, variables, optimizer: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  init_rng, rng = jax.random.split(rng)
  peft = method.init(init_rng, variables["params"])
  batch_stats = jax.tree.map(jnp.copy, variables.get("batch_stats", {}))  # the step donates its state
  return TrainState(jnp.zeros((), jnp.int32), peft, optimizer.init(peft), batch_stats, rng)


def classification_loss(label_smoothing: float = 0.0, class_weights=None) -> Callable:
  """Softmax cross-entropy, optionally label-smoothed and weighted per class (normalised by weight)."""

  def loss_fn(logits, batch):
    labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    if class_weights is None:
      return losses.mean()
    w = jnp.asarray(class_weights, jnp.float32)[batch["label"]]
    return jnp.sum(losses * w) / jnp.sum(w)

  return loss_fn


softmax_cross_entropy = classification_loss()


def make_train_step(model, method: Method, optimizer: optax.GradientTransformation, *,
                    loss_fn: Callable = softmax_cross_entropy, update_batch_stats: bool = True,
                    grad_accum: int = 1, jit: bool = True):
  """Returns `step(state, params, batch, frozen=None) -> (state, metrics)`; `batch` has "image" and "label".

  `frozen`: the method's frozen state (`method.frozen_state(params)`, SV-Diff's SVD), computed once
  by the caller; None recomputes it inside the step (free for every method without one).
  `update_batch_stats`: BatchNorm normalises with batch statistics and updates its running ones
  (train mode); False keeps them frozen and normalises with them. `jit=False` returns the plain
  function, for callers that jit it with explicit shardings.
  """

  def micro_step(peft, params, frozen, batch_stats, batch, rng):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    mutable = ["batch_stats"] if batch_stats and update_batch_stats else False
    train = bool(mutable) or not batch_stats

    def loss(peft):
      out = method.apply(model, variables, peft, batch["image"], train=train, rngs={"dropout": rng},
                         mutable=mutable, frozen=frozen)
      logits, updates = out if mutable else (out, {"batch_stats": batch_stats})
      return loss_fn(logits, batch), (logits, updates["batch_stats"])

    (value, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(peft)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    return grads, value, correct, batch_stats

  def step(state: TrainState, params, batch, frozen=None):
    rng, step_rng = jax.random.split(state.rng)
    if frozen is None:
      frozen = method.frozen_state(params)
    if grad_accum == 1:
      grads, value, correct, batch_stats = micro_step(state.peft, params, frozen, state.batch_stats, batch,
                                                      step_rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def body(carry, xs):
        grads, value, correct, batch_stats = carry
        mb, i = xs
        rng_i = jax.random.fold_in(step_rng, i)
        g, v, c, batch_stats = micro_step(state.peft, params, frozen, batch_stats, mb, rng_i)
        return (jax.tree.map(jnp.add, grads, g), value + v, correct + c, batch_stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.peft)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats)
      (grads, value, correct, batch_stats), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      value = value / grad_accum
    updates, opt_state = optimizer.update(grads, state.opt_state, state.peft)
    state = state.replace(step=state.step + 1, peft=optax.apply_updates(state.peft, updates),
                          opt_state=opt_state, batch_stats=batch_stats, rng=rng)
    metrics = {"loss": value, "accuracy": correct / batch["label"].shape[0],
               "grad_norm": optax.tree.norm(grads)}
    return state, metrics

  if grad_accum < 1 or not isinstance(grad_accum, int):
    raise ValueError(f"grad_accum must be a positive integer, not {grad_accum!r}.")
  return jax.jit(step, donate_argnums=0) if jit else step
