"""Linear probing on cached trunk features: the frozen trunk runs once per image, then only the head trains.

With `linear_on_features=True` (the default) the `linear` method does not run the model each step:
every image of the train, validation and test splits goes once through the trunk in evaluation mode
(the evaluation transform — resize and centre crop — no augmentation; BatchNorm with its running
statistics), and the head trains on those features. This is the classic linear probe; it differs from
`linear_on_features=False` (the head trained through the whole model on augmented images, BatchNorm
statistics following `bn_mode`) by the augmentation and BatchNorm mode only. Features are cached in
memory per (model, weights, image size, dataset build, split), so the runs of a sweep (regimes, seeds,
learning rates) compute them once. The best head is saved as an ordinary `linear` adapter: evaluated
or exported through the whole model, it gives the same outputs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from medpeft_jax import data
from medpeft_jax.train import sharding
from medpeft_jax.train.metrics import classification_metrics
from medpeft_jax.train.step import classification_loss, per_example_weights

_FEATURES: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (features, labels) of a whole split


def split_features(key: dict, trunk, variables, split: data.Split, *, image_size: int, mean, std,
                   batch_size: int, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, D), labels (N,)) of `split` (its regime's examples), computed once per `key` and split.

  Every process reads its share of the split; the features are gathered, so all processes hold them all.
  """
  full_key = json.dumps({**key, "split": split.split, "build": str(split.builder.data_path)}, sort_keys=True,
                        default=str)
  if full_key not in _FEATURES:
    whole = data.Split(split.builder, split.split)
    whole._decoded = split._decoded  # noqa: SLF001  (the same decoded images, when cached)
    apply = jax.jit(lambda v, x: trunk.apply(v, x, train=False).astype(jnp.float32))
    features, labels, positions = [], [], []
    for local in data.eval_loader(whole, image_size=image_size, mean=mean, std=std, batch_size=batch_size):
      batch = sharding.global_batch(local, mesh)
      gathered = multihost_utils.process_allgather((apply(variables, batch["image"]), batch["label"],
                                                    batch["position"]), tiled=True)
      for out, value in zip((features, labels, positions), gathered):
        out.append(np.asarray(value))
    positions = np.concatenate(positions)
    order = np.argsort(np.where(positions < 0, len(positions) + 1, positions), kind="stable")
    order = order[positions[order] >= 0]  # split order, padding dropped
    if len(_FEATURES) >= 8:
      _FEATURES.pop(next(iter(_FEATURES)))
    _FEATURES[full_key] = (np.concatenate(features)[order], np.concatenate(labels)[order])
  features, labels = _FEATURES[full_key]
  return features[split.indices], labels[split.indices]


def trunk_of(spec, overrides: dict, variables) -> tuple:
  """The model without its head (`num_classes=0`: pooled features) and its variables."""
  trunk = spec.build(num_classes=0, **overrides)
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  return trunk, {**variables, "params": params}


def head_logits(trainable, features):
  head = trainable["params"]
  return features @ head["head/kernel"] + head["head/bias"]


def make_head_step(optimizer, label_smoothing: float):
  """`step(state, params, batch, derived)` on {"features", "label", "weight"}: the train loop's signature."""
  loss_fn = classification_loss(label_smoothing)

  def step(state, params, batch, derived):
    del params, derived  # the trunk ran once, before training

    def loss(trainable):
      logits = head_logits(trainable, batch["features"])
      return loss_fn(logits, batch), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                          opt_state=opt_state)
    return state, {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                   "grad_norm": optax.tree.norm(grads)}

  return step


class FeatureBatches:
  """Batches of cached features, a pure function of the step (`data.pipeline.step_rows`): nothing to restore."""

  def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, mesh, weights):
    self.features, self.labels, self.batch_size, self.seed, self.mesh = features, labels, batch_size, seed, mesh
    self.weights = weights

  def next(self, step: int) -> dict:
    rows = data.pipeline.step_rows(len(self.labels), self.batch_size, self.seed, step)
    local = {"features": self.features[rows], "label": self.labels[rows].astype(np.int32),
             "weight": per_example_weights(self.labels[rows], self.weights)}
    return sharding.global_batch(local, self.mesh)

  def state(self) -> None:
    return None

  def restore(self, state) -> None:
    del state


@jax.jit
def _probabilities(trainable, features):
  return jax.nn.softmax(head_logits(trainable, features))


def evaluate_features(trainable, features: np.ndarray, labels: np.ndarray, class_names) -> dict:
  return classification_metrics(labels, np.asarray(_probabilities(trainable, features)), class_names)
