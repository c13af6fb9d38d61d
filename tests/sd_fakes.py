"""A tiny Stable Diffusion pipeline folder in the real diffusers layout, from the PyTorch references."""

import json
import pathlib

import diffusers
import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from tests.helpers import randomise

UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, norm_num_groups=8)
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
WORDS = ("a", "chest", "x", "ray", "with", "cardiomegaly", "no", "finding")


def write_tokenizer(folder: pathlib.Path) -> int:
  """A CLIP BPE tokenizer with CLIP's byte alphabet and merges spelling WORDS; returns the vocab size."""
  alphabet = sorted(ByteLevel.alphabet())
  vocab = alphabet + [c + "</w>" for c in alphabet]
  merges = []
  for word in WORDS:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
      merges.append(f"{pieces[0]} {pieces[1]}")
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      if pieces[0] not in vocab:
        vocab.append(pieces[0])
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
  transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(str(folder))
  return len(vocab)


def write_pipeline(folder: pathlib.Path, **unet_overrides) -> dict:
  """Writes unet/, vae/, text_encoder/, tokenizer/, scheduler/; returns the torch modules."""

  vocab_size = write_tokenizer(folder / "tokenizer")
  torch.manual_seed(0)
  unet = randomise(diffusers.UNet2DConditionModel(**{**UNET, **unet_overrides}), seed=1)
  vae = randomise(diffusers.AutoencoderKL(**VAE), seed=2)
  text = randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
      pad_token_id=vocab_size - 1)), seed=3)
  unet.save_pretrained(folder / "unet")
  vae.save_pretrained(folder / "vae")
  text.save_pretrained(folder / "text_encoder")
  diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
  return {"unet": unet, "vae": vae, "text_encoder": text}
