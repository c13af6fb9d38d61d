"""grain input pipelines: a split (or a data regime of it) -> augmented, normalised, batched arrays.

Train: one seeded permutation per epoch over the whole split; process p of P reads positions
p, p + P, ... (`jax.process_index`), so a global batch holds the same images whatever the number of
processes. Random-resized crop + horizontal flip (torchvision's recipe) draw from a per-position
seed. Batches are the same for a given seed and worker count (workers batch their own records, so
another worker count groups them differently); the iterator's state is checkpointable
(`iterator.get_state()` / `set_state()`) for exact resume.
Eval: resize (shorter side to size x 256/224) + centre crop, in order, padded to whole batches with
a `mask` (1 real, 0 padding) so every batch has the same shape, and each example's `position` in the
split (processes read contiguous shares, so gathered batches are not in split order).
Batches are {"image": float32 (B, H, W, 3) normalised with the model's mean/std, "label": int32 (B,)}.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from PIL import Image

from medpeft_jax.data.regimes import check_regime, regime_indices
from medpeft_jax.data.transforms import normalize, resize_center_crop, to_rgb


class Split:
  """One split of a built dataset, optionally a data regime of it; a grain random-access source.

  Records keep their encoded image (decoded in the pipeline's workers): {"image": JPEG bytes,
  "label": int, "id": bytes, "group": bytes}. `regime` is a fraction in (0, 1] of the split, chosen
  stratified and nested (medpeft_jax.data.regimes) with `regime_seed`.
  """

  def __init__(self, builder, split: str, regime: float = 1.0, regime_seed: int = 0):
    regime = check_regime(regime)
    self.builder, self.split, self.regime, self.regime_seed = builder, split, regime, regime_seed
    self._source, self._decoded = None, None
    labels = np.asarray([self.source[i]["label"] for i in range(len(self.source))], np.int32)
    self.indices = regime_indices(labels, regime, regime_seed) if regime < 1.0 else np.arange(len(labels))
    self.labels = labels[self.indices]
    self.num_classes = builder.info.features["label"].num_classes
    self.class_names = builder.info.features["label"].names

  @property
  def source(self):
    if self._source is None:  # opened lazily, so that pickled copies (grain workers) reopen it
      self._source = self.builder.as_data_source(self.split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):  # grain workers reopen the source and decode for themselves
    return {**self.__dict__, "_source": None, "_decoded": None}

  def __repr__(self) -> str:  # grain compares it when restoring an iterator state
    b = self.builder
    return (f"Split({b.name}/{b.builder_config.name}/{b.version}, {self.split!r}, regime={self.regime}, "
            f"regime_seed={self.regime_seed}, n={len(self)})")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    if self._decoded is not None:
      return {"image": self._decoded[int(self.indices[i])], "label": int(self.labels[i])}
    return self.source[int(self.indices[i])]

  def cache_decoded(self, budget_bytes: int) -> bool:
    """Keeps the split's images decoded in memory (shared by every Split of the same build and split),
    so the loop's pace does not depend on reading and decoding the stored JPEGs: a regime of 5 % and
    of 100 % then step alike. Skipped (False, logged) when the decoded split would exceed the budget."""
    key = (str(self.builder.data_path), self.split)
    if key not in _DECODED:
      n = len(self.source)
      sample = [np.asarray(decode(self.source[i]["image"])) for i in range(min(n, 16))]
      estimate = int(np.mean([a.nbytes for a in sample]) * n)
      if estimate > budget_bytes:
        logging.info("Not caching %s %s decoded: about %d MiB, over the %d MiB budget.", self.builder.name,
                     self.split, estimate >> 20, budget_bytes >> 20)
        return False
      if len(_DECODED) >= 4:
        _DECODED.pop(next(iter(_DECODED)))
      _DECODED[key] = [np.asarray(decode(self.source[i]["image"])) for i in range(n)]
    self._decoded = _DECODED[key]
    return True

  def class_counts(self) -> np.ndarray:
    return np.bincount(self.labels, minlength=self.num_classes)


# Decoded splits (Split.cache_decoded), by (build folder, split); the last four are kept.
_DECODED: dict[tuple[str, str], list[np.ndarray]] = {}


def decode(data) -> Image.Image:
  """A stored image (JPEG bytes, or an already decoded uint8 array) as an RGB PIL image."""
  if isinstance(data, np.ndarray):
    return Image.fromarray(data)
  return to_rgb(Image.open(io.BytesIO(data)))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (left, top, right, bottom): 10 tries, then a centre crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  scale: tuple[float, float] = (0.08, 1.0)

  def random_map(self, record, rng: np.random.Generator):
    img = decode(record["image"])
    box = random_resized_crop_box(img.width, img.height, rng, self.scale)
    img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return {"image": normalize(np.asarray(img), self.mean, self.std), "label": np.int32(record["label"])}


@dataclasses.dataclass
class EvalTransform(grain.transforms.Map):
  size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def map(self, record):
    img = resize_center_crop(decode(record["image"]), self.size)
    return {"image": normalize(img, self.mean, self.std), "label": np.int32(record["label"]),
            "mask": np.float32(record["mask"]), "position": np.int32(record["position"])}


def epoch_permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: one seeded permutation per (seed, epoch), shared by every task's batches."""
  return np.random.default_rng([seed, epoch]).permutation(num_records)


