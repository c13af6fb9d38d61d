"""AdaLoRA, FacT and GLoRA on the tiny conv + dense stack of test_peft_methods (its fixtures): identity at
init, merge == training path, gradients only on their leaves, files; AdaLoRA against Hugging Face PEFT
(forward, regulariser, conversion both ways, and the rank budget against its `RankAllocator` on the same
scores)."""

from __future__ import annotations

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch

from medpeft_jax import models, peft, presets
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.peft.core import flatten
from medpeft_jax.peft.interop.hf_peft import FORMATS, from_hf_peft, save_hf_peft, to_ours
from medpeft_jax.train.step import init_train_state, make_train_step
from tests.test_peft_methods import (
  _CONVS,
  _DENSE,
  LAYERS,
  TorchTiny,
  assert_trains_on_activations,
  randomised,
  randomised_for,
  run,
  tiny,
  torch_outputs,
  torch_tiny,
)

ADALORA = dict(targets=LAYERS, init_r=4, target_r=2, alpha=3.0, tinit=5, total_step=20)
CASES = {  # id: (method, hyperparameters); each adapts convs (1x1, strided 3x3) and dense layers
    "adalora": ("adalora", ADALORA),
    # Shared width d = 8: conv2 is 1x2 slices of 8x8, conv3 2x1 (per tap), fc1 1x8.
    "fact-tt": ("fact", dict(targets="conv2|conv3|fc1", rank=2, scale=2.0)),
    "fact-tk": ("fact", dict(targets="conv2|conv3|fc1", rank=3, scale=2.0, variant="tk")),
    "glora": ("glora", dict(targets=LAYERS, rank=2, a="lora", b="lora", c="lora", d="vector", e="scalar")),
    "glora-vectors": ("glora", dict(targets=LAYERS, a="scalar", b="vector", c="vector", d="scalar",
                                    e="vector")),
}


def method_for(case):
  name, kw = CASES[case]
  return peft.get_method(name, head=None, **kw)


@pytest.mark.parametrize("case", CASES)
def test_init_is_the_base_model_and_merge_equals_the_training_path(case):
  model, variables, x = tiny()
  method = method_for(case)
  base = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(run(method, method.init(jax.random.key(3), variables["params"])), base,
                             atol=1e-6, rtol=0)
  trained = randomised(method)
  out = run(method, trained)
  assert float(jnp.abs(out - base).max()) > 1e-2  # the adapter does something
  merged = method.merge(variables["params"], trained)
  assert jax.tree.structure(merged) == jax.tree.structure(variables["params"])
  # GLoRA's vector/scalar shifts add window sums: outputs in the hundreds, so float32's relative precision.
  np.testing.assert_allclose(jax.jit(model.apply)({"params": merged}, x), out, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_the_methods_leaves_and_files_round_trip(case, tmp_path):
  model, variables, x = tiny()
  method = method_for(case)
  optimizer = optax.adam(1e-2)
  state = init_train_state(method, variables, optimizer, jax.random.key(5))
  before = jax.tree.map(np.asarray, state.trainable)
  frozen = jax.tree.map(np.asarray, variables["params"])
  step = make_train_step(model, method, optimizer)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
  logits = run(method, state.trainable)
  # The step's loss is the classification loss plus the method's term (AdaLoRA's regulariser).
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  expected += method.loss_term(state.trainable)
  state, metrics = step(state, variables["params"], batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  # Factors initialised at zero move once their partner has.
  state, metrics = step(state, variables["params"], batch)
  assert not state.trainable["params"]  # nothing of the base is trained (no head here)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.trainable)
  assert all(jax.tree.leaves(changed)), changed
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, variables["params"]))
  peft.save_adapter(tmp_path / case, method, state.trainable, base_model="tiny")
  adapter = peft.load_adapter(tmp_path / case)
  assert adapter.method == method
  jax.tree.map(np.testing.assert_array_equal, adapter.trainable, jax.tree.map(np.asarray, state.trainable))


