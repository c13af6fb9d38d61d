"""One sharding code path from 1 CPU to a pod: a ('data', 'fsdp') mesh, and placement rules as data.

The batch is split over both axes (every device sees different examples; 'fsdp' devices additionally
hold slices of the large parameters, which XLA gathers for compute: ZeRO-3 style).

Placement is decided for the *base* parameters only, by the first (regex, rule) of `rules` (config
`mesh.rules`) that fully matches a leaf's '/'-joined path: "fsdp" shards the leaf's largest dimension
divisible by the 'fsdp' axis when it has at least `min_size` elements; "replicate" copies it.
Everything else inherits: a trainable copy of a base leaf takes that leaf's placement; an adapter
leaf (or a method's derived tensor) of module M takes M's kernel's sharded dimension where its own
shape lines up with it (LoRA's A (in, r) follows a kernel sharded over `in`, B (r, out) one sharded
over `out`); optimizer moments take their parameter's. So no rule names an adapter leaf, and a
renamed leaf cannot silently fall out of the sharding.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_RULES = ((r".*", "fsdp"),)  # every leaf of at least min_size elements
RULE_KINDS = ("fsdp", "replicate")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, runs: int = 1) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices; -1 takes what the other axes leave.

  `runs` > 1 adds a leading 'runs' axis: runs trained together (train/runs.py) spread over its rows, each
  run's batch and state split over its row's ('data', 'fsdp') devices.
  """
  devices = np.asarray(devices if devices is not None else jax.devices())
  n = devices.size
  if runs < 1 or n % runs:
    raise ValueError(f"config.mesh.runs={runs} does not divide the {n} devices; pick a divisor of {n}.")
  if data == -1:
    data = n // (fsdp * runs)
  if fsdp == -1:
    fsdp = n // (data * runs)
  if data < 1 or fsdp < 1 or runs * data * fsdp != n:
    raise ValueError(f"Mesh runs={runs} x data={data} x fsdp={fsdp} does not use the {n} devices; set "
                     f"config.mesh.data and config.mesh.fsdp so that their product is {n // runs} (-1 takes the rest).")
  if runs == 1:
    return Mesh(devices.reshape(data, fsdp), ("data", "fsdp"))
  return Mesh(devices.reshape(runs, data, fsdp), ("runs", "data", "fsdp"))


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Placement:
  """Shardings of base parameters by rules, and of everything derived from them by inheritance."""

  def __init__(self, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 2**18):
    for rule in rules:
      if len(rule) != 2 or rule[1] not in RULE_KINDS:
        raise ValueError(f"Sharding rule {rule!r} is not (regex, one of {RULE_KINDS}).")
    self.mesh, self.rules, self.min_size = mesh, tuple((str(r), str(k)) for r, k in rules), min_size
    self.base: dict[str, tuple[tuple, P]] = {}  # path -> (shape, spec) of the base leaves placed so far

  def _named(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def _rule_spec(self, path: str, shape) -> P:
    fsdp = self.mesh.shape["fsdp"]
    for pattern, rule in self.rules:
      if re.fullmatch(pattern, path):
        if rule == "fsdp" and fsdp > 1 and int(np.prod(shape)) >= self.min_size:
          for axis in np.argsort(shape, kind="stable")[::-1]:
            if shape[axis] % fsdp == 0:
              spec = [None] * len(shape)
              spec[axis] = "fsdp"
              return P(*spec)
        return P()
    return P()

  def params(self, tree):
    """Base parameters (or batch statistics): by the rules; remembered for inheritance."""

    def one(path, leaf):
      name, shape = path_name(path), tuple(np.shape(leaf))
      spec = self._rule_spec(name, shape)
      self.base[name] = (shape, spec)
      return self._named(spec)

    return jax.tree_util.tree_map_with_path(one, tree)

  def _inherit(self, shape: tuple, base_shape: tuple, base_spec: P) -> P:
    """`base_spec`'s sharded axes moved onto the axes of `shape` that line up with them (else replicated)."""
    out = [None] * len(shape)
    for axis, name in enumerate(tuple(base_spec) + (None,) * (len(base_shape) - len(base_spec))):
      if name is None:
        continue
      n, last = base_shape[axis], axis == len(base_shape) - 1
      for candidate in ([axis] if len(shape) == len(base_shape) else []) + ([len(shape) - 1] if last else [0]):
        if 0 <= candidate < len(shape) and shape[candidate] == n and out[candidate] is None:
          out[candidate] = name
          break
    return P(*out)

  def _attached(self, module: str, shape: tuple) -> P:
    """A tensor attached to `module`: lined up with its kernel (or embedding, or norm scale); else replicated."""
    for leaf in ("kernel", "embedding", "scale"):
      if f"{module}/{leaf}" in self.base:
        return self._inherit(shape, *self.base[f"{module}/{leaf}"])
    return P()

  def trainable(self, tree):
    """A method's trainable tree {"params": {path: leaf}, "adapters": {module: {name: leaf}}}."""
    params = {path: self._named(self.base[path][1] if path in self.base else self._rule_spec(path, np.shape(leaf)))
              for path, leaf in tree["params"].items()}
    adapters = {module: {k: self._named(self._attached(module, tuple(np.shape(v)))) for k, v in leaves.items()}
                for module, leaves in tree["adapters"].items()}
    return {"params": params, "adapters": adapters}

  def derived(self, flat: dict):
    """A method's derived tensors {'<module>/<name>': array} (SV-Diff's factors), attached to their module."""
    return {p: self._named(self._attached(p.rsplit("/", 1)[0], tuple(np.shape(v)))) for p, v in flat.items()}

  def state(self, state, trainable_shardings):
    """A train state: every leaf that ends with a trainable leaf's path (the leaf itself, its optimizer
    moments) takes that leaf's sharding; the rest (BatchNorm statistics, counters, RNG) goes by the rules."""
    by_path = {path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}

    def one(path, leaf):
      for i in range(len(path)):
        suffix = path_name(path[i:])
        if suffix in by_path:
          return by_path[suffix]
      return self._named(self._rule_spec(path_name(path), tuple(np.shape(leaf))))

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles each process's local batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
