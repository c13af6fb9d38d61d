"""Prints a model + method's parameter counts at full size, in Hugging Face PEFT's format.

python -m launch.params --config configs/classify.py:model=vit_b16,method=lora,num_classes=3
"""

from absl import app, flags

from medpeft_jax import config_args, presets

_CONFIG = config_args.define_config_file("config", "Config file and argument.")


def main(argv):
  del argv
  c = _CONFIG.value
  method = presets.build_method(c.model, c.method, **c.peft)
  print(presets.count_parameters(c.model, method, c.num_classes, c.image_size))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
