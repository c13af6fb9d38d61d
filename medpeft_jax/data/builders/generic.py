"""Builders for your own data: one folder per class, or a CSV of path,label[,group] rows."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import (
  IMAGE_SUFFIXES,
  MedicalImageBuilder,
  Record,
  check_class_names,
  read_csv,
  register,
  relative_id,
  require_columns,
)


@register("image_folder")
class MedImageFolder(MedicalImageBuilder):
  """Images in one sub-folder per class (class names = folder names, sorted). No groups."""

  HOMEPAGE = "local"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir at a folder with one sub-folder per class:
  <manual_dir>/<class name>/<any name>.{jpg,png,bmp,tif,dcm}   (searched recursively inside each class)"""

  @classmethod
  def _class_images(cls, root: pathlib.Path) -> dict[pathlib.Path, list[pathlib.Path]]:
    """{class folder: its images}, checked: no class folder may be empty or be named like another."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
      raise FileNotFoundError(f"image_folder: no class sub-folders in {root}.\n"
                              f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    images = {f: [p for p in sorted(f.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES] for f in folders}
    empty = [str(f) for f, paths in images.items() if not paths]
    if empty:
      raise ValueError(f"image_folder: class folder(s) {empty} hold no images ({', '.join(IMAGE_SUFFIXES)}); "
                       "each sub-folder of manual_dir is a class. Add images or remove the folder(s).")
    check_class_names([(str(f), f.name) for f in folders], f"image_folder: {root}", "class folder name")
    return images

  @classmethod
  def discover_classes(cls, manual_dir, config):
    return tuple(f.name for f in cls._class_images(manual_dir))

  def list_records(self, root: pathlib.Path) -> list[Record]:
    return [Record(relative_id(p, root), folder.name, relative_id(p, root), p)
            for folder, paths in self._class_images(root).items() for p in paths]


@register("csv")
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
    check_class_names([(f"line {i + 2}", row["label"] or "") for i, row in enumerate(rows)],
                      f"csv: {path}, column 'label' (line 1 = header)", "label value")
    return rows

  @classmethod
  def discover_classes(cls, manual_dir, config):
    return tuple(sorted({row["label"] for row in cls._rows(manual_dir, config.csv_file)}))

  def list_records(self, root: pathlib.Path) -> list[Record]:
    return [Record(row["path"], row["label"], row.get("group") or row["path"], root / row["path"])
            for row in self._rows(root, self.builder_config.csv_file)]
