"""The methods Hugging Face PEFT also has — (IA)³, VeRA, LoHa, LoKr, (B)OFT, PiSSA-initialised LoRA — on a
tiny conv + dense stack: identity at init, merge == training path, gradients only on their leaves, files,
and parity with HF PEFT on the same weights through `interop.hf_peft`."""

from __future__ import annotations

import dataclasses
import functools
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft as hf_peft
import pytest
import torch
import torchvision
from peft.tuners.boft import layer as hf_boft

from medpeft_jax import models, peft, presets
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.peft.core import flatten
from medpeft_jax.peft.interop.hf_peft import from_hf_peft, load_hf_peft, save_hf_peft
from medpeft_jax.train.step import init_train_state, make_train_step
from tests.helpers import random_images, randomise, torch_logits

LAYERS = r"conv\d|fc\d"


class Tiny(nn.Module):
  """A 3x3 conv, a 1x1 conv, a strided 3x3 conv and two dense layers (mirrored by `TorchTiny`)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv1")(x))
    x = nn.relu(nn.Conv(16, (1, 1), name="conv2")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=1, name="conv3")(x))
    x = nn.relu(nn.Dense(64, name="fc1")(x.mean(axis=(1, 2))))
    return nn.Dense(6, name="fc2")(x)


class TorchTiny(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.conv2 = torch.nn.Conv2d(8, 16, 1)
    self.conv3 = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
    self.fc1 = torch.nn.Linear(8, 64)
    self.fc2 = torch.nn.Linear(64, 6)

  def forward(self, x):
    x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
    return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))


@functools.cache
def tiny():
  model = Tiny()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))  # non-zero biases: a mis-scaled bias shows
  params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, {"params": params}, x


def torch_tiny(params) -> TorchTiny:
  """The same network in torch, with our weights (a fresh copy: HF PEFT edits PiSSA's base in place)."""
  module = TorchTiny()
  with torch.no_grad():
    for name, leaves in params.items():
      kernel = np.asarray(leaves["kernel"])
      weight = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
      getattr(module, name).weight.copy_(torch.from_numpy(weight.copy()))
      getattr(module, name).bias.copy_(torch.from_numpy(np.asarray(leaves["bias"]).copy()))
  return module.eval()


CASES = {  # id: (method, hyperparameters); every one adapts dense and conv layers unless said
    "ia3": ("ia3", dict(targets=LAYERS, feedforward=r"conv[23]|fc2")),  # input and output scaling, both kinds
    "vera": ("vera", dict(targets=LAYERS, rank=4)),
    "loha": ("loha", dict(targets=LAYERS, rank=2, alpha=3.0)),
    "lokr": ("lokr", dict(targets=LAYERS, rank=2, alpha=3.0)),  # W2 whole on the convs, factored on fc1/fc2
    "lokr-both": ("lokr", dict(targets=LAYERS, rank=2, alpha=3.0, decompose_both=True)),  # W1 factored on fc1
    "pissa": ("lora", dict(targets=LAYERS, rank=2, alpha=4.0, init_weights="pissa")),
    "rslora": ("lora", dict(targets=LAYERS, rank=4, alpha=4.0, rslora=True)),  # scale alpha / sqrt(r) = 2
    "olora": ("lora", dict(targets=LAYERS, rank=2, alpha=4.0, init_weights="olora")),
    "oft": ("oft", dict(targets=LAYERS, block_size=4)),  # 1 block of 3 on conv1, 16 of 4 on fc2
    "oft-cayley": ("oft", dict(targets=LAYERS, block_size=4, cayley_neumann_terms=0)),
    # BOFT (conv1's 3 channels take no even blocks): 3 butterfly factors of 2x2 blocks; one factor (OFT with
    # the exact Cayley and the output scale) of 4 blocks, of 2 features on conv2/fc1, 4 on conv3, 16 on fc2.
    "boft": ("boft", dict(targets=r"conv[23]|fc\d", block_size=2, n_butterfly_factor=3)),
    "boft-blocks": ("boft", dict(targets=r"conv[23]|fc\d", block_num=4, n_butterfly_factor=1)),
}


def method_for(case):
  name, kw = CASES[case]
  return peft.get_method(name, head=None, **kw)


def run(method, trained, variables=None):
  model, base, x = tiny()
  return jax.jit(lambda v, t: method.apply(model, v, t, x))(variables or base, trained)


def randomised(method, seed=3):
  return randomised_for(method, tiny()[1]["params"], seed)


def randomised_for(method, params, seed=3):
  leaves, treedef = jax.tree.flatten(method.init(jax.random.key(seed), params))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.mark.parametrize("case", CASES)
def test_init_is_the_base_model(case):
  model, variables, x = tiny()
  method = method_for(case)
  out = run(method, method.init(jax.random.key(3), variables["params"]))
  np.testing.assert_allclose(out, jax.jit(model.apply)(variables, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merged_model_equals_training_path(case):
  model, variables, x = tiny()
  method = method_for(case)
  trained = randomised(method)
  out = run(method, trained)
  assert float(jnp.abs(out - jax.jit(model.apply)(variables, x)).max()) > 1e-2  # the adapter does something
  merged = method.merge(variables["params"], trained)
  assert jax.tree.structure(merged) == jax.tree.structure(variables["params"])
  # rtol: OLoRA's unscaled A0·B0 carries the weights' magnitude into s·(A·B - A0·B0) (outputs ~30, 1.5e-5 seen)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": merged}, x), out, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_only_the_methods_leaves(case):
  model, variables, x = tiny()
  method = method_for(case)
  optimizer = optax.adam(1e-2)
  state = init_train_state(method, variables, optimizer, jax.random.key(5))
  before = jax.tree.map(np.asarray, state.trainable)
  frozen = jax.tree.map(np.asarray, variables["params"])
  step = make_train_step(model, method, optimizer)
  for _ in range(2):  # factors initialised at zero move once their partner has
    state, metrics = step(state, variables["params"], {"image": x, "label": jnp.array([0, 1, 2, 3])})
  assert np.isfinite(float(metrics["loss"]))
  assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(state.trainable)
  assert not state.trainable["params"]  # nothing of the base is trained (no head here)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.trainable)
  assert all(jax.tree.leaves(changed)), changed
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, variables["params"]))


@pytest.mark.parametrize("case", CASES)
def test_adapter_round_trip_is_bit_identical(case, tmp_path):
  method = method_for(case)
  trained = randomised(method)
  peft.save_adapter(tmp_path / case, method, trained, base_model="tiny")
  adapter = peft.load_adapter(tmp_path / case)
  assert adapter.method == method
  jax.tree.map(np.testing.assert_array_equal, adapter.trainable, trained)
  np.testing.assert_array_equal(run(adapter.method, adapter.trainable), run(method, trained))


# --- defaults from model roles, counts at full size --------------------------------------------------------

@pytest.mark.parametrize("model_name,name,count", [
    ("vit_b16", "ia3", 12 * (768 + 768 + 768 + 3072) + 2307),  # key, value outputs; fc1, fc2 inputs; head
    ("vit_b16", "vera", 24 * (256 + 768) + 2307),  # query, value: Λd (r = 256) + Λb
    ("vit_b16", "loha", 24 * 2 * 8 * (768 + 768) + 2307),
    ("vit_b16", "lokr", 24 * (24 * 24 + 2 * 8 * 32) + 2307),  # 768 = 24·32: W1 (24, 24), W2 = (32, 8)·(8, 32)
    ("vit_b16", "boft", 24 * (2 * 192 * 4 * 4 + 768) + 2307),  # query, value: 2 factors of 192 4x4 blocks; s
    ("resnet50", "ia3", 20_672 + 6147),  # the input channels of layer1-4's main-path convs; head
    ("resnet50", "boft", 188_032 + 6147),  # layer1-4's main-path convs: 2·16/4 per input, 1 per output channel
])
def test_role_defaults_and_trainable_counts(model_name, name, count):
  method = presets.build_method(model_name, name)
  assert presets.count_parameters(model_name, method, num_classes=3).trainable == count
  if model_name == "vit_b16":  # the plain-regex defaults were written for the ViT: the roles select the same
    init = functools.partial(models.create_model(model_name, num_classes=3).init, train=False)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(init, jax.random.key(0), x)["params"]
    plain = peft.get_method(name)
    assert method != plain  # the regexes really come from the roles
    flat = flatten(params)
    assert method.adapter_modules(flat) == plain.adapter_modules(flat)
    if name == "ia3":
      assert [m for m in method.adapter_modules(flat) if method.is_feedforward(m)] == \
          [m for m in plain.adapter_modules(flat) if plain.is_feedforward(m)]


# --- Hugging Face PEFT parity ---------------------------------------------------------------------------

_CONVS, _DENSE = ["conv1", "conv2", "conv3"], ["fc1", "fc2"]
HF = {  # id: (HF config, which of our cases it is)
    "ia3": (lambda: hf_peft.IA3Config(target_modules=_CONVS + _DENSE,
                                      feedforward_modules=["conv2", "conv3", "fc2"]), "ia3"),
    "vera": (lambda: hf_peft.VeraConfig(r=4, target_modules=_DENSE), "vera"),
    "loha": (lambda: hf_peft.LoHaConfig(r=2, alpha=3, target_modules=_CONVS + _DENSE), "loha"),
    "lokr": (lambda: hf_peft.LoKrConfig(r=2, alpha=3, target_modules=_CONVS + _DENSE), "lokr"),
    "lokr-both": (lambda: hf_peft.LoKrConfig(r=2, alpha=3, decompose_both=True,
                                             target_modules=_CONVS + _DENSE), "lokr-both"),
    "pissa": (lambda: hf_peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=_DENSE),
              "pissa"),
    "rslora": (lambda: hf_peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=_CONVS + _DENSE),
               "rslora"),
    "olora": (lambda: hf_peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="olora", target_modules=_DENSE),
              "olora"),
    "oft": (lambda: hf_peft.OFTConfig(oft_block_size=4, target_modules=["conv2"] + _DENSE), "oft"),
    "oft-cayley": (lambda: hf_peft.OFTConfig(oft_block_size=4, use_cayley_neumann=False,
                                             target_modules=["conv2"] + _DENSE), "oft-cayley"),
    "boft": (lambda: hf_peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3,
                                        target_modules=["conv2"] + _DENSE), "boft"),
    "boft-blocks": (lambda: hf_peft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=1,
                                               target_modules=["conv2"] + _DENSE), "boft-blocks"),
}
_ADAPTER_LEAVES = ("ia3_l", "vera_lambda", "hada_", "lokr_", "lora_", "oft_R", "boft_")


