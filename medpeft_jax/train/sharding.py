"""One sharding code path from 1 CPU to a pod: a ('data', 'fsdp') mesh and regex placement rules.

The batch is split over both axes (every device sees different examples; 'fsdp' devices additionally
hold slices of the large parameters, which XLA gathers for compute: ZeRO-3 style). Parameters,
optimizer state and PEFT leaves are placed by the first matching (regex, rule) over their
'/'-joined path: "fsdp" shards a leaf's largest dimension divisible by the 'fsdp' axis when it has
at least `min_size` elements; "replicate" copies it.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_RULES = ((r".*kernel.*|.*/a|.*/b|.*alpha", "fsdp"), (r".*", "replicate"))
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices; -1 takes what the other axis leaves."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  n = devices.size
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"Mesh data={data} x fsdp={fsdp} does not use the {n} devices.")
  return Mesh(devices.reshape(data, fsdp), ("data", "fsdp"))


def _spec(path: str, shape, mesh: Mesh, rules, min_size: int) -> P:
  fsdp = mesh.shape["fsdp"]
  for pattern, rule in rules:
    if re.fullmatch(pattern, path):
      if rule == "fsdp" and fsdp > 1 and int(np.prod(shape)) >= min_size:
        for axis in np.argsort(shape)[::-1]:
          if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
      return P()
  return P()


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 2**18):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), by path rules."""

  def one(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return NamedSharding(mesh, _spec(name, np.shape(leaf), mesh, rules, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles each process's local batch into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
