"""Per-run step time of K runs trained together (one vmapped program, train/runs.py) against apart.

python -m benchmarks.vmapped_runs                       # MobileNetV2 64 px batch 32 (the main job's shapes)
python -m benchmarks.vmapped_runs --cases=mobilenet_v2:lora,vit_b16:lora --runs=4 --size=32 --tiny

Apart: one compiled step called K times per round (K runs in turn, as a sweep runs them today).
Together: the vmapped step, one call per round. Both on the same K states, learning rates and batches;
median of `--steps` rounds after warm-up. Reports seconds per run-step and the ratio together/apart
(< 1: training together is faster per run).
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from medpeft_jax import models, presets
from medpeft_jax.train import optim, runs
from medpeft_jax.train.step import init_train_state, make_train_step

_CASES = flags.DEFINE_list("cases", ["mobilenet_v2:lora", "mobilenet_v2:full"], "model:method pairs.")
_RUNS = flags.DEFINE_integer("runs", 4, "Runs trained together.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size per run.")
_SIZE = flags.DEFINE_integer("size", 64, "Image size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed rounds after 2 warm-up rounds.")
_TINY = flags.DEFINE_bool("tiny", False, "The tiny test configuration of each family (presets.TINY_MODELS).")


def _median_time(fn, steps: int) -> float:
  for _ in range(2):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(model_name: str, method_name: str, k: int, batch: int, size: int, steps: int, tiny: bool) -> dict:
  overrides = presets.TINY_MODELS[models.get_spec(model_name).family] if tiny else {}
  model = models.create_model(model_name, num_classes=3, **overrides)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((k, batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (k, batch)).astype(np.int32)
  variables = jax.jit(model.init)(jax.random.key(0), images[0, :1])
  method, spec = presets.build_method(model_name, method_name), optim.OptimizerSpec()
  plain = make_train_step(model, method, spec.build(1e-3), jit=False)
  lrs = np.geomspace(1e-4, 1e-2, k)
  fresh = lambda: [init_train_state(method, variables, spec.build(lr, 1, 100), jax.random.key(i))
                   for i, lr in enumerate(lrs)]
  params = variables["params"]

  apart_step, states = jax.jit(plain, donate_argnums=0), fresh()
  batches = [{"image": images[i], "label": labels[i]} for i in range(k)]

  def apart():
    for i in range(k):
      states[i], _ = apart_step(states[i], params, batches[i], None)
    return states

  together_step, stacked = runs.vmapped_step(plain), [runs.stack(fresh())]
  batch_stack = {"image": images, "label": labels}

  def together():
    stacked[0], _ = together_step(stacked[0], params, batch_stack, None)
    return stacked[0]

  t_apart, t_together = _median_time(apart, steps) / k, _median_time(together, steps) / k
  return dict(case=f"{model_name}:{method_name}", apart=t_apart, together=t_together, ratio=t_together / t_apart)


def main(argv):
  del argv
  print(f"{_RUNS.value} runs, batch {_BATCH.value} each, {_SIZE.value} px, {jax.devices()[0].platform}, "
        f"median of {_STEPS.value} rounds; seconds per run-step")
  print("| case | apart (s) | together (s) | together / apart |")
  print("|---|---:|---:|---:|")
  for case in _CASES.value:
    model_name, method_name = case.split(":")
    r = measure(model_name, method_name, _RUNS.value, _BATCH.value, _SIZE.value, _STEPS.value, _TINY.value)
    print(f"| {r['case']} | {r['apart']:.4f} | {r['together']:.4f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
