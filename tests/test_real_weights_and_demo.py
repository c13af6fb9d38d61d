"""Real ImageNet weights, read without torch, classify real photos; the main job runs end to end."""

import os
import subprocess
import sys

from medpeft_jax import demo

CAT_IDS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_IDS = {504, 967, 968}  # coffee mug, espresso, cup


def test_mobilenet_v2_imagenet_weights_classify_cat_and_coffee():
  predictions, report = demo.classify_imagenet(demo.sample_photos())
  assert report.ok and len(report.loaded) == 262 and not report.reinitialized
  cat, coffee = (p.top5[0][0] for p in predictions)
  assert cat in CAT_IDS, predictions[0]
  assert coffee in COFFEE_IDS, predictions[1]


def test_main_job_command_runs(tmp_path):
  """The README's main job (`python -m launch.demo`) in a fresh process."""
  result = subprocess.run([sys.executable, "-m", "launch.demo"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Egyptian cat" in result.stdout and "espresso" in result.stdout
  assert "vit_b16" in result.stdout and "85.80M" in result.stdout
