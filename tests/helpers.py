"""Test helpers: random PyTorch references and comparisons with our models on the same inputs."""

import math

import numpy as np
import torch


def random_images(n=2, size=32, seed=0):
  """NHWC float32 images and the same images as an NCHW torch tensor."""
  x = np.random.default_rng(seed).standard_normal((n, size, size, 3), dtype=np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def randomise(module: torch.nn.Module, seed=0) -> torch.nn.Module:
  """Replaces every parameter and BatchNorm statistic by random values of a sensible scale.

  Reference inits leave biases at 0 and norms at identity, which would hide a mis-mapped tensor.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      if not t.dtype.is_floating_point:
        continue
      if t.dim() >= 2:
        t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(math.prod(t.shape[1:])))
      elif name.endswith(("running_var", "weight")):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))  # norm scales and variances stay positive
      else:
        t.copy_(torch.rand(t.shape, generator=g) - 0.5)
  return module.eval()


def torch_logits(module: torch.nn.Module, x_nchw) -> np.ndarray:
  module.eval()
  with torch.no_grad():
    out = module(x_nchw)
  return (out.logits if hasattr(out, "logits") else out).numpy()
