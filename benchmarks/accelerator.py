"""Train-step throughput, model FLOPs utilisation and peak memory on one accelerator, one row per case.

python -m benchmarks.accelerator --out accelerator.jsonl            # full size (an accelerator)
python -m benchmarks.accelerator --tiny --noisolate --out /tmp/a.jsonl   # tiny shapes, any CPU (the tests)

Cases (bfloat16 compute: float32 parameters and optimizer state, bf16 activations, float32 loss; the
train state donated; random weights, since time does not depend on the values):
  vit_b16:full, vit_b16:lora   ViT-B/16 full fine-tuning and LoRA r16 on query/value, batch 256, 224 px
  resnet50:full                ResNet-50 full fine-tuning, batch 256, 224 px
  unet:lora@28, unet:lora@64   SD v1.5 U-Net LoRA (the t2i trainer's step), batch 16, 28x28 / 64x64 latents
`--tiny` runs each at tiny shapes (presets.TINY_MODELS, a 2-level U-Net, batch 2-4, 32 px / 8x8 latents).

Per case: the median step time over `--steps` steps after `--warmup` (`jax.block_until_ready`), img/s;
model FLOPs per step (`step_flops`: the matrix-product, convolution and fused-attention FLOPs of the
traced train step, counted from operand shapes — forward, the input gradients and the weight gradients
of what trains only, whichever kernels run them); XLA's own count (`compiled.cost_analysis()`, which
adds elementwise work and may miss custom kernels such as cuDNN's attention); MFU = model FLOPs / step
time / the device's stated dense bf16 peak (`PEAKS`, or `--peak_tflops`; "n/a" where none is known, as
on a CPU); the share of those FLOPs run in bfloat16 (the compute-policy check); and memory: the
device's `peak_bytes_in_use` where it reports one, else XLA's static estimate
(`compiled.memory_analysis()`), labelled as such.

Each row is printed and appended to `--out` (JSON lines) as soon as its case ends. `--isolate` (the
default) runs each case in its own process, so that a device's peak memory is that case's own and an
out-of-memory case does not stop the others; the parent never touches the accelerator. `--budget_s`
bounds the whole run: a case that would start with too little time left is skipped with a note, and an
isolated case still running at the budget is stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

# Dense (non-sparse) bf16 tensor-core peaks from the vendors' datasheets, by a substring of
# `device.device_kind`, most specific first: (substring, TFLOP/s, note).
PEAKS = (
    ("H100 PCIe", 756.0, "datasheet, dense bf16"),
    ("H200", 989.0, "datasheet, dense bf16; ~790 measured on this workplace's H200 (8192^3 bf16 matmul)"),
    ("H100", 989.0, "datasheet (SXM), dense bf16"),
    ("A100", 312.0, "datasheet, dense bf16"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every case is measured (the flags of the same names)."""

  tiny: bool = False
  steps: int = 10
  warmup: int = 2
  dtype: str = "bfloat16"
  peak_tflops: float | None = None

  def as_flags(self) -> list[str]:
    return [f"--{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None]


@dataclasses.dataclass(frozen=True)
class Case:
  model: str  # a registered model name
  method: str
  batch: int
  size: int  # image side (px) or latent side
  tiny_batch: int
  tiny_size: int


CASES = {
    "vit_b16:full": Case("vit_b16", "full", 256, 224, 4, 32),
    "vit_b16:lora": Case("vit_b16", "lora", 256, 224, 4, 32),
    "resnet50:full": Case("resnet50", "full", 256, 224, 4, 32),
    # 28x28 latents (224-px images) are not a multiple of the U-Net's downsampling. Tiny, both cases are one
    # program (the tests' compilation cache compiles it once).
    "unet:lora@28": Case("stable_diffusion_unet", "lora", 16, 28, 2, 8),
    "unet:lora@64": Case("stable_diffusion_unet", "lora", 16, 64, 2, 8),
}
TEXT_TOKENS = 77  # CLIP's context length: the cross-attention keys
# Tiny runs are smoke tests: LLVM's optimisation level 0 halves a CPU's compile time (tiny step times mean nothing).
TINY_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def tiny_unet_config():
  """The 2-level U-Net of the tests (tests/sd_fakes.py UNET) with one layer per block: a CPU compiles its
  train step in two thirds of the time."""
  from medpeft_jax.models import unet  # noqa: PLC0415

  return unet.UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                         down_block_types=(unet.CROSS_ATTN_DOWN, unet.DOWN), up_block_types=(unet.UP, unet.CROSS_ATTN_UP),
                         attention_head_dim=4, norm_num_groups=8)


