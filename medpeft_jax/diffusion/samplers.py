"""DDIM and PNDM (PLMS) sampling with classifier-free guidance, as one jit-compiled `lax.fori_loop`.

Each sampler is a host-side *plan* — per iteration: the timestep the model sees, the alphas the
update uses, and (PLMS) how the noise estimates combine — so the loop body is the same for every
iteration and the U-Net is traced once. The updates follow diffusers' `DDIMScheduler.step` (eta 0)
and `PNDMScheduler.step_plms` with `skip_prk_steps`, the SD v1.5 default, "leading" timestep spacing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medpeft_jax.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "pndm")
# PLMS combinations of the noise estimates [current, newest stored, ..., oldest of 4], by iteration.
_PLMS_WEIGHTS = np.array([[0, 1, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 1.5, -0.5, 0, 0],
                          [0, 23 / 12, -16 / 12, 5 / 12, 0], [0, 55 / 24, -59 / 24, 37 / 24, -9 / 24]], np.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
  sampler: str
  timesteps: np.ndarray  # what the model is evaluated at, per iteration (int32)
  alpha: np.ndarray  # alphas_cumprod at the update's "from" timestep (float32)
  alpha_prev: np.ndarray  # ... at its "to" timestep (the final alpha past 0)
  prediction_type: str

  def __len__(self):
    return len(self.timesteps)


def _leading_timesteps(schedule: NoiseSchedule, steps: int) -> tuple[np.ndarray, int]:
  if not 1 <= steps <= schedule.num_train_timesteps:
    raise ValueError(f"steps must be in [1, {schedule.num_train_timesteps}], got {steps}.")
  ratio = schedule.num_train_timesteps // steps
  return np.arange(steps) * ratio + schedule.steps_offset, ratio


def make_plan(schedule: NoiseSchedule, sampler: str, steps: int) -> Plan:
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
  base, ratio = _leading_timesteps(schedule, steps)
  ac = schedule.alphas_cumprod

  def alpha_at(t):
    return np.where(t >= 0, ac[np.clip(t, 0, None)], schedule.final_alpha_cumprod).astype(np.float32)

  if sampler == "ddim":
    t = base[::-1]
  else:  # PLMS: the second-lowest timestep is visited twice
    t = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
  t_from, prev = t.copy(), t - ratio
  if sampler == "pndm" and len(t) > 1:  # iteration 1 steps from t + ratio to t
    t_from[1], prev[1] = t[1] + ratio, t[1]
  return Plan(sampler, t.astype(np.int32), alpha_at(t_from), alpha_at(prev), schedule.prediction_type)

def ddim_update(sample, model_output, alpha, alpha_prev, prediction_type: str):
  """One deterministic DDIM step (eta = 0) from `sample` at alpha to alpha_prev."""
  beta = 1.0 - alpha
  if prediction_type == "epsilon":
    x0, eps = (sample - jnp.sqrt(beta) * model_output) / jnp.sqrt(alpha), model_output
  else:
    x0 = jnp.sqrt(alpha) * sample - jnp.sqrt(beta) * model_output
    eps = jnp.sqrt(alpha) * model_output + jnp.sqrt(beta) * sample
  return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev) * eps


def pndm_update(sample, model_output, alpha, alpha_prev, prediction_type: str):
  """The PNDM transfer (formula 9 of Liu et al., 2022) given an already-combined noise estimate."""
  beta, beta_prev = 1.0 - alpha, 1.0 - alpha_prev
  if prediction_type == "v_prediction":
    model_output = jnp.sqrt(alpha) * model_output + jnp.sqrt(beta) * sample
  denominator = alpha * jnp.sqrt(beta_prev) + jnp.sqrt(alpha * beta * alpha_prev)
  return jnp.sqrt(alpha_prev / alpha) * sample - (alpha_prev - alpha) * model_output / denominator


def sample_loop(denoise: Callable, latents, plan: Plan):
  """Runs the plan: `denoise(latents, timestep) -> model output` (guidance already applied)."""
  timesteps, alpha, alpha_prev = (jnp.asarray(a) for a in (plan.timesteps, plan.alpha, plan.alpha_prev))
  dtype = latents.dtype

  if plan.sampler == "ddim":
    def body(i, x):
      out = denoise(x, timesteps[i]).astype(jnp.float32)
      return ddim_update(x.astype(jnp.float32), out, alpha[i], alpha_prev[i], plan.prediction_type).astype(dtype)
    return jax.lax.fori_loop(0, len(plan), body, latents)

  weights = jnp.asarray(_PLMS_WEIGHTS)

  def body(i, carry):
    x, history, first = carry  # history: the last 4 stored noise estimates, newest last
    out = denoise(x, timesteps[i]).astype(jnp.float32)
    stored = jnp.where(i == 1, history, jnp.concatenate([history[1:], out[None]]))
    w = weights[jnp.minimum(i, 4)]
    combined = w[0] * out + jnp.tensordot(w[1:], stored[::-1], axes=1)
    source = jnp.where(i == 1, first, x.astype(jnp.float32))  # iteration 1 restarts from iteration 0's input
    first = jnp.where(i == 0, x.astype(jnp.float32), first)
    x = pndm_update(source, combined, alpha[i], alpha_prev[i], plan.prediction_type).astype(dtype)
    return x, stored, first

  history = jnp.zeros((4,) + latents.shape, jnp.float32)
  x, _, _ = jax.lax.fori_loop(0, len(plan), body, (latents, history, latents.astype(jnp.float32)))
  return x


def guided(predict: Callable, guidance: float) -> Callable:
  """Classifier-free guidance: `predict(latents2, t) -> out2` on [unconditional; conditional] halves."""

  def denoise(x, t):
    out = predict(jnp.concatenate([x, x]), t)
    uncond, cond = jnp.split(out, 2)
    return uncond + guidance * (cond - uncond)

  return denoise
