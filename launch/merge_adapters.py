"""Combines LoRA/DoRA adapter folders into one adapter folder (Hugging Face PEFT's `add_weighted_adapter`).

python -m launch.merge_adapters --adapters runs/a/best_adapter,runs/b/best_adapter --weights 0.5,0.5 \
  --combination ties --density 0.5 --out runs/ab_ties
  [--svd_rank 8] [--svd_clamp 0.99] [--majority_sign_method total] [--seed 0] [--params_from 0]
  [--base_weights ...]

The output is a normal adapter folder (`medpeft_jax.peft.load_adapter`, `launch.evaluate`, `launch.export`);
formulas and combinations: medpeft_jax/peft/arithmetic.py. DoRA and PiSSA adapters need the base model, which
is rebuilt from the first adapter's run config (`--base_weights` overrides its checkpoint path).
"""

import json

from absl import app, flags

from medpeft_jax import peft
from medpeft_jax.train import adapters_io, trainer

_ADAPTERS = flags.DEFINE_list("adapters", None, "Adapter folders to combine.", required=True)
_WEIGHTS = flags.DEFINE_list("weights", None, "One weight per adapter (may be negative).", required=True)
_COMBINATION = flags.DEFINE_enum("combination", "svd", peft.COMBINATIONS, "How to combine (peft's names).")
_OUT = flags.DEFINE_string("out", None, "The adapter folder to write.", required=True)
_DENSITY = flags.DEFINE_float("density", None, "Fraction kept by ties, dare_* and magnitude_prune kinds.")
_SVD_RANK = flags.DEFINE_integer("svd_rank", None, "Rank of *svd kinds (default: the largest source rank).")
_SVD_CLAMP = flags.DEFINE_float("svd_clamp", None, "Quantile at which *svd kinds clamp their factors.")
_SIGN = flags.DEFINE_enum("majority_sign_method", "total", ["total", "frequency"], "TIES sign election.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of DARE's random masks.")
_PARAMS_FROM = flags.DEFINE_integer("params_from", None, "Index of the adapter whose head (and other trained "
                                    "base leaves, BatchNorm statistics) the result keeps.")
_BASE_WEIGHTS = flags.DEFINE_string("base_weights", None, "Base checkpoint for DoRA/PiSSA sources (default: "
                                    "the one the first adapter's run used).")


def main(argv):
  del argv
  if len(_WEIGHTS.value) != len(_ADAPTERS.value):
    raise app.UsageError(f"--weights has {len(_WEIGHTS.value)} values for {len(_ADAPTERS.value)} --adapters.")
  adapters = [peft.load_adapter(path) for path in _ADAPTERS.value]
  params = None
  if any(isinstance(a.method, peft.lora.DoRA) or getattr(a.method, "init_weights", "") == "pissa"
         for a in adapters):
    config = adapters_io.run_config(adapters[0])
    if _BASE_WEIGHTS.value:
      config.weights = _BASE_WEIGHTS.value
    params = trainer.build_model(config, adapters[0].num_classes)[1]["params"]
  merged = peft.combine_adapters(
      adapters, [float(w) for w in _WEIGHTS.value], _COMBINATION.value, names=_ADAPTERS.value, params=params,
      svd_rank=_SVD_RANK.value, svd_clamp=_SVD_CLAMP.value, density=_DENSITY.value,
      majority_sign_method=_SIGN.value, rng=_SEED.value, params_from=_PARAMS_FROM.value)
  if _COMBINATION.value.startswith("dare"):
    merged.config["merged_from"]["seed"] = _SEED.value
  size = merged.save(_OUT.value)
  print(json.dumps({"out": _OUT.value, "method": merged.method.name, "rank": merged.method.rank,
                    "bytes": size, **merged.config["merged_from"]}, indent=2))


if __name__ == "__main__":
  app.run(main)
