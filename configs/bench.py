"""A benchmark sweep: models x methods x datasets x regimes x seeds (see medpeft_jax/bench/runner.py).

python -m launch.bench \\
    --config configs/bench.py:models=vit_b16,methods=full+lora,datasets=ham10000,regimes=0.1+1.0,seeds=0+1+2 \\
    --config.weights.vit_b16=/ckpt/vit-base-patch16-224-in21k --config.manual_dirs.ham10000=/data/ham10000 \\
    --config.lr.lora=1e-3 --config.dataset_options.ham10000.max_side=256 --workdir runs/sweep

Arguments: models, methods, datasets, regimes, seeds (lists joined with +), smoke (tiny models, 32 px,
a few steps: CPU tests), plugins (your modules to import first, joined with +). Fields, listed for every registered model, dataset and method so that each
is settable from the command line: `weights.<model>` and `manual_dirs.<dataset>` (paths; "": none),
`dataset_options.<dataset>.<option>` (max_side, on_bad_image, label_set, ...; the dataset's defaults),
`lr.<method>` (> 0 fixes a method's learning rate: no search; 0.0: search), `lr_search` (grids per
method, seed, step budget), `runs_together` (train seeds / LR candidates as one program), `run` (the per-run training config of configs/classify.py:
--config.run.batch_size=...), `report` (metric, ties, combine_models, bootstrap). Read the "unset"
values with medpeft_jax.config_checks (fixed_lr, dataset_options). The paper's experiments:
configs/paper_table2.py, paper_table3.py, paper_fig1.py; the embedded main job: configs/embedded.py.
"""

import ml_collections

from configs import classify
from medpeft_jax import data, peft, presets
from medpeft_jax import plugins as plugins_module
from medpeft_jax.config_args import parse_arg
from medpeft_jax.config_checks import dataset_options_section
from medpeft_jax.models import MODELS


def sweep(models, methods, datasets, regimes, seeds, smoke=False, plugins="") -> ml_collections.ConfigDict:
  plugins_module.load(plugins)  # what they register gets its sections below
  c = ml_collections.ConfigDict()
  c.models, c.methods, c.datasets = tuple(models), tuple(methods), tuple(datasets)
  c.regimes, c.seeds, c.smoke = tuple(float(r) for r in regimes), tuple(int(s) for s in seeds), smoke
  all_models = dict.fromkeys([*MODELS.names(), *c.models])
  all_datasets = dict.fromkeys([*data.DATASETS.names(), *c.datasets])
  c.weights = {m: "" for m in all_models}  # model -> checkpoint path ("": none)
  c.manual_dirs = {d: "" for d in all_datasets}  # dataset -> downloaded folder
  c.dataset_options = {d: dataset_options_section(d) for d in all_datasets if d in data.DATASETS}
  # method -> fixed learning rate (skips the search); 0.0: searched
  c.lr = {m: 0.0 for m in dict.fromkeys([*peft.METHODS.names(), *presets.VARIANTS, *c.methods])}
  # The search budget: every candidate trains once on the largest regime with this seed.
  c.lr_search = ml_collections.ConfigDict({
      "grid": dict(presets.LR_GRIDS),  # per method; "default" for the rest (medpeft_jax/presets.py)
      "seed": 0, "total_steps": 0, "regime": 0.0})  # 0: the runs' own schedule; 0.0: the largest regime
  c.run = classify.get_config(f"smoke={smoke},plugins={plugins}")
  # Runs that differ only in seed (a regime's seeds) or learning rate (the search) train as one vmapped
  # program (medpeft_jax/train/runs.py), each with its own record; pays where one run under-uses the device.
  c.runs_together = False
  c.report = ml_collections.ConfigDict({"metric": "f1_macro", "ties": "average", "combine_models": False,
                                        "bootstrap": 0})
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, models=("mobilenet_v2",), methods=("full", "lora"), datasets=("br35h",), regimes=(1.0,),
                seeds=(0,), smoke=False, plugins="")
  return sweep(a.models, a.methods, a.datasets, a.regimes, a.seeds, a.smoke, a.plugins)
