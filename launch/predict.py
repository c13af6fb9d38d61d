"""Predicts the class of each image with a merged export (launch.export) and writes a CSV.

python -m launch.predict --model runs/x/merged.safetensors --images /data/new_scans --out runs/x/predictions.csv
One row per image (folders are searched recursively): path, predicted class, then each class's probability.
"""

import csv
import pathlib

from absl import app, flags

from medpeft_jax.train import adapters_io

_MODEL = flags.DEFINE_string("model", None, "A merged .safetensors written by launch.export (its .json beside it).",
                             required=True)
_IMAGES = flags.DEFINE_multi_string("images", None, "Image files or folders (repeatable).", required=True)
_OUT = flags.DEFINE_string("out", None, "The CSV to write.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def main(argv):
  del argv
  rows = adapters_io.predict_images(_MODEL.value, _IMAGES.value, _BATCH.value)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  counts = {}
  for row in rows:
    counts[row["prediction"]] = counts.get(row["prediction"], 0) + 1
  print(f"Wrote {len(rows)} predictions to {out}: {counts}")


if __name__ == "__main__":
  app.run(main)
