"""The shared tfds builder: list records from a local folder, split them, store resized images.

Each dataset subclass says where its files come from (`MANUAL_DOWNLOAD_INSTRUCTIONS`: the download
source and the expected layout) and lists its `Record`s; this class checks labels, assigns the
splits (stratified, grouped, seed 42, unless the dataset ships its own), converts every image to RGB,
shrinks it to `max_side` and stores it as JPEG (quality 95) in array_record files. Tensorflow is not
needed: read the result with `builder.as_data_source(split)`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pathlib
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from medpeft_jax.data.source import Source
from medpeft_jax.data.splits import (
  connected_groups,
  grey_thumbnails,
  near_duplicate_pairs,
  stratified_group_split,
)
from medpeft_jax.data.transforms import to_rgb
from medpeft_jax.registry import Registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")


@dataclasses.dataclass
class ImageConfig(tfds.core.BuilderConfig):
  """Build options. `name` must differ between option sets that should be cached separately."""

  max_side: int = 512  # longer side of stored images (smaller images are kept as they are)
  on_bad_image: str = "error"  # "skip": leave unreadable images out, logging how many
  label_set: str = ""  # datasets with several label granularities (Fitzpatrick17k, RSNA)
  near_duplicates: bool | None = None  # group near-identical images before splitting (None: dataset default)
  csv_file: str = "labels.csv"  # the generic CSV builder's file, in the manual folder
  classes: tuple[str, ...] = ()  # class names, when the data defines them (filled by `discover_classes`)
  source: Source | None = None  # what the build is made from (filled by `medpeft_jax.data.make_config`)


@dataclasses.dataclass(frozen=True)
class Record:
  id: str  # unique, stable (e.g. the path relative to the dataset root)
  label: str  # a class name
  group: str  # examples sharing a group never land in two splits
  path: pathlib.Path
  reader: Callable[[pathlib.Path], Image.Image] | None = None  # default: PIL


def read_image(path: pathlib.Path) -> Image.Image:
  if path.suffix.lower() == ".dcm":
    from medpeft_jax.data.dicom import read_dicom  # noqa: PLC0415

    return Image.fromarray(read_dicom(path))
  with Image.open(path) as img:
    img.load()
    return img


def encode_for_storage(img: Image.Image, max_side: int) -> bytes:
  """RGB, longer side at most `max_side` (aspect kept), JPEG quality 95."""
  img = to_rgb(img)
  if max(img.size) > max_side:
    scale = max_side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


DATASETS: Registry[type[MedicalImageBuilder]] = Registry("dataset")


def register(name: str):
  """Class decorator: registers a builder under `name` (a new dataset = its builder file, see README "Extending")."""
  return DATASETS.register(name)


class MedicalImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class; subclasses set CLASSES, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS and `list_records`."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ImageConfig(name="default")]
  CLASSES: tuple[str, ...] = ()
  HOMEPAGE = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = ""
  NEAR_DUPLICATES = False  # whether near-identical images are grouped before splitting by default

  def classes(self) -> tuple[str, ...]:
    classes = tuple(self.builder_config.classes) or self.CLASSES
    if not classes:
      raise ValueError(f"{self.name}: the class names come from the data; build it through "
                       "medpeft_jax.data.load, which reads them first (discover_classes).")
    return classes

  @classmethod
  def source_root(cls, manual_dir: str | os.PathLike | None) -> pathlib.Path:
    """The resolved folder a build reads, whose path and fingerprint identify the build."""
    if manual_dir is None:
      raise FileNotFoundError(f"{cls.name}: manual_dir is required: point it at the dataset's folder "
                              f"(a build is identified by that folder and its files).\n"
                              f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    root = pathlib.Path(manual_dir).expanduser().resolve()
    if not root.is_dir():
      raise FileNotFoundError(f"{cls.name}: manual_dir {root} is not a folder.\n"
                              f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return root

  @classmethod
  def discover_classes(cls, manual_dir: pathlib.Path, config: ImageConfig) -> tuple[str, ...]:
    """Class names for datasets whose labels come from the data (default: the fixed CLASSES)."""
    del manual_dir, config
    return cls.CLASSES

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(self.classes())),
            "id": tfds.features.Text(),
            "group": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
    )

  # --- what a dataset defines --------------------------------------------------------------------
  def source_dir(self, dl_manager) -> pathlib.Path:
    """The folder to read: tfds' manual_dir, checked with an error that says what to download."""
    try:
      root = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # tfds: missing or empty
      root = None
    if root is None or not root.is_dir() or not any(root.iterdir()):
      raise self.missing("no data in the manual folder")
    return root

  def list_records(self, root: pathlib.Path) -> list[Record]:
    raise NotImplementedError

  def assign_splits(self, records: list[Record]) -> dict[str, list[Record]]:
    dedup = self.builder_config.near_duplicates
    if dedup if dedup is not None else self.NEAR_DUPLICATES:
      records = group_near_duplicates(records, self.name)
    index = {c: i for i, c in enumerate(self.classes())}
    parts = stratified_group_split([index[r.label] for r in records], [r.group for r in records])
    empty = [name for name, idx in parts.items() if not len(idx)]
    if empty:
      raise ValueError(f"{self.name}: too few images or groups ({len(records)} images, "
                       f"{len({r.group for r in records})} groups) to fill the {empty} split(s).")
    return {name: [records[i] for i in idx] for name, idx in parts.items()}

  def missing(self, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{self.name}: {what}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  # --- tfds ------------------------------------------------------------------------------------------
  def _download_and_prepare(self, **kwargs):
    super()._download_and_prepare(**kwargs)
    if self.builder_config.source is not None:  # into tfds' temporary folder: renamed with the build
      self.builder_config.source.write(self.data_dir)

  def _split_generators(self, dl_manager):
    records = self.list_records(self.source_dir(dl_manager))
    if not records:
      raise self.missing("no images found")
    unknown = sorted({r.label for r in records} - set(self.classes()))
    if unknown:
      raise ValueError(f"{self.name}: unknown label values {unknown}; "
                       f"expected one of {list(self.classes())}.")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
      raise ValueError(f"{self.name}: duplicate example ids, e.g. "
                       f"{[i for i in ids if ids.count(i) > 1][:3]}.")
    return {name: self._generate_examples(recs) for name, recs in self.assign_splits(records).items()}

  def _generate_examples(self, records: list[Record]):
    skipped = 0
    for r in records:
      try:
        image = encode_for_storage((r.reader or read_image)(r.path), self.builder_config.max_side)
      except Exception as e:  # noqa: BLE001  (any decoder failure is a bad image)
        if self.builder_config.on_bad_image != "skip":
          raise ValueError(f"{self.name}: cannot read image {r.path}: {e}. Fix or remove it, or set the "
                           "dataset option on_bad_image='skip' to leave unreadable images out.") from e
        skipped += 1
        logging.warning("%s: skipping unreadable image %s (%s)", self.name, r.path, e)
        continue
      yield r.id, {"image": image, "label": r.label, "id": r.id, "group": r.group}
    if skipped:
      logging.warning("%s: skipped %d unreadable image(s) of %d.", self.name, skipped, len(records))


def find_images(root: pathlib.Path, suffixes=IMAGE_SUFFIXES) -> dict[str, pathlib.Path]:
  """{file stem: path} for every image below `root` (recursively)."""
  return {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in suffixes and p.is_file()}


def relative_id(path: pathlib.Path, root: pathlib.Path) -> str:
  return path.relative_to(root).as_posix()


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  import csv  # noqa: PLC0415

  with open(path, newline="", encoding="utf-8-sig") as f:
    return list(csv.DictReader(f))


def require_columns(rows: list[dict], columns, path: os.PathLike, name: str) -> None:
  have = set(rows[0]) if rows else set()
  lacking = [c for c in columns if c not in have]
  if lacking:
    raise ValueError(f"{name}: {path} lacks column(s) {lacking} (it has {sorted(have)}).")


def read_metadata(builder_cls, root: pathlib.Path, pattern: str, columns) -> list[dict[str, str]]:
  """Rows of the first CSV below `root` matching `pattern`, checked for `columns`."""
  path = next(iter(sorted(root.rglob(pattern))), None)
  if path is None:
    raise FileNotFoundError(f"{builder_cls.name}: no {pattern} below {root}.\n"
                            f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  rows = read_csv(path)
  require_columns(rows, columns, path, builder_cls.name)
  return rows


def check_class_names(labels, source: str, what: str) -> None:
  """Refuses label values that would silently add a class: empty ones, ones with leading/trailing
  spaces, and ones equal to another but for case or spaces. `labels`: (where, value) pairs, `where`
  naming the row or folder; `source`: the file or folder they come from; `what`: what a value is.
  """
  places = collections.defaultdict(list)
  for where, value in labels:
    places[value].append(where)

  def some(ws):
    return ", ".join(ws[:8]) + (f" and {len(ws) - 8} more" if len(ws) > 8 else "")

  problems = []
  empty = [w for v, ws in places.items() if not v.strip() for w in ws]
  if empty:
    problems.append(f"empty {what} at {some(empty)}: give each a class name or remove it")
  spellings = collections.defaultdict(list)
  for v in places:
    if v.strip():
      spellings[v.strip().casefold()].append(v)
  for vs in spellings.values():
    if len(vs) > 1:
      problems.append(", ".join(f"{v!r} ({some(places[v])})" for v in sorted(vs))
                      + " differ only by case or spaces: use one spelling per class")
    elif vs[0] != vs[0].strip():
      problems.append(f"{vs[0]!r} ({some(places[vs[0]])}) has leading/trailing spaces: remove them")
  if problems:
    raise ValueError(f"{source}: each distinct {what} is a class, so these would add classes:\n  "
                     + "\n  ".join(problems))


def group_near_duplicates(records: list[Record], name: str) -> list[Record]:
  """Merges groups joined by near-identical images (32x32 grey correlation > 0.99)."""
  thumbs = grey_thumbnails((r.reader or read_image)(r.path) for r in records)
  first: dict[str, int] = {}
  edges = [(i, first.setdefault(r.group, i)) for i, r in enumerate(records)]
  pairs = near_duplicate_pairs(thumbs)
  component = connected_groups(len(records), np.concatenate([np.asarray(edges).reshape(-1, 2), pairs]))
  logging.info("%s: %d near-duplicate pairs; %d groups of %d images.", name, len(pairs),
               len(set(component.tolist())), len(records))
  return [dataclasses.replace(r, group=records[c].group) for r, c in zip(records, component)]