@pytest.fixture(autouse=True)
def _boft_block_diagonals_in_torch(monkeypatch):
  """HF's BOFT builds its factors' block diagonals with a CUDA extension; without one (any CPU) it silently
  drops to one butterfly factor. This is that extension's forward, in torch (not HF's code under test)."""
  fbd = types.SimpleNamespace(forward=lambda r: [torch.stack([torch.block_diag(*factor) for factor in r])])
  monkeypatch.setattr(hf_boft, "_FBD_CUDA", fbd)


def torch_outputs(module) -> np.ndarray:
  _, _, x = tiny()
  with torch.no_grad():
    return module(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()


def adapted(case) -> list[str]:
  """HF has VeRA, PiSSA and OLoRA on linear layers only, and (B)OFT as ours on 1x1 convs only."""
  if case in ("vera", "pissa", "olora"):
    return _DENSE
  return ["conv2"] + _DENSE if case.startswith(("oft", "boft")) else _CONVS + _DENSE


@pytest.mark.parametrize("case", HF)
def test_hugging_face_peft_adapters_import_with_parity(case, tmp_path):
  model, variables, x = tiny()
  make_config, ours_case = HF[case]
  ref = hf_peft.get_peft_model(torch_tiny(variables["params"]), make_config())
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # HF starts most adapters at the identity: move every adapter tensor
    for name, p in ref.named_parameters():
      if any(leaf in name for leaf in _ADAPTER_LEAVES):
        p.add_(0.3 * torch.randn(p.shape, generator=g))
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  method, trained, derived = from_hf_peft(config, read_checkpoint(tmp_path).tensors,
                                          lambda m: m.replace(".", "/"), variables["params"])
  assert method.targets == "|".join(adapted(case))
  fields = {"targets": method.targets, **({"feedforward": method.feedforward} if case == "ia3" else {})}
  assert method == dataclasses.replace(method_for(ours_case), **fields)  # every hyperparameter carried over
  ours = jax.jit(lambda t, d: method.apply(model, variables, t, x, derived=d or None))(trained, derived)
  theirs = torch_outputs(ref)
  assert float(np.abs(theirs - jax.jit(model.apply)(variables, x)).max()) > 1e-2
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  # The same trainable-parameter count as HF's (no head in either).
  assert method.count(variables["params"], trained).trainable == ref.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", HF)
def test_our_adapters_export_to_hugging_face_peft_with_parity(case, tmp_path):
  _, variables, _ = tiny()
  method = dataclasses.replace(method_for(HF[case][1]), targets="|".join(adapted(case)))
  trained = randomised(method)
  save_hf_peft(tmp_path, method, trained, variables["params"], lambda path: path.replace("/", "."))
  ref = hf_peft.PeftModel.from_pretrained(torch_tiny(variables["params"]), tmp_path)
  np.testing.assert_allclose(torch_outputs(ref), run(method, trained), atol=1e-4, rtol=0)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  back, again, _ = from_hf_peft(config, read_checkpoint(tmp_path).tensors, lambda m: m.replace(".", "/"),
                                variables["params"])
  assert back == (dataclasses.replace(method, feedforward=back.feedforward) if case == "ia3" else method)
  if case == "ia3":
    assert back.feedforward == "conv2|conv3|fc2"
  jax.tree.map(np.testing.assert_array_equal, again, trained)  # the conversion is exact both ways


# --- cost: trained on the activations -------------------------------------------------------------------

def _products(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every matmul and convolution in a jaxpr, nested calls included (dims sorted)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      out += [tuple(sorted(v.aval.shape)) for v in eqn.outvars]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _products(inner)
  return out


def assert_trains_on_activations(method, trained):
  """The cost claim (../shared/DESIGN.md): no matmul/conv in the gradient computation outputs a base
  kernel's shape — which it does when the factors are trained through a folded kernel (the check)."""
  model, variables, x = tiny()
  kernels = {tuple(sorted(leaves["kernel"].shape)) for leaves in variables["params"].values()}

  def products(forward):
    return set(_products(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(forward(t) ** 2)))(trained).jaxpr))

  assert not products(lambda t: method.apply(model, variables, t, x)) & kernels
  assert products(lambda t: model.apply({"params": method.merge(variables["params"], t)}, x)) & kernels


