"""Merges a trained adapter into its base model and writes plain weights (safetensors + JSON).

python -m launch.export --adapter runs/x/best_adapter --out runs/x/merged.safetensors [--weights ...]
"""

import json

from absl import app, flags

from medpeft_jax.train import adapters_io

_ADAPTER = flags.DEFINE_string("adapter", None, "Adapter folder written by launch.train.", required=True)
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Base checkpoint (default: the one the run used).")


def main(argv):
  del argv
  print(json.dumps(adapters_io.export_merged(_ADAPTER.value, _OUT.value, weights=_WEIGHTS.value), indent=2))


if __name__ == "__main__":
  app.run(main)
