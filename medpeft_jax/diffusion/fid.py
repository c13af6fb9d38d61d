"""Fréchet distance and kernel inception distance between two sets of features (float64, NumPy).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the matrix square root is
computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), via `eigh`: no complex parts to discard and no
failure on singular covariances (fewer images than feature dimensions), unlike `scipy.linalg.sqrtm`.
KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets, as torch-fidelity and clean-fid report it.
"""

from __future__ import annotations

import numpy as np


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
