"""The paper's Fig. 1: HAM10000 data regimes, ViT-B and ViT-L, Full vs BitFit vs LoRA, 3 seeds.

python -m launch.bench --config configs/paper_fig1.py:vit_b16=/ckpt/vit-base-patch16-224-in21k,vit_l16=/ckpt/vit-large-patch16-224-in21k,data_root=/data \\
    --workdir runs/fig1
python -m launch.report --results runs/fig1/results.jsonl --out runs/fig1/report   # regimes_*.png: Fig. 1

Regimes 1, 5, 10, 20, 30, 50, 80 and 100 % of the training split (nested, stratified). Paper: PEFT
beats full fine-tuning at low data, full catches up at high data (the crossings are marked).
"""

import ml_collections

from configs import bench, paper_table2
from medpeft_jax.config_args import parse_arg
from medpeft_jax.data.regimes import PAPER_REGIMES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, vit_b16="", vit_l16="", data_root="~/medical_data", seeds=(0, 1, 2))
  c = bench.sweep(["vit_b16", "vit_l16"], ["full", "bias", "lora"], ["ham10000"], PAPER_REGIMES, a.seeds)
  c.weights.vit_b16, c.weights.vit_l16 = a.vit_b16, a.vit_l16
  return paper_table2.paper_run(c, a.data_root)