def step_rows(num_records: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """This process's share of 0-based step `step`'s global batch, as positions in 0..num_records-1.

  The batch is a whole slice of its epoch's permutation (sorted); process p of P takes every P-th row,
  so a global batch holds the same rows whatever P. Batches of a step source that keeps no iterator.
  """
  epoch, position = divmod(step, num_records // batch_size)
  order = epoch_permutation(num_records, seed, epoch)
  rows = np.sort(order[position * batch_size:(position + 1) * batch_size])
  return rows[jax.process_index()::jax.process_count()]


class EpochShuffleSampler:
  """Global index i -> position i % N of epoch i // N's permutation; grain reads every P-th index."""

  def __init__(self, num_records: int, seed: int, num_epochs: int | None = None):
    self.num_records, self.seed, self.num_epochs = num_records, seed, num_epochs
    self._shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)  # read by DataLoader
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize if self.num_epochs is None else self.num_epochs * self.num_records

  def __repr__(self) -> str:  # grain checks it when restoring an iterator state
    return (f"EpochShuffleSampler(num_records={self.num_records}, seed={self.seed}, "
            f"num_epochs={self.num_epochs})")

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      self._permutations = {epoch: epoch_permutation(self.num_records, self.seed, epoch)}
    return self._permutations[epoch]

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f"Sampler index {index} is out of range.")
    epoch, position = divmod(index, self.num_records)
    rng = np.random.Generator(np.random.Philox(key=self.seed + index))
    return grain.RecordMetadata(index=index, record_key=int(self._permutation(epoch)[position]), rng=rng)


def train_loader(split: Split, *, image_size: int, mean, std, batch_size: int, seed: int,
                 worker_count: int = 0, num_epochs: int | None = None, scale=(0.08, 1.0)) -> grain.DataLoader:
  """Endless (or `num_epochs`) shuffled, augmented batches; `batch_size` is global across processes."""
  local_batch = _local_batch(batch_size)
  if len(split) < batch_size:
    raise ValueError(f"The training set has {len(split)} images, fewer than one batch of {batch_size}.")
  sampler = EpochShuffleSampler(len(split), seed, num_epochs)
  operations = [TrainTransform(image_size, tuple(mean), tuple(std), tuple(scale)),
                grain.transforms.Batch(local_batch, drop_remainder=True)]
  return _loader(split, sampler, operations, worker_count)


class _Padded:
  """This process's contiguous share of a split, padded to whole batches; padding has mask 0."""

  def __init__(self, split: Split, start: int, stop: int, length: int):
    self.split, self.start, self.stop, self.length = split, start, stop, length

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    j = self.start + i
    return {**self.split[j if j < self.stop else 0], "mask": 1.0 if j < self.stop else 0.0,
            "position": j if j < self.stop else -1}  # the example's index in the split (-1: padding)


def eval_loader(split: Split, *, image_size: int, mean, std, batch_size: int,
                worker_count: int = 0) -> grain.DataLoader:
  """One ordered pass over the split in equal-shaped batches (global `batch_size`), with a mask."""
  local_batch = _local_batch(batch_size)
  processes, index = jax.process_count(), jax.process_index()
  per_process = -(-len(split) // processes)
  start, stop = min(index * per_process, len(split)), min((index + 1) * per_process, len(split))
  source = _Padded(split, start, stop, -(-per_process // local_batch) * local_batch)
  sampler = grain.samplers.IndexSampler(len(source), shuffle=False, num_epochs=1)
  operations = [EvalTransform(image_size, tuple(mean), tuple(std)), grain.transforms.Batch(local_batch)]
  return _loader(source, sampler, operations, worker_count)


def _loader(source, sampler, operations, worker_count: int) -> grain.DataLoader:
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (e.g. in a notebook)
  # No reader threads: records are local array_record files, and grain's default (16 threads, a
  # 500-record buffer it scans per element) halves a 32-image batch's throughput (70 -> 35 ms, Br35H).
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=worker_count,
                          read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _local_batch(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.process_count()} processes.")
  return batch_size // jax.process_count()
