"""Stable Diffusion in Flax against diffusers/transformers in PyTorch: models, weights, schedules, sampling."""

import json
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medpeft_jax import data
from medpeft_jax.diffusion import (
  NoiseSchedule,
  StableDiffusion,
  add_noise,
  cache,
  diffusion_loss,
  make_plan,
  sample_loop,
)
from medpeft_jax.diffusion.samplers import ddim_update, pndm_update
from medpeft_jax.models import clip_text, unet, vae
from medpeft_jax.models.weights import diffusers as sd_weights
from tests import data_fakes, sd_fakes
from tests.test_train import REPO


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_sd")
  return folder, sd_fakes.write_pipeline(folder)


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [8, 12])  # 12: not a multiple of 4, so an upsampler sizes to its skip
def test_unet_matches_diffusers(pipeline, size):
  folder, reference = pipeline
  model, params, report = sd_weights.load_component(folder, "unet")
  assert report.ok and not report.unexpected, report
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, size, size, 4), dtype=np.float32)
  t = np.array([10, 981])
  context = rng.standard_normal((2, 5, 32), dtype=np.float32)
  ours = model.apply({"params": params}, x, t, context)
  with torch.no_grad():
    theirs = reference["unet"](nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
  np.testing.assert_allclose(ours, nhwc(theirs), atol=1e-4, rtol=1e-4)


def test_vae_encode_decode_match_diffusers(pipeline):
  folder, reference = pipeline
  model, params, report = sd_weights.load_component(folder, "vae")
  assert report.ok and not report.unexpected, report
  x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, logvar = model.apply({"params": params}, x, method=model.encode)
  with torch.no_grad():
    posterior = reference["vae"].encode(nchw(x)).latent_dist
    decoded = reference["vae"].decode(posterior.mean).sample
  np.testing.assert_allclose(mean, nhwc(posterior.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, nhwc(posterior.logvar), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(model.apply({"params": params}, mean, method=model.decode), nhwc(decoded),
                             atol=1e-4, rtol=1e-4)


def test_text_encoder_and_tokenizer_match_transformers(pipeline):
  folder, reference = pipeline
  model, params, report = sd_weights.load_component(folder, "text_encoder")
  assert report.ok and not report.unexpected, report
  ids = sd_weights.tokenize(sd_weights.load_tokenizer(folder), ["a chest x ray with cardiomegaly", ""])
  assert ids.shape == (2, 77) and ids[0, 0] == ids[1, 0] and len(set(ids[0, 1:7])) == 6
  hidden, pooled = model.apply({"params": params}, ids)
  with torch.no_grad():
    out = reference["text_encoder"](torch.from_numpy(ids.astype(np.int64)))
  np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_full_size_parameter_counts():
  def count(model, *inputs):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

  assert count(unet.UNet2DConditionModel(), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
               jnp.zeros((1, 77, 768))) == 859_520_964
  assert count(vae.AutoencoderKL(), jnp.zeros((1, 16, 16, 3))) == 83_653_863
  assert count(clip_text.CLIPTextModel(), jnp.zeros((1, 77), jnp.int32)) == 123_060_480


def test_schedule_noise_and_steps_match_diffusers():
  schedule = NoiseSchedule()
  ddim = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 set_alpha_to_one=False, steps_offset=1, clip_sample=False)
  np.testing.assert_allclose(schedule.alphas_cumprod, ddim.alphas_cumprod.numpy(), rtol=1e-5)  # float32 cumprods
  rng = np.random.default_rng(0)
  x0, noise, out = (rng.standard_normal((3, 4, 4, 4), dtype=np.float32) for _ in range(3))
  t = np.array([0, 500, 999])
  np.testing.assert_allclose(add_noise(schedule, x0, noise, t),
                             nhwc(ddim.add_noise(nchw(x0), nchw(noise), torch.from_numpy(t))), atol=1e-6)
  ddim.set_timesteps(10)
  plan = make_plan(schedule, "ddim", 10)
  np.testing.assert_array_equal(plan.timesteps, ddim.timesteps.numpy())
  theirs = ddim.step(nchw(out), int(plan.timesteps[3]), nchw(x0)).prev_sample
  np.testing.assert_allclose(ddim_update(x0, out, plan.alpha[3], plan.alpha_prev[3], "epsilon"), nhwc(theirs),
                             atol=1e-5)
  pndm = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
  pndm.set_timesteps(10)
  plan = make_plan(schedule, "pndm", 10)
  np.testing.assert_array_equal(plan.timesteps, pndm.timesteps.numpy())
  theirs = pndm.step(nchw(out), int(plan.timesteps[0]), nchw(x0)).prev_sample
  np.testing.assert_allclose(pndm_update(x0, out, plan.alpha[0], plan.alpha_prev[0], "epsilon"), nhwc(theirs),
                             atol=1e-5)


@pytest.mark.parametrize("sampler,prediction", [("ddim", "epsilon"), ("pndm", "epsilon"), ("pndm", "v_prediction")])
def test_whole_sampling_loop_matches_diffusers(sampler, prediction):
  """Every iteration, PLMS history included, with a fixed fake model: eps = 0.1 x + sin(t / 100)."""
  schedule = NoiseSchedule(prediction_type=prediction)
  kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                steps_offset=1, prediction_type=prediction)
  scheduler = (diffusers.DDIMScheduler(clip_sample=False, **kwargs) if sampler == "ddim"
               else diffusers.PNDMScheduler(skip_prk_steps=True, **kwargs))
  scheduler.set_timesteps(7)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4), dtype=np.float32)
  sample = nchw(x)
  for t in scheduler.timesteps:
    sample = scheduler.step(0.1 * sample + np.sin(int(t) / 100), t, sample).prev_sample
  ours = jax.jit(lambda x: sample_loop(lambda x, t: 0.1 * x + jnp.sin(t / 100), x,
                                       make_plan(schedule, sampler, 7)))(x)
  np.testing.assert_allclose(ours, nhwc(sample), atol=1e-4, rtol=1e-4)


