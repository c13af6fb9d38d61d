"""README "Extending": a new method, dataset and model family, each one file, trained with no edit elsewhere."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medpeft_jax import models, presets
from tests.extending import toy_method, toy_model  # noqa: F401  (registers channel_scale and toy_cnn)

REPO = pathlib.Path(__file__).resolve().parent.parent
PLUGINS = "tests.extending.toy_method+tests.extending.toy_dataset+tests.extending.toy_model"


def write_toy_shapes(root: pathlib.Path, n: int = 24) -> pathlib.Path:
  """The fake layout of the toy dataset: n dark and n light 36 px squares with noise."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  lines = []
  for i in range(2 * n):
    label = ("dark", "light")[i % 2]
    pixels = rng.integers(0, 90, (36, 36, 3)) + (150 if label == "light" else 0)
    Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{i}.png")
    lines.append(f"{i}.png {label}")
  (root / "labels.txt").write_text("\n".join(lines) + "\n")
  return root


def test_toy_method_starts_at_the_base_and_merges_exactly():
  model = models.create_model("toy_cnn", num_classes=2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  method = presets.build_method("toy_cnn", "channel_scale")  # its targets: toy_cnn's `conv` role
  assert method.targets == r"(?:conv\d)"
  trainable = method.init(jax.random.key(1), variables["params"])
  assert sorted(trainable["adapters"]) == ["conv1", "conv2"]
  np.testing.assert_allclose(method.apply(model, variables, trainable, x), model.apply(variables, x), atol=1e-6)
  trainable["adapters"] = jax.tree.map(lambda s: s * 1.5, trainable["adapters"])
  merged = method.merge(variables["params"], trainable)
  np.testing.assert_allclose(method.apply(model, variables, trainable, x), model.apply({"params": merged}, x),
                             atol=1e-5)


def test_plugins_train_through_launch_train(tmp_path):
  """One `launch.train` with a plugin method x plugin dataset x plugin model family; nothing else edited."""
  data = write_toy_shapes(tmp_path / "toy")
  command = [sys.executable, "-m", "launch.train", "--config",
             f"configs/classify.py:model=toy_cnn,method=channel_scale,dataset=toy_shapes,plugins={PLUGINS}",
             "--config.init=random", f"--config.manual_dir={data}", f"--config.data_dir={tmp_path / 'tfds'}",
             "--config.batch_size=8", "--config.epochs=2", "--config.lr=3e-2", "--config.progress=False",
             f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert (results["model"], results["method"], results["dataset"]) == ("toy_cnn", "channel_scale", "toy_shapes")
  # What trains: the head plus one scale per output channel of conv1 (8) and conv2 (16).
  assert results["trainable_params"] == (16 * 2 + 2) + 8 + 16
  adapter = json.loads((tmp_path / "run" / "best_adapter" / "adapter_config.json").read_text())
  assert adapter["method"] == "channel_scale" and adapter["class_names"] == ["dark", "light"]
