"""Train-step time and memory, ours (JAX) against PyTorch + Hugging Face peft, side by side in one run.

python -m benchmarks.step_time                 # the four cases below, batch 8, 224 px, median of 5 steps
python -m benchmarks.step_time --steps=10 --cases=vit_b16:lora,resnet50:full

Cases: ViT-B/16 LoRA r16 on query/value and full fine-tuning; ResNet-50 full fine-tuning and
BatchNorm tuning; 3 classes; AdamW; random weights (time does not depend on the values). Each
measurement runs in its own subprocess, so the peak resident memory (ru_maxrss) is its own; XLA's
`compiled.memory_analysis()` is given for ours. PyTorch uses transformers' ViTForImageClassification
+ peft's LoraConfig and torchvision's resnet50, with torch.set_num_threads(os.cpu_count()).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

_CASES = flags.DEFINE_list("cases", ["vit_b16:lora", "vit_b16:full", "resnet50:full", "resnet50:norm"],
                           "model:method pairs.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after 2 warm-up steps.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_ONE = flags.DEFINE_string("one", None, "Internal: run one measurement, framework:model:method.")


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time(step, steps: int) -> float:
  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_jax(model_name: str, method: str, batch: int, steps: int) -> dict:
  from benchmarks.common import measure  # noqa: PLC0415  (jax only in the jax subprocesses)

  r = measure(model_name, method, batch, 224, steps)
  return {"step_s": r["step_s"], "xla_memory": r["memory"], "trainable": r["trainable"], "compile_s": r["compile_s"]}


def run_torch(model_name: str, method: str, batch: int, steps: int) -> dict:
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  if model_name == "vit_b16":
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3))
    if method == "lora":
      lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["classifier"])
      model = peft.get_peft_model(model, lora)
  else:
    import torchvision  # noqa: PLC0415

    model = torchvision.models.resnet50(num_classes=3)
    if method == "norm":
      for name, p in model.named_parameters():
        p.requires_grad = ".bn" in name or name.startswith(("bn1", "fc")) or ".downsample.1" in name
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-3)
  x, y = torch.randn(batch, 3, 224, 224), torch.arange(batch) % 3

  def step():
    out = model(x)
    loss = torch.nn.functional.cross_entropy(getattr(out, "logits", out), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return {"step_s": _time(step, steps), "trainable": sum(p.numel() for p in params)}


def main(argv):
  del argv
  if _ONE.value:
    framework, model_name, method = _ONE.value.split(":")
    run = run_jax if framework == "jax" else run_torch
    result = run(model_name, method, _BATCH.value, _STEPS.value)
    print(json.dumps({**result, "peak_rss": _peak_rss()}))
    return
  print(f"batch {_BATCH.value}, 224 px, median of {_STEPS.value} steps, {os.cpu_count()} CPU cores")
  rows = {}
  for case in _CASES.value:
    for framework in ("jax", "torch"):
      out = subprocess.run([sys.executable, "-m", "benchmarks.step_time", f"--one={framework}:{case}",
                            f"--steps={_STEPS.value}", f"--batch={_BATCH.value}"],
                           capture_output=True, text=True, check=True)
      rows[(case, framework)] = json.loads(out.stdout.strip().splitlines()[-1])
      r = rows[(case, framework)]
      print(f"  {case} {framework}: {r['step_s']:.3f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB",
            flush=True)
  print("\n| case | trainable | ours (s) | PyTorch (s) | ours / PyTorch | ours / our full | our compile (s) "
        "| XLA memory (MiB) | peak RSS ours / PyTorch (MiB) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for case in _CASES.value:
    ours, ref = rows[(case, "jax")], rows[(case, "torch")]
    full = rows.get((case.split(":")[0] + ":full", "jax"))
    vs_full = f"{ours['step_s'] / full['step_s']:.2f}" if full else "-"
    print(f"| {case} | {ours['trainable']:,} | {ours['step_s']:.3f} | {ref['step_s']:.3f} | "
          f"{ours['step_s'] / ref['step_s']:.2f} | {vs_full} | {ours['compile_s']:.1f} | {ours['xla_memory'] / 2**20:.0f} | "
          f"{ours['peak_rss'] / 2**20:.0f} / {ref['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
  app.run(main)