@pytest.mark.parametrize("case", CASES)
def test_training_never_forms_a_frozen_kernels_weight_gradient(case):
  method = method_for(case)
  assert_trains_on_activations(method, randomised(method))


def test_grouped_convolutions_are_refused_with_the_module_named():
  class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(3, (3, 3), feature_group_count=3, name="dw")(x)

  model, x = Depthwise(), jnp.ones((1, 4, 4, 3))
  variables = model.init(jax.random.key(0), x)
  for name, kw in [("vera", {}), ("loha", {}), ("lokr", {}), ("ia3", dict(feedforward="dw")), ("oft", {}),
                   ("boft", dict(n_butterfly_factor=1)), ("adalora", {}), ("fact", {}), ("glora", {})]:
    method = peft.get_method(name, targets="dw", head=None, **kw)
    with pytest.raises(ValueError, match="'dw'.*grouped convolution"):
      method.apply(model, variables, method.init(jax.random.key(0), variables["params"]), x)


def test_a_torchvision_resnet_adapter_loads_through_the_checkpoint_names(tmp_path):
  # HF module names -> ours through the ResNet checkpoint layouts (`load_hf_peft`), a 3x3, a strided
  # 3x3 and the classifier: LoHa, whose flattened conv factors need our kernels' shapes.
  base = randomise(torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                    num_classes=3))
  torch.save(base.state_dict(), tmp_path / "resnet.pth")
  targets = ["layer1.0.conv2", "layer2.0.conv1", "fc"]
  ref = hf_peft.get_peft_model(base, hf_peft.LoHaConfig(r=2, alpha=4, target_modules=targets))
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "hada_" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
  ref.save_pretrained(tmp_path / "adapter")
  model, variables, _ = models.load_pretrained("resnet18", tmp_path / "resnet.pth", num_classes=3,
                                               image_size=32, stage_sizes=(1, 1, 1, 1))
  method, trained, _ = load_hf_peft(tmp_path / "adapter", "resnet18", variables["params"])
  assert method.targets == r"head|layer1/block0/conv2|layer2/block0/conv1"
  assert trained["adapters"]["layer2/block0/conv1"]["w1_b"].shape == (3, 3, 64, 2)
  x, x_torch = random_images()
  np.testing.assert_allclose(method.apply(model, variables, trained, x), torch_logits(ref, x_torch),
                             atol=1e-4, rtol=0)


