"""The paper's Table 2: ResNet-50 (ImageNet-1k) x 5 datasets x 6 methods, full training data.

python -m launch.bench --config configs/paper_table2.py:weights=/ckpt/resnet50-0676ba61.pth,data_root=/data \\
    --workdir runs/table2
python -m launch.report --results runs/table2/results.jsonl --ties dense --out runs/table2/report

`data_root` holds one downloaded folder per dataset: busi, fitzpatrick17k, ham10000, smdg,
rsna_pneumonia (layouts: medpeft_jax/data/builders). Recipe (paper_protocol.md): AdamW, batch 512,
30 epochs, warmup + cosine, weight decay 1e-4, 224 px, learning rate searched per method on
validation (configs/bench.py grids). Paper (macro-F1 not stated; its ranks): TSA and BN tuning
lead among PEFT methods; Full 23.5M, TSA 10.6M, BN 59.1K, Bias 32.7K, SSF 60.6K trainable.
"""

import ml_collections

from configs import bench
from medpeft_jax.config_args import parse_arg

DATASETS = ("busi", "fitzpatrick17k", "ham10000", "smdg", "rsna_pneumonia")
METHODS = ("full", "linear", "tsa", "norm", "bias", "ssf")


def paper_run(c: ml_collections.ConfigDict, data_root: str) -> ml_collections.ConfigDict:
  """The paper's recipe, shared by the paper configs."""
  for dataset in c.datasets:
    c.manual_dirs[dataset] = f"{data_root}/{dataset}"
  c.run.batch_size, c.run.epochs, c.run.weight_decay, c.run.image_size = 512, 30, 1e-4, 224
  c.run.workers = 4
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, weights="", data_root="~/medical_data", seeds=(0,))
  c = bench.sweep(["resnet50"], METHODS, DATASETS, [1.0], a.seeds)
  c.weights["resnet50"] = a.weights
  c.report.ties = "dense"  # the paper's ResNet table uses dense ranks
  return paper_run(c, a.data_root)
