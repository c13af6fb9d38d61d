"""Stable Diffusion text-to-image sampling: load a diffusers folder, encode prompts, sample, decode.

  sd = StableDiffusion.load("/ckpt/stable-diffusion-v1-5")
  images = sd.generate(["a chest x-ray with cardiomegaly"], steps=75, guidance=4.0, size=224, seed=0)

The whole chain after tokenisation — text encoder, the guided sampler loop (one `lax.fori_loop`),
VAE decode — is one jitted function per (sampler, steps, size, batch); `unet_params` can be swapped
(a fine-tuned or merged U-Net) without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from medpeft_jax.diffusion.samplers import guided, make_plan, sample_loop
from medpeft_jax.diffusion.schedule import NoiseSchedule
from medpeft_jax.models.weights import diffusers

_SCHEDULER_CLASSES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim"}


@dataclasses.dataclass
class LoadedModel:
  """A Flax module with its parameters: one loaded pipeline component."""

  model: nn.Module
  params: Any


@dataclasses.dataclass
class StableDiffusion:
  tokenizer: Any
  text_encoder: LoadedModel
  unet: LoadedModel
  vae: LoadedModel
  schedule: NoiseSchedule
  default_sampler: str = "pndm"

  @classmethod
  def load(cls, folder: str | os.PathLike, *, dtype=jnp.float32) -> StableDiffusion:
    """From a diffusers-format folder; `dtype` is the compute dtype (parameters stay float32)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
      raise diffusers.missing_error(folder, "pipeline folder")
    parts = {name: LoadedModel(*diffusers.load_component(folder, name, dtype=dtype)[:2])
             for name in ("text_encoder", "unet", "vae")}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    schedule = NoiseSchedule.from_config(scheduler) if scheduler.is_file() else NoiseSchedule()
    sampler = "pndm"
    if scheduler.is_file():
      sampler = _SCHEDULER_CLASSES.get(json.loads(scheduler.read_text()).get("_class_name"), "pndm")
    return cls(diffusers.load_tokenizer(folder), schedule=schedule, default_sampler=sampler, **parts)

  @property
  def latent_channels(self) -> int:
    return self.unet.model.config.in_channels

  @property
  def vae_factor(self) -> int:
    """Image pixels per latent pixel: 8 for SD's VAE (three 2x stages)."""
    return 2 ** (len(self.vae.model.config.block_out_channels) - 1)

  def tokenize(self, prompts) -> np.ndarray:
    return diffusers.tokenize(self.tokenizer, prompts, self.text_encoder.model.config.max_position_embeddings)

  def encode_prompts(self, prompts) -> jax.Array:
    """(len(prompts), 77, D) text-encoder hidden states: the U-Net's conditioning."""
    return _encode(self.text_encoder.model)(self.text_encoder.params, jnp.asarray(self.tokenize(prompts)))

  def generate(self, prompts, *, steps: int = 50, guidance: float = 7.5, size: int = 512, seed: int = 0,
               sampler: str | None = None, unet_params=None, first_index: int = 0) -> np.ndarray:
    """uint8 images (len(prompts), size, size, 3).

    Prompt i's starting noise is drawn from (seed, first_index + i), so an image does not depend on
    how the prompts are batched.
    """
    factor = self.vae_factor
    if size % factor:
      raise ValueError(f"size must be a multiple of {factor} (the VAE's downsampling), got {size}.")
    prompts = list(prompts)
    ids = jnp.asarray(self.tokenize(prompts + [""]))
    fn = _sampler_fn(self.text_encoder.model, self.unet.model, self.vae.model, self.schedule,
                     sampler or self.default_sampler, steps, float(guidance))
    shape = (len(prompts), size // factor, size // factor, self.latent_channels)
    keys = [jax.random.fold_in(jax.random.key(seed), first_index + i) for i in range(len(prompts))]
    noise = jnp.stack([jax.random.normal(k, shape[1:], jnp.float32) for k in keys])
    images = fn(self.text_encoder.params, self.unet.params if unet_params is None else unet_params,
                self.vae.params, ids, noise)
    return np.asarray(images)


@functools.cache
def _encode(text_encoder):
  return jax.jit(lambda params, ids: text_encoder.apply({"params": params}, ids)[0])


@functools.cache
def _sampler_fn(text_encoder, unet, vae, schedule: NoiseSchedule, sampler: str, steps: int, guidance: float):
  plan = make_plan(schedule, sampler, steps)

  @jax.jit
  def run(text_params, unet_params, vae_params, ids, noise):
    hidden = text_encoder.apply({"params": text_params}, ids)[0]  # prompts..., then "" (unconditional)
    cond, uncond = hidden[:-1], jnp.broadcast_to(hidden[-1:], hidden[:-1].shape)
    context = jnp.concatenate([uncond, cond])
    predict = lambda x, t: unet.apply({"params": unet_params}, x, t, context)
    latents = sample_loop(guided(predict, guidance), noise, plan)
    images = vae.apply({"params": vae_params}, latents / vae.config.scaling_factor, method=vae.decode)
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)

  return run


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """(N, H, W, 3) -> one (rows*H, columns*W, 3) image; empty cells are black."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * columns, h, w, c), images.dtype)
  grid[:n] = images
  return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def generate_to_folder(sd: StableDiffusion, prompts: list[str], out: str | os.PathLike, *, steps: int,
                       guidance: float, size: int, seed: int, sampler: str | None = None, batch_size: int = 4,
                       unet_params=None) -> np.ndarray:
  """Generates in batches with a progress bar; writes NNNN.png, grid.png, images.npz, generation.json."""
  if not prompts:
    raise ValueError("No prompts to generate from.")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  batches = []
  for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
    batches.append(sd.generate(prompts[start:start + batch_size], steps=steps, guidance=guidance, size=size,
                               seed=seed, sampler=sampler, unet_params=unet_params, first_index=start))
  images = np.concatenate(batches)
  for i, image in enumerate(images):
    Image.fromarray(image).save(out / f"{i:04d}.png")
  Image.fromarray(image_grid(images[:64])).save(out / "grid.png")
  np.savez_compressed(out / "images.npz", images=images, prompts=np.array(prompts))
  (out / "generation.json").write_text(json.dumps({
      "prompts": len(prompts), "steps": steps, "guidance": guidance, "size": size, "seed": seed,
      "sampler": sampler or sd.default_sampler}, indent=2) + "\n")
  return images
