"""Encodes a text-to-image split once: VAE latent distributions and text-encoder states on disk.

U-Net fine-tuning never needs the frozen VAE encoder or text encoder again after this: the trainer
reads `latent_mean`/`latent_logvar` (N, size/8, size/8, 4), samples a latent per step, and reads
`text` (N, 77, D). Arrays are `.npy` files (float16 for the text states, float32 for the latents),
memory-mapped, so the cache may exceed RAM; `meta.json` records what built it.

  cache = encode_split(sd, builder.as_data_source("train"), "runs/mimic_cache/train", size=224)
"""

from __future__ import annotations

import io
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from medpeft_jax.data.transforms import resize_center_crop, to_rgb


def _image(record, size: int) -> np.ndarray:
  image = record["image"]
  if isinstance(image, bytes):
    image = np.asarray(Image.open(io.BytesIO(image)))
  pixels = resize_center_crop(to_rgb(Image.fromarray(np.asarray(image))), size, resize=size)
  return pixels.astype(np.float32) / 127.5 - 1.0  # [-1, 1], the VAE's input range


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
