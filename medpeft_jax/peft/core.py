"""The method contract: a PEFT method is a pure transform of a Flax parameter pytree.

  peft = method.init(rng, params)                        # only what trains
  out = method.apply(model, variables, peft, *inputs, train=True, mutable=["batch_stats"], ...)
  merged = method.merge(params, peft)                    # plain params, no inference overhead
  frozen = method.frozen_state(params)                   # {} except SV-Diff: its SVD, computed once

`peft` is `{"params": {path: leaf}, "adapters": {module path: {name: leaf}}}` with '/'-joined paths:
  - "params" holds trained copies of selected base leaves (the head in every method, plus what a
    selective method tunes); `apply` and `merge` put them in place of the base leaves;
  - "adapters" holds new tensors attached to the modules whose paths a method's regex selects.
    `apply` runs them on activations by intercepting those modules' `__call__`
    (`flax.linen.intercept_methods`) and `merge` folds them into the base leaves. Training on
    activations keeps autodiff from forming any frozen kernel's weight gradient, which is the cost of
    full fine-tuning (../shared/DESIGN.md, "Train on activations, fold only to merge").
A method may also derive non-trainable tensors from the base once (`frozen_state`: SV-Diff's singular
vectors). Callers that step many times compute it once and pass it as `frozen=` to `apply` and
`merge` — a non-differentiated argument like the base params; without it, they recompute it.

This package knows parameter paths and pytrees, never model classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medpeft_jax.registry import Registry

Params = Any
Flat = dict[str, Any]

METHODS: Registry[type[Method]] = Registry("PEFT method")


def register(name: str):
  """Class decorator: registers a method class under `name` (also stored as `cls.name`)."""

  def add(cls):
    cls.name = name
    return METHODS.register(name, cls)

  return add


def get_method(name: str, **hyperparameters) -> Method:
  """Builds a registered method; unknown hyperparameters are an error listing the valid ones."""
  cls = METHODS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(hyperparameters) - fields
  if unknown:
    raise TypeError(f"PEFT method {name!r} has no hyperparameter(s) {sorted(unknown)}; "
                    f"it takes {sorted(fields)}.")
  return cls(**hyperparameters)


def flatten(tree: Params) -> Flat:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Flat) -> Params:
  return traverse_util.unflatten_dict(flat, sep="/")


def module_paths(flat: Flat, enclosing: bool = False) -> list[str]:
  """The modules that own parameters (every leaf path without its last component), in natural order.

  `enclosing=True` adds the modules that contain them (e.g. a ViT's `block3/mlp` and `block3`).
  """
  owners = {p.rsplit("/", 1)[0] for p in flat if "/" in p}
  if enclosing:
    owners |= {"/".join(o.split("/")[:i]) for o in owners for i in range(1, o.count("/") + 1)}
  return sorted(owners, key=natural_key)


def natural_key(path: str):
  """Sorts block2 before block10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def select(candidates: Iterable[str], pattern: str | None, what: str,
           exclude: str | None = None) -> list[str]:
  """The candidates `pattern` fully matches (minus `exclude`); selecting nothing is an error."""
  candidates = list(candidates)
  if pattern is None:
    return []
  chosen = [c for c in candidates if re.fullmatch(pattern, c)
            and not (exclude and re.fullmatch(exclude, c))]
  if not chosen:
    shown = ", ".join(candidates[:40]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 40 else "")
    raise ValueError(f"The {what} regex {pattern!r} (exclude={exclude!r}) selects nothing. "
                     f"Available: {shown}.")
  return chosen


def num_params(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class ParamCount:
  trainable: int
  total: int

  def __str__(self):
    """The Hugging Face PEFT `print_trainable_parameters` format."""
    return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.trainable / self.total:.4f}")


class MergeError(ValueError):
  """The method adds computation that cannot be folded into the base parameters."""


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class: selective leaves (`trainable_paths`) plus optional module adapters.

  Subclasses override `trainable_paths` (selective methods) or `adapter_modules`, `init_adapter`,
  `call_adapter` and `fold_adapter` (adapter methods). `head` selects the new classification head,
  trained by every method; None for models without one.
  """

  name = "method"  # set by @register
  head: str | None = r"head/.*"

  # --- what a subclass defines ---------------------------------------------------------------------
  def trainable_paths(self, flat: Flat) -> list[str]:
    """Base leaves trained in place (the head by default)."""
    return select(flat, self.head, "head") if self.head else []

  def adapter_modules(self, flat: Flat) -> list[str]:
    return []

  def init_adapter(self, rng, module: str, flat: Flat) -> dict[str, jax.Array]:
    raise NotImplementedError

  def call_adapter(self, adapter, module, base: Flat, path: str, next_fun, args, kwargs):
    """Runs intercepted module `path` (a bound flax module) with its adapter; returns its output."""
    raise NotImplementedError

  def fold_adapter(self, flat: Flat, path: str, adapter) -> Flat:
    """Returns the leaves of module `path` with the adapter folded in."""
    raise MergeError(f"{self.name} cannot be merged into the base parameters: its adapters add "
                     "computation that no weight can express. Keep it as an adapter "
                     "(medpeft_jax.peft.save_adapter) and apply it with method.apply.")

  def frozen_state(self, params: Params) -> Flat:
    """Non-trainable tensors derived from the base once, as extra '/'-joined leaves beside it."""
    return {}

  # --- the contract ----------------------------------------------------------------------------------
  def init(self, rng: jax.Array, params: Params) -> Params:
    flat = flatten(params)
    modules = self.adapter_modules(flat)
    keys = jax.random.split(rng, max(len(modules), 1))
    # Copies: the trainable leaves must not alias the frozen base (a jitted step donates them).
    return {"params": {p: jnp.array(flat[p], copy=True) for p in self.trainable_paths(flat)},
            "adapters": {m: self.init_adapter(k, m, flat) for m, k in zip(modules, keys)}}

  def apply(self, model, variables: Params, peft: Params, *inputs, frozen: Flat | None = None, **kwargs):
    """`model.apply(variables, *inputs, **kwargs)` with the method in it: pure and jit-able."""
    base = flatten(variables["params"])
    params = unflatten({**base, **peft["params"]})
    variables = {**variables, "params": params}
    adapters = peft["adapters"]
    if not adapters:
      return model.apply(variables, *inputs, **kwargs)
    if frozen is None:
      frozen = self.frozen_state(variables["params"])
    flat_params = {**base, **frozen, **peft["params"]}
    active: set[str] = set()  # a module's __call__ may call its parent class's (wrapped) __call__

    def interceptor(next_fun, args, kw, context):
      if context.method_name != "__call__":
        return next_fun(*args, **kw)
      path = "/".join(context.module.path)
      if path not in adapters or path in active:
        return next_fun(*args, **kw)
      active.add(path)
      try:
        return self.call_adapter(adapters[path], context.module, flat_params, path, next_fun, args, kw)
      finally:
        active.discard(path)

    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs, **kwargs)

  def merge(self, params: Params, peft: Params, frozen: Flat | None = None) -> Params:
    frozen = self.frozen_state(params) if frozen is None else frozen
    flat = {**flatten(params), **frozen, **peft["params"]}
    for path, adapter in peft["adapters"].items():
      flat = self.fold_adapter(flat, path, adapter)
    return unflatten({k: v for k, v in flat.items() if k not in frozen})

  def count(self, params: Params, peft: Params) -> ParamCount:
    """Trainable = everything in `peft`; total = the base model plus the adapters it adds."""
    return ParamCount(num_params(peft), num_params(params) + num_params(peft["adapters"]))