def stated_peak(device_kind: str, override: float | None = None) -> tuple[float | None, str]:
  """(TFLOP/s, where the figure comes from) for a device kind; (None, why) when none is known."""
  if override:
    return override, "--peak_tflops"
  for key, tflops, note in PEAKS:
    if key.lower() in device_kind.lower():
      return tflops, note
  return None, f"no stated peak for {device_kind!r} (benchmarks/accelerator.py PEAKS; or --peak_tflops)"


# ---------------------------------------------------------------------------------------------------------
# FLOPs of a traced step, from its operand shapes.


def _prod(xs) -> int:
  return math.prod(int(x) for x in xs)


_BNTH = 1  # jax's cudnn AttentionLayout.BNTH (BTNH = 0, what `jax.nn.dot_product_attention` passes)


def _eqn_flops(eqn) -> tuple[float, str] | None:
  """(FLOPs, operand dtype) of a matrix product, convolution or fused attention; None for other primitives."""
  name = eqn.primitive.name
  avals = [v.aval for v in eqn.invars]
  out = eqn.outvars[0].aval
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * _prod(out.shape) * _prod(avals[0].shape[d] for d in lhs_contract), str(avals[0].dtype)
  if name == "conv_general_dilated":
    rhs = avals[1]
    taps = _prod(rhs.shape) // rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]  # per output: kh*kw*cin/g
    holes = _prod(eqn.params["lhs_dilation"] or (1,))  # a transposed (strided) conv's zeros do no work
    return 2.0 * _prod(out.shape) * taps / holes, str(avals[0].dtype)
  if name.startswith("dot_product_attention_"):  # cuDNN's fused attention, layout (B, T, N, H) or (B, N, T, H)
    q, k = avals[0], avals[1]
    forward = 4.0 * _prod(q.shape) * k.shape[2 if eqn.params.get("layout") == _BNTH else 1]  # q·kᵀ and p·v
    if name.startswith("dot_product_attention_fwd"):
      return forward, str(q.dtype)
    if name.startswith("dot_product_attention_bwd"):
      return 2 * forward, str(q.dtype)  # dq, dk, dv, dp (the recomputed scores not counted)
  return None


def _subjaxprs(eqn):
  """The jaxprs nested in an equation's parameters (jit, remat, custom_jvp, scan, while, ...)."""
  for value in eqn.params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
        yield sub


def step_flops(jaxpr) -> dict[str, float]:
  """Matrix-product, convolution and fused-attention FLOPs of a (closed) jaxpr by operand dtype; nested
  jaxprs included (a scan's body times its length, the costliest branch of a cond, a while body once)."""
  totals: dict[str, float] = {}

  def add(counts, times=1.0):
    for dtype, flops in counts.items():
      totals[dtype] = totals.get(dtype, 0.0) + times * flops

  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    counted = _eqn_flops(eqn)
    if counted:
      add({counted[1]: counted[0]})
    elif eqn.primitive.name == "cond":
      add(max((step_flops(b) for b in eqn.params["branches"]), key=lambda c: sum(c.values())))
    else:
      times = float(eqn.params["length"]) if eqn.primitive.name == "scan" else 1.0
      for sub in _subjaxprs(eqn):
        add(step_flops(sub), times)
  return totals


def primitives(jaxpr) -> set[str]:
  """The names of every primitive in a (closed) jaxpr, nested ones included."""
  names = set()
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    names.add(eqn.primitive.name)
    for sub in _subjaxprs(eqn):
      names |= primitives(sub)
  return names


# ---------------------------------------------------------------------------------------------------------
# One case.


def random_like(tree, seed: int = 0):
  """Host arrays shaped like `tree` (ShapeDtypeStructs): scales 1, biases and means 0, variances 1, other
  leaves N(0, 1/fan_in) — without compiling the model's init (the U-Net's alone takes a minute)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  pool = np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32)

  def leaf(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(x.shape, x.dtype)
    if name in ("bias", "mean"):
      return np.zeros(x.shape, x.dtype)
    fan_in = max(_prod(x.shape[:-1]), 1)
    return (np.resize(pool, x.shape) / np.float32(math.sqrt(fan_in))).astype(x.dtype, copy=False)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _classification(case: Case, batch: int, size: int, dtype, tiny: bool):
  """(step, state, params, batch, derived) of the classification trainer's step."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from medpeft_jax import models, presets  # noqa: PLC0415
  from medpeft_jax.train import optim  # noqa: PLC0415
  from medpeft_jax.train.step import init_train_state, make_train_step  # noqa: PLC0415

  overrides = presets.TINY_MODELS[models.get_spec(case.model).family] if tiny else {}
  model = models.create_model(case.model, num_classes=3, dtype=dtype, **overrides)
  images = np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  variables = jax.device_put(random_like(shapes))
  method = presets.build_method(case.model, case.method)
  optimizer = optim.OptimizerSpec().build(1e-3, 0, 1000)
  state = init_train_state(method, variables, optimizer, jax.random.PRNGKey(1))
  data = jax.device_put({"image": images, "label": np.arange(batch, dtype=np.int32) % 3})
  step = make_train_step(model, method, optimizer, jit=False)
  return step, state, variables["params"], data, method.derived_state(variables["params"])


