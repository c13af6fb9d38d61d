"""Compiled programs reused by what they are: hashable statics plus the abstract signature of their inputs.

`compile_once(statics, make_fn, args, ...)` lowers and compiles `make_fn()` ahead of time unless a
program with equal statics (the model, the method, the optimizer's static settings: frozen
dataclasses and flax modules compare by value) and the same input shapes, dtypes, shardings and tree
structure was compiled before in this process. Nothing is keyed by config field names, so a field
that changes the program cannot be forgotten: what a program closes over must be in `statics`, and
everything else enters as an argument (learning rate, schedule length and class weights are runtime
values: train/optim.py, the batch's per-example weights).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable

import jax

from medpeft_jax.train import logs


def signature(tree) -> tuple:
  """The abstract signature of a pytree of arrays or ShapeDtypeStructs: structure, shapes, dtypes, shardings."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


class ProgramCache:
  """An in-process LRU of compiled programs (a sweep's runs of one model x method reuse one program)."""

  def __init__(self, size: int = 4):
    self.size = size
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def compile_once(self, statics: Hashable, make_fn: Callable[[], Callable], args: tuple, *, in_shardings=None,
                   out_shardings=None, donate_argnums=(), name: str = "program"):
    """Returns `(compiled, seconds spent compiling)`; 0 seconds when an equal program was cached.

    Shardings left None follow the arguments' own (committed arrays or ShapeDtypeStructs with one).
    """
    try:
      key = (name, statics, signature(args))  # the arguments carry their shardings
      hash(key)
    except TypeError as e:
      raise TypeError(f"The statics of {name} must be hashable (frozen dataclasses, modules, tuples): {e}") from e
    if key in self._entries:
      self._entries.move_to_end(key)
      logs.log_info("Reusing the compiled %s (same statics and input signature).", name)
      return self._entries[key], 0.0
    start = time.perf_counter()
    placement = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings)) if v is not None}
    compiled = jax.jit(make_fn(), donate_argnums=donate_argnums, **placement).lower(*args).compile()
    seconds = time.perf_counter() - start
    logs.log_info("Compiled %s in %.1f s (XLA memory estimate %.0f MiB).", name, seconds,
                  xla_memory_estimate(compiled) / 2**20)
    self._entries[key] = compiled
    while len(self._entries) > self.size:
      self._entries.popitem(last=False)
    return compiled, seconds

  def clear(self) -> None:
    self._entries.clear()


PROGRAMS = ProgramCache()


def xla_memory_estimate(compiled) -> int:
  """XLA's static estimate (arguments + outputs + temporaries - aliased), not a measured peak."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
