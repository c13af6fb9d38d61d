"""The main job until the benchmark lands: a short, real, offline tour of what exists.

  1. the model zoo at full size: trunk parameter counts from `jax.eval_shape` (no weights needed);
  2. real ImageNet MobileNetV2 weights, read from torchvision's .pth without torch;
  3. top-5 ImageNet predictions for photos (scikit-image's cat and coffee by default).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medpeft_jax import assets, models
from medpeft_jax.data import transforms


@dataclasses.dataclass
class Prediction:
  image: str
  top5: list[tuple[int, str, float]]  # (ImageNet class id, name, probability)


def trunk_parameter_counts() -> dict[str, int]:
  """Parameters of every registered model without its head, at its pre-training resolution."""
  counts = {}
  for name in models.classifiers():
    spec = models.get_spec(name)
    model = spec.build(num_classes=0)
    x = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    counts[name] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
  return counts


def sample_photos() -> list[pathlib.Path]:
  """scikit-image's sample photos of a cat and a cup of coffee (ImageNet-like, installed offline)."""
  try:
    import skimage  # noqa: PLC0415  (optional: the `assets` extra)
  except ImportError:
    raise ImportError("The demo photos come with scikit-image: pip install 'medpeft-jax[assets]'.") from None
  data = pathlib.Path(skimage.__file__).parent / "data"
  return [data / "chelsea.png", data / "coffee.png"]


def classify_imagenet(paths, top: int = 5):
  """Classifies images with ImageNet MobileNetV2 weights read from torchvision's checkpoint file."""
  spec = models.get_spec("mobilenet_v2")
  model, variables, report = models.load_pretrained(
      "mobilenet_v2", assets.asset_path("mobilenet_v2_imagenet"), num_classes=1000)
  batch = np.stack([transforms.resize_center_crop(Image.open(p), spec.image_size) for p in paths])
  logits = jax.jit(model.apply)(variables, transforms.normalize(batch, spec.mean, spec.std))
  probs = np.asarray(jax.nn.softmax(logits))
  names = models.imagenet_classes()
  predictions = [Prediction(str(p), [(int(i), names[i], float(pr[i])) for i in np.argsort(-pr)[:top]])
                 for p, pr in zip(paths, probs)]
  return predictions, report


def run(images=None) -> list[Prediction]:
  start = time.time()
  print("Model zoo (trunk parameters, no head, from jax.eval_shape):")
  for name, n in trunk_parameter_counts().items():
    print(f"  {name:14s} {n / 1e6:8.2f}M")
  predictions, report = classify_imagenet(images or sample_photos())
  print(f"\nMobileNetV2 ImageNet weights, read without torch:\n{report}\n")
  for p in predictions:
    print(pathlib.Path(p.image).name)
    for i, name, prob in p.top5:
      print(f"  {prob:6.1%}  {i:4d}  {name}")
  print(f"\nDone in {time.time() - start:.1f}s.")
  return predictions
