"""Encodes a text-to-image split once: VAE latent distributions and text-encoder states on disk.

U-Net fine-tuning never needs the frozen VAE encoder or text encoder again after this: the trainer
reads `latent_mean`/`latent_logvar` (N, size/8, size/8, 4), samples a latent per step, and reads
`text` (N, 77, D). Arrays are `.npy` files (float16 for the text states, float32 for the latents),
memory-mapped, so the cache may exceed RAM; `meta.json` records what built it.

  cache = encode_split(sd, PromptSource(builder, "train"), "runs/mimic_cache/train", size=224)
  cache = cached_split(builder, "train", pipeline=folder, size=224, cache_dir="~/medpeft_cache",
                       load_sd=lambda: StableDiffusion.load(folder))  # encodes on first use only
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from medpeft_jax.data.transforms import resize_center_crop, to_rgb


def _pixels(record, size: int) -> np.ndarray:
  """The record's image, resized and centre-cropped to size x size RGB (uint8)."""
  image = record["image"]
  if isinstance(image, bytes):
    image = np.asarray(Image.open(io.BytesIO(image)))
  return np.asarray(resize_center_crop(to_rgb(Image.fromarray(np.asarray(image))), size, resize=size))


def _image(record, size: int) -> np.ndarray:
  return _pixels(record, size).astype(np.float32) / 127.5 - 1.0  # [-1, 1], the VAE's input range


class PromptSource:
  """{"image": encoded bytes, "prompt": str} records of a built split.

  The prompt is the dataset's own `prompt` feature (MIMIC-CXR's report), else `caption` formatted
  with the record's class name (`"a brain MRI: {label}"`), so any labelled dataset can serve.
  """

  def __init__(self, builder, split: str, caption: str = "{label}"):
    features = builder.info.features
    if "prompt" not in features and "label" not in features:
      raise ValueError(f"{builder.name} has neither a `prompt` nor a `label` feature to caption its images.")
    self.names = features["label"].names if "prompt" not in features else None
    self.caption = caption
    self.source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    record = self.source[int(i)]
    prompt = _text(record) if self.names is None else self.caption.format(label=self.names[record["label"]])
    return {"image": record["image"], "prompt": prompt}


def uint8_images(source, indices, size: int) -> np.ndarray:
  """(len(indices), size, size, 3) uint8: the records' images resized and centre-cropped (FID's real set)."""
  return np.stack([_pixels(source[int(i)], size) for i in indices])


def _text(record) -> str:
  prompt = record["prompt"]
  return prompt.decode() if isinstance(prompt, bytes) else str(prompt)


def encode_split(sd, source, out: str | os.PathLike, *, size: int = 224, batch_size: int = 16) -> dict:
  """Encodes every record ({"image", "prompt"}) of `source`; returns {name: memmapped array}."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  n, side = len(source), size // sd.vae_factor
  if n == 0:
    raise ValueError("The split is empty: nothing to encode.")
  text_len = sd.text_encoder.model.config.max_position_embeddings
  width = sd.text_encoder.model.config.hidden_size
  arrays = {
      "latent_mean": np.lib.format.open_memmap(out / "latent_mean.npy", "w+", np.float32, (n, side, side, 4)),
      "latent_logvar": np.lib.format.open_memmap(out / "latent_logvar.npy", "w+", np.float32, (n, side, side, 4)),
      "text": np.lib.format.open_memmap(out / "text.npy", "w+", np.float16, (n, text_len, width))}
  vae, text_encoder = sd.vae, sd.text_encoder
  encode_images = jax.jit(lambda p, x: vae.model.apply({"params": p}, x, method=vae.model.encode))
  encode_text = jax.jit(lambda p, ids: text_encoder.model.apply({"params": p}, ids)[0])
  for start in tqdm(range(0, n, batch_size), desc="encode", unit="batch"):
    idx = range(start, min(start + batch_size, n))
    records = [source[i] for i in idx]
    images = np.stack([_image(r, size) for r in records])
    ids = sd.tokenize([_text(r) for r in records])
    pad = batch_size - len(records)  # one compiled shape for every batch
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
    mean, logvar = encode_images(vae.params, jnp.asarray(images))
    states = encode_text(text_encoder.params, jnp.asarray(ids))
    k = len(records)
    arrays["latent_mean"][start:start + k] = np.asarray(mean)[:k]
    arrays["latent_logvar"][start:start + k] = np.asarray(logvar)[:k]
    arrays["text"][start:start + k] = np.asarray(states, np.float16)[:k]
  for a in arrays.values():
    a.flush()
  (out / "meta.json").write_text(json.dumps({"examples": n, "size": size, "latent_side": side,
                                             "scaling_factor": sd.vae.model.config.scaling_factor}, indent=2) + "\n")
  return load_cache(out)


def cached_split(builder, split: str, *, pipeline: str | os.PathLike, size: int, cache_dir: str | os.PathLike,
                 load_sd: Callable, caption: str = "{label}", batch_size: int = 16) -> dict:
  """The encoded split, built on first use under `cache_dir` (keyed by dataset, split, size, pipeline, caption).

  `load_sd()` returns the StableDiffusion used to encode; it is called only when the cache is missing.
  """
  key = json.dumps([str(pathlib.Path(pipeline).expanduser().resolve()), caption])
  name = f"{split}_{size}px_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
  folder = pathlib.Path(cache_dir).expanduser() / builder.info.full_name.replace("/", "_") / name
  if not (folder / "meta.json").is_file():
    encode_split(load_sd(), PromptSource(builder, split, caption), folder, size=size, batch_size=batch_size)
  return load_cache(folder)


def load_cache(folder: str | os.PathLike) -> dict:
  """{"latent_mean", "latent_logvar", "text": read-only memmaps, "meta": dict} of an encoded split."""
  folder = pathlib.Path(folder)
  if not (folder / "meta.json").is_file():
    raise FileNotFoundError(f"No encoded split in {folder} (meta.json missing): run encode_split first.")
  out = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("latent_mean", "latent_logvar", "text")}
  return {**out, "meta": json.loads((folder / "meta.json").read_text())}


def sample_latents(mean, logvar, rng, scaling_factor: float):
  """U-Net training latents from cached posteriors: (mean + std * noise) * scaling_factor."""
  return (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)) * scaling_factor
