"""Our Flax models, loaded through our torch-free readers, match the PyTorch references' logits."""

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
import transformers

from medpeft_jax import models
from tests.helpers import random_images, randomise, torch_logits

TOL = 1e-4
TINY_VIT = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)


def assert_logits_match(name, path, reference, num_classes=3, size=32, **overrides):
  x, x_torch = random_images(size=size)
  model, variables, report = models.load_pretrained(name, path, num_classes=num_classes, image_size=size,
                                                    **overrides)
  assert report.ok and not report.unexpected and not report.reinitialized, report
  ours = np.asarray(model.apply(variables, x))
  ref = torch_logits(reference, x_torch)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  return report


def tiny_timm_vit(num_classes=3):
  return randomise(timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=num_classes))


def tiny_hf_vit():
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
  return randomise(transformers.ViTForImageClassification(config))


def test_hf_vit_download_folder(tmp_path):
  """save_pretrained writes the hub layout (model.safetensors, old key names, config.json eps 1e-12)."""
  ref = tiny_hf_vit()
  ref.save_pretrained(tmp_path)
  assert_logits_match("vit_b16", tmp_path, ref, **TINY_VIT)


def test_hf_vit_state_dict_bin(tmp_path):
  """A transformers 5 in-memory state dict (q_proj/.../mlp names) saved with torch.save."""
  ref = tiny_hf_vit()
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  assert_logits_match("vit_b16", tmp_path / "pytorch_model.bin", ref, norm_eps=1e-12, **TINY_VIT)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_vit(tmp_path, fmt):
  ref = tiny_timm_vit()
  path = tmp_path / f"model.{fmt}"
  if fmt == "safetensors":
    safetensors.torch.save_file(ref.state_dict(), path)
  else:
    torch.save(ref.state_dict(), path)
  assert_logits_match("vit_b16", path, ref, **TINY_VIT)


