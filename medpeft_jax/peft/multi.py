"""Several adapters on one frozen base: each example of a batch runs with its own adapter, in one program.

  stack = stack_adapters({"ham": adapter_a, "isic": adapter_b}, variables)  # leaves gain an adapter axis
  forward = mixed_forward(model, train=False)                               # jitted once
  logits = forward(variables, stack, stack.index(["ham", "isic", "ham"]), images)

The forward is `method.apply` vmapped over the batch, each example reading its adapter's slice of the
stacked leaves (and of the stacked BatchNorm statistics, for adapters that carry their own). Any method
works, selective ones too, with no per-method code. The index vector and the stacked values are plain
inputs of the compiled program: switching adapters, or replacing their values with others of the same
shapes, reuses it; only a different number of adapters or a different batch shape compiles again.
Stacking needs one method with one set of hyperparameters and leaves of one shape, hence one head size.
Inference only: per-example BatchNorm batch statistics (train mode) would not be the batch's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medpeft_jax.peft.adapters import Adapter
from medpeft_jax.peft.core import Flat, Method, Params, flatten, unflatten


@flax.struct.dataclass
class AdapterStack:
  """N adapters of one method as one pytree: every leaf has a leading axis of length N."""

  trainable: Params
  batch_stats: Params | None  # None when no adapter carries statistics (the base's are used)
  method: Method = flax.struct.field(pytree_node=False)
  names: tuple[str, ...] = flax.struct.field(pytree_node=False)

  def index(self, names: Sequence[str]) -> jax.Array:
    """The index vector for a batch whose example i runs with adapter `names[i]`."""
    unknown = sorted(set(names) - set(self.names))
    if unknown:
      raise KeyError(f"No adapter {unknown} in this stack; stacked: {', '.join(self.names)}.")
    return jnp.asarray([self.names.index(n) for n in names], jnp.int32)


def _leaves_of(adapter: Adapter, stats: Params | None) -> dict[str, Flat]:
  out = {"params": dict(adapter.trainable["params"]), "adapters": flatten(adapter.trainable["adapters"])}
  return out if stats is None else {**out, "batch_stats": flatten(stats)}


def stack_adapters(adapters: Mapping[str, Adapter], variables: Params | None = None) -> AdapterStack:
  """Stacks adapters of one method (same hyperparameters, same leaf shapes) along a new leading axis.

  `variables`: the base model's; adapters without their own BatchNorm statistics use its statistics.
  """
  if not adapters:
    raise ValueError("stack_adapters: no adapters given.")
  names = tuple(adapters)
  first = adapters[names[0]]
  for name in names[1:]:
    method = adapters[name].method
    if method != first.method:
      fields = [f.name for f in dataclasses.fields(method) if type(method) is type(first.method)
                and getattr(method, f.name) != getattr(first.method, f.name)]
      what = f"hyperparameters {fields}" if fields else f"method {method.name!r} vs {first.method.name!r}"
      raise ValueError(f"Adapters {names[0]!r} and {name!r} differ in {what}: a mixed batch runs one method "
                       "with one set of hyperparameters; stack only adapters trained with the same settings.")
  has_stats = any(a.batch_stats for a in adapters.values())
  base_stats = (variables or {}).get("batch_stats")
  if has_stats and not base_stats and not all(a.batch_stats for a in adapters.values()):
    raise ValueError("stack_adapters: some adapters carry BatchNorm statistics and others do not; pass the "
                     "base `variables` so that those without use the base model's.")
  leaves = {n: _leaves_of(a, (a.batch_stats or base_stats) if has_stats else None)
            for n, a in adapters.items()}
  stacked = {}
  for section, ref in leaves[names[0]].items():
    for name in names[1:]:
      other = leaves[name][section]
      if set(other) != set(ref):
        diff = sorted(set(other) ^ set(ref))[:3]
        raise ValueError(f"Adapters {names[0]!r} and {name!r} have different {section} leaves ({diff}...): "
                         "they were trained with other targets; stack only adapters with the same leaves.")
      wrong = [f"{p} {tuple(np.shape(other[p]))} vs {tuple(np.shape(v))}" for p, v in ref.items()
               if np.shape(other[p]) != np.shape(v)]
      if wrong:
        raise ValueError(f"Adapters {names[0]!r} and {name!r} differ in shape at {'; '.join(wrong[:3])}: a "
                         "mixed batch needs adapters of the same shapes (the same ranks and the same head "
                         "size, i.e. class count).")
    stacked[section] = {p: jnp.stack([jnp.asarray(leaves[n][section][p]) for n in names]) for p in ref}
  modules: dict[str, dict] = {}
  for path, value in stacked["adapters"].items():  # back to {module path: {leaf: ...}}
    module, leaf = path.rsplit("/", 1)
    modules.setdefault(module, {})[leaf] = value
  trainable = {"params": stacked["params"], "adapters": modules}
  stats = unflatten(stacked["batch_stats"]) if has_stats else None
  return AdapterStack(trainable, stats, first.method, names)


def apply_mixed(model, variables: Params, stack: AdapterStack, index, *inputs, derived: Flat | None = None,
                **kwargs):
  """`model` on a batch whose example i runs with adapter `index[i]` of `stack` (inputs batched on axis 0)."""
  if "mutable" in kwargs:
    raise ValueError("apply_mixed is inference only: mutable collections (train-mode BatchNorm) would hold "
                     "per-example statistics; apply one adapter at a time to train.")
  method = stack.method
  if derived is None:  # from the base alone: once for all examples, outside the vmap
    derived = method.derived_state(variables["params"])

  def one(i, *xs):
    pick = functools.partial(jax.tree.map, lambda s: s[i])
    v = variables if stack.batch_stats is None else {**variables, "batch_stats": pick(stack.batch_stats)}
    out = method.apply(model, v, pick(stack.trainable), *(x[None] for x in xs), derived=derived, **kwargs)
    return jax.tree.map(lambda o: o[0], out)

  return jax.vmap(one)(jnp.asarray(index), *inputs)


def mixed_forward(model, **kwargs):
  """`apply_mixed` jitted once: `forward(variables, stack, index, *inputs)`; `kwargs` (e.g. train=False) are
  fixed. Other index vectors and other stacks of the same method and shapes reuse the compiled program
  (`forward.cache_size()` counts its compilations)."""
  run = jax.jit(functools.partial(apply_mixed, model, **kwargs))

  def forward(variables, stack: AdapterStack, index, *inputs):
    return run(variables, stack.replace(names=()), index, *inputs)  # names are bookkeeping, not the program's

  forward.cache_size = run._cache_size
  return forward
