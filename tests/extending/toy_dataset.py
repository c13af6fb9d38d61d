"""A new dataset in one file: images listed in a text file with their class ("dark" or "light").

Layout (the fake one is written by tests/test_extending.py `write_toy_shapes`):
  <manual_dir>/labels.txt          one "<file name> <class>" per line
  <manual_dir>/images/<file name>
Registered as "toy_shapes" on import; the shared builder splits, checks labels and stores the images.
"""

from __future__ import annotations

import pathlib

from medpeft_jax.data.builders.base import MedicalImageBuilder, Record, register


@register("toy_shapes")
class ToyShapes(MedicalImageBuilder):
  """Dark or light squares (a stand-in for a real dataset's reader)."""

  CLASSES = ("dark", "light")
  HOMEPAGE = "local"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir at a folder with labels.txt ("<file> <class>" lines) and images/<file>."""

  def list_records(self, root: pathlib.Path) -> list[Record]:
    labels = root / "labels.txt"
    if not labels.is_file():
      raise self.missing(f"{labels} not found")
    records = []
    for line in labels.read_text().splitlines():
      if line.strip():
        name, label = line.split()
        records.append(Record(name, label, name, root / "images" / name))
    return records
