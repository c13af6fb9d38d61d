"""Trains and evaluates one classifier (see configs/classify.py for the options).

python -m launch.train --config configs/classify.py:model=vit_b16,method=lora,dataset=ham10000,regime=0.1 \\
    --config.weights=/ckpt/vit-base-patch16-224-in21k --config.manual_dir=/data/ham10000 --workdir runs/x

Re-running the same command resumes from the last checkpoint in --workdir.
"""

import json

import jax
from absl import app, flags

from medpeft_jax import config_args
from medpeft_jax.train import trainer

_CONFIG = config_args.define_config_file("config", "Config file and argument.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")


def main(argv):
  del argv
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps({k: results[k] for k in ("model", "method", "dataset", "regime", "seed", "best_step")}
                     | {"test_" + k: results["test"][k] for k in ("f1_macro", "accuracy", "auc")}))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
