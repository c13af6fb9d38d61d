"""Hugging Face PEFT folders both ways for DoRA and for per-module LoRA/DoRA ranks (rank_pattern /
alpha_pattern), on the tiny dense + conv model of test_peft_methods: HF's adapters import with output parity,
ours (combined ones too, whose ranks differ per module) load into `peft.PeftModel` with parity, and the
conversion round-trips exactly (peft #3737: merged adapters with a rank_pattern did not reload)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
from peft.utils.other import get_pattern_key

from medpeft_jax import peft
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.peft.interop.hf_peft import _pattern, _rank_patterns, from_hf_peft, save_hf_peft, to_hf_peft
from tests.test_peft_methods import randomised, run, tiny, torch_outputs, torch_tiny

_ALL = ["conv1", "conv2", "conv3", "fc1", "fc2"]

IMPORTS = {  # id: (our method, HF LoraConfig kwargs), on the 3x3, 1x1 and strided convs and both dense layers
    "dora": ("dora", dict(r=2, lora_alpha=3, use_dora=True, target_modules=_ALL)),
    # Regex and suffix keys; per-module scales 0.75 .. 2.5 against the method's 1.5: folded into B.
    "rank_pattern": ("lora", dict(r=2, lora_alpha=3, target_modules=_ALL, rank_pattern={"conv1": 4, r"fc\d": 3},
                                  alpha_pattern={"^conv3": 5, "fc2": 2})),
    "dora-rslora-ranks": ("dora", dict(r=4, lora_alpha=2, use_rslora=True, use_dora=True,  # alpha / sqrt(r)
                                       target_modules=_ALL, rank_pattern={"conv[23]": 1, "fc1": 6})),
}
EXPORTS = {  # id: (our method, its sources: one exports as is, several combine with "cat": per-module ranks)
    "dora": ("dora", [dict(targets="|".join(_ALL), rank=2, alpha=3.0)]),
    "lora-cat": ("lora", [dict(targets="conv1|fc1", rank=2, alpha=4.0),
                          dict(targets="conv3|fc1|fc2", rank=3, rslora=True)]),
    "dora-cat": ("dora", [dict(targets="conv1|conv3|fc1", rank=2, alpha=3.0),
                          dict(targets="conv2|fc1|fc2", rank=1)]),
}


def dots(path):
  return path.replace("/", ".")


def load(folder):
  """Our (method, trainable) for an HF PEFT folder of the tiny model."""
  config = json.loads((folder / "adapter_config.json").read_text())
  method, trained, _ = from_hf_peft(config, read_checkpoint(folder).tensors, lambda m: m.replace(".", "/"),
                                    tiny()[1]["params"])
  return method, trained


def ranks(trained) -> dict[str, int]:
  return {m: int(a["a"].shape[-1]) for m, a in trained["adapters"].items()}


def hf_layers(ref, trained):
  return {m: ref.base_model.model.get_submodule(m) for m in trained["adapters"]}


def assert_exported_with_parity(method, trained, folder) -> None:
  """`save_hf_peft`, `PeftModel.from_pretrained` computes our output with our per-module ranks and scales, and
  the folder imports back to the same factors (the method: the same scale; HF's r is the most common rank)."""
  save_hf_peft(folder, method, trained, tiny()[1]["params"], dots)
  ref = hf_peft.PeftModel.from_pretrained(torch_tiny(tiny()[1]["params"]), folder)
  np.testing.assert_allclose(torch_outputs(ref), run(method, trained), atol=1e-4, rtol=0)
  layers = hf_layers(ref, trained)
  assert {m: layer.r["default"] for m, layer in layers.items()} == ranks(trained)
  assert {np.float32(layer.scaling["default"]) for layer in layers.values()} == {np.float32(method.scale)}
  back, again = load(folder)
  assert type(back) is type(method) and np.float32(back.scale) == np.float32(method.scale)
  assert dataclasses.replace(back, rank=method.rank, alpha=method.alpha) == method
  jax.tree.map(np.testing.assert_array_equal, again, trained)


@pytest.mark.parametrize("case", IMPORTS)
def test_hugging_face_adapters_import_with_parity_and_export_back(case, tmp_path):
  model, variables, x = tiny()
  name, kwargs = IMPORTS[case]
  ref = hf_peft.get_peft_model(torch_tiny(variables["params"]), hf_peft.LoraConfig(**kwargs))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # B starts at zero and the magnitudes at the base's norms: move every adapter tensor
    for key, p in ref.named_parameters():
      if "lora_magnitude_vector" in key:
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "lora_" in key:
        p.add_(0.3 * torch.randn(p.shape, generator=g))
  ref.save_pretrained(tmp_path / "hf")
  method, trained = load(tmp_path / "hf")
  assert method.name == name and method.rslora == kwargs.get("use_rslora", False)
  assert ranks(trained) == {m: layer.r["default"] for m, layer in hf_layers(ref, trained).items()}
  theirs, ours = torch_outputs(ref), run(method, trained)
  assert float(np.abs(theirs - jax.jit(model.apply)(variables, x)).max()) > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert method.count(variables["params"], trained).trainable == ref.get_nb_trainable_parameters()[0]
  assert_exported_with_parity(method, trained, tmp_path / "back")


@pytest.mark.parametrize("case", EXPORTS)
def test_our_adapters_export_with_parity_and_round_trip(case, tmp_path):
  params = tiny()[1]["params"]
  name, sources = EXPORTS[case]
  methods = [peft.get_method(name, head=None, **kw) for kw in sources]
  trained = [randomised(m, seed=3 + 2 * i) for i, m in enumerate(methods)]
  if len(methods) == 1:
    method, trained = methods[0], trained[0]
  else:
    method, trained = peft.combine(list(zip(methods, trained)), [0.8, 0.5], "cat", params=params)
    assert len(set(ranks(trained).values())) > 1 and method.name == name
  assert_exported_with_parity(method, trained, tmp_path)
  if len(methods) == 1:
    assert load(tmp_path)[0] == method


def test_pattern_keys_match_as_peft_matches_them():
  # Imported keys: peft's regex over the name or a dotted suffix, first match wins; exported keys are
  # anchored, so the stem's "conv1" does not also give its rank to "layer1.0.conv1".
  patterns = {"conv1": 1, r"layer\d\.0\.conv2": 2, "^layer1.1.conv1": 3, "fc": 4}
  for module in ("conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv2", "fc", "head.fc", "fc2"):
    assert _pattern(patterns, module, 0) == patterns.get(get_pattern_key(patterns, module), 0), module
  method = peft.get_method("lora", rank=2, alpha=3.0, rslora=True, head=None)
  ours = {"conv1": 4, "layer1.0.conv1": 2, "layer1.1.conv1": 2, "layer1.0.conv2": 8}
  config = _rank_patterns(method, ours)
  assert config["r"] == 2 and config["lora_alpha"] == 3.0
  for module, rank in ours.items():
    assert _pattern(config["rank_pattern"], module, config["r"]) == rank
    alpha = _pattern(config["alpha_pattern"], module, config["lora_alpha"])
    assert np.float32(alpha / np.sqrt(rank)) == np.float32(method.scale)


def test_what_does_not_convert_is_refused_with_the_field_named():
  params = tiny()[1]["params"]
  method = peft.get_method("dora", targets="conv1|fc1", rank=2, head=None)
  config, tensors = to_hf_peft(method, randomised(method), params, dots)
  lora = {k: v for k, v in tensors.items() if "magnitude" not in k}

  def convert(changes, tensors=tensors):
    return from_hf_peft({**config, **changes}, tensors, lambda m: m.replace(".", "/"), params)

  with pytest.raises(ValueError, match="use_dora=False disagrees with its tensors"):
    convert({"use_dora": False})
  with pytest.raises(ValueError, match="use_dora=True disagrees with its tensors"):
    convert({}, {k: v for k, v in tensors.items() if k != "base_model.model.fc1.lora_magnitude_vector"})
  with pytest.raises(ValueError, match="init_lora_weights='pissa' converts without use_dora, rank_pattern"):
    convert({"init_lora_weights": "pissa"})
  with pytest.raises(ValueError, match="fc1's factors have rank 2, but r/rank_pattern give it 3"):
    convert({"use_dora": False, "rank_pattern": {"fc1": 3}}, lora)
  with pytest.raises(ValueError, match="convert for LoRA and DoRA only, not LOHA"):
    from_hf_peft({"peft_type": "LOHA", "r": 2, "alpha": 2, "rank_pattern": {"fc1": 3}}, {}, str, params)
