"""PEFT interoperability and files: Hugging Face PEFT parity, adapter save/load, the params CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
import torchvision
import transformers

from medpeft_jax import models, peft
from medpeft_jax.peft.interop.hf_peft import load_hf_peft_lora
from medpeft_jax.train.step import init_train_state, make_train_step
from tests.helpers import random_images, randomise, torch_logits

TINY_VIT = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4)


def _random_lora_factors(model, seed=0):
  """peft initialises B = 0 (an identity); give A and B random non-zero values."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_lora_matches_hugging_face_peft_on_a_vit(tmp_path):
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
  base = randomise(transformers.ViTForImageClassification(config))
  base.save_pretrained(tmp_path / "base")
  lora_config = hf_peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
  ref = hf_peft.get_peft_model(base, lora_config)
  _random_lora_factors(ref)
  ref.save_pretrained(tmp_path / "adapter")

  model, variables, _ = models.load_pretrained("vit_b16", tmp_path / "base", num_classes=3, image_size=32,
                                               **TINY_VIT)
  method, trained = load_hf_peft_lora(tmp_path / "adapter", "vit_b16")
  assert sorted(trained["adapters"]) == ["block0/attn/query", "block0/attn/value", "block1/attn/query",
                                         "block1/attn/value"]
  assert method.scale == 2.0
  x, x_torch = random_images()
  ours = method.apply(model, variables, trained, x)
  np.testing.assert_allclose(ours, torch_logits(ref, x_torch), atol=1e-4, rtol=0)
  merged = {"params": method.merge(variables["params"], trained)}
  np.testing.assert_allclose(model.apply(merged, x), ours, atol=1e-5, rtol=0)


