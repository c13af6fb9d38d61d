"""SMDG-19: Standardized Multi-Channel Dataset for Glaucoma (Kiefer et al. 2023), fundus photographs."""

from __future__ import annotations

import pathlib

from absl import logging

from medpeft_jax.data.builders.base import MedicalImageBuilder, Record, find_images, read_metadata, register

_TYPES = {"0": "non_glaucoma", "1": "glaucoma"}  # -1 (glaucoma suspect) is left out


@register("smdg")
class Smdg(MedicalImageBuilder):
  """Fundus photos, glaucoma vs not. Suspects (types = -1) are left out; grouped by patient_id when given."""

  CLASSES = ("non_glaucoma", "glaucoma")
  HOMEPAGE = "https://github.com/TheBeastCoding/standardized-multichannel-dataset-glaucoma"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download SMDG-19 (Kaggle: deathtrooper/multichannel-glaucoma-benchmark-dataset; see
https://github.com/TheBeastCoding/standardized-multichannel-dataset-glaucoma) and extract it:
  <manual_dir>/metadata - standardized.csv  columns names, types (0 non-glaucoma, 1 glaucoma,
                                            -1 suspect), patient_id, fundus (/full-fundus/<names>.png), ...
  <manual_dir>/full-fundus/<names>.png      (found by file name anywhere below <manual_dir>)"""

  def list_records(self, root: pathlib.Path) -> list[Record]:
    rows = read_metadata(type(self), root, "metadata*standardized*.csv", ("names", "types", "fundus"))
    images = find_images(root)
    records, suspects, no_fundus = [], 0, 0
    for row in rows:
      if not row["fundus"].strip():
        no_fundus += 1
        continue
      kind = row["types"].strip()
      if kind == "-1":
        suspects += 1
        continue
      stem = pathlib.PurePosixPath(row["fundus"]).stem
      path = images.get(stem, root / row["fundus"].lstrip("/"))
      label = _TYPES.get(kind, kind)  # anything else is reported as an unknown label
      records.append(Record(row["names"], label, row.get("patient_id") or row["names"], path))
    logging.info("smdg: left out %d glaucoma suspects and %d rows without a fundus image.",
                 suspects, no_fundus)
    return records
