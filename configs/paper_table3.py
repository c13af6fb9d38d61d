"""The paper's Table 3: ViT-B/16, L/16, H/14 (ImageNet-21k) x 5 datasets x 8 methods.

python -m launch.bench --config configs/paper_table3.py:vit_b16=/ckpt/vit-base-patch16-224-in21k,vit_l16=/ckpt/vit-large-patch16-224-in21k,vit_h14=/ckpt/vit-huge-patch14-224-in21k,data_root=/data \\
    --workdir runs/table3
python -m launch.report --results runs/table3/results.jsonl --ties average --combine-models --out runs/table3/report

Methods: full, linear, attention, bias (BitFit), norm (LayerNorm), lora (r16 q,v), ssf, adaptformer
(bottleneck 6); settings from medpeft_jax/presets.py. ViT-L/H at batch 512 need several devices or
`--config.run.grad_accum=8 --config.run.remat=True`. Paper: LoRA and BitFit rank best among PEFT
methods on ViTs; the Combined Average Rank row is over all (model, dataset) rows.
"""

import ml_collections

from configs import bench, paper_table2
from medpeft_jax.config_args import parse_arg

MODELS = ("vit_b16", "vit_l16", "vit_h14")
METHODS = ("full", "linear", "attention", "bias", "norm", "lora", "ssf", "adaptformer")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, vit_b16="", vit_l16="", vit_h14="", data_root="~/medical_data", seeds=(0,))
  c = bench.sweep(MODELS, METHODS, paper_table2.DATASETS, [1.0], a.seeds)
  for model in MODELS:
    c.weights[model] = a[model]
  c.report.ties, c.report.combine_models = "average", True  # the paper's ViT table
  return paper_table2.paper_run(c, a.data_root)