def test_missing_pipeline_names_the_hub_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="stable-diffusion-v1-5"):
    StableDiffusion.load(tmp_path / "nowhere")
  (tmp_path / "unet").mkdir()
  with pytest.raises(FileNotFoundError, match="unet/config.json"):
    sd_weights.load_component(tmp_path, "unet")


def test_generate_cli_end_to_end(pipeline, tmp_path):
  folder, _ = pipeline
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a chest x ray with cardiomegaly\nno finding\nchest x ray\n")
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "launch.generate", f"--pipeline={folder}", f"--prompts={prompts}",
                  f"--out={out}", "--steps=3", "--guidance=4", "--size=32", "--seed=0", "--batch_size=2"],
                 cwd=REPO, check=True, capture_output=True, text=True)
  images = np.load(out / "images.npz")
  assert images["images"].shape == (3, 32, 32, 3) and images["images"].dtype == np.uint8
  assert list(images["prompts"]) == ["a chest x ray with cardiomegaly", "no finding", "chest x ray"]
  assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "grid.png"]
  assert json.loads((out / "generation.json").read_text())["steps"] == 3
  # The same seed gives the same images in-process, through the library.
  sd = StableDiffusion.load(folder)
  again = sd.generate(["a chest x ray with cardiomegaly", "no finding"], steps=3, guidance=4.0, size=32, seed=0)
  np.testing.assert_array_equal(again, images["images"][:2])


def test_unet_remat_and_bfloat16():
  """Rematerialised blocks give the same gradients; bf16 activations keep float32 params and output."""
  config = unet.UNetConfig.from_dict({**sd_fakes.UNET, "layers_per_block": 1, "block_out_channels": (32,),
                                      "down_block_types": ("CrossAttnDownBlock2D",),
                                      "up_block_types": ("CrossAttnUpBlock2D",)})  # small: two compiles
  model, remat = unet.UNet2DConditionModel(config), unet.UNet2DConditionModel(config, remat=True)
  rng = np.random.default_rng(0)
  x, context = rng.standard_normal((1, 8, 8, 4), dtype=np.float32), rng.standard_normal((1, 5, 32), dtype=np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x, 500, context)["params"]

  def grads(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, 500, context) ** 2)))(params)

  for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  out = jax.jit(unet.UNet2DConditionModel(config, dtype=jnp.bfloat16).apply)({"params": params}, x, 500, context)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jax.jit(model.apply)({"params": params}, x, 500, context), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_zero_for_the_exact_target(prediction):
  """A predictor that inverts the forward process exactly (knowing x0) has zero loss, with min-SNR too."""
  schedule = NoiseSchedule(prediction_type=prediction)
  x0 = jax.random.normal(jax.random.key(1), (4, 4, 4, 4))
  a = jnp.asarray(schedule.alphas_cumprod)

  def exact(noisy, t):
    s, r = jnp.sqrt(a[t])[:, None, None, None], jnp.sqrt(1 - a[t])[:, None, None, None]
    noise = (noisy - s * x0) / r
    return noise if prediction == "epsilon" else s * noise - r * x0

  for gamma in (0.0, 5.0):
    assert diffusion_loss(schedule, exact, x0, jax.random.key(2), min_snr_gamma=gamma) < 1e-6
  assert diffusion_loss(schedule, lambda noisy, t: jnp.zeros_like(noisy), x0, jax.random.key(2)) > 0.1


def test_encode_split_caches_latents_and_text(pipeline, tmp_path):
  """The cache holds exactly what the VAE encoder and text encoder give for each record."""
  folder, _ = pipeline
  sd = StableDiffusion.load(folder)
  (tmp_path / "mimic").mkdir()
  data_fakes.write_mimic_cxr(tmp_path / "mimic")
  source = data.load("mimic_cxr", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "mimic").as_data_source("train")
  out = cache.encode_split(sd, source, tmp_path / "cache", size=16, batch_size=3)
  assert out["latent_mean"].shape == (2, 8, 8, 4) and out["text"].shape == (2, 77, 32)
  assert out["meta"]["examples"] == 2
  image = cache._image(source[1], 16)[None]
  mean, logvar = sd.vae.model.apply({"params": sd.vae.params}, image, method=sd.vae.model.encode)
  np.testing.assert_allclose(out["latent_mean"][1], mean[0], atol=1e-5)
  np.testing.assert_allclose(out["latent_logvar"][1], logvar[0], atol=1e-5)
  np.testing.assert_allclose(out["text"][1], sd.encode_prompts([source[1]["prompt"].decode()])[0], atol=2e-3)
  reloaded = cache.load_cache(tmp_path / "cache")
  np.testing.assert_array_equal(reloaded["latent_mean"], out["latent_mean"])
  z = cache.sample_latents(jnp.asarray(reloaded["latent_mean"]), jnp.asarray(reloaded["latent_logvar"]),
                           jax.random.key(0), 0.18215)
  assert z.shape == (2, 8, 8, 4) and bool(jnp.all(jnp.isfinite(z)))