@pytest.mark.parametrize("case", CASES)
def test_training_never_forms_a_frozen_kernels_weight_gradient(case):
  method = method_for(case)
  assert_trains_on_activations(method, randomised(method))


def test_role_defaults_run_and_merge_exactly_on_a_tiny_vit():
  # FacT on a ViT: d = 32 shared by q, k, v, out (1x1 slices), fc1 (1x2) and fc2 (2x1); GLoRA's defaults.
  model = models.create_model("vit_b16", num_classes=3, **presets.TINY_MODELS["vit"])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  base = jax.jit(model.apply)(variables, x)
  for name, kw in [("fact", dict(variant="tk", rank=4)), ("glora", {}), ("adalora", {})]:
    method = presets.build_method("vit_b16", name, **kw)
    trained = randomised_for(method, variables["params"])
    out = jax.jit(lambda t, m=method: m.apply(model, variables, t, x))(trained)
    assert float(jnp.abs(out - base).max()) > 1e-3, name
    merged = {**variables, "params": method.merge(variables["params"], trained)}
    np.testing.assert_allclose(jax.jit(model.apply)(merged, x), out, atol=1e-5, rtol=0, err_msg=name)


# --- AdaLoRA against Hugging Face PEFT -------------------------------------------------------------------

def hf_adalora(**kw):
  return hf_peft.AdaLoraConfig(**{**dict(init_r=4, target_r=2, lora_alpha=3, tinit=5, total_step=20,
                                         target_modules=_CONVS + _DENSE), **kw})


def hf_randomised(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "lora_" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=g))
  return module


def test_hugging_face_adalora_converts_both_ways_with_parity(tmp_path):
  model, variables, x = tiny()
  ref = hf_randomised(hf_peft.get_peft_model(torch_tiny(variables["params"]), hf_adalora()))
  ref.save_pretrained(tmp_path / "theirs")
  config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
  method, trained, _ = from_hf_peft(config, read_checkpoint(tmp_path / "theirs").tensors,
                                    lambda m: m.replace(".", "/"), variables["params"])
  assert method == dataclasses.replace(method_for("adalora"), targets="conv1|conv2|conv3|fc1|fc2")
  theirs = torch_outputs(ref)
  assert float(np.abs(theirs - jax.jit(model.apply)(variables, x)).max()) > 1e-2
  np.testing.assert_allclose(run(method, trained), theirs, atol=1e-4, rtol=0)
  assert method.count(variables["params"], trained).trainable == ref.get_nb_trainable_parameters()[0]
  # Ours -> HF -> ours: the same function in torch, the same tensors back.
  save_hf_peft(tmp_path / "ours", method, trained, variables["params"], lambda path: path.replace("/", "."))
  again = hf_peft.PeftModel.from_pretrained(torch_tiny(variables["params"]), tmp_path / "ours")
  np.testing.assert_allclose(torch_outputs(again), theirs, atol=1e-4, rtol=0)
  config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
  back, same, _ = from_hf_peft(config, read_checkpoint(tmp_path / "ours").tensors,
                               lambda m: m.replace(".", "/"), variables["params"])
  assert back == method
  jax.tree.map(np.testing.assert_array_equal, same, trained)


class TorchTinyWithLoss(TorchTiny):
  """HF's AdaLoRA adds its regulariser to `outputs.loss`: a zero loss exposes the regulariser alone."""

  def forward(self, x):
    return types.SimpleNamespace(loss=torch.zeros(()), logits=super().forward(x))


