"""Image transforms shared by the input pipelines and the demos (PIL in, numpy out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode (L, RGBA, P, I;16, ...) to 8-bit RGB."""
  if img.mode in ("I;16", "I;16B", "I", "F"):  # high bit depth: stretch to 8 bits by the value range
    a = np.asarray(img, np.float64)
    lo, hi = float(a.min()), float(a.max())
    img = Image.fromarray(np.uint8(np.round(255 * (a - lo) / (hi - lo or 1.0))))
  return img if img.mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, resize: int | None = None) -> np.ndarray:
  """The evaluation transform of the torchvision recipe: shorter side to `resize`, centre crop `size`.

  `resize` defaults to size * 256 / 224 (256 for 224). Returns uint8 HWC RGB.
  """
  resize = resize or round(size * 256 / 224)
  img = to_rgb(img)
  w, h = img.size
  scale = resize / min(w, h)
  img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 RGB in [0, 255] -> float32 standardised with a model's per-channel mean/std (in [0, 1] units)."""
  x = np.asarray(images, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