def test_conv_lora_matches_hugging_face_peft_on_a_resnet_conv(tmp_path):
  base = randomise(torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                    num_classes=3))
  torch.save(base.state_dict(), tmp_path / "resnet.pth")
  targets = ["layer1.0.conv2", "layer2.0.conv1"]  # a 3x3 stride-1 and a 3x3 stride-2 conv
  ref = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
  _random_lora_factors(ref, seed=1)
  ref.save_pretrained(tmp_path / "adapter")

  model, variables, _ = models.load_pretrained("resnet18", tmp_path / "resnet.pth", num_classes=3,
                                               image_size=32, stage_sizes=(1, 1, 1, 1))
  method, trained = load_hf_peft_lora(tmp_path / "adapter", "resnet18")
  assert trained["adapters"]["layer2/block0/conv1"]["a"].shape == (3, 3, 64, 4)
  x, x_torch = random_images()
  np.testing.assert_allclose(method.apply(model, variables, trained, x), torch_logits(ref, x_torch),
                             atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trained_resnet():
  """A tiny ResNet after two train-mode steps of bias tuning: BatchNorm statistics have moved."""
  model = models.create_model("resnet18", num_classes=3, width=8, stage_sizes=(1, 1, 1, 1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  method = peft.get_method("bias")
  state = init_train_state(method, variables, optax.adam(1e-2), jax.random.key(1))
  step = make_train_step(model, method, optax.adam(1e-2))
  for _ in range(2):
    state, _ = step(state, variables["params"], {"image": x, "label": jnp.array([0, 1, 2, 0])})
  return model, variables, method, state, x


def test_adapter_round_trip_is_bit_identical_with_batch_stats(tmp_path, trained_resnet):
  model, variables, method, state, x = trained_resnet
  assert not np.array_equal(state.batch_stats["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"])
  size = peft.save_adapter(tmp_path / "bias", method, state.trainable, state.batch_stats, base_model="resnet18",
                           dataset="toy")
  assert size == (tmp_path / "bias" / "adapter_model.safetensors").stat().st_size
  assert sorted(os.listdir(tmp_path / "bias")) == ["adapter_config.json", "adapter_model.safetensors"]
  adapter = peft.load_adapter(tmp_path / "bias")
  assert adapter.method == method and adapter.config["base_model"] == "resnet18"
  assert adapter.config["dataset"] == "toy"
  saved = {**variables, "batch_stats": state.batch_stats}
  expected = method.apply(model, saved, state.trainable, x)
  restored = adapter.method.apply(model, {**variables, "batch_stats": adapter.batch_stats}, adapter.trainable, x)
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(expected))


def test_adapter_bank_switches_adapters_on_one_base(tmp_path, trained_resnet):
  model, variables, method, state, x = trained_resnet
  lora = peft.get_method("lora", targets=r"layer\d/block\d+/conv\d", rank=2)
  lora_params = jax.tree.map(lambda a: a + 0.1, lora.init(jax.random.key(2), variables["params"]))
  peft.save_adapter(tmp_path / "lora", lora, lora_params, base_model="resnet18")
  peft.save_adapter(tmp_path / "bias", method, state.trainable, state.batch_stats, base_model="resnet18")
  bank = peft.AdapterBank(model, variables)
  bank.add("bias", tmp_path / "bias")
  bank.add("lora", tmp_path / "lora")
  np.testing.assert_array_equal(bank.apply("bias", x), method.apply(
      model, {**variables, "batch_stats": state.batch_stats}, state.trainable, x))
  np.testing.assert_array_equal(bank.apply("lora", x), lora.apply(model, variables, lora_params, x))
  assert not np.allclose(bank.apply("bias", x), bank.apply("lora", x))
  with pytest.raises(KeyError, match="No adapter 'ssf'; loaded: bias, lora"):
    bank.apply("ssf", x)


def test_unfoldable_adapters_still_save_and_load(tmp_path):
  model = models.create_model("vit_b16", num_classes=3, **TINY_VIT)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  method = peft.get_method("adaptformer", bottleneck=4)
  trained = jax.tree.map(lambda a: a + 0.1, method.init(jax.random.key(1), variables["params"]))
  peft.save_adapter(tmp_path / "af", method, trained, base_model="vit_b16")
  adapter = peft.load_adapter(tmp_path / "af")
  np.testing.assert_array_equal(adapter.method.apply(model, variables, adapter.trainable, x),
                                method.apply(model, variables, trained, x))


def test_params_command_prints_one_hugging_face_line():
  result = subprocess.run(
      [sys.executable, "-m", "launch.params", "--config",
       "configs/classify.py:model=vit_b16,method=lora,num_classes=3"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == "trainable params: 592,131 || all params: 86,390,787 || trainable%: 0.6854\n"


def test_hf_peft_cli_converts_both_ways_with_the_head(tmp_path):
  """launch.hf_peft: an HF LoRA adapter with its classifier in modules_to_save becomes our adapter (head
  included) and goes back to an HF folder that PeftModel loads; outputs equal torch's both times."""
  from launch import hf_peft as cli  # noqa: PLC0415

  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
  base = randomise(transformers.ViTForImageClassification(config))
  base.save_pretrained(tmp_path / "base")
  torch.save(base.state_dict(), tmp_path / "state_dict.bin")  # the module names an adapter for it uses
  ref = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        modules_to_save=["classifier"]))
  _random_lora_factors(ref)
  with torch.no_grad():
    ref.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)  # a head unlike the base's
  ref.save_pretrained(tmp_path / "hf")
  x, x_torch = random_images()
  expected = torch_logits(ref, x_torch)

  cli.import_hf(str(tmp_path / "hf"), "vit_b16", str(tmp_path / "base"), str(tmp_path / "ours"), image_size=32,
                **TINY_VIT)
  adapter = peft.load_adapter(tmp_path / "ours")
  assert sorted(adapter.trainable["params"]) == ["head/bias", "head/kernel"]
  model, variables, _ = models.load_pretrained("vit_b16", tmp_path / "base", num_classes=3, image_size=32, **TINY_VIT)
  np.testing.assert_allclose(adapter.method.apply(model, variables, adapter.trainable, x), expected, atol=1e-4, rtol=0)

  cli.export_hf(str(tmp_path / "ours"), str(tmp_path / "state_dict.bin"), str(tmp_path / "back"), image_size=32,
                **TINY_VIT)
  fresh = transformers.ViTForImageClassification.from_pretrained(tmp_path / "base")
  again = hf_peft.PeftModel.from_pretrained(fresh, tmp_path / "back")
  np.testing.assert_allclose(torch_logits(again, x_torch), expected, atol=1e-4, rtol=0)


def test_a_hugging_face_lora_with_trained_biases_is_refused_not_dropped(tmp_path):
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
  ref = hf_peft.get_peft_model(transformers.ViTForImageClassification(config),
                               hf_peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
  ref.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="lora_bias=true .* not supported"):
    load_hf_peft_lora(tmp_path, "vit_b16")
