"""README "Your own images": the block runs as written (real MobileNetV2 weights, real MRI slices)."""

import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from medpeft_jax import assets

REPO = pathlib.Path(__file__).resolve().parent.parent


def readme_block(marker: str) -> str:
  text = (REPO / "README.md").read_text()
  match = re.search(rf"<!-- {marker}.*?-->\n```bash\n(.*?)```", text, re.S)
  assert match, f"no {marker} block in README.md"
  return match.group(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """30 real Br35H slices per class as a class-folder dataset, and 6 unseen ones to predict."""
  root = tmp_path_factory.mktemp("byod")
  source = assets.asset_path("br35h")
  for folder, label in (("no", "healthy"), ("yes", "tumour")):
    files = sorted((source / folder).iterdir())
    (root / "my_images" / label).mkdir(parents=True)
    for f in files[:30]:
      shutil.copy(f, root / "my_images" / label / f.name)
    (root / "new_images").mkdir(exist_ok=True)
    for f in files[-3:]:
      shutil.copy(f, root / "new_images" / f"{label}_{f.name}")
  return root


def test_readme_byod_commands_run_as_written(folders):
  script = (readme_block("byod-commands").replace("/data/my_images", str(folders / "my_images"))
            .replace("/data/new_images", str(folders / "new_images")).replace("runs/", f"{folders}/runs/"))
  env = {**os.environ, "HOME": str(folders),  # the build cache goes to $HOME/tensorflow_datasets
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  run = folders / "runs" / "my_lora"
  results = json.loads((run / "results.json").read_text())
  test = json.loads((run / "test.json").read_text())
  assert test == results["test"]  # launch.evaluate reproduces the run's own test metrics
  meta = json.loads((run / "merged.json").read_text())
  assert meta["class_names"] == ["healthy", "tumour"] and meta["preprocessing"]["image_size"] == 96
  with open(run / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and {r["prediction"] for r in rows} <= {"healthy", "tumour"}
  for r in rows:
    assert abs(float(r["healthy"]) + float(r["tumour"]) - 1) < 1e-5
  assert (folders / "tensorflow_datasets").is_dir()  # nothing was written outside HOME and the workdir
