"""Data regimes: a fraction of the training split, stratified, nested and seeded.

A regime is a float in (0, 1] everywhere (configs, records). For each class a seeded permutation of
its training examples is fixed once; regime f takes the first max(1, round(f * n_class)) of it. So
regimes are nested (5 % ⊂ 10 % ⊂ ... ⊂ 100 %), keep the class mix, and never drop a class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAPER_REGIMES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def check_regime(fraction: float) -> float:
  fraction = float(fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"A data regime is a fraction of the training split in (0, 1], not {fraction}: "
                     "e.g. regime=0.1 for 10 % of it, 1.0 for all of it.")
  return fraction


def regime_indices(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices (into `labels`) of the training examples regime `fraction` keeps."""
  fraction = check_regime(fraction)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    order = members[rng.permutation(len(members))]
    keep.append(order[:max(1, int(round(fraction * len(members))))])
  return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)
