"""The noise schedule of Stable Diffusion and the training-side maths (own code, checked against diffusers).

alphas_cumprod[t] = prod_{s<=t} (1 - beta_s) with the "scaled_linear" betas of latent diffusion
(linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2). Everything here is a pure function of arrays, so
it jits, and the schedule itself is a small frozen dataclass read from a diffusers
`scheduler_config.json` or built with SD v1.5's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  steps_offset: int = 1  # SD v1.5's scheduler config: inference timesteps are shifted by one
  set_alpha_to_one: bool = False  # the last step's "previous" alpha: 1.0, or alphas_cumprod[0]

  def __post_init__(self):
    if self.beta_schedule not in ("scaled_linear", "linear"):
      raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; use 'scaled_linear' or 'linear'.")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}.")

  @classmethod
  def from_config(cls, path: str | os.PathLike) -> NoiseSchedule:
    """From a diffusers `scheduler_config.json` (or the folder holding it); unknown keys are ignored."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "scheduler_config.json"
    config = json.loads(path.read_text())
    if config.get("trained_betas") is not None:
      raise ValueError(f"{path}: trained_betas are not supported; give beta_start/beta_end/beta_schedule.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})

  @property
  def betas(self) -> np.ndarray:
    """float32, computed as diffusers does (in float32), so the tables agree to the last bit or two."""
    n = self.num_train_timesteps
    if self.beta_schedule == "linear":
      return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
    return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas, dtype=np.float32)

  @property
  def final_alpha_cumprod(self) -> float:
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


def _per_sample(values, like):
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)


def add_noise(schedule: NoiseSchedule, x0, noise, timesteps):
  """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample's integer timestep."""
  a = jnp.asarray(schedule.alphas_cumprod)[timesteps]
  return _per_sample(jnp.sqrt(a), x0) * x0 + _per_sample(jnp.sqrt(1.0 - a), x0) * noise


def velocity(schedule: NoiseSchedule, x0, noise, timesteps):
  """The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
  a = jnp.asarray(schedule.alphas_cumprod)[timesteps]
  return _per_sample(jnp.sqrt(a), x0) * noise - _per_sample(jnp.sqrt(1.0 - a), x0) * x0


def training_target(schedule: NoiseSchedule, x0, noise, timesteps):
  return noise if schedule.prediction_type == "epsilon" else velocity(schedule, x0, noise, timesteps)


def snr(schedule: NoiseSchedule, timesteps):
  a = jnp.asarray(schedule.alphas_cumprod)[timesteps]
  return a / (1.0 - a)


def diffusion_loss(schedule: NoiseSchedule, predict, x0, rng, min_snr_gamma: float = 0.0):
  """The DDPM training loss: noise x0 at uniform random timesteps, regress the schedule's target.

  `predict(noisy, timesteps) -> prediction`. With `min_snr_gamma > 0`, per-sample weights
  min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v) — Hang et al., 2023.
  """
  noise_rng, t_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  timesteps = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_train_timesteps)
  prediction = predict(add_noise(schedule, x0, noise, timesteps), timesteps)
  target = training_target(schedule, x0, noise, timesteps)
  per_sample = jnp.mean((prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2,
                        axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma > 0:
    s = snr(schedule, timesteps)
    per_sample = per_sample * jnp.minimum(s, min_snr_gamma) / (s if schedule.prediction_type == "epsilon" else s + 1)
  return per_sample.mean()