def _unet(case: Case, batch: int, size: int, dtype, tiny: bool):
  """(step, state, params, batch, derived) of the text-to-image trainer's step (`train.t2i.make_t2i_step`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from medpeft_jax import presets  # noqa: PLC0415
  from medpeft_jax.diffusion.schedule import NoiseSchedule  # noqa: PLC0415
  from medpeft_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: PLC0415
  from medpeft_jax.train import optim  # noqa: PLC0415
  from medpeft_jax.train.t2i import T2IState, make_t2i_step  # noqa: PLC0415

  config = tiny_unet_config() if tiny else UNetConfig()
  unet = UNet2DConditionModel(config, dtype=dtype)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((batch, size, size, config.in_channels), np.float32)
  text = rng.standard_normal((batch, TEXT_TOKENS, config.cross_attention_dim), np.float32).astype(np.float16)
  shapes = jax.eval_shape(lambda x, c: unet.init(jax.random.key(0), x, jnp.zeros((batch,)), c), latents, text)
  params = jax.device_put(random_like(shapes)["params"])
  method = presets.build_method(presets.UNET, case.method)
  optimizer = optim.OptimizerSpec(kind="constant").build(1e-4)
  trainable = method.init(jax.random.PRNGKey(2), params)
  state = T2IState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), {}, jax.random.PRNGKey(1),
                   method.init_step_state(trainable))
  data = jax.device_put({"latent_mean": latents, "latent_logvar": np.full_like(latents, -2.0), "text": text})
  step, _ = make_t2i_step(unet, method, optimizer, NoiseSchedule(), 0.18215)
  return step, state, params, data, method.derived_state(params)


def measure(name: str, settings: Settings) -> dict:
  """Compiles and times one case in this process; returns its row."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from medpeft_jax.train.programs import xla_memory_estimate  # noqa: PLC0415

  case = CASES[name]
  batch, size = (case.tiny_batch, case.tiny_size) if settings.tiny else (case.batch, case.size)
  build = _unet if case.model == "stable_diffusion_unet" else _classification
  step, state, params, data, derived = build(case, batch, size, jnp.dtype(settings.dtype), settings.tiny)
  trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
  start = time.perf_counter()
  traced = jax.jit(step, donate_argnums=0).trace(state, params, data, derived)
  compiled = traced.lower().compile(TINY_COMPILER_OPTIONS if settings.tiny else None)
  compile_s = time.perf_counter() - start
  by_dtype = step_flops(traced.jaxpr)
  model_flops = sum(by_dtype.values())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
  times = []
  for i in range(settings.warmup + settings.steps):
    begin = time.perf_counter()
    state, metrics = compiled(state, params, data, derived)
    jax.block_until_ready((state, metrics))
    if i >= settings.warmup:
      times.append(time.perf_counter() - begin)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak, peak_note = stated_peak(device.device_kind, settings.peak_tflops)
  row = {
      "case": name, "model": case.model, "method": case.method, "batch": batch,
      "shape": f"{size}x{size} latents" if case.model == "stable_diffusion_unet" else f"{size} px",
      "tiny": settings.tiny, "dtype": settings.dtype, "device": device.device_kind, "backend": jax.default_backend(),
      "jax": jax.__version__, "trainable_params": int(trainable), "compile_s": round(compile_s, 2),
      "steps": settings.steps, "step_s": step_s, "step_s_min": min(times), "img_per_s": batch / step_s,
      "model_flops": model_flops, "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
      "bf16_flop_share": by_dtype.get("bfloat16", 0.0) / model_flops if model_flops else None,
      "attention": "cudnn fused" if any(p.startswith("dot_product_attention_") for p in primitives(traced.jaxpr))
                   else "xla",
      "peak_tflops": peak, "peak_source": peak_note,
      "mfu": model_flops / step_s / (peak * 1e12) if peak else None,
      "loss": float(metrics["loss"]), "loss_dtype": str(metrics["loss"].dtype),
  }
  row["xla_memory_estimate_bytes"] = xla_memory_estimate(compiled)
  if "peak_bytes_in_use" in stats:
    row.update(memory_bytes=int(stats["peak_bytes_in_use"]), memory_source="device peak_bytes_in_use")
  else:
    row.update(memory_bytes=row["xla_memory_estimate_bytes"], memory_source="XLA estimate (compiled.memory_analysis)")
  return row


