"""Name -> object registries (models, PEFT methods, datasets).

One small class so that every lookup by name fails the same way: with the list of valid names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
  """A name no registry (or preset table) knows; the message lists the valid ones."""

  def __str__(self) -> str:  # KeyError would print the message quoted
    return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
  """A mapping from names to objects, filled by the `register` decorator."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str, obj: T | None = None):
    """Registers `obj` under `name`; used bare as `@registry.register("name")`."""

    def add(o: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is already registered.")
      self._items[name] = o
      return o

    return add if obj is None else add(obj)

  def get(self, name: str) -> T:
    try:
      return self._items[name]
    except KeyError:
      valid = ", ".join(sorted(self._items))
      raise UnknownNameError(f"Unknown {self.kind} {name!r}; valid names: {valid}.") from None

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
