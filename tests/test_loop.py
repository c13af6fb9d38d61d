"""The one training loop: runtime schedules share a program, finite or nothing, one run per workdir,
sharding as data (adapters inherit their base leaf's placement; parameters created sharded)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from medpeft_jax import models, peft, presets
from medpeft_jax.train import optim, sharding, trainer
from medpeft_jax.train.programs import ProgramCache
from medpeft_jax.train.step import init_train_state, make_train_step
from tests.test_train import REPO, smoke_config

flags.FLAGS.mark_as_parsed()


def test_a_reused_program_follows_the_new_states_schedule():
  """Two learning rates and step budgets, one compiled program: the same result as a program built for each."""
  model = models.create_model("vit_b16", num_classes=3, **presets.TINY_MODELS["vit"])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  batch = {"image": x, "label": jnp.arange(8) % 3}
  method, spec = peft.get_method("lora", rank=4), optim.OptimizerSpec(1.0, 1e-4, "cosine")
  cache = ProgramCache()

  def train(lr, total, cache):
    optimizer = spec.build(lr, warmup=1, total=total)
    state = init_train_state(method, variables, optimizer, jax.random.PRNGKey(1))
    step, seconds = cache.compile_once((model, method, spec), lambda: make_train_step(model, method, optimizer, jit=False),
                                       (state, variables["params"], batch, {}))
    for _ in range(3):
      state, _ = step(state, variables["params"], batch, {})
    return state.trainable, seconds

  _, first = train(1e-3, 10, cache)
  reused, again = train(3e-2, 5, cache)
  fresh, _ = train(3e-2, 5, ProgramCache())
  assert first > 0 and again == 0.0
  jax.tree.map(np.testing.assert_array_equal, reused, fresh)
  # The schedule itself: optax's warmup + cosine.
  import optax  # noqa: PLC0415
  reference = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, 7, end_value=0.0)
  for count in range(9):
    assert float(optim.learning_rate(count, 3e-2, 2, 7, "cosine")) == pytest.approx(float(reference(count)), rel=1e-6)


def test_nan_run_writes_nothing_non_finite(easy, tmp_path):
  """lr 1e6 diverges: the run stops naming the step and its learning rate; every checkpoint, the best adapter
  (if any) and the results are finite or absent."""
  config = smoke_config(easy, "resnet50", "full", lr=1e6, epochs=4, checkpoint_every=2, eval_every=2)
  with pytest.raises(FloatingPointError, match=r"at step \d+ \(learning rate there [0-9.e+]+\)") as error:
    trainer.train_and_evaluate(config, tmp_path)
  assert "Lower the learning rate" in str(error.value)
  assert not (tmp_path / "results.json").exists()
  if (tmp_path / "best_adapter").exists():
    peft.load_adapter(tmp_path / "best_adapter")  # refuses non-finite weights
  from medpeft_jax.train.checkpoints import Checkpoints  # noqa: PLC0415
  for step_dir in (tmp_path / "checkpoints").glob("[0-9]*"):
    state = Checkpoints(tmp_path / "checkpoints", 2).manager.restore(int(step_dir.name))["state"]
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state) if np.issubdtype(np.asarray(v).dtype, np.floating))


def test_resume_refuses_another_run(easy, tmp_path):
  trainer.train_and_evaluate(smoke_config(easy, "resnet50", "bias", epochs=1), tmp_path)
  with pytest.raises(ValueError, match=r"different run \(.*lr: checkpoint 0.001, now 0.01"):
    trainer.train_and_evaluate(smoke_config(easy, "resnet50", "bias", epochs=1, lr=1e-2), tmp_path)


def test_adapter_leaves_inherit_their_kernels_placement():
  placement = sharding.Placement(sharding.make_mesh())
  spec = sharding.P(None, "fsdp")  # a kernel (in, out) sharded over its output features
  assert placement._inherit((768, 16), (768, 3072), spec) == sharding.P(None, None)  # LoRA A (in, r)
  assert placement._inherit((16, 3072), (768, 3072), spec) == sharding.P(None, "fsdp")  # LoRA B (r, out)
  assert placement._inherit((3072,), (768, 3072), spec) == sharding.P("fsdp")  # a per-channel scale
  conv = sharding.P(None, None, "fsdp", None)  # a conv kernel sharded over its input channels
  assert placement._inherit((3, 3, 64, 8), (3, 3, 64, 256), conv) == conv  # conv LoRA A


FSDP_SCRIPT = """
import jax, numpy as np
from configs import classify
from medpeft_jax import presets
from medpeft_jax.train import sharding, trainer
from medpeft_jax.train.step import init_train_state
c = classify.get_config("model=vit_b16,method=lora,smoke=True")
placement = sharding.Placement(sharding.make_mesh(1, 8), c.mesh.rules, min_size=64)
model, variables = trainer.build_model(c, 3, placement)
method = presets.build_method("vit_b16", "lora", **c.peft)
trainable = jax.jit(method.init, out_shardings=placement.trainable(jax.eval_shape(method.init, jax.random.key(0),
                    variables["params"])))(jax.random.key(0), variables["params"])