def test_boft_blocks_follow_hugging_faces_rules_or_say_which_module_breaks_them(tmp_path):
  params = tiny()[1]["params"]
  with pytest.raises(ValueError, match="'conv1' has 3 input features.*Exclude it"):  # no even blocks
    peft.get_method("boft", targets="conv1", head=None).init(jax.random.key(0), params)
  method = peft.get_method("boft", targets="fc1", head=None, block_num=3, n_butterfly_factor=1)
  with pytest.raises(ValueError, match="'fc1' has 8 input features, which block_num=3 cannot split"):
    method.init(jax.random.key(0), params)
  # A block size the width does not take is fitted (fc1: 8 features, blocks of 2 for 3), as OFT's; HF's BOFT
  # refuses it, so such an adapter does not export.
  method = peft.get_method("boft", targets="fc1", head=None, block_size=3, n_butterfly_factor=1)
  trained = method.init(jax.random.key(0), params)
  assert trained["adapters"]["fc1"]["r"].shape == (1, 4, 2, 2)
  with pytest.raises(ValueError, match="fc1: BOFT fitted its blocks to 2 features.*exclude it"):
    save_hf_peft(tmp_path, method, trained, params, lambda path: path)
  # peft without its CUDA extension trains one factor whatever its config says: such a folder is refused.
  method = dataclasses.replace(method_for("boft"), targets="fc1")
  save_hf_peft(tmp_path / "hf", method, randomised(method), params, lambda path: path)
  config = {**json.loads((tmp_path / "hf" / "adapter_config.json").read_text()), "boft_n_butterfly_factor": 2}
  with pytest.raises(ValueError, match=r"boft_n_butterfly_factor=2 in its config, but its boft_R tensors hold \[3\]"):
    from_hf_peft(config, read_checkpoint(tmp_path / "hf").tensors, lambda m: m, params)