def test_orthogonality_regulariser_equals_hugging_faces(tmp_path):
  _, variables, x = tiny()
  base = torch_tiny(variables["params"])
  with_loss = TorchTinyWithLoss()
  with_loss.load_state_dict(base.state_dict())
  ref = hf_randomised(hf_peft.get_peft_model(with_loss, hf_adalora()))
  ref.save_pretrained(tmp_path)
  method, trained, _ = from_hf_peft(json.loads((tmp_path / "adapter_config.json").read_text()),
                                    read_checkpoint(tmp_path).tensors, lambda m: m.replace(".", "/"),
                                    variables["params"])
  with torch.no_grad():
    # (PeftModel's own forward skips AdaLoraModel's for models without a task type: call it.)
    theirs = float(ref.base_model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).loss)
  assert theirs > 0.1  # the adapters are far from orthogonal
  np.testing.assert_allclose(float(method.loss_term(trained)), theirs, rtol=1e-5)


def _ours(named: dict[str, np.ndarray], params) -> dict:
  """HF AdaLoRA tensors by parameter name ("...fc1.lora_A.default") -> our adapters."""
  flat, fmt, out = flatten(params), FORMATS["ADALORA"], {}
  for name, t in named.items():
    module, leaf = name.removeprefix("base_model.model.").removesuffix(".default").rsplit(".", 1)
    ours, kind = fmt.leaves[leaf]
    taps = tuple(flat[f"{module}/kernel"].shape[:-2])
    out.setdefault(module, {})[ours] = jnp.asarray(to_ours(t, kind, taps))
  return out


