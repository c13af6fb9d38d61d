"""The FID Inception-v3 in Flax against pytorch-fid's network (random weights, written as its .pth)."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception as pytorch_fid_inception
from torchvision.models.inception import Inception3

from medpeft_jax.diffusion import fid
from medpeft_jax.models.weights.inception import load_fid_inception
from tests.helpers import randomise


def fid_inception_without_download():
  """pytorch-fid's `fid_inception_v3` minus its weight download: torchvision's Inception3 with the FID blocks."""
  net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  p = pytorch_fid_inception
  net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (p.FIDInceptionA(192, 32), p.FIDInceptionA(256, 64),
                                              p.FIDInceptionA(288, 64))
  net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (p.FIDInceptionC(768, c) for c in (128, 160, 160, 192))
  net.Mixed_7b, net.Mixed_7c = p.FIDInceptionE_1(1280), p.FIDInceptionE_2(2048)
  return randomise(net, seed=4)


def test_fid_features_match_pytorch_fid(tmp_path, monkeypatch):
  net = fid_inception_without_download()
  torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
  monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", lambda: net)
  reference = pytorch_fid_inception.InceptionV3([3]).eval()  # resize to 299, scale to [-1, 1], pool 3

  model, variables, report = load_fid_inception(tmp_path / "pt_inception.pth")
  assert report.ok and not report.unexpected and {k.split(".")[0] for k in report.ignored} >= {"fc"}
  images = np.random.default_rng(0).uniform(0, 1, (2, 64, 80, 3)).astype(np.float32)
  ours = jax.jit(model.apply)(variables, images)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))[0][:, :, 0, 0].numpy()
  assert ours.shape == (2, 2048)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_missing_weights_say_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    load_fid_inception(tmp_path / "nope.pth")


def test_compare_sets_from_folders_and_npz(tmp_path):
  """launch.fid's library path: PNG folder vs .npz, FID/KID equal to the maths on the same features."""
  torch.save(fid_inception_without_download().state_dict(), tmp_path / "w.pth")
  rng = np.random.default_rng(1)
  real = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # the t2i smoke size: one Inception program
  fake = np.clip(real.astype(int) + 40, 0, 255).astype(np.uint8)
  (tmp_path / "real").mkdir()
  for i, image in enumerate(real):
    Image.fromarray(image).save(tmp_path / "real" / f"{i}.png")
  np.savez(tmp_path / "fake.npz", images=fake)
  out = fid.compare_sets(tmp_path / "real", tmp_path / "fake.npz", tmp_path / "w.pth", batch_size=4,
                         kid_subsets=3, kid_subset_size=5)
  model, variables, _ = load_fid_inception(tmp_path / "w.pth")
  real_f, fake_f = (fid.inception_features(model, variables, x, batch_size=4) for x in (real, fake))
  assert out["num_real"] == out["num_fake"] == 5
  assert out["fid"] == pytest.approx(fid.fid_from_features(real_f, fake_f), rel=1e-6) and out["fid"] > 0
  assert out["kid"] == pytest.approx(fid.kernel_inception_distance(real_f, fake_f, subsets=3, subset_size=5)[0])
