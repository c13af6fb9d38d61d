"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al., Data in Brief 2020), 780 images in 3 classes."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import IMAGE_SUFFIXES, MedicalImageBuilder, Record, register


@register("busi")
class Busi(MedicalImageBuilder):
  """Breast ultrasound: benign / malignant / normal. No patient ids: each image is its own group."""

  CLASSES = ("benign", "malignant", "normal")
  HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Dataset_BUSI_with_GT (https://scholar.cu.edu.eg/?q=afahmy/pages/dataset, also on Kaggle as
aryashah2k/breast-ultrasound-images-dataset) and extract it into the manual folder:
  <manual_dir>/Dataset_BUSI_with_GT/benign/benign (1).png, benign (1)_mask.png, ...
  <manual_dir>/Dataset_BUSI_with_GT/malignant/malignant (1).png, ...
  <manual_dir>/Dataset_BUSI_with_GT/normal/normal (1).png, ...
(the class folders may also sit directly in <manual_dir>). Segmentation masks (*_mask*.png) are skipped."""

  def list_records(self, root: pathlib.Path) -> list[Record]:
    base = root / "Dataset_BUSI_with_GT" if (root / "Dataset_BUSI_with_GT").is_dir() else root
    records = []
    for label in self.CLASSES:
      folder = base / label
      if not folder.is_dir():
        raise self.missing(f"class folder {folder} not found")
      for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in path.stem:
          rid = f"{label}/{path.name}"
          records.append(Record(rid, label, rid, path))
    return records