whole = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]
         if x.size >= 64 and any(s.data.shape == x.shape for s in x.addressable_shards)]
sharded_b = [m for m, a in trainable["adapters"].items() if a["b"].sharding.spec != sharding.P()]
print("WHOLE", whole); print("SHARDED_B", len(sharded_b), len(trainable["adapters"]))

# 8 runs trained together on a ("runs",) mesh: each device holds one run, and the result is the unsharded one's.
from medpeft_jax.train import optim, runs
from medpeft_jax.train.step import make_train_step
spec, params = optim.OptimizerSpec(), jax.device_get(variables["params"])
states = [init_train_state(method, {"params": params}, spec.build(lr, 1, 10), jax.random.key(i))
          for i, lr in enumerate(np.geomspace(1e-4, 1e-2, 8))]
x = np.random.default_rng(0).standard_normal((8, 4, 32, 32, 3)).astype(np.float32)
batch = {"image": x, "label": np.zeros((8, 4), np.int32)}
step = runs.vmapped_step(make_train_step(model, method, spec.build(1e-3), jit=False))
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("runs",))
spread = runs.shard_runs(runs.stack(states), mesh)
one_each = all(s.data.shape[0] == 1 for x in jax.tree.leaves(spread) for s in x.addressable_shards)
spread, _ = step(spread, params, runs.shard_runs(batch, mesh), None)
alone, _ = step(jax.device_put(runs.stack(states), jax.devices()[0]), params, batch, None)
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(spread.trainable),
                                                                               jax.tree.leaves(alone.trainable)))
print("RUNS", one_each, spread.trainable["adapters"]["block0/attn/query"]["b"].sharding.spec, diff)
"""


def test_fsdp_parameters_are_never_whole_on_one_device_and_runs_spread_over_devices():
  """8 simulated devices, fsdp=8: every base leaf of a tiny ViT above the size threshold is created split
  (never whole on a device), and LoRA's B factors follow their kernel's output-feature sharding. Then 8 runs
  trained together on a ("runs",) mesh: one run per device, one SPMD step, equal to the unsharded step."""
  out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("WHOLE", "SHARDED_B", "RUNS")))
  assert lines["WHOLE"] == "[]", lines["WHOLE"]
  sharded, total = map(int, lines["SHARDED_B"].split())
  assert total == 4 and sharded == total  # q and v of 2 blocks
  one_each, rest = lines["RUNS"].split(" ", 1)
  spec, diff = rest.rsplit(" ", 1)
  assert one_each == "True" and "runs" in spec and float(diff) < 1e-6, lines["RUNS"]


def test_linear_probe_on_cached_features_equals_the_whole_model(easy, tmp_path):
  """The head trained on eval-mode trunk features, saved as a `linear` adapter, scores the same through the
  whole model (launch.evaluate's path); a second run of the sweep's kind reuses the features and the program."""
  from medpeft_jax.train import adapters_io  # noqa: PLC0415

  config = smoke_config(easy, "resnet50", "linear", lr=3e-2, epochs=4)
  first = trainer.train_and_evaluate(config, tmp_path / "a")
  assert first["test"]["accuracy"] >= 0.6
  whole = adapters_io.evaluate_adapter(tmp_path / "a" / "best_adapter", "test")
  assert whole["f1_macro"] == pytest.approx(first["test"]["f1_macro"], abs=1e-6)
  assert whole["auc"] == pytest.approx(first["test"]["auc"], abs=1e-5)
  again = trainer.train_and_evaluate(smoke_config(easy, "resnet50", "linear", lr=1e-2, epochs=4, seed=1),
                                     tmp_path / "b")
  assert again["compile_time_s"] == 0.0

