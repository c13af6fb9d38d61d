"""ConvNeXt: logits equal timm's and transformers' through our torch-free readers, full-size parameter counts
equal the references', and every paper method trains on it with the defaults its roles resolve to."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.torch
import timm
import torch
import transformers

from medpeft_jax import models, presets
from medpeft_jax.peft.core import flatten, num_params
from tests.helpers import random_images, randomise, torch_logits

TOL = 1e-4
TINY = {"depths": (1, 2, 1, 1), "dims": (8, 16, 32, 64)}


def load(path, num_classes, size):
  """The model (its `apply` jitted: eager dispatch compiles each of the depthwise conv's 49 taps alone)."""
  model, variables, report = models.load_pretrained("convnext_t", path, num_classes=num_classes, image_size=size,
                                                    **TINY)
  assert report.ok and not report.unexpected and not report.reinitialized, report
  return model, variables, jax.jit(model.apply)


def hf_config(**kw):
  return transformers.ConvNextConfig(hidden_sizes=list(TINY["dims"]), depths=list(TINY["depths"]), **kw)


def test_timm_convnext_safetensors(tmp_path):
  ref = randomise(timm.models.convnext.ConvNeXt(depths=TINY["depths"], dims=TINY["dims"], num_classes=3))
  safetensors.torch.save_file(ref.state_dict(), tmp_path / "model.safetensors")
  _, variables, apply = load(tmp_path / "model.safetensors", 3, 32)
  x, x_torch = random_images(size=32)
  np.testing.assert_allclose(np.asarray(apply(variables, x)), torch_logits(ref, x_torch), atol=TOL, rtol=0)


def test_hf_convnext_classifier_folder_at_a_non_native_size(tmp_path):
  """The hub folders (`facebook/convnext-tiny-224`) hold config.json and a pickled pytorch_model.bin; the
  config's layer_norm_eps (1e-12) sets the final norm's eps. 40 px is no multiple of the total stride 32:
  each strided conv drops the remainder, as torch's does."""
  ref = randomise(transformers.ConvNextForImageClassification(hf_config(num_labels=3, image_size=32)))
  ref.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  model, variables, apply = load(tmp_path, 3, 40)
  assert model.head_norm_eps == ref.config.layer_norm_eps == 1e-12
  x, x_torch = random_images(size=40)
  np.testing.assert_allclose(np.asarray(apply(variables, x)), torch_logits(ref, x_torch), atol=TOL, rtol=0)


def test_hf_convnext_model_gives_the_pooled_features_without_a_head(tmp_path):
  ref = randomise(transformers.ConvNextModel(hf_config()))
  ref.save_pretrained(tmp_path)
  _, variables, apply = load(tmp_path, 0, 32)
  x, x_torch = random_images(size=32)
  with torch.no_grad():
    want = ref(x_torch).pooler_output.numpy()
  np.testing.assert_allclose(np.asarray(apply(variables, x)), want, atol=TOL, rtol=0)


def test_a_missing_checkpoint_names_the_hub_ids(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"timm/convnext_small\.fb_in22k.*facebook/convnext-small-224"):
    models.load_pretrained("convnext_s", tmp_path / "absent", num_classes=3)


@pytest.mark.parametrize("name, timm_name, depths, dims", [
    ("convnext_t", "convnext_tiny", [3, 3, 9, 3], [96, 192, 384, 768]),
    ("convnext_s", "convnext_small", [3, 3, 27, 3], [96, 192, 384, 768]),
    ("convnext_b", "convnext_base", [3, 3, 27, 3], [128, 256, 512, 1024]),
])
def test_full_size_parameter_counts_equal_timm_and_transformers(name, timm_name, depths, dims):
  model = models.create_model(name, num_classes=1000)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  with torch.device("meta"):
    refs = [timm.create_model(timm_name, num_classes=1000), transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(depths=depths, hidden_sizes=dims, num_labels=1000))]
  want = {sum(p.numel() for p in ref.parameters()) for ref in refs}
  assert want == {num_params(shapes)}  # 28,589,128 / 50,223,688 / 88,591,464


# A cheaper ConvNeXt for training steps (the compile of a 7x7 depthwise conv's backward dominates on CPU).
TINY_TRAIN = {"depths": (1, 1), "dims": (8, 16), "kernel_size": 3}
# What each method adapts through the roles: the pointwise (mlp/fc) and the stem/downsampling convs, never the
# depthwise ones; SSF also follows every LayerNorm.
_CONVS = {"stem_conv", "stage1/downsample_conv"}
_POINTWISE = {f"stage{i}/block0/mlp/fc{j}" for i in range(2) for j in (1, 2)}
_NORMS = {"stem_norm", "stage1/downsample_norm", "stage0/block0/norm", "stage1/block0/norm", "norm"}
ADAPTED = {"lora": _CONVS | _POINTWISE, "dora": _CONVS | _POINTWISE, "tsa": _CONVS | _POINTWISE,
           "ssf": _POINTWISE | _NORMS}


@pytest.fixture(scope="module")
def tiny_convnext():
  """Random parameters of every scale (numpy: a jitted `init` would compile each initialiser), the head
  included (the zero-initialised one would pass no gradient back to the body in the first step)."""
  model = models.create_model("convnext_t", num_classes=3, **TINY_TRAIN)
  x, _ = random_images(size=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)
                                                 / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 4)),
                           shapes)
  return model, variables, x, jax.jit(model.apply)


@pytest.mark.parametrize("name", ["full", "linear", "bias", "norm", "lora", "dora", "tsa", "ssf"])
def test_paper_methods_train_a_step_on_convnext_and_merge_exactly(tiny_convnext, name):
  model, variables, x, plain_apply = tiny_convnext
  labels = jnp.array([0, 2])
  method = presets.build_method("convnext_t", name)
  trainable = method.init(jax.random.key(2), variables["params"])
  assert set(trainable["adapters"]) == ADAPTED.get(name, set())
  tuned = {p.rsplit("/", 1)[0] for p in trainable["params"]}
  assert ("stage0/block0/dwconv" in tuned) == (name in ("full", "bias"))

  @jax.jit
  def step(trainable):
    def loss(t):
      logits = method.apply(model, variables, t, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    value, grads = jax.value_and_grad(loss)(trainable)
    trainable = jax.tree.map(lambda t, g: t - 0.5 * g, trainable, grads)
    return value, grads, trainable, method.apply(model, variables, trainable, x)

  loss, grads, trainable, logits = step(trainable)
  body = [g for p, g in flatten(grads).items() if "head/" not in p]
  assert np.isfinite(float(loss)) and (name == "linear") == (not body)
  assert name == "linear" or max(float(jnp.abs(g).max()) for g in body) > 0  # the body learns, not only the head
  before = plain_apply(variables, x)
  assert float(jnp.abs(logits - before).max()) > 1e-3
  merged = plain_apply({"params": method.merge(variables["params"], trainable)}, x)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(logits), atol=1e-5, rtol=0)