def test_pissa_is_a_lora_initialisation_only():
  with pytest.raises(ValueError, match="dora init_weights='pissa': expected one of"):
    peft.get_method("dora", init_weights="pissa")
  with pytest.raises(ValueError, match="lora init_weights='loftq': expected one of.*pissa.*olora"):
    peft.get_method("lora", init_weights="loftq")


SMALL = {"ia3": {}, "vera": dict(rank=16), "loha": dict(rank=2), "lokr": dict(rank=2), "oft": dict(block_size=8),
         "lora": dict(rank=2, init_weights="pissa")}


def test_role_defaults_run_and_merge_exactly_on_a_tiny_vit():
  # The ViT's dense layers see (batch, tokens, features): LoKr's and OFT's channel reshapes keep the tokens.
  model = models.create_model("vit_b16", num_classes=3, **presets.TINY_MODELS["vit"])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  base = jax.jit(model.apply)(variables, x)
  for name, kw in SMALL.items():
    method = presets.build_method("vit_b16", name, **kw)
    trained = randomised_for(method, variables["params"])
    out = jax.jit(lambda t, m=method: m.apply(model, variables, t, x))(trained)
    assert float(jnp.abs(out - base).max()) > 1e-3, name
    merged = {**variables, "params": method.merge(variables["params"], trained)}
    np.testing.assert_allclose(jax.jit(model.apply)(merged, x), out, atol=1e-5, rtol=0, err_msg=name)
