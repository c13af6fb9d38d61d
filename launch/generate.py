"""Generates images from prompts with a Stable Diffusion pipeline folder (diffusers format, local).

python -m launch.generate --pipeline /ckpt/stable-diffusion-v1-5 --prompts prompts.txt --out runs/gen \\
    --steps 75 --guidance 4 --size 224 --seed 0
Writes NNNN.png (one per prompt line, in order), grid.png, images.npz (images, prompts) and
generation.json. The paper's sampling: PNDM, 75 steps, guidance 4, 224 px. `--adapter DIR` (a
launch.train_t2i adapter folder) samples from the fine-tuned U-Net, its adapter merged.
"""

import pathlib

from absl import app, flags

from medpeft_jax import peft
from medpeft_jax.diffusion import SAMPLERS, StableDiffusion
from medpeft_jax.diffusion.pipeline import generate_to_folder

_PIPELINE = flags.DEFINE_string("pipeline", None, "diffusers-format folder (unet/, vae/, ...).", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "Text file, one prompt per line.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_STEPS = flags.DEFINE_integer("steps", 75, "Sampling steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side in pixels (a multiple of 8).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Default: the pipeline's scheduler.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts per sampling batch.")
_ADAPTER = flags.DEFINE_string("adapter", None, "A fine-tuned U-Net adapter folder (launch.train_t2i).")


def main(argv):
  del argv
  prompts = [line.strip() for line in pathlib.Path(_PROMPTS.value).read_text().splitlines() if line.strip()]
  sd = StableDiffusion.load(_PIPELINE.value)
  unet_params = None
  if _ADAPTER.value:
    adapter = peft.load_adapter(_ADAPTER.value)
    unet_params = adapter.method.merge(sd.unet.params, adapter.trainable)
  generate_to_folder(sd, prompts, _OUT.value, steps=_STEPS.value, guidance=_GUIDANCE.value, size=_SIZE.value,
                     seed=_SEED.value, sampler=_SAMPLER.value, batch_size=_BATCH.value, unet_params=unet_params)
  print(f"Wrote {len(prompts)} images to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
