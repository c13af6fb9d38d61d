"""Forward + backward time of our convolution fast paths against Flax's `nn.Conv` (XLA's convolution).

python -m benchmarks.conv_paths

Cases: MobileNetV2's depthwise 3x3 convolutions (run as shifted multiply-adds on CPU) and a ResNet
1x1 convolution (run as a matmul), plus the whole MobileNetV2 train-mode gradient at 64 px, batch
32 with each depthwise implementation. Same inputs, one process, median of 5 after a warm-up.
"""

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app

from medpeft_jax import models
from medpeft_jax.models import layers

# (name, input NHWC, features, kernel, stride, groups)
CASES = [("depthwise 3x3, 32x32x96 s1", (32, 32, 32, 96), 96, 3, 1, 96),
         ("depthwise 3x3, 32x32x144 s2", (32, 32, 32, 144), 144, 3, 2, 144),
         ("depthwise 3x3, 56x56x144 s1 (batch 8)", (8, 56, 56, 144), 144, 3, 1, 144),
         ("1x1, 56x56x64 -> 256 (batch 8)", (8, 56, 56, 64), 256, 1, 1, 1)]


def median_time(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def grad_time(module, x) -> float:
  variables = module.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1)))
  return median_time(grad, variables, x)


def mobilenet_grad_time() -> float:
  model = models.create_model("mobilenet_v2", num_classes=2)
  x = jnp.ones((32, 64, 64, 3))
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return out.sum()

  return median_time(jax.jit(jax.grad(loss)), variables["params"], x)


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()}")
  print("| case | nn.Conv (s) | ours (s) | nn.Conv / ours |\n|---|---:|---:|---:|")
  for name, shape, features, k, s, groups in CASES:
    x = jax.random.normal(jax.random.key(0), shape)
    kwargs = dict(features=features, kernel_size=(k, k), strides=s, padding="SAME", feature_group_count=groups)
    reference, ours = grad_time(nn.Conv(**kwargs), x), grad_time(layers.Conv(**kwargs), x)
    print(f"| {name} | {reference:.4f} | {ours:.4f} | {reference / ours:.1f} |")
  ours = mobilenet_grad_time()
  original = jax.default_backend
  jax.default_backend = lambda: "gpu"  # makes layers.Conv keep XLA's grouped convolution
  try:
    reference = mobilenet_grad_time()
  finally:
    jax.default_backend = original
  print(f"| MobileNetV2 gradient, 64 px, batch 32 | {reference:.4f} | {ours:.4f} | {reference / ours:.1f} |")


if __name__ == "__main__":
  app.run(main)
