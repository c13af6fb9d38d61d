"""Diffusion maths (noise schedule, losses, DDIM/PNDM sampling) and the Stable Diffusion pipeline."""

from medpeft_jax.diffusion.pipeline import StableDiffusion
from medpeft_jax.diffusion.samplers import SAMPLERS, guided, make_plan, sample_loop
from medpeft_jax.diffusion.schedule import NoiseSchedule, add_noise, diffusion_loss, training_target

__all__ = ["SAMPLERS", "NoiseSchedule", "StableDiffusion", "add_noise", "diffusion_loss", "guided", "make_plan",
           "sample_loop", "training_target"]
