"""Torch-free loading of pytorch-fid's FID Inception-v3 weights into `models.inception.InceptionV3FID`.

`pt_inception-2015-12-05-6726825d.pth` converts by renaming: parameters through the diffusers rule
(`convert_state`: list indices join their module name, `weight` -> `kernel`/`scale`), BatchNorm
`running_mean`/`running_var` to `batch_stats` `mean`/`var`; the unused `fc` classifier and the
`num_batches_tracked` counters are reported as ignored.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medpeft_jax.models.inception import InceptionV3FID
from medpeft_jax.models.weights.diffusers import convert_state
from medpeft_jax.models.weights.loader import CheckpointMismatchError, LoadReport
from medpeft_jax.models.weights.readers import read_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE)


def load_fid_inception(path: str | os.PathLike) -> tuple[InceptionV3FID, dict, LoadReport]:
  """The FID network and its variables from pytorch-fid's weights file (torch-free)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No FID Inception weights at {path}. Download {WEIGHTS_URL} (pytorch-fid's "
                            f"{WEIGHTS_FILE}) on a machine with network and pass its path.")
  model = InceptionV3FID()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  param_shapes = traverse_util.flatten_dict(shapes["params"], sep="/")
  stat_shapes = traverse_util.flatten_dict(shapes["batch_stats"], sep="/")
  state = read_file(path)
  stat_keys = {k for k in state if k.endswith((".running_mean", ".running_var", ".num_batches_tracked"))}
  report = LoadReport(str(path), "pytorch-fid")
  params = convert_state({k: v for k, v in state.items() if k not in stat_keys and not k.startswith("fc.")},
                         param_shapes, report)
  report.ignored += sorted(k for k in state if k.startswith("fc.") or k.endswith(".num_batches_tracked"))
  stats = {}
  for key in sorted(stat_keys - set(report.ignored)):
    target = key.rsplit(".", 1)[0].replace(".", "/") + ("/mean" if key.endswith("running_mean") else "/var")
    if target not in stat_shapes or tuple(stat_shapes[target].shape) != tuple(state[key].shape):
      report.unexpected.append(key)
      continue
    stats[target] = np.asarray(state[key], np.float32)
    report.loaded.append(target)
  report.missing += [p for p in stat_shapes if p not in stats]
  if not report.ok:
    raise CheckpointMismatchError(report)
  nest = lambda flat: traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()}, sep="/")
  return model, {"params": nest(params), "batch_stats": nest(stats)}, report
