"""Fine-tunes the Stable Diffusion U-Net with one strategy (see configs/t2i.py for the options).

python -m launch.train_t2i --config configs/t2i.py:method=lora,dataset=mimic_cxr,regime=0.1 \\
    --config.pipeline=/ckpt/stable-diffusion-v1-5 --config.manual_dir=/data/mimic-cxr-jpg --workdir runs/t2i_lora

Re-running the same command resumes from the last checkpoint in --workdir. Sample from the result with
`python -m launch.generate --pipeline ... --adapter runs/t2i_lora/adapter`.
"""

import jax
from absl import app, flags

from medpeft_jax import config_args
from medpeft_jax.train import logs, t2i

_CONFIG = config_args.define_config_file("config", "Config file and argument.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, the adapter and results go here.", required=True)


def main(argv):
  del argv
  results = t2i.train_t2i(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    logs.print_json({k: results[k] for k in ("method", "dataset", "regime", "seed", "lr", "steps", "probe_loss_start",
                                             "probe_loss_end", "trainable_params")})


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
