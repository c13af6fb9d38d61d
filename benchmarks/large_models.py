"""What fits where: the ViT-g/14s' LoRA train step compiled with FSDP, and XLA's memory estimate per device.

python -m benchmarks.large_models                             # gigapath_g14, dinov2_g14; 8 simulated CPUs
python -m benchmarks.large_models --models=dinov2_g14 --fsdp=8 --batch=32 --remat

Each model's LoRA train step (the trainer's: `make_train_step`, its optimizer, the state donated) is lowered
and compiled ahead of time, never run, at batch `--batch` and `--size` px in bfloat16 compute (float32
parameters and optimizer state), twice: on a ('data', 'fsdp') = (1, `--fsdp`) mesh with the parameters
placed as the trainer places them (`sharding.Placement`: every leaf of >= `min_shard_size` elements split
over 'fsdp', LoRA factors following their kernel, the batch split over all devices), and on one device
unsharded. The parameters are created sharded: their initialisation is compiled with the same
out-shardings (`trainer.build_model`), so no device ever holds a whole model; its per-device estimate is
printed too. Nothing is allocated: inputs are ShapeDtypeStructs, so a 1.1B-parameter model costs only
compile time (minutes per program on a CPU).

Memory is XLA's static estimate from `compiled.memory_analysis()` (arguments + outputs + temporaries -
aliased, per device), here from a CPU compile: a GPU compile fuses and schedules differently, and the
runtime adds its own overhead (CUDA context, allocator), so read "fits" with headroom. On a CPU host
the 8 devices are simulated (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set below before jax is
imported unless XLA_FLAGS already sets a device count).
"""

from __future__ import annotations

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from medpeft_jax import models, presets
from medpeft_jax.peft.core import num_params
from medpeft_jax.train import optim, sharding, trainer
from medpeft_jax.train.programs import xla_memory_estimate
from medpeft_jax.train.step import init_train_state, make_train_step

_MODELS = flags.DEFINE_list("models", ["gigapath_g14", "dinov2_g14"], "Registered models to compile.")
_METHOD = flags.DEFINE_string("method", "lora", "PEFT method (its preset for the model).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image size.")
_FSDP = flags.DEFINE_integer("fsdp", 8, "Devices on the 'fsdp' axis (the mesh is 1 x fsdp).")
_REMAT = flags.DEFINE_boolean("remat", False, "Recompute each block's activations in the backward pass.")
_UNSHARDED = flags.DEFINE_boolean("unsharded", True, "Also compile the step on one device, unsharded.")

GPU_BYTES = 80 * 10**9  # an "80 GB" GPU in decimal GB: below its 80 GiB, so the comparison keeps headroom
GIB = 2**30


def structs(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_step(name: str, mesh) -> dict:
  """Compiles the sharded parameter creation and the train step on `mesh`; XLA's per-device estimates."""
  model = models.create_model(name, num_classes=3, dtype=jnp.bfloat16, remat=_REMAT.value)
  placement = sharding.Placement(mesh, sharding.DEFAULT_RULES)  # the trainer's default mesh.rules
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw PRNGKey, as the trainer passes it
  n, size = _BATCH.value, _SIZE.value
  init = functools.partial(model.init, train=False)
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(init, key, image)
  variables_sh = trainer.variable_shardings(placement, variables)
  start = time.perf_counter()
  created = jax.jit(init, out_shardings=variables_sh).lower(key, image).compile()

  method = presets.build_method(name, _METHOD.value)
  optimizer = optim.OptimizerSpec().build(1e-3, 10, 1000)
  state = jax.eval_shape(lambda v, k: init_train_state(method, v, optimizer, k), variables, key)
  state_sh = placement.state(state, placement.trainable(state.trainable))
  batch_sh = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch_sh)}
  params, params_sh = variables["params"], variables_sh["params"]
  step = jax.jit(make_train_step(model, method, optimizer, jit=False), donate_argnums=0,
                 in_shardings=(state_sh, params_sh, batch_sh, {}),
                 out_shardings=(state_sh, sharding.NamedSharding(mesh, sharding.P())))
  compiled = step.lower(structs(state, state_sh), structs(params, params_sh), batch, {}).compile()
  m = compiled.memory_analysis()
  return {"params": num_params(params), "trainable": num_params(state.trainable),
          "sharded": sum(s.spec != sharding.P() for s in jax.tree.leaves(params_sh)),
          "leaves": len(jax.tree.leaves(params)), "create": xla_memory_estimate(created),
          "arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
          "step": xla_memory_estimate(compiled), "compile_s": time.perf_counter() - start}


def main(argv):
  del argv
  devices = jax.devices()
  if len(devices) < _FSDP.value:
    raise ValueError(f"--fsdp={_FSDP.value} needs {_FSDP.value} devices, and jax sees {len(devices)}; on a "
                     f"CPU set XLA_FLAGS={_DEVICES_FLAG}={_FSDP.value} before jax is imported.")
  meshes = {f"fsdp {_FSDP.value}": sharding.make_mesh(1, _FSDP.value, devices[:_FSDP.value])}
  if _UNSHARDED.value:
    meshes["1 device"] = sharding.make_mesh(1, 1, devices[:1])
  platform = devices[0].platform
  print(f"jax {jax.__version__}, {platform} x {len(devices)}; {_METHOD.value} train step, batch "
        f"{_BATCH.value} at {_SIZE.value} px, bfloat16 compute{', remat' if _REMAT.value else ''}; memory: "
        f"XLA's estimate per device from a {platform.upper()} compile (arguments + outputs + temporaries - "
        "aliased)\n", flush=True)
  rows = []
  for name in _MODELS.value:
    for layout, mesh in meshes.items():
      rows.append((name, layout, compile_step(name, mesh)))
      print(f"  {name} on {layout}: {rows[-1][2]['step'] / GIB:.1f} GiB per device (XLA estimate), "
            f"compiled in {rows[-1][2]['compile_s']:.0f} s", flush=True)
  print("\n| model | devices | parameters (trainable) | leaves sharded | GiB/device: create params | "
        "arguments | temporaries | train step (XLA estimate) | fits 80 GB |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---|")
  for name, layout, r in rows:
    gib = " | ".join(f"{r[k] / GIB:.2f}" for k in ("create", "arguments", "temporaries", "step"))
    print(f"| {name} | {layout} | {r['params']:,} ({r['trainable']:,}) | {r['sharded']} of {r['leaves']} | "
          f"{gib} | {'yes' if r['step'] <= GPU_BYTES else 'no'} |")


if __name__ == "__main__":
  app.run(main)
