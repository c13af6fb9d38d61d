"""Fitzpatrick17k (Groh et al., CVPR-W 2021): 16,577 clinical skin photos labelled with 114 conditions."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import (
  ImageConfig,
  MedicalImageBuilder,
  Record,
  find_images,
  read_metadata,
  register,
)

# label_set -> CSV column
_COLUMNS = {"3": "three_partition_label", "9": "nine_partition_label", "114": "label"}


@register("fitzpatrick17k")
class Fitzpatrick17k(MedicalImageBuilder):
  """Clinical skin photos. label_set 3 (default: benign / malignant / non-neoplastic), 9 or 114."""

  BUILDER_CONFIGS = [ImageConfig(name="default", label_set="3")]
  CLASSES = ("benign", "malignant", "non-neoplastic")
  HOMEPAGE = "https://github.com/mattgroh/fitzpatrick17k"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download fitzpatrick17k.csv from https://github.com/mattgroh/fitzpatrick17k and the images from the
URLs in its `url` column, saved as <md5hash>.jpg:
  <manual_dir>/fitzpatrick17k.csv           columns md5hash, fitzpatrick_scale, label, nine_partition_label,
                                            three_partition_label, qc, url, ...
  <manual_dir>/images/<md5hash>.jpg, ...    (found by md5hash anywhere below <manual_dir>)
Rows whose image could not be downloaded are errors; build with on_bad_image='skip' to leave them out."""

  @classmethod
  def _rows(cls, root: pathlib.Path):
    return read_metadata(cls, root, "fitzpatrick17k*.csv", ("md5hash", *_COLUMNS.values()))

  @classmethod
  def _column(cls, config: ImageConfig) -> str:
    if config.label_set not in _COLUMNS:
      raise ValueError(f"fitzpatrick17k: label_set must be one of {sorted(_COLUMNS)}, "
                       f"not {config.label_set!r}.")
    return _COLUMNS[config.label_set]

  @classmethod
  def discover_classes(cls, manual_dir, config):
    if cls._column(config) == _COLUMNS["3"]:
      return cls.CLASSES
    return tuple(sorted({row[cls._column(config)] for row in cls._rows(pathlib.Path(manual_dir))}))

  def list_records(self, root: pathlib.Path) -> list[Record]:
    column = self._column(self.builder_config)
    images = find_images(root)
    return [Record(row["md5hash"], row[column], row["md5hash"],
                   images.get(row["md5hash"], root / "images" / f"{row['md5hash']}.jpg"))
            for row in self._rows(root)]
