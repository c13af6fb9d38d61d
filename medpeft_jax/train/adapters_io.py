"""Using a trained adapter folder: evaluate it on a dataset split, export merged plain weights, predict.

An adapter folder written by the trainer holds the run's config, its class names and preprocessing,
so the base model, its input size and the dataset are rebuilt from it; `weights`, `data_dir` and
`manual_dir` override its paths (e.g. on another machine). The data's class names must equal the
adapter's, in order, or nothing is evaluated.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from medpeft_jax import config_checks, data, models, peft, plugins, presets
from medpeft_jax.data.builders.base import IMAGE_SUFFIXES, read_image
from medpeft_jax.data.transforms import normalize, resize_center_crop
from medpeft_jax.fileio import read_json, read_safetensors
from medpeft_jax.peft.core import flatten, unflatten
from medpeft_jax.train import logs, sharding
from medpeft_jax.train.trainer import build_model, evaluate_split, make_predict


def run_config(adapter: peft.Adapter) -> ml_collections.ConfigDict:
  """The training config stored with the adapter (older adapters: `scratch` read as `full` from random)."""
  if "config" not in adapter.config:
    raise ValueError(f"{adapter} has no training config (not written by the trainer); apply it with "
                     "medpeft_jax.peft.load_adapter and your own model instead.")
  config = ml_collections.ConfigDict(adapter.config["config"])
  if "init" not in config:
    run = presets.variant(config.method)
    config.method, config.init = run["method"], run["init"] if config.weights else "random"
  plugins.load(config.get("plugins", ""))
  return config


def _restore(adapter_dir, weights: str | None):
  adapter = peft.load_adapter(adapter_dir)
  config = run_config(adapter)
  if weights is not None:
    config.weights = weights
  peft.adapters.check_adapter(adapter, base_model=config.model)
  model, variables = build_model(config, adapter.num_classes)
  return adapter, config, model, variables


def evaluate_adapter(adapter_dir, split: str = "test", *, weights: str | None = None,
                     data_dir: str | None = None, manual_dir: str | None = None,
                     batch_size: int | None = None) -> dict:
  """Classification metrics of a trained adapter on `split` of its dataset (the classes must match)."""
  adapter, config, model, variables = _restore(adapter_dir, weights)
  builder = data.load(config.dataset, data_dir=data_dir or config.data_dir,
                      manual_dir=manual_dir or config.manual_dir or None,
                      **config_checks.set_options(config.dataset, config.dataset_options))
  target = data.Split(builder, split)
  peft.adapters.check_adapter(adapter, class_names=target.class_names)
  spec = models.get_spec(config.model)
  pre = adapter.preprocessing or {"image_size": config.image_size or spec.image_size, "mean": spec.mean,
                                   "std": spec.std}
  return evaluate_split(make_predict(model, adapter.method), adapter.trainable, variables["params"],
                        adapter.batch_stats or variables.get("batch_stats", {}), target,
                        image_size=pre["image_size"], mean=pre["mean"], std=pre["std"],
                        batch_size=batch_size or config.eval_batch_size or config.batch_size, workers=0,
                        mesh=sharding.make_mesh())


def export_merged(adapter_dir, out, *, weights: str | None = None) -> dict:
  """Writes the adapter merged into its base as one safetensors file of our parameter names.

  Tensors are named `params/<path>` and `batch_stats/<path>`; a `<out>.json` beside it records the
  model, its overrides, the class names and the preprocessing. Methods that cannot fold (AdaptFormer,
  VPT) raise MergeError; a non-finite merge is refused before anything is written.
  """
  adapter, config, model, variables = _restore(adapter_dir, weights)
  merged = {"params": adapter.method.merge(variables["params"], adapter.trainable)}
  stats = adapter.batch_stats or variables.get("batch_stats")
  if stats:
    merged["batch_stats"] = stats
  tensors = {f"{collection}/{path}": np.ascontiguousarray(jax.device_get(v))
             for collection, tree in merged.items() for path, v in flatten(tree).items()}
  bad = [name for name, v in tensors.items() if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(f"Merging {adapter} gives non-finite weights ({bad[:3]}); nothing was written to {out}.")
  spec = models.get_spec(config.model)
  meta = {"model": config.model, "model_overrides": config.model_overrides.to_dict(),
          "image_size": config.image_size or spec.image_size, "num_classes": adapter.num_classes,
          "class_names": list(adapter.class_names) if adapter.class_names else None,
          "preprocessing": adapter.preprocessing or {"image_size": config.image_size or spec.image_size,
                                                     "mean": list(spec.mean), "std": list(spec.std)},
          "merged_from": str(adapter_dir), "method": adapter.method.name, "plugins": config.get("plugins", "")}
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp")
  safetensors.numpy.save_file(tensors, tmp)
  tmp.replace(out)
  logs.write_json(out.with_suffix(".json"), meta)
  return meta


def load_merged(path) -> tuple:
  """A merged export (`export_merged`): `(model, variables, meta)`; the JSON beside it says what it is."""
  path = pathlib.Path(path)
  meta_file = path.with_suffix(".json")
  if not path.is_file() or not meta_file.is_file():
    raise FileNotFoundError(f"{path} is not a merged export: expected it and {meta_file.name} beside it "
                            "(written by launch.export).")
  meta = read_json(meta_file, "export the adapter again with launch.export")
  flat = read_safetensors(path, "export the adapter again with launch.export")
  bad = [name for name, v in flat.items() if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(f"{path} holds non-finite weights ({bad[:3]}); export a finite adapter again.")
  plugins.load(meta.get("plugins", ""))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_overrides"].items()}
  model = models.create_model(meta["model"], num_classes=meta["num_classes"], **overrides)
  variables = {}
  for name, value in flat.items():
    collection, leaf = name.split("/", 1)
    variables.setdefault(collection, {})[leaf] = value
  return model, {c: unflatten(v) for c, v in variables.items()}, meta


def image_files(inputs) -> list[pathlib.Path]:
  """Image files among `inputs` (files, or folders searched recursively), in sorted order."""
  out = []
  for item in map(pathlib.Path, inputs):
    if item.is_dir():
      out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif item.is_file():
      out.append(item)
    else:
      raise FileNotFoundError(f"{item} is neither an image file nor a folder.")
  if not out:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}.")
  return out


def predict_images(merged_path, inputs, batch_size: int = 32) -> list[dict]:
  """Class probabilities of a merged export for each image: `[{"path", "prediction", <class>: p, ...}]`.

  Images are read as the datasets read them (any PIL mode, DICOM) and preprocessed as in evaluation
  (shorter side to size x 256/224, centre crop, the model's normalisation), from the export's JSON.
  """
  model, variables, meta = load_merged(merged_path)
  pre, names = meta["preprocessing"], meta["class_names"] or [str(i) for i in range(meta["num_classes"])]
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype(jnp.float32)))
  rows, files = [], image_files(inputs)
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    images = np.stack([normalize(resize_center_crop(read_image(f), pre["image_size"]), pre["mean"], pre["std"])
                       for f in chunk])
    probs = np.asarray(apply(variables, images))
    for f, p in zip(chunk, probs):
      rows.append({"path": str(f), "prediction": names[int(p.argmax())], **dict(zip(names, map(float, p)))})
  return rows
