"""Evaluates a trained adapter on a split of its dataset and writes the metrics as JSON.

python -m launch.evaluate --adapter runs/x/best_adapter --split test --out runs/x/test_metrics.json
  [--weights /ckpt/vit-base-patch16-224-in21k] [--data_dir ...] [--manual_dir ...]
"""

from absl import app, flags

from medpeft_jax.train import adapters_io, logs

_ADAPTER = flags.DEFINE_string("adapter", None, "Adapter folder written by launch.train.", required=True)
_SPLIT = flags.DEFINE_string("split", "test", "train, validation or test.")
_OUT = flags.DEFINE_string("out", None, "Where to write the metrics JSON (default: print only).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Base checkpoint (default: the one the run used).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built-datasets folder (default: the run's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Downloaded dataset folder (default: the run's).")


def main(argv):
  del argv
  metrics = adapters_io.evaluate_adapter(_ADAPTER.value, _SPLIT.value, weights=_WEIGHTS.value,
                                         data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value)
  logs.print_json(metrics, _OUT.value)


if __name__ == "__main__":
  app.run(main)
