"""The method contract: a PEFT method is a pure transform of a Flax parameter pytree.

  trainable = method.init(rng, params)                   # only what trains
  out = method.apply(model, variables, trainable, *inputs, train=True, mutable=["batch_stats"], ...)
  merged = method.merge(params, trainable)               # plain params, no inference overhead
  derived = method.derived_state(params)                 # {} except SV-Diff: its SVD, computed once

`trainable` is `{"params": {path: leaf}, "adapters": {module path: {name: leaf}}}` with '/'-joined paths:
  - "params" holds trained copies of selected base leaves (the head in every method, plus what a
    selective method tunes); `apply` and `merge` put them in place of the base leaves;
  - "adapters" holds new tensors attached to the modules whose paths a method's regex selects.
    `apply` runs them on activations by intercepting those modules' `__call__`
    (`flax.linen.intercept_methods`; each call reaches `Method.call_adapter` as an `AdapterCall`)
    and `merge` folds them into the base leaves. Training on activations keeps autodiff from forming
    any frozen kernel's weight gradient, which is the cost of full fine-tuning (../shared/DESIGN.md,
    "Train on activations, fold only to merge").
A method may also derive non-trainable tensors from the base once (`derived_state`: SV-Diff's singular
vectors). Callers that step many times compute it once and pass it as `derived=` to `apply` and
`merge` — a non-differentiated argument like the base params; without it, they recompute it.

This package knows parameter paths and pytrees, never model classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

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
class AdapterCall:
  """One intercepted `__call__` of a module that has an adapter, as `Method.call_adapter` sees it."""

  module: nn.Module  # the bound flax module
  path: str  # its '/'-joined parameter path
  base: Flat  # every leaf it may read: base params, derived state, trained copies of selected leaves
  next_fun: Callable  # the module's own `__call__`
  args: tuple
  kwargs: dict

  @property
  def inputs(self):
    """The module's first positional input (its activations)."""
    return self.args[0]

  def original(self):
    """The module's output without the adapter."""
    return self.next_fun(*self.args, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class: selective leaves (`trainable_paths`) plus optional module adapters.

  Subclasses override `trainable_paths` (selective methods) or `adapter_modules`, `init_adapter`,
  `call_adapter` and `fold_adapter` (adapter methods). `head` selects the new classification head,
  trained by every method; None for models without one.
  """

  name = "method"  # set by @register
  # Regex templates for the fields whose defaults depend on the model: `{role}` stands for the model's regex
  # of that kind of layer (`models.ROLE_NAMES`, declared by each model), e.g. {"targets": "{query}|{value}"}.
  # `presets.build_method` fills them in where neither the user nor the paper's settings set the field, so
  # a new method runs on every model that has the layers it adapts. A field of OPTIONAL_ROLE_FIELDS may
  # resolve to nothing (e.g. an exclusion); any other is an error when the model has none of its roles.
  ROLE_DEFAULTS: ClassVar[Mapping[str, str]] = {}
  OPTIONAL_ROLE_FIELDS: ClassVar[frozenset[str]] = frozenset()
  head: str | None = r"head/.*"

  # --- what a subclass defines ---------------------------------------------------------------------
  def trainable_paths(self, flat: Flat) -> list[str]:
    """Base leaves trained in place (the head by default)."""
    return select(flat, self.head, "head") if self.head else []

  def adapter_modules(self, flat: Flat) -> list[str]:
    return []

  def init_adapter(self, rng, module: str, flat: Flat) -> dict[str, jax.Array]:
    raise NotImplementedError

  def call_adapter(self, adapter, call: AdapterCall):
    """Runs the intercepted module `call.module` with its adapter; returns its output."""
    raise NotImplementedError

  def fold_adapter(self, flat: Flat, path: str, adapter) -> Flat:
    """Returns the leaves of module `path` with the adapter folded in."""
    raise MergeError(f"{self.name} cannot be merged into the base parameters: its adapters add "
                     "computation that no weight can express. Keep it as an adapter "
                     "(medpeft_jax.peft.save_adapter) and apply it with method.apply.")

  def derived_state(self, params: Params) -> Flat:
    """Non-trainable tensors derived from the base once, as extra '/'-joined leaves beside it."""
    return {}

  def init_step_state(self, trainable: Params) -> Params:
    """State a method carries across training steps (e.g. AdaLoRA's importance scores); {} for most."""
    del trainable
    return {}

  def after_update(self, trainable: Params, grads: Params, step_state: Params, step):
    """Runs inside the jitted step after each optimizer update (step: the 1-based step just taken).

    Returns `(trainable, step_state)`; a method that reallocates or prunes its parameters during
    training (AdaLoRA's rank budget) does it here. The default changes nothing.
    """
    del grads, step
    return trainable, step_state

  def for_run(self, total_steps: int) -> Method:
    """The method for a run of `total_steps` steps (a schedule inside it needs them); itself for most."""
    del total_steps
    return self

  def loss_term(self, trainable: Params) -> jax.Array | float:
    """A term the method adds to the training loss (AdaLoRA's orthogonality regulariser); 0 for most."""
    del trainable
    return 0.0

  # --- the contract ----------------------------------------------------------------------------------
  def init(self, rng: jax.Array, params: Params) -> Params:
    flat = flatten(params)
    modules = self.adapter_modules(flat)
    keys = jax.random.split(rng, max(len(modules), 1))
    # Copies: the trainable leaves must not alias the frozen base (a jitted step donates them).
    return {"params": {p: jnp.array(flat[p], copy=True) for p in self.trainable_paths(flat)},
            "adapters": {m: self.init_adapter(k, m, flat) for m, k in zip(modules, keys)}}

  def apply(self, model, variables: Params, trainable: Params, *inputs, derived: Flat | None = None, **kwargs):
    """`model.apply(variables, *inputs, **kwargs)` with the method in it: pure and jit-able."""
    base = flatten(variables["params"])
    check_fits(base, trainable, self.name)
    params = unflatten({**base, **trainable["params"]})
    variables = {**variables, "params": params}
    adapters = trainable["adapters"]
    if not adapters:
      return model.apply(variables, *inputs, **kwargs)
    if derived is None:
      derived = self.derived_state(variables["params"])
    flat_params = {**base, **derived, **trainable["params"]}
    active: set[str] = set()  # a module's __call__ may call its parent class's (wrapped) __call__

    def interceptor(next_fun, args, kw, context):
      if context.method_name != "__call__":
        return next_fun(*args, **kw)
      path = "/".join(context.module.path)
      if path not in adapters or path in active:
        return next_fun(*args, **kw)
      active.add(path)
      try:
        call = AdapterCall(context.module, path, flat_params, next_fun, args, kw)
        return self.call_adapter(adapters[path], call)
      finally:
        active.discard(path)

    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs, **kwargs)

  def merge(self, params: Params, trainable: Params, derived: Flat | None = None) -> Params:
    derived = self.derived_state(params) if derived is None else derived
    check_fits(flatten(params), trainable, self.name)
    flat = {**flatten(params), **derived, **trainable["params"]}
    for path, adapter in trainable["adapters"].items():
      flat = self.fold_adapter(flat, path, adapter)
    return unflatten({k: v for k, v in flat.items() if k not in derived})

  def count(self, params: Params, trainable: Params) -> ParamCount:
    """Trainable = everything in `trainable`; total = the base model plus the adapters it adds."""
    return ParamCount(num_params(trainable), num_params(params) + num_params(trainable["adapters"]))


def check_fits(base: Flat, trainable: Params, method: str) -> None:
  """Trained leaves and adapted modules must exist in the base with the same shapes: an adapter made
  for another model (or another head size) is an error naming what does not fit, not a flax error."""
  wrong = [f"{p} {tuple(np.shape(v))} (model: {tuple(np.shape(base[p])) if p in base else 'absent'})"
           for p, v in trainable["params"].items() if p not in base or np.shape(base[p]) != np.shape(v)]
  modules = {p.rsplit("/", 1)[0] for p in base if "/" in p} | set(module_paths(base, enclosing=True))
  wrong += [f"{m} (an adapted module the model lacks)" for m in trainable["adapters"] if m not in modules]
  if wrong:
    raise ValueError(f"This {method} adapter does not fit the model: {'; '.join(wrong[:4])}"
                     f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}. It was made for another model, "
                     "class count or configuration: apply it to the base model (and classes) it was trained on.")
