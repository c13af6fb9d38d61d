"""RSNA Pneumonia Detection Challenge (2018): 26,684 chest X-ray DICOMs."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import (
  ImageConfig,
  MedicalImageBuilder,
  Record,
  find_images,
  read_csv,
  register,
  require_columns,
)

_THREE = {"Normal": "normal", "No Lung Opacity / Not Normal": "not_normal_no_opacity",
          "Lung Opacity": "lung_opacity"}


@register("rsna_pneumonia")
class RsnaPneumonia(MedicalImageBuilder):
  """Chest X-rays (DICOM). label_set 2 (default: Target 0/1 of the labels CSV) or 3 (detailed classes)."""

  BUILDER_CONFIGS = [ImageConfig(name="default", label_set="2")]
  CLASSES = ("no_opacity", "lung_opacity")
  HOMEPAGE = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the RSNA Pneumonia Detection Challenge data (kaggle competitions download -c
rsna-pneumonia-detection-challenge) and extract it into the manual folder:
  <manual_dir>/stage_2_train_labels.csv          columns patientId, x, y, width, height, Target
  <manual_dir>/stage_2_detailed_class_info.csv   columns patientId, class (for label_set 3)
  <manual_dir>/stage_2_train_images/<patientId>.dcm
DICOMs are converted by medpeft_jax.data.dicom's rule and stored resized to max_side."""

  @classmethod
  def discover_classes(cls, manual_dir, config):
    if config.label_set == "3":
      return tuple(_THREE.values())
    if config.label_set in ("", "2"):
      return cls.CLASSES
    raise ValueError(f"rsna_pneumonia: label_set must be 2 or 3, not {config.label_set!r}.")

  def list_records(self, root: pathlib.Path) -> list[Record]:
    labels_csv = root / "stage_2_train_labels.csv"
    if not labels_csv.is_file():
      raise self.missing(f"{labels_csv} not found")
    rows = read_csv(labels_csv)
    require_columns(rows, ("patientId", "Target"), labels_csv, self.name)
    target: dict[str, str] = {}
    for row in rows:  # several rows (boxes) per patient: opacity if any
      target[row["patientId"]] = max(target.get(row["patientId"], "0"), row["Target"].strip())
    if self.builder_config.label_set == "3":
      info_csv = root / "stage_2_detailed_class_info.csv"
      if not info_csv.is_file():
        raise self.missing(f"{info_csv} not found (needed for label_set 3)")
      info = read_csv(info_csv)
      require_columns(info, ("patientId", "class"), info_csv, self.name)
      label = {row["patientId"]: _THREE.get(row["class"], row["class"]) for row in info}
    else:
      label = {pid: {"0": "no_opacity", "1": "lung_opacity"}.get(t, t) for pid, t in target.items()}
    images = find_images(root, (".dcm",))
    return [Record(pid, label.get(pid, "<missing>"), pid,
                   images.get(pid, root / "stage_2_train_images" / f"{pid}.dcm")) for pid in sorted(target)]