# ---------------------------------------------------------------------------------------------------------
# The run: cases in order, each row printed and appended as it ends.


def _si(x: float, unit: str) -> str:
  scale, prefix = next(((10.0**e, p) for e, p in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")) if x >= 10.0**e),
                       (1.0, ""))
  return f"{x / scale:.3g} {prefix}{unit}"


def format_row(row: dict) -> str:
  if "skipped" in row or "error" in row:
    return f"{row['case']}: {row.get('skipped') or row.get('error')}"
  mfu = f"{100 * row['mfu']:.1f} % of {row['peak_tflops']:g} TFLOP/s" if row["mfu"] is not None else "n/a"
  xla = _si(row["xla_flops"], "FLOP") if row["xla_flops"] else "n/a"
  return (f"{row['case']} ({row['batch']} x {row['shape']}, {row['dtype']}, attention {row['attention']}): "
          f"{row['img_per_s']:.1f} img/s, step {1e3 * row['step_s']:.1f} ms (median of {row['steps']}), "
          f"model {_si(row['model_flops'], 'FLOP')}/step (XLA {xla}), MFU {mfu}, "
          f"bf16 share {row['bf16_flop_share']:.3f}, memory {row['memory_bytes'] / 2**30:.3g} GiB "
          f"({row['memory_source']}), compile {row['compile_s']:.1f} s, loss {row['loss']:.4g} ({row['loss_dtype']})")


def _isolated(name: str, settings: Settings, seconds: float) -> dict:
  """`measure(name)` in a child process, stopped after `seconds`; a failure becomes an error row."""
  command = [sys.executable, "-m", "benchmarks.accelerator", f"--one={name}", *settings.as_flags()]
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  except subprocess.TimeoutExpired:
    return {"case": name, "error": f"stopped at the time budget after {seconds:.0f} s (--budget_s)"}
  if out.returncode:
    tail = " | ".join(out.stderr.strip().splitlines()[-8:])
    return {"case": name, "error": f"exit status {out.returncode}: {tail}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(cases: list[str], settings: Settings, budget_s: float, out: str | None = None, isolate: bool = True
        ) -> list[dict]:
  """Measures `cases` in order, printing each row and appending it to `out` as it ends; returns the rows
  (skipped and failed cases as rows with a note)."""
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    raise ValueError(f"--cases: unknown {unknown}; the cases are {', '.join(CASES)}.")
  print(f"{'tiny' if settings.tiny else 'full-size'} cases, {settings.dtype} compute, median of {settings.steps} "
        f"steps after {settings.warmup}, budget {budget_s:g} s; stated peaks: "
        + "; ".join(f"{k} {t:g} TFLOP/s ({n})" for k, t, n in PEAKS), flush=True)
  start, longest, rows = time.monotonic(), 0.0, []
  for name in cases:
    left = budget_s - (time.monotonic() - start)
    begin = time.monotonic()
    if left < longest:  # the longest case so far is the estimate of the next
      row = {"case": name, "skipped": f"{left:.0f} s left of --budget_s={budget_s:g}, the longest case so far "
                                      f"took {longest:.0f} s"}
    else:
      row = _isolated(name, settings, left) if isolate else measure(name, settings)
    longest = max(longest, time.monotonic() - begin)
    print(format_row(row), flush=True)
    if out:
      with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    rows.append(row)
  return rows


def _define_flags() -> None:
  """Only when run as a program: importing this module (the tests) defines no global flags."""
  flags.DEFINE_list("cases", list(CASES), "Cases to run, in this order.")
  flags.DEFINE_bool("tiny", False, "Tiny shapes (the CPU tests).")
  flags.DEFINE_integer("steps", Settings.steps, "Timed steps (the median is reported).")
  flags.DEFINE_integer("warmup", Settings.warmup, "Untimed steps after compiling.")
  flags.DEFINE_string("dtype", Settings.dtype, "Compute dtype (parameters and optimizer state stay float32).")
  flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak to state, TFLOP/s (default: `PEAKS` by device).")
  flags.DEFINE_float("budget_s", 270.0, "Seconds for the whole run; a case that does not fit is skipped.")
  flags.DEFINE_string("out", None, "JSON-lines file each row is appended to as soon as it is measured.")
  flags.DEFINE_bool("isolate", True, "Each case in its own process (its own peak memory).")
  flags.DEFINE_string("one", None, "Internal: measure one case in this process and print its row as JSON.")


def main(argv):
  del argv
  f = flags.FLAGS
  settings = Settings(f.tiny, f.steps, f.warmup, f.dtype, f.peak_tflops)
  if f.one:
    print(json.dumps(measure(f.one, settings)))
  else:
    run(f.cases, settings, f.budget_s, f.out, f.isolate)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
