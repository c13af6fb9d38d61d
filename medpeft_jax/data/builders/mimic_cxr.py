"""MIMIC-CXR-JPG v2 with report prompts, for text-to-image fine-tuning (the paper's Table 4 data)."""

from __future__ import annotations

import csv
import gzip
import pathlib
import re
import zipfile

import tensorflow_datasets as tfds
from absl import logging

from medpeft_jax.data.builders.base import (
  ImageConfig,
  MedicalImageBuilder,
  encode_for_storage,
  read_image,
  register,
)

FRONTAL = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
_HEADER = re.compile(r"^\s*([A-Z][A-Z /&()-]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
  """{SECTION NAME: its text, whitespace collapsed} of a MIMIC-CXR free-text report."""
  heads = list(_HEADER.finditer(text))
  return {m.group(1).strip(): " ".join(text[m.end():nxt.start() if nxt else len(text)].split())
          for m, nxt in zip(heads, heads[1:] + [None])}


def prompt_from_report(text: str) -> str:
  """The IMPRESSION section, else FINDINGS, else "" (the paper's prompt)."""
  sections = report_sections(text)
  return sections.get("IMPRESSION") or sections.get("FINDINGS") or ""


def _read_table(root: pathlib.Path, stem: str, builder) -> list[dict[str, str]]:
  path = next((p for name in (f"{stem}.csv.gz", f"{stem}.csv") for p in sorted(root.rglob(name))), None)
  if path is None:
    raise builder.missing(f"no {stem}.csv(.gz) below {root}")
  with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
    return list(csv.DictReader(f))


class _Reports:
  """Study reports from an extracted `files/pXX/pSUBJECT/sSTUDY.txt` tree or `mimic-cxr-reports.zip`."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    zips = sorted(root.rglob("mimic-cxr-reports.zip"))
    self.zip = zipfile.ZipFile(zips[0]) if zips else None
    self.names = {pathlib.PurePosixPath(n).name: n for n in self.zip.namelist()} if self.zip else {}
    self.files = {} if self.zip else {p.name: p for p in root.rglob("s*.txt")}

  def get(self, study_id: str) -> str | None:
    name = f"s{study_id}.txt"
    if self.zip is not None:
      return self.zip.read(self.names[name]).decode("utf-8") if name in self.names else None
    return self.files[name].read_text(encoding="utf-8") if name in self.files else None


@register("mimic_cxr")
class MimicCxr(MedicalImageBuilder):
  """Frontal (PA/AP) chest X-rays of MIMIC-CXR-JPG with the report's IMPRESSION (else FINDINGS) as prompt."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [ImageConfig(name="default", max_side=256)]
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MIMIC-CXR-JPG v2 (credentialed access: https://physionet.org/content/mimic-cxr-jpg/2.0.0/) and the
reports of MIMIC-CXR (https://physionet.org/content/mimic-cxr/2.0.0/, mimic-cxr-reports.zip). Put in
the manual folder:
  <manual_dir>/mimic-cxr-2.0.0-split.csv.gz       dicom_id, study_id, subject_id, split (train/validate/test)
  <manual_dir>/mimic-cxr-2.0.0-metadata.csv.gz    dicom_id, ..., ViewPosition
  <manual_dir>/files/pXX/p<subject_id>/s<study_id>/<dicom_id>.jpg
  <manual_dir>/mimic-cxr-reports.zip              (or its extracted files/pXX/p<subject>/s<study>.txt)
The official split is kept; only frontal views with a non-empty IMPRESSION or FINDINGS are used."""

  @classmethod
  def discover_classes(cls, manual_dir, config):
    return ()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(self.__doc__ or "").strip(), homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "prompt": tfds.features.Text(), "id": tfds.features.Text(), "group": tfds.features.Text(),
            "view": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    root = self.source_dir(dl_manager)
    split_rows = _read_table(root, "mimic-cxr-2.0.0-split", self)
    view = {r["dicom_id"]: r.get("ViewPosition", "") for r in _read_table(root, "mimic-cxr-2.0.0-metadata", self)}
    images = {p.stem: p for p in sorted((root / "files").rglob("*.jpg"))} if (root / "files").is_dir() else {}
    if not images:
      raise self.missing(f"no JPEGs under {root / 'files'}")
    reports = _Reports(root)
    splits: dict[str, list] = {name: [] for name in _SPLITS.values()}
    dropped = {"lateral or unknown view": 0, "no image file": 0, "no report text": 0}
    for row in split_rows:
      if view.get(row["dicom_id"]) not in FRONTAL:
        dropped["lateral or unknown view"] += 1
        continue
      if row["dicom_id"] not in images:
        dropped["no image file"] += 1
        continue
      prompt = prompt_from_report(reports.get(row["study_id"]) or "")
      if not prompt:
        dropped["no report text"] += 1
        continue
      splits[_SPLITS[row["split"]]].append((row, images[row["dicom_id"]], prompt, view[row["dicom_id"]]))
    logging.info("mimic_cxr: kept %s; dropped %s.", {k: len(v) for k, v in splits.items()}, dropped)
    empty = [name for name, rows in splits.items() if not rows]
    if empty:
      raise self.missing(f"no frontal image with a report in the {empty} split(s) among {len(split_rows)} rows "
                         f"(dropped: {dropped})")
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    for row, path, prompt, view in rows:
      yield row["dicom_id"], {"image": encode_for_storage(read_image(path), self.builder_config.max_side),
                              "prompt": prompt, "id": row["dicom_id"], "group": row["subject_id"], "view": view}
