"""Fréchet distance and kernel inception distance between two sets of features (float64, NumPy).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the matrix square root is
computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), via `eigh`: no complex parts to discard and no
failure on singular covariances (fewer images than feature dimensions), unlike `scipy.linalg.sqrtm`.
KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets, as torch-fidelity and clean-fid report it.
Features: pool-3 of the FID Inception-v3 (medpeft_jax/models/inception.py) with pytorch-fid's weights
(loaded by medpeft_jax/models/weights/inception.py).
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from medpeft_jax.models.weights.inception import load_fid_inception


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of (N, D) features, float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"Expected (N >= 2, D) features, got shape {f.shape}.")
  return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"Statistics of different dimensions: {mu1.shape} vs {mu2.shape}.")
  root = _psd_sqrt(sigma1)
  eig = np.linalg.eigvalsh(root @ sigma2 @ root)
  trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(real, fake) -> float:
  return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kernel_inception_distance(real, fake, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """(mean, std) over `subsets` random subsets of min(subset_size, N) rows of each set."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"Features of different dimensions: {real.shape[1]} vs {fake.shape[1]}.")
  m = min(subset_size, len(real), len(fake))
  if m < 2:
    raise ValueError("KID needs at least 2 samples in each set.")
  rng = np.random.default_rng(seed)
  d = real.shape[1]
  values = []
  for _ in range(subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                  - 2 * kxy.mean())
  return float(np.mean(values)), float(np.std(values))


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(path: str | os.PathLike) -> np.ndarray:
  """uint8 (N, H, W, 3) from a folder of images (sorted by name) or an .npz with an `images` array."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    with np.load(path) as npz:
      return np.asarray(npz["images"])
  if not path.is_dir():
    raise FileNotFoundError(f"No image folder or .npz at {path}.")
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) in {path}.")
  images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
  if len({i.shape for i in images}) != 1:
    raise ValueError(f"Images in {path} differ in size; resize them to one size first.")
  return np.stack(images)


@functools.cache
def _jitted_apply(model):
  return jax.jit(model.apply)


def inception_features(model, variables, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
  """(N, 2048) pool-3 features of uint8 images, in batches (the last one padded, then dropped)."""
  apply = _jitted_apply(model)
  out = []
  for start in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch", leave=False):
    batch = images[start:start + batch_size].astype(np.float32) / 255.0
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.float32)])
    out.append(np.asarray(apply(variables, batch))[:n])
  return np.concatenate(out).astype(np.float64)


def compare_sets(real, fake, weights: str | os.PathLike, batch_size: int = 50, kid_subsets: int = 100,
                 kid_subset_size: int = 1000) -> dict:
  """FID and KID between two image sets (folders or .npz files), with the FID Inception at `weights`."""
  model, variables, _ = load_fid_inception(weights)
  real_f, fake_f = (inception_features(model, variables, load_images(p), batch_size) for p in (real, fake))
  kid, kid_std = kernel_inception_distance(real_f, fake_f, subsets=kid_subsets, subset_size=kid_subset_size)
  return {"fid": fid_from_features(real_f, fake_f), "kid": kid, "kid_std": kid_std,
          "num_real": len(real_f), "num_fake": len(fake_f)}
