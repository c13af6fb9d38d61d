"""Deterministic, stratified, grouped train/validation/test splits, and near-duplicate groups.

Medical datasets leak through groups: one lesion photographed several times (HAM10000), one patient
scanned twice, adjacent MRI slices that are near-identical (Br35H). Splitting by group keeps every
member of a group in one split; stratifying by class keeps each split's class mix close to the whole.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

FRACTIONS = {"train": 0.75, "validation": 0.10, "test": 0.15}
SEED = 42


def stratified_group_split(labels: Sequence[int], groups: Sequence[str] | None = None, *,
                           fractions: dict[str, float] | None = None,
                           seed: int = SEED) -> dict[str, np.ndarray]:
  """Assigns every example to a split; returns {split: sorted example indices}.

  Groups (default: each example its own) are dealt out whole, class by class (a group's class is its
  most common label), in a seeded random order: first one to each split, smallest share first, when
  the class has a group for every split; then each to the split furthest below its target share of
  that class's examples. Deterministic for a seed.
  """
  fractions = fractions or FRACTIONS
  labels = np.asarray(labels)
  groups = np.asarray(groups if groups is not None else np.arange(len(labels)).astype(str))
  members: dict[str, list[int]] = collections.defaultdict(list)
  for i, g in enumerate(groups):
    members[g].append(i)
  by_class: dict[int, list[str]] = collections.defaultdict(list)
  for g in sorted(members):
    by_class[collections.Counter(labels[members[g]].tolist()).most_common(1)[0][0]].append(g)

  rng = np.random.default_rng(seed)
  names = list(fractions)
  target = np.asarray([fractions[n] for n in names], np.float64)
  assigned: dict[str, list[int]] = {n: [] for n in names}
  for c in sorted(by_class):
    class_groups = by_class[c]
    total = sum(len(members[g]) for g in class_groups)
    filled = np.zeros(len(names))
    seeded = list(np.argsort(target, kind="stable")) if len(class_groups) >= len(names) else []
    for n, gi in enumerate(rng.permutation(len(class_groups))):
      g = class_groups[gi]
      k = int(seeded[n]) if n < len(seeded) else int(np.argmax(target * total - filled))
      assigned[names[k]].extend(members[g])
      filled[k] += len(members[g])
  return {n: np.asarray(sorted(v), np.int64) for n, v in assigned.items()}


def grey_thumbnails(images, size: int = 32) -> np.ndarray:
  """(N, size*size) float32 grey thumbnails of PIL images, each zero-mean and unit-norm."""
  from PIL import Image  # noqa: PLC0415

  vecs = np.stack([np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), np.float32).ravel()
                   for im in images])
  vecs -= vecs.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(vecs, axis=1, keepdims=True)
  return vecs / np.where(norms == 0, 1, norms)


def near_duplicate_pairs(thumbnails: np.ndarray, threshold: float = 0.99) -> np.ndarray:
  """(P, 2) index pairs i < j whose thumbnails correlate above `threshold` (Pearson)."""
  corr = thumbnails @ thumbnails.T
  i, j = np.nonzero(np.triu(corr > threshold, k=1))
  return np.stack([i, j], axis=1)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
  """Group id per item: the connected components of the near-duplicate graph (union-find)."""
  parent = np.arange(n)

  def find(a):
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  for a, b in pairs:
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  return np.asarray([find(a) for a in range(n)])
