"""The paper's text-to-image strategies on the SD U-Net: counts at full size, exact merges on a tiny one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from medpeft_jax import presets
from medpeft_jax.models import unet
from medpeft_jax.models.weights import diffusers as sd_weights
from medpeft_jax.peft.interop.diffusers import export_unet_lora
from tests import sd_fakes

FULL_SIZE = {"full": 859_520_964, "attention": 267_239_360, "bias": 343_684, "norm": 200_320,
             "bias_norm_attention": 267_421_124, "lora": 797_184, "svdiff": 222_696, "difffit": 481_284}


def test_trainable_counts_at_sd_v15_shapes():
  """Paper: bias 0.34M, norm 0.2M, LoRA 0.8M, SV-Diff 0.22M, DiffFit 0.58M (= ours + the norm biases counted twice)."""
  params = jax.eval_shape(unet.UNet2DConditionModel().init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                          jnp.zeros((1,)), jnp.zeros((1, 77, 768)))["params"]
  methods = {name: presets.build_method(presets.UNET, name) for name in presets.PRESETS["unet"]}
  counts = {name: m.count(params, jax.eval_shape(m.init, jax.random.key(0), params)).trainable
            for name, m in methods.items()}
  assert counts == FULL_SIZE
  assert FULL_SIZE["difffit"] + FULL_SIZE["norm"] // 2 == 581_444  # the paper's "0.58M"


@pytest.fixture(scope="module")
def tiny():
  model = unet.UNet2DConditionModel(unet.UNetConfig.from_dict({  # one level: every block kind, small compiles
      **sd_fakes.UNET, "block_out_channels": (32,), "down_block_types": ("CrossAttnDownBlock2D",),
      "up_block_types": ("CrossAttnUpBlock2D",)}))
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((1, 8, 8, 4), dtype=np.float32), jnp.array([300]),
            rng.standard_normal((1, 3, 32), dtype=np.float32))
  return model, jax.jit(model.init)(jax.random.key(0), *inputs)["params"], inputs


# The paper's three foldable strategies, and the LyCORIS / HF PEFT methods by the U-Net's roles (attention
# projections, feed-forwards and resnet convs: LoHa and LoKr are LyCORIS's own SD methods).
@pytest.mark.parametrize("name", ["lora", "difffit", "svdiff", "ia3", "loha", "lokr", "oft", "boft"])
def test_training_path_equals_merged_weights(tiny, name):
  model, params, inputs = tiny
  method = presets.build_method(presets.UNET, name)
  peft = method.init(jax.random.key(1), params)
  # Move every trainable leaf away from its initialisation (LoRA's B = 0, DiffFit's γ = 1 and SV-Diff's
  # δ = 0 are identities).
  leaves, tree = jax.tree.flatten(peft)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  peft = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  trained = method.apply(model, {"params": params}, peft, *inputs)
  merged = model.apply({"params": method.merge(params, peft)}, *inputs)
  np.testing.assert_allclose(trained, merged, atol=1e-4, rtol=1e-4)
  assert not np.allclose(trained, model.apply({"params": params}, *inputs), atol=1e-3)


def test_svdiff_rebuilds_every_kernel_and_clamps_at_zero(tiny):
  """δ = 0 rebuilds each kernel from its SVD; relu(σ + δ) clamps a spectrum shifted below 0."""
  _, params, _ = tiny
  method = presets.build_method(presets.UNET, "svdiff")
  derived = method.derived_state(params)
  peft = method.init(jax.random.key(0), params)
  flat = traverse_util.flatten_dict(params, sep="/")
  kernels = [p for p, x in flat.items() if p.endswith("/kernel")]
  assert sorted(f"{m}/kernel" for m in peft["adapters"]) == sorted(kernels)
  merged = traverse_util.flatten_dict(method.merge(params, peft, derived=derived), sep="/")
  assert merged.keys() == flat.keys()  # the derived factors never leak into the parameters
  for p in kernels:
    np.testing.assert_allclose(merged[p], flat[p], atol=2e-5 * float(np.abs(flat[p]).max()))
  module = "conv_in"
  peft["adapters"][module]["delta"] = -2 * derived[f"{module}/svd_s"]
  assert not np.any(method.merge(params, peft, derived=derived)["conv_in"]["kernel"])


def test_selective_strategies_touch_only_their_leaves(tiny):
  _, params, _ = tiny
  chosen = {name: set(presets.build_method(presets.UNET, name).init(jax.random.key(0), params)["params"])
            for name in ("attention", "bias", "norm", "bias_norm_attention", "difffit")}
  assert all("attentions_" in p for p in chosen["attention"])
  assert all(p.endswith("/bias") for p in chosen["bias"]) and any("norm" in p for p in chosen["bias"])
  assert all("norm" in p.rsplit("/", 2)[-2] for p in chosen["norm"])
  assert chosen["bias_norm_attention"] == chosen["attention"] | chosen["bias"] | chosen["norm"]
  assert chosen["difffit"] == chosen["bias"] | chosen["norm"]
  # Beyond the paper's table, methods go by the U-Net's roles; one whose layers it lacks says so.
  with pytest.raises(ValueError, match="vpt on stable_diffusion_unet: .* declares none of them"):
    presets.build_method(presets.UNET, "vpt")


def test_lora_exports_to_diffusers_naming(tmp_path):
  """Our U-Net + LoRA equals diffusers' U-Net with the exported file loaded by diffusers itself."""
  reference = sd_fakes.write_pipeline(tmp_path / "pipe")["unet"]
  model, params, _ = sd_weights.load_component(tmp_path / "pipe", "unet")
  method = presets.build_method(presets.UNET, "lora", alpha=8)  # scale 2: exported into B
  peft = method.init(jax.random.key(1), params)
  peft["adapters"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                                  peft["adapters"])
  path = export_unet_lora(method, peft, tmp_path / "lora")
  reference.load_lora_adapter(str(path.parent), prefix="unet", weight_name=path.name)
  rng = np.random.default_rng(0)
  x, context = rng.standard_normal((1, 8, 8, 4), dtype=np.float32), rng.standard_normal((1, 5, 32), dtype=np.float32)
  ours = method.apply(model, {"params": params}, peft, x, jnp.array([400]), context)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.tensor([400]),
                       torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  assert not np.allclose(ours, model.apply({"params": params}, x, jnp.array([400]), context), atol=1e-3)
