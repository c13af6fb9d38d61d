"""HAM10000 (Tschandl et al., Sci. Data 2018): 10,015 dermoscopy images of 7 diagnoses."""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import MedicalImageBuilder, Record, find_images, read_metadata, register


@register("ham10000")
class Ham10000(MedicalImageBuilder):
  """Dermoscopy, 7 classes (dx). Split grouped by lesion_id: one lesion never lands in two splits."""

  CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
  HOMEPAGE = "https://doi.org/10.7910/DVN/DBW86T"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T, also on Kaggle as
kmader/skin-cancer-mnist-ham10000) and extract it into the manual folder:
  <manual_dir>/HAM10000_metadata.csv        columns lesion_id, image_id, dx, dx_type, age, sex, localization
  <manual_dir>/HAM10000_images_part_1/ISIC_0024306.jpg, ...
  <manual_dir>/HAM10000_images_part_2/ISIC_0029306.jpg, ...
(images are found by image_id anywhere below <manual_dir>)."""

  def list_records(self, root: pathlib.Path) -> list[Record]:
    rows = read_metadata(type(self), root, "HAM10000_metadata*.csv", ("lesion_id", "image_id", "dx"))
    images = find_images(root)
    return [Record(row["image_id"], row["dx"], row["lesion_id"],
                   images.get(row["image_id"], root / f"{row['image_id']}.jpg")) for row in rows]
