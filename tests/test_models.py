"""The zoo: full-size shapes, names PEFT regexes rely on, compute dtypes, and loader behaviour."""

import functools
import re

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from flax import traverse_util

from medpeft_jax import models
from medpeft_jax.models import layers
from tests.helpers import randomise


def param_shapes(name, num_classes=0, size=224, **overrides):
  model = models.create_model(name, num_classes=num_classes, **overrides)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return traverse_util.flatten_dict(variables["params"], sep="/")


def count(shapes, pattern=".*"):
  return sum(int(np.prod(s.shape)) for p, s in shapes.items() if re.fullmatch(pattern, p))


@pytest.mark.parametrize("name,trunk", [
    # timm/torchvision counts with num_classes=0. The paper's "ViT-B 87.2M" is not a trunk count.
    ("vit_b16", 85_798_656), ("vit_l16", 303_301_632), ("vit_h14", 630_764_800),
    ("resnet50", 23_508_032), ("mobilenet_v2", 2_223_872),
])
def test_full_size_trunk_parameter_counts(name, trunk):
  assert count(param_shapes(name)) == trunk


def test_head_is_sized_by_num_classes():
  shapes = param_shapes("resnet50", num_classes=3)
  assert shapes["head/kernel"].shape == (2048, 3)
  assert count(shapes) == 23_508_032 + 2048 * 3 + 3


def test_peft_regexes_read_naturally():
  """The paths DESIGN.md's regexes assume: TSA's main-path convs, ViT q/k/v, MobileNet's groups."""
  r50 = param_shapes("resnet50")
  main = [p for p in r50 if re.fullmatch(r"layer\d/block\d+/conv\d/kernel", p)]
  assert len(main) == 16 * 3
  assert len([p for p in r50 if "downsample_conv" in p]) == 4
  # A parallel 1x1 adapter beside every main-path conv: the paper's 10.6M TSA parameters.
  assert sum(r50[p].shape[2] * r50[p].shape[3] for p in main) == 10_616_832

  vit = param_shapes("vit_b16")
  assert vit["block11/attn/query/kernel"].shape == (768, 768)
  lora_r16_qv = sum(16 * sum(vit[p].shape) for p in vit if re.fullmatch(r".*attn/(query|value)/kernel", p))
  assert lora_r16_qv == 589_824  # the paper's ViT-B LoRA 0.6M (with a small head)
  assert count(vit, r".*norm\d?/(scale|bias)") == 38_400  # LayerNorm tuning ~0.04M

  mnv2 = param_shapes("mobilenet_v2")
  dw = [p for p in mnv2 if "depthwise_conv" in p]
  assert len(dw) == 17 and all(mnv2[p].shape[:3] == (3, 3, 1) for p in dw)


def test_batch_stats_and_train_mode():
  model = models.create_model("resnet18", num_classes=2, width=8, stage_sizes=(1, 1, 1, 1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  before = variables["batch_stats"]["stem_bn"]["mean"]
  after = updates["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(before, after)


@pytest.mark.parametrize("name,overrides", [
    ("vit_b16", dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)),
    ("resnet50", dict(width=8, stage_sizes=(1, 1, 1, 1))),
])
def test_bfloat16_compute_keeps_float32_params_and_logits(name, overrides):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  f32 = models.create_model(name, num_classes=3, **overrides)
  bf16 = models.create_model(name, num_classes=3, dtype=jnp.bfloat16, **overrides)
  variables = jax.jit(f32.init)(jax.random.key(0), x)
  head = jax.random.normal(jax.random.key(1), variables["params"]["head"]["kernel"].shape)
  variables = {**variables, "params": {**variables["params"], "head": {"kernel": head, "bias": jnp.zeros(3)}}}
  bf16_shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bf16_shapes))
  out, ref = jax.jit(bf16.apply)(variables, x), jax.jit(f32.apply)(variables, x)
  assert out.dtype == jnp.float32
  assert not np.array_equal(out, ref)  # the compute really ran in bfloat16 ...
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))  # ... and still agrees


