"""A benchmark sweep: models x methods x datasets x regimes x seeds (see medpeft_jax/bench/runner.py).

python -m launch.bench --config configs/bench.py:models=vit_b16,methods=full+lora,datasets=ham10000,regimes=0.1+1.0,seeds=0+1+2 \\
    --config.weights.vit_b16=/ckpt/vit-base-patch16-224-in21k --config.manual_dirs.ham10000=/data/ham10000 \\
    --workdir runs/sweep

Arguments: models, methods, datasets, regimes, seeds (lists joined with +), smoke (tiny models, 32 px,
a few steps: CPU tests). Fields: `weights.<model>` and `manual_dirs.<dataset>` (paths),
`dataset_options.<dataset>`, `lr.<method>` (fixes a method's learning rate: no search),
`lr_search` (grids per method, seed, step budget), `run` (the per-run training config of
configs/classify.py: --config.run.batch_size=...), `report` (metric, ties, combine_models, bootstrap).
The paper's experiments: configs/paper_table2.py, paper_table3.py, paper_fig1.py; the embedded
main job: configs/embedded.py.
"""

import ml_collections

from configs import classify
from medpeft_jax.config_args import parse_arg


def sweep(models, methods, datasets, regimes, seeds, smoke=False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models, c.methods, c.datasets = tuple(models), tuple(methods), tuple(datasets)
  c.regimes, c.seeds, c.smoke = tuple(float(r) for r in regimes), tuple(int(s) for s in seeds), smoke
  c.weights = ml_collections.ConfigDict()  # model -> checkpoint path (empty: random initialisation)
  c.manual_dirs = ml_collections.ConfigDict()  # dataset -> downloaded folder
  c.dataset_options = ml_collections.ConfigDict()  # dataset -> {label_set, max_side, ...}
  c.lr = ml_collections.ConfigDict()  # method -> fixed learning rate (skips the search)
  # The search budget: every candidate trains once on the largest regime with this seed.
  c.lr_search = ml_collections.ConfigDict({
      "grid": {"full": (3e-5, 1e-4, 3e-4), "scratch": (3e-4, 1e-3, 3e-3), "linear": (1e-3, 3e-3, 1e-2),
               "default": (3e-4, 1e-3, 3e-3)},
      "seed": 0, "total_steps": 0})  # 0: the runs' own schedule
  c.run = classify.get_config(f"smoke={smoke}")
  c.report = ml_collections.ConfigDict({"metric": "f1_macro", "ties": "average", "combine_models": False,
                                        "bootstrap": 0})
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, models=("mobilenet_v2",), methods=("full", "lora"), datasets=("br35h",), regimes=(1.0,),
                seeds=(0,), smoke=False)
  return sweep(a.models, a.methods, a.datasets, a.regimes, a.seeds, a.smoke)
