"""Builders for your own data: one folder per class, or a CSV of path,label[,group] rows."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import (
  IMAGE_SUFFIXES,
  MedicalImageBuilder,
  Record,
  read_csv,
  relative_id,
  require_columns,
)


class MedImageFolder(MedicalImageBuilder):
  """Images in one sub-folder per class (class names = folder names, sorted). No groups."""

  HOMEPAGE = "local"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir at a folder with one sub-folder per class:
  <manual_dir>/<class name>/<any name>.{jpg,png,bmp,tif,dcm}   (searched recursively inside each class)"""

  @classmethod
  def _class_folders(cls, root: pathlib.Path):
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

  @classmethod
  def discover_classes(cls, manual_dir, config):
    root = pathlib.Path(manual_dir or "")
    if manual_dir is None or not root.is_dir():
      raise FileNotFoundError(f"image_folder: {root} is not a folder.\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return tuple(p.name for p in cls._class_folders(root))

  def list_records(self, root: pathlib.Path) -> list[Record]:
    return [Record(relative_id(p, root), folder.name, relative_id(p, root), p)
            for folder in self._class_folders(root)
            for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]


class MedCsv(MedicalImageBuilder):
  """Images listed in a CSV with columns path, label and optionally group (paths relative to the CSV)."""

  HOMEPAGE = "local"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir at a folder holding the CSV (csv_file, default labels.csv) and the images:
  <manual_dir>/labels.csv     columns path, label[, group]; path relative to <manual_dir>
Rows sharing a group (e.g. a patient id) never land in two splits."""

  @classmethod
  def _rows(cls, root: pathlib.Path, csv_file: str):
    path = root / csv_file
    if not path.is_file():
      raise FileNotFoundError(f"csv: {path} not found.\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    rows = read_csv(path)
    require_columns(rows, ("path", "label"), path, "csv")
    return rows

  @classmethod
  def discover_classes(cls, manual_dir, config):
    if manual_dir is None:
      raise FileNotFoundError(f"csv: manual_dir is required.\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return tuple(sorted({row["label"] for row in cls._rows(pathlib.Path(manual_dir), config.csv_file)}))

  def list_records(self, root: pathlib.Path) -> list[Record]:
    return [Record(row["path"], row["label"], row.get("group") or row["path"], root / row["path"])
            for row in self._rows(root, self.builder_config.csv_file)]