def test_unknown_model_lists_the_registered_ones():
  with pytest.raises(KeyError, match="Unknown model 'vit_b32'.*mobilenet_v2.*vit_b16"):
    models.create_model("vit_b32", num_classes=2)


def test_image_size_must_be_a_multiple_of_the_patch():
  model = models.create_model("vit_b16", num_classes=2, patch_size=8, width=32, depth=1, mlp_dim=64,
                              num_heads=4)
  with pytest.raises(ValueError, match="multiple of the patch size 8"):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


# --- loading: heads, errors -------------------------------------------------------------------------

TINY_VIT = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)


@pytest.fixture(scope="module")
def timm_vit_file(tmp_path_factory):
  ref = randomise(timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=5))
  path = tmp_path_factory.mktemp("timm") / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), path)
  return path, ref


def test_head_reinitialised_for_another_num_classes(timm_vit_file):
  path, ref = timm_vit_file
  _, variables, report = models.load_pretrained("vit_b16", path, num_classes=3, image_size=32, **TINY_VIT)
  assert sorted(report.reinitialized) == ["params/head/bias", "params/head/kernel"]
  assert variables["params"]["head"]["kernel"].shape == (32, 3)
  assert not np.any(variables["params"]["head"]["kernel"])  # fresh zero-initialised head
  np.testing.assert_array_equal(variables["params"]["block1"]["mlp"]["fc2"]["kernel"],
                                ref.blocks[1].mlp.fc2.weight.detach().numpy().T)


def test_num_classes_zero_drops_the_head_and_returns_features(timm_vit_file):
  path, ref = timm_vit_file
  model, variables, report = models.load_pretrained("vit_b16", path, num_classes=0, image_size=32,
                                                    **TINY_VIT)
  assert "head" not in variables["params"]
  assert sorted(report.ignored) == ["params/head/bias", "params/head/kernel"]
  x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref_features = ref.forward_head(ref.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))),
                                    pre_logits=True).numpy()
  np.testing.assert_allclose(model.apply(variables, x), ref_features, atol=1e-4)


def test_wrong_architecture_is_refused_with_a_report(timm_vit_file):
  path, _ = timm_vit_file
  with pytest.raises(models.CheckpointMismatchError, match=r"mismatch: params/block0/attn/query/kernel"):
    models.load_pretrained("vit_b16", path, num_classes=5, image_size=32,
                           **{**TINY_VIT, "width": 64, "num_heads": 4})
  with pytest.raises(ValueError, match="none of the resnet layouts"):
    models.load_pretrained("resnet50", path, num_classes=5)


def test_missing_checkpoint_says_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"google/vit-base-patch16-224-in21k.*vit_base_patch16_224"):
    models.load_pretrained("vit_b16", tmp_path / "nope", num_classes=2)
  with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
    models.load_pretrained("resnet50", tmp_path / "nope.pth", num_classes=2)


@pytest.mark.parametrize("kernel,strides,padding,groups", [
    ((3, 3), 1, ((1, 1), (1, 1)), "depthwise"), ((3, 3), 2, "SAME", "depthwise"), ((5, 5), 2, 2, "depthwise"),
    ((1, 1), 2, "SAME", 1), ((4, 4), 4, "VALID", 1)])
def test_conv_fast_paths_match_flax_conv(kernel, strides, padding, groups):
  """layers.Conv's matmul and shifted-tap paths give nn.Conv's outputs and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 6))
  kwargs = dict(features=6, kernel_size=kernel, strides=strides, padding=padding,
                feature_group_count=6 if groups == "depthwise" else 1)
  ours, reference = layers.Conv(**kwargs), flax.linen.Conv(**kwargs)
  variables = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference.init(jax.random.key(1), x))

  def grads(module):
    return jax.tree.leaves(jax.grad(lambda v, x: (module.apply(v, x) ** 2).sum(), (0, 1))(variables, x))

  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  for a, b in zip(grads(ours), grads(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