def _random_vit_npz(rng, depth=2, d=32, heads=4, mlp=64, patch=8, tokens=17, classes=3):
  """A random checkpoint in the original ViT (vit_jax) .npz layout."""
  r = lambda *s: rng.standard_normal(s).astype(np.float32) / np.sqrt(s[0] if len(s) > 1 else 4)
  w = {"cls": r(1, 1, d), "embedding/kernel": r(patch, patch, 3, d), "embedding/bias": r(d),
       "Transformer/posembed_input/pos_embedding": r(1, tokens, d),
       "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d),
       "head/kernel": r(d, classes), "head/bias": r(classes)}
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = 1 + r(d), r(d)
    for n in ("query", "key", "value"):
      w[f"{b}MultiHeadDotProductAttention_1/{n}/kernel"] = r(d, heads, d // heads)
      w[f"{b}MultiHeadDotProductAttention_1/{n}/bias"] = r(heads, d // heads)
    w[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = r(heads, d // heads, d)
    w[f"{b}MultiHeadDotProductAttention_1/out/bias"] = r(d)
    w[f"{b}MlpBlock_3/Dense_0/kernel"], w[f"{b}MlpBlock_3/Dense_0/bias"] = r(d, mlp), r(mlp)
    w[f"{b}MlpBlock_3/Dense_1/kernel"], w[f"{b}MlpBlock_3/Dense_1/bias"] = r(mlp, d), r(d)
  return w


def test_big_vision_npz_matches_timm_npz_import(tmp_path):
  """timm's own .npz importer is the reference for the original ViT layout."""
  w = _random_vit_npz(np.random.default_rng(0))
  np.savez(tmp_path / "ViT-tiny.npz", **w)
  ref = tiny_timm_vit()
  timm.models.vision_transformer._load_weights(ref, str(tmp_path / "ViT-tiny.npz"))
  assert_logits_match("vit_b16", tmp_path / "ViT-tiny.npz", ref, **TINY_VIT)

  # big_vision's scanned variant stacks the blocks along a leading depth axis.
  scanned = {k: v for k, v in w.items() if "encoderblock_" not in k}
  for k in [k for k in w if "encoderblock_0/" in k]:
    layers = [w[k.replace("encoderblock_0/", f"encoderblock_{i}/")] for i in range(2)]
    scanned[k.replace("encoderblock_0", "encoderblock")] = np.stack(layers)
  np.savez(tmp_path / "scanned.npz", **scanned)
  assert_logits_match("vit_b16", tmp_path / "scanned.npz", ref, **TINY_VIT)


def test_pos_embed_resampled_for_another_image_size(tmp_path):
  """A 32 px checkpoint used at 48 px matches timm with its position grid resampled bilinearly."""
  src = tiny_timm_vit()
  safetensors.torch.save_file(src.state_dict(), tmp_path / "model.safetensors")
  ref = timm.models.vision_transformer.VisionTransformer(
      img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=3).eval()
  state = src.state_dict()
  state["pos_embed"] = timm.layers.resample_abs_pos_embed(
      state["pos_embed"], [6, 6], interpolation="bilinear", antialias=False)
  ref.load_state_dict(state)
  report = assert_logits_match("vit_b16", tmp_path / "model.safetensors", ref, size=48, **TINY_VIT)
  assert report.resampled == ["params/pos_embed (1, 17, 32) -> (1, 37, 32)"]


@pytest.mark.parametrize("block,stages", [("bottleneck", (1, 1, 1, 1)), ("basic", (1, 1, 1, 1))])
def test_torchvision_resnet(tmp_path, block, stages):
  tv_block = {"bottleneck": torchvision.models.resnet.Bottleneck,
              "basic": torchvision.models.resnet.BasicBlock}[block]
  ref = randomise(torchvision.models.resnet.ResNet(tv_block, list(stages), num_classes=3))
  torch.save(ref.state_dict(), tmp_path / "resnet.pth")
  name = {"bottleneck": "resnet50", "basic": "resnet18"}[block]
  assert_logits_match(name, tmp_path / "resnet.pth", ref, stage_sizes=stages)


def test_timm_resnet(tmp_path):
  """timm's ResNet (e.g. resnet50.tv_in1k) shares torchvision's names; it is its own implementation."""
  ref = randomise(timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 2, 1, 1], num_classes=3))
  safetensors.torch.save_file(ref.state_dict(), tmp_path / "model.safetensors")
  assert_logits_match("resnet18", tmp_path / "model.safetensors", ref, stage_sizes=(1, 2, 1, 1))


def test_hf_resnet_download_folder(tmp_path):
  config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
                                     layer_type="bottleneck", num_labels=3)
  ref = randomise(transformers.ResNetForImageClassification(config))
  ref.save_pretrained(tmp_path)
  assert_logits_match("resnet50", tmp_path, ref, stage_sizes=(1, 2, 1, 1), width=8)


def test_torchvision_mobilenet_v2(tmp_path):
  ref = randomise(torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25))
  torch.save(ref.state_dict(), tmp_path / "mobilenet_v2.pth")
  assert_logits_match("mobilenet_v2", tmp_path / "mobilenet_v2.pth", ref, width_mult=0.25)


def test_resnet_train_mode_normalises_with_batch_statistics(tmp_path):
  """In train mode both frameworks normalise with the batch's (biased) statistics."""
  ref = randomise(torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                   num_classes=3))
  torch.save(ref.state_dict(), tmp_path / "resnet.pth")
  model, variables, _ = models.load_pretrained("resnet18", tmp_path / "resnet.pth", num_classes=3,
                                               image_size=32, stage_sizes=(1, 1, 1, 1))
  x, x_torch = random_images(n=4)
  ours, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  with torch.no_grad():
    ref_out = ref.train()(x_torch).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref_out, atol=TOL, rtol=0)
  # Running means move towards the batch means with torch's momentum 0.1.
  np.testing.assert_allclose(np.asarray(updates["batch_stats"]["stem_bn"]["mean"]),
                             ref.bn1.running_mean.numpy(), atol=1e-5)
