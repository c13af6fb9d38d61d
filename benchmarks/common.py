"""Shared measurement code for the benchmarks (no flags here: each script defines its own)."""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medpeft_jax import models, presets
from medpeft_jax.train.programs import xla_memory_estimate
from medpeft_jax.train.step import init_train_state, make_train_step


def measure(model_name: str, method_name: str, batch: int, size: int, steps: int) -> dict:
  model = models.create_model(model_name, num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  method = presets.build_method(model_name, method_name).for_run(1000)  # e.g. AdaLoRA's budget needs a length
  optimizer = optax.adamw(1e-3)
  state = init_train_state(method, variables, optimizer, jax.random.key(1))
  batch_data = {"image": x, "label": jnp.arange(batch) % 3}
  start = time.perf_counter()
  lowered = make_train_step(model, method, optimizer).lower(state, variables["params"], batch_data)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start  # lowering included
  memory = xla_memory_estimate(compiled)
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, variables["params"], batch_data)
    jax.block_until_ready(metrics["loss"])
    if i:  # the first call is a warm-up
      times.append(time.perf_counter() - start)
  count = method.count(variables["params"], state.trainable)
  return {"step_s": statistics.median(times), "memory": memory, "lower_s": lower_s, "compile_s": compile_s,
          "trainable": count.trainable}
