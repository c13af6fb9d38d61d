"""One Stable Diffusion U-Net fine-tuned with one strategy on one dataset, data regime and seed.

python -m launch.train_t2i --config configs/t2i.py:method=lora,dataset=mimic_cxr,regime=0.1 \\
    --config.pipeline=/ckpt/stable-diffusion-v1-5 --config.manual_dir=/data/mimic-cxr-jpg --workdir runs/t2i_lora

Arguments (comma-separated key=value): method (a U-Net strategy of medpeft_jax/presets.py PRESETS["unet"]:
full, attention, bias, norm, bias_norm_attention, lora, svdiff, difffit — exactly as the paper defines
them; or any other method, e.g. loha, lokr, ia3, oft, by the U-Net's roles), dataset, regime, seed,
smoke (True: 16 px, batch 2, a few steps — CPU tests on a tiny pipeline). Everything else is a
field below, e.g. --config.ema_decay=0.9999. The paper's recipe: 224 px, constant LR (1e-5 full,
1e-4 PEFT), grad-norm clip 1, 15k steps, seed 42. Re-running the command resumes from the last
checkpoint in --workdir. The first run on a dataset encodes it once into `cache_dir`.
"""

import ml_collections

from medpeft_jax.config_args import parse_arg
from medpeft_jax.config_checks import dataset_options_section
from medpeft_jax.data import DATASETS
from medpeft_jax.train import sharding


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, method="lora", dataset="mimic_cxr", regime=1.0, seed=42, smoke=False)
  c = ml_collections.ConfigDict()
  c.method, c.dataset, c.regime, c.seed = a.method, a.dataset, a.regime, a.seed
  c.pipeline = ""  # diffusers-format Stable Diffusion v1.5 folder (unet/, vae/, text_encoder/, ...)
  c.peft = ml_collections.ConfigDict()  # overrides of the strategy's preset, e.g. rank
  c.data_dir = "~/tensorflow_datasets"
  c.manual_dir = ""  # the downloaded dataset folder
  c.dataset_options = dataset_options_section(a.dataset) if a.dataset in DATASETS else {}  # build options
  c.caption = "{label}"  # prompt template for datasets without a `prompt` feature (class name as {label})
  c.cache_dir = "~/.cache/medpeft_jax/t2i"  # encoded latents and text states, one folder per split

  c.image_size = 16 if a.smoke else 224
  c.batch_size = 2 if a.smoke else 16  # global (the paper does not give it)
  c.total_steps = 4 if a.smoke else 15_000
  c.lr = 0.0  # 0: the strategy's default (medpeft_jax/presets.py DEFAULT_LR: 1e-5 full, 1e-3 svdiff, 1e-4)
  c.weight_decay = 1e-2  # AdamW's usual default (diffusers' train_text_to_image)
  c.grad_clip = 1.0
  c.ema_decay = 0.0  # > 0: keep an EMA of the trainable leaves and save it
  c.min_snr_gamma = 0.0  # > 0: min-SNR loss weighting (5 is the usual value)
  c.dtype = "float32"  # U-Net compute dtype ("bfloat16" for bf16 activations; parameters stay float32)
  c.remat = False  # rematerialise each ResNet/Transformer block in the backward pass

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "min_shard_size": 2**18,
                                      "rules": sharding.DEFAULT_RULES})  # see configs/classify.py
  c.probe_size = 4 if a.smoke else 32  # examples of the fixed-noise probe loss
  c.checkpoint_every = 2 if a.smoke else 1000
  c.keep_checkpoints = 2
  c.log_every = 1 if a.smoke else 50
  c.progress = True
  c.plugins = ""  # modules to import first (joined with +): your own strategies
  return c