def test_rank_budget_masks_equal_hugging_faces_rank_allocator():
  # Both sides see the same adapter values and gradients each step (random: distinct scores); HF's allocator
  # runs on torch tensors, ours in the jitted `after_update`. Then both keep target_r triplets per module on
  # average, the same ones, and the final phase keeps applying that pattern.
  _, variables, _ = tiny()
  config = hf_adalora(tinit=2, tfinal=3, total_step=12, deltaT=2)
  ref = hf_peft.get_peft_model(torch_tiny(variables["params"]), config)
  method = peft.get_method("adalora", head=None, **{**ADALORA, "tinit": 2, "tfinal": 3, "total_step": 12,
                                                    "delta_t": 2})
  lora = {n: p for n, p in ref.named_parameters() if "lora_" in n}
  g = torch.Generator().manual_seed(0)
  trained = {"params": {}, "adapters": _ours({n: p.detach().numpy() for n, p in lora.items()},
                                             variables["params"])}
  state = method.init_step_state(trained)
  after_update = jax.jit(method.after_update)
  masked_once = False
  for step in range(1, 15):
    moves = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in lora.items()}
    grads = {n: torch.randn(p.shape, generator=g) for n, p in lora.items()}
    with torch.no_grad():
      for n, p in lora.items():
        p.add_(moves[n])
        p.grad = grads[n]
    ref.base_model.update_and_allocate(step)
    moved = jax.tree.map(jnp.add, trained["adapters"], _ours({n: m.numpy() for n, m in moves.items()},
                                                             variables["params"]))
    trained, state = after_update({"params": {}, "adapters": moved},
                                  {"params": {}, "adapters": _ours({n: t.numpy() for n, t in grads.items()},
                                                                   variables["params"])}, state, step)
    theirs = _ours({n: p.detach().numpy() for n, p in lora.items() if "lora_E" in n}, variables["params"])
    for module, leaves in theirs.items():
      ours = np.asarray(trained["adapters"][module]["e"])
      np.testing.assert_array_equal(ours == 0, np.asarray(leaves["e"]) == 0, err_msg=f"step {step} {module}")
      np.testing.assert_allclose(ours, leaves["e"], rtol=1e-6, atol=0)
    masked_once |= any(bool(np.any(np.asarray(a["e"]) == 0)) for a in trained["adapters"].values())
  assert masked_once
  pattern = ref.peft_config["default"].rank_pattern
  assert {m: [bool(k) for k in keep] for m, keep in state["keep"].items()} == \
      {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
  assert sum(method.ranks(state).values()) == 2 * 5  # target_r per module on average
  assert len(set(method.ranks(state).values())) > 1  # reallocated: the modules' ranks differ


def test_a_budgeted_hugging_face_adalora_imports_with_its_rank_pattern(tmp_path):
  # HF saves a budgeted adapter with the masked triplets dropped (`rank_pattern`); ours keeps them at zero.
  _, variables, _ = tiny()
  ref = hf_randomised(hf_peft.get_peft_model(torch_tiny(variables["params"]), hf_adalora()))
  pattern = {f"{m}.lora_E.default": [i % 2 == 0 or m == "fc1" for i in range(4)] for m in _CONVS + _DENSE}
  ref.base_model.rankallocator.mask_using_rank_pattern(ref.base_model.model, pattern)
  ref.peft_config["default"].rank_pattern = pattern
  ref.save_pretrained(tmp_path)
  tensors = read_checkpoint(tmp_path).tensors
  assert tensors["base_model.model.conv1.lora_A"].shape == (2, 27)  # HF dropped the masked rows
  method, trained, _ = from_hf_peft(json.loads((tmp_path / "adapter_config.json").read_text()), tensors,
                                    lambda m: m.replace(".", "/"), variables["params"])
  assert trained["adapters"]["conv1"]["a"].shape == (3, 3, 3, 4)
  np.testing.assert_array_equal(trained["adapters"]["conv1"]["e"][1::2], 0)
  np.testing.assert_allclose(run(method, trained), torch_outputs(ref), atol=1e-4, rtol=0)


def test_adalora_needs_its_schedule():
  with pytest.raises(ValueError, match="total_step .* is required"):
    peft.get_method("adalora").init_step_state({"params": {}, "adapters": {}})
  with pytest.raises(ValueError, match="no budgeting phase"):
    peft.get_method("adalora", tinit=10, tfinal=5, total_step=15)


# --- defaults from model roles, counts at full size --------------------------------------------------------

def _resnet50_convs():
  """(taps, in, out) of ResNet-50's main-path convs: bottlenecks of widths 64..512, (3, 4, 6, 3) blocks."""
  for stage, blocks in enumerate((3, 4, 6, 3)):
    w = 64 << stage
    for block in range(blocks):
      cin = (64 if stage == 0 else 2 * w) if block == 0 else 4 * w
      yield from ((1, cin, w), (9, w, w), (1, w, 4 * w))


FACT_VIT = {  # per rank: the factors U, V (768 x r each), then the 12 slices of d x d per block x 12 blocks
    "tt": lambda r: 2 * 768 * r + 144 * r * r,
    "tk": lambda r: 2 * 768 * r + r ** 3 + 144 * r,
}


@pytest.mark.parametrize("model_name,name,overrides,count", [
    ("vit_b16", "adalora", {}, 24 * 12 * (768 + 1 + 768) + 2307),  # query, value: P, Λ, Q at init_r 12; head
    ("resnet50", "adalora", {}, sum(12 * (t * i + 1 + o) for t, i, o in _resnet50_convs()) + 6147),
    ("vit_b16", "fact", {}, FACT_VIT["tt"](8) + 2307),  # 21,504 + head
    ("vit_b16", "fact", dict(variant="tk", rank=32), FACT_VIT["tk"](32) + 2307),  # 86,528 + head
    # d = 64 on ResNet-50: U, V, and a core of (in/64·8) x (out/64·8) per tap
    ("resnet50", "fact", {}, 2 * 64 * 8 + sum(t * i // 8 * o // 8 for t, i, o in _resnet50_convs()) + 6147),
    # A, D, E vectors over the outputs, C over the inputs, B a rank-4 LoRA: 5·in + 7·out per layer
    ("vit_b16", "glora", {}, 12 * (4 * 12 * 768 + (5 * 768 + 7 * 3072) + (5 * 3072 + 7 * 768)) + 2307),
    ("resnet50", "glora", {}, sum(5 * o + 4 * t * i for t, i, o in _resnet50_convs()) + 6147),  # no bias
])
def test_role_defaults_and_trainable_counts(model_name, name, overrides, count):
  method = presets.build_method(model_name, name, **overrides)
  assert presets.count_parameters(model_name, method, num_classes=3).trainable == count
