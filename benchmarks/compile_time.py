"""Train-step compile time against XLA flags, with the step time each flag set gives, in one run.

python -m benchmarks.compile_time       # the cases and flag sets below, median of 3 steps
python -m benchmarks.compile_time --cases=mobilenet_v2:full:64:32 --flag_sets=default,no_expensive_llvm

A flag set may cut compile time only if it does not slow the step (the performance issue's rule). Each
(case, flag set) runs in a fresh process (XLA reads XLA_FLAGS once, at start-up) with the persistent
compilation cache off, so every compile is a real one. Times: `lower` (tracing + StableHLO), `compile`
(XLA: HLO passes + LLVM code generation), and the median step; ratios are against `default`.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

FLAG_SETS = {
    "default": "",
    "fast_compile": "--xla_cpu_opt_preset=FAST_COMPILE",
    "no_expensive_llvm": "--xla_llvm_disable_expensive_passes=true",
    "backend_opt_1": "--xla_backend_optimization_level=1",
    "backend_opt_0": "--xla_backend_optimization_level=0",
    # Not a compile-time flag: convolutions through XLA's own emitter instead of YNNPACK (this jaxlib's default).
    "no_ynn_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
}
_CASES = flags.DEFINE_list("cases", ["mobilenet_v2:full:64:32", "mobilenet_v2:lora:64:32", "vit_b16:lora:224:8",
                                     "resnet50:full:224:8"], "model:method:size:batch (the first two: the main job's).")
_FLAG_SETS = flags.DEFINE_list("flag_sets", list(FLAG_SETS), f"Names from {list(FLAG_SETS)}.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
_ONE = flags.DEFINE_string("one", None, "Internal: measure one case in this process.")


def _measure_one(case: str, steps: int) -> dict:
  from benchmarks.common import measure  # noqa: PLC0415  (jax only in the subprocesses)

  model_name, method, size, batch = case.split(":")
  return measure(model_name, method, int(batch), int(size), steps)


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(_measure_one(_ONE.value, _STEPS.value)))
    return
  unknown = sorted(set(_FLAG_SETS.value) - set(FLAG_SETS))
  if unknown:
    raise app.UsageError(f"Unknown flag sets {unknown}; known: {list(FLAG_SETS)}.")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
  print(f"{os.cpu_count()} CPU cores, median of {_STEPS.value} steps, no persistent compilation cache")
  rows = {}
  for case in _CASES.value:
    for name in _FLAG_SETS.value:
      out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", f"--one={case}", f"--steps={_STEPS.value}"],
                           capture_output=True, text=True, env={**env, "XLA_FLAGS": FLAG_SETS[name]})
      if out.returncode:
        print(f"  {case} {name}: failed\n{out.stderr[-2000:]}", flush=True)
        continue
      r = rows[(case, name)] = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"  {case} {name}: lower {r['lower_s']:.1f} s, compile {r['compile_s'] - r['lower_s']:.1f} s, "
            f"step {r['step_s']:.3f} s", flush=True)
  print("\n| case | flags | lower (s) | XLA compile (s) | compile / default | step (s) | step / default |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for (case, name), r in rows.items():
    base = rows.get((case, "default"))
    xla = r["compile_s"] - r["lower_s"]
    ratios = (f"{xla / (base['compile_s'] - base['lower_s']):.2f} | {r['step_s']:.3f} | "
              f"{r['step_s'] / base['step_s']:.2f}") if base else f"- | {r['step_s']:.3f} | -"
    print(f"| {case} | {name} | {r['lower_s']:.1f} | {xla:.1f} | {ratios} |")


if __name__ == "__main__":
  app.run(main)
