"""FID and KID against float64 references (scipy's sqrtm; the MMD estimator written out)."""

import numpy as np
import pytest
import scipy.linalg

from medpeft_jax.diffusion import fid


def reference_fid(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((500, 16))
  b = rng.standard_normal((400, 16)) @ rng.uniform(0.5, 1.5, (16, 16)) * 0.3 + 0.7
  assert fid.fid_from_features(a, b) == pytest.approx(reference_fid(a, b), rel=1e-9)
  assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_is_stable_on_singular_covariances():
  """Fewer samples than dimensions (a common small-FID situation): finite, non-negative, symmetric."""
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((20, 64)), rng.standard_normal((25, 64)) + 0.1
  d1, d2 = fid.fid_from_features(a, b), fid.fid_from_features(b, a)
  assert np.isfinite(d1) and d1 > 0 and d1 == pytest.approx(d2, rel=1e-7)


def test_kernel_inception_distance_matches_the_unbiased_mmd():
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)) + 0.5
  mean, std = fid.kernel_inception_distance(x, y, subsets=1, subset_size=1000)
  m, d = 50, 8
  pick = np.random.default_rng(0)
  xs, ys = x[pick.choice(60, m, replace=False)], y[pick.choice(50, m, replace=False)]
  k = lambda a, b: (a @ b.T / d + 1) ** 3
  expected = sum(k(xs[i:i + 1], xs[j:j + 1])[0, 0] + k(ys[i:i + 1], ys[j:j + 1])[0, 0]
                 for i in range(m) for j in range(m) if i != j) / (m * (m - 1)) - 2 * k(xs, ys).mean()
  assert mean == pytest.approx(expected, rel=1e-9) and std == 0.0
  # Two draws of one distribution: near zero, far below the shifted pair's distance.
  same, _ = fid.kernel_inception_distance(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)), subsets=20,
                                          subset_size=200)
  shifted, _ = fid.kernel_inception_distance(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.5,
                                             subsets=20, subset_size=200)
  assert abs(same) < 0.1 * shifted
