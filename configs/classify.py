"""One classifier fine-tuned with one PEFT method (the trainer issue extends this config).

python -m launch.params --config configs/classify.py:model=vit_b16,method=lora,num_classes=3
  -> trainable params: 592,131 || all params: 86,390,787 || trainable%: 0.6854

Method hyperparameters default to the paper's settings for the model's family
(medpeft_jax/presets.py) and can be overridden, e.g. `--config.peft.rank=8`.
"""

import ml_collections

from medpeft_jax import presets
from medpeft_jax.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  arg = parse_arg(arg, model="vit_b16", method="lora", num_classes=3, image_size=0)
  config = ml_collections.ConfigDict()
  config.model = arg.model
  config.method = arg.method
  config.num_classes = arg.num_classes
  config.image_size = arg.image_size or None  # 0: the model's pre-training resolution
  config.peft = presets.preset(arg.model, arg.method)
  return config
