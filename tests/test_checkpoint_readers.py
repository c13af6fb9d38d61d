"""The torch-free readers return exactly what torch.load / safetensors return, and run no code."""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
import transformers

from medpeft_jax import assets
from medpeft_jax.models.weights import (
  UnsafeCheckpointError,
  load_torch_checkpoint,
  read_checkpoint,
  read_safetensors,
)


def assert_same_as_torch(ours, ref, where="root"):
  """Same structure, names, shapes, dtypes and values."""
  if isinstance(ref, torch.Tensor):
    assert isinstance(ours, np.ndarray), where
    assert ours.shape == tuple(ref.shape), where
    assert str(ours.dtype) == str(ref.dtype).removeprefix("torch."), (where, ours.dtype, ref.dtype)
    ref = ref.detach()
    ref_np = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
    np.testing.assert_array_equal(ours.astype(ref_np.dtype), ref_np, err_msg=where)
  elif isinstance(ref, dict):
    assert type(ours) is type(ref) and list(ours) == list(ref), where
    for k in ref:
      assert_same_as_torch(ours[k], ref[k], f"{where}.{k}")
  elif isinstance(ref, (list, tuple)):
    assert type(ours) is type(ref) and len(ours) == len(ref), where
    for i, (a, b) in enumerate(zip(ours, ref)):
      assert_same_as_torch(a, b, f"{where}[{i}]")
  else:
    assert ours == ref, where


def _tricky_checkpoint():
  """Views sharing one storage, non-contiguous and offset tensors, scalars, every common dtype."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return {
      "epoch": 7, "name": "run", "lr": [1e-3, 0.5],
      "state_dict": collections.OrderedDict(
          transposed=base.t(), row=base[2], strided=base[:, ::2], scalar=torch.tensor(3.5),
          bf16=torch.randn(5).bfloat16(), f16=torch.randn(3).half(), f64=torch.randn(2, dtype=torch.float64),
          i64=torch.arange(5), i32=torch.arange(3, dtype=torch.int32), u8=torch.arange(4, dtype=torch.uint8),
          i8=torch.arange(-2, 2, dtype=torch.int8), b=torch.tensor([True, False]),
          param=torch.nn.Parameter(torch.randn(2, 2))),
  }


CHECKPOINTS = {
    "torchvision_mobilenet_v2":
        lambda: torchvision.models.mobilenet_v2(num_classes=4, width_mult=0.5).state_dict(),
    "torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=4).state_dict(),
    "timm_vit": lambda: timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=4).state_dict(),
    "hf_vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=4)).state_dict(),
    "tricky": _tricky_checkpoint,
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_reader_matches_torch_load(tmp_path, kind, legacy):
  torch.manual_seed(0)
  path = tmp_path / "ckpt.pth"
  torch.save(CHECKPOINTS[kind](), path, _use_new_zipfile_serialization=not legacy)
  ours = load_torch_checkpoint(path)
  assert_same_as_torch(ours, torch.load(path, weights_only=True))
  if kind != "tricky":  # state_dict() metadata (module versions) survives too
    assert ours._metadata == torch.load(path, weights_only=True)._metadata


def test_reader_matches_torch_load_on_the_real_mobilenet_v2_file():
  path = assets.asset_path("mobilenet_v2_imagenet")
  assert_same_as_torch(load_torch_checkpoint(path), torch.load(path, weights_only=True))


def test_hf_pytorch_model_bin_folder(tmp_path):
  """A Hugging Face folder with pytorch_model.bin is read, flattened and its config kept."""
  model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_labels=2))
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  ckpt = read_checkpoint(tmp_path)
  ref = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
  assert ckpt.files == [str(tmp_path / "pytorch_model.bin")] and ckpt.config["model_type"] == "resnet"
  assert list(ckpt.tensors) == list(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(ckpt.tensors[k], v.numpy())


def test_wrapped_and_data_parallel_state_dicts_are_unwrapped(tmp_path):
  sd = {"module.fc.weight": torch.ones(2, 3), "module.fc.bias": torch.zeros(2)}
  torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "ckpt.pth")
  assert sorted(read_checkpoint(tmp_path / "ckpt.pth").tensors) == ["fc.bias", "fc.weight"]


def test_safetensors_reader_matches_safetensors_torch(tmp_path):
  tensors = {"bf16": torch.randn(3, 2).bfloat16(), "f32": torch.randn(4), "i64": torch.arange(3),
             "f16": torch.randn(2, 2).half(), "empty": torch.zeros(0, 3)}
  safetensors.torch.save_file(tensors, tmp_path / "t.safetensors")
  ours = read_safetensors(tmp_path / "t.safetensors")
  assert ours["bf16"].dtype == ml_dtypes.bfloat16
  assert_same_as_torch(ours, safetensors.torch.load_file(tmp_path / "t.safetensors"))


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pth_is_refused_and_not_run(tmp_path, container):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"weight": _Exploit(marker)}, protocol=2)
  path = tmp_path / "evil.pth"
  if container == "zip":
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("evil/data.pkl", payload)
      zf.writestr("evil/byteorder", "little")
  else:
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
      pickle.dump(header, buf, protocol=2)
    path.write_bytes(buf.getvalue() + payload)
  with pytest.raises(UnsafeCheckpointError, match=r"`(posix|os)\.system`"):
    load_torch_checkpoint(path)
  assert not marker.exists()


def test_pickled_module_is_refused_with_advice(tmp_path):
  torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # a whole module, not a state dict
  with pytest.raises(UnsafeCheckpointError, match="state dict"):
    read_checkpoint(tmp_path / "model.pth")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "notes.pth").write_bytes(b"hello")
  with pytest.raises(ValueError, match="neither a zip nor a legacy torch checkpoint"):
    load_torch_checkpoint(tmp_path / "notes.pth")
