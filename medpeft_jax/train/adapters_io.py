"""Using a trained adapter folder: evaluate it on a dataset split, or export merged plain weights.

An adapter folder written by the trainer holds the run's config, so the base model, its input size
and the dataset are rebuilt from it; `weights`, `data_dir` and `manual_dir` override its paths
(e.g. on another machine).
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from medpeft_jax import data, models, peft
from medpeft_jax.peft.core import flatten
from medpeft_jax.train import sharding
from medpeft_jax.train.trainer import build_model, evaluate_split, make_predict


def _restore(adapter_dir, weights: str | None):
  adapter = peft.load_adapter(adapter_dir)
  if "config" not in adapter.config:
    raise ValueError(f"{adapter_dir} has no training config (not written by the trainer); "
                     "apply it with medpeft_jax.peft.load_adapter and your own model instead.")
  config = ml_collections.ConfigDict(adapter.config["config"])
  if weights is not None:
    config.weights = weights
  num_classes = adapter.peft["params"]["head/kernel"].shape[-1]
  model, variables = build_model(config, num_classes)
  return adapter, config, model, variables


def evaluate_adapter(adapter_dir, split: str = "test", *, weights: str | None = None,
                     data_dir: str | None = None, manual_dir: str | None = None,
                     batch_size: int | None = None) -> dict:
  """Classification metrics of a trained adapter on `split` of its dataset."""
  adapter, config, model, variables = _restore(adapter_dir, weights)
  builder = data.load(config.dataset, data_dir=data_dir or config.data_dir,
                      manual_dir=manual_dir or config.manual_dir or None, **dict(config.dataset_options))
  spec = models.get_spec(config.model)
  return evaluate_split(make_predict(model, adapter.method), adapter.peft, variables["params"],
                        adapter.batch_stats or variables.get("batch_stats", {}), data.Split(builder, split),
                        image_size=config.image_size or spec.image_size, spec=spec,
                        batch_size=batch_size or config.eval_batch_size or config.batch_size, workers=0,
                        mesh=sharding.make_mesh())


def export_merged(adapter_dir, out, *, weights: str | None = None) -> dict:
  """Writes the adapter merged into its base as one safetensors file of our parameter names.

  Tensors are named `params/<path>` and `batch_stats/<path>`; a `<out>.json` beside it records the
  model, its overrides and the classes. Methods that cannot fold (AdaptFormer, VPT) raise MergeError.
  """
  adapter, config, model, variables = _restore(adapter_dir, weights)
  merged = {"params": adapter.method.merge(variables["params"], adapter.peft)}
  stats = adapter.batch_stats or variables.get("batch_stats")
  if stats:
    merged["batch_stats"] = stats
  tensors = {f"{collection}/{path}": np.ascontiguousarray(jax.device_get(v))
             for collection, tree in merged.items() for path, v in flatten(tree).items()}
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, out)
  meta = {"model": config.model, "model_overrides": config.model_overrides.to_dict(),
          "image_size": config.image_size or models.get_spec(config.model).image_size,
          "num_classes": int(adapter.peft["params"]["head/kernel"].shape[-1]),
          "merged_from": str(adapter_dir), "method": adapter.method.name}
  out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
  return meta
