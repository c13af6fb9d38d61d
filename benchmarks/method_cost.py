"""Per-method cost of one jitted train step, relative to full fine-tuning, in one run.

python -m benchmarks.method_cost                        # ViT-B/16, DINOv2-B/14, ResNet-50; batch 8, 224 px
python -m benchmarks.method_cost --models=dinov2_b14 --batch=4 --steps=3

Random full-size weights (no checkpoint needed; the cost does not depend on the values). Time is the
median wall time of `--steps` calls after one warm-up call; memory is XLA's
`compiled.memory_analysis()` (arguments + outputs + temporaries - aliased), which works on CPU.
The target for a ViT (ViT-B/16, DINOv2-B/14): every PEFT method's step at most `TARGET` x full fine-tuning's.
"""

import jax
from absl import app, flags

from benchmarks.common import measure
from medpeft_jax import models

_MODELS = flags.DEFINE_list("models", ["vit_b16", "dinov2_b14", "resnet50"], "Models to measure.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per method.")
_METHODS = flags.DEFINE_list("methods", None, "Methods to measure (default: all for the family; "
                             "`full` is always measured as the reference).")

# Beyond the paper's: every method with dense and conv support (PiSSA, OLoRA and rsLoRA are LoRA with
# another initialisation or scale: LoRA's step).
BEYOND = ["ia3", "vera", "loha", "lokr", "oft", "boft", "fact", "glora", "adalora"]
METHODS = {
    "vit": ["full", "linear", "bias", "norm", "attention", "lora", "dora", "ssf", "adaptformer", "vpt", *BEYOND],
    "resnet": ["full", "linear", "bias", "norm", "ssf", "tsa", "lora", "dora", *BEYOND],
    "mobilenet_v2": ["full", "linear", "bias", "norm", "ssf", "tsa", "lora"],
    "convnext": ["full", "linear", "bias", "norm", "ssf", "tsa", "lora", "dora", "adaptformer"],
}
TARGET = 0.75  # a PEFT step's time / full fine-tuning's, at most (the ViT target)


def main(argv):
  del argv
  print(f"jax {jax.__version__}, {jax.devices()[0].platform} x {jax.device_count()}, "
        f"batch {_BATCH.value}, {_SIZE.value} px, median of {_STEPS.value} steps")
  for model_name in _MODELS.value:
    rows = {}
    names = METHODS[models.get_spec(model_name).family]
    if _METHODS.value:
      names = ["full"] + [n for n in _METHODS.value if n != "full"]
    for method_name in names:
      rows[method_name] = measure(model_name, method_name, _BATCH.value, _SIZE.value, _STEPS.value)
      r = rows[method_name]
      print(f"  {model_name} {method_name}: {r['step_s']:.3f} s, {r['memory'] / 2**20:.0f} MiB, "
            f"compiled in {r['compile_s']:.1f} s", flush=True)
    full = rows["full"]
    print(f"\n{model_name}\n| method | trainable | step time (s) | x full | memory (MiB) | x full |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
      print(f"| {name} | {r['trainable']:,} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} | "
            f"{r['memory'] / 2**20:.0f} | {r['memory'] / full['memory']:.2f} |")
    slow = [name for name, r in rows.items() if name != "full" and r["step_s"] > TARGET * full["step_s"]]
    print(f"\nSteps over {TARGET}x full fine-tuning's: {', '.join(slow) or 'none'}\n")


if __name__ == "__main__":
  app.run(main)
