"""Several adapters on one base: a mixed batch in one compiled forward, and adapter arithmetic with Hugging
Face PEFT's `add_weighted_adapter` formulas — parity on converted adapters, and peft's open bugs as cases
(#3531 DoRA on transposed layouts, #3608 two DoRA adapters on one module, #3761 rsLoRA/DoRA weighted
combinations, #3737 per-layer ranks after a merge)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
from peft.utils import merge_utils

from medpeft_jax import data, models, peft, presets
from medpeft_jax.peft.interop.hf_peft import from_hf_peft, to_ours
from medpeft_jax.train import adapters_io, trainer
from tests.test_peft_methods import tiny, torch_outputs, torch_tiny
from tests.test_train import smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_adapter(method, params, seed, scale=0.3):
  """`method.init` moved off its identity start (every leaf gets noise)."""
  leaves, treedef = jax.tree.flatten(method.init(jax.random.key(seed), params))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return treedef.unflatten([a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def all_close(got, expected, atol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=0), got, expected)


# --- several adapters in one batch ------------------------------------------------------------------------

@functools.cache
def tiny_vit():
  model = models.create_model("vit_b16", num_classes=3, **presets.TINY_MODELS["vit"])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 16, 16, 3)), jnp.float32)
  return model, jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x), x


@functools.cache
def single_forward(method):
  model, _, x = tiny_vit()
  return jax.jit(lambda v, t: method.apply(model, v, t, x, train=False))


MIXED = {"lora": {"rank": 2}, "bias": {}}  # an adapter method and a selective one, each with a head


def bank_of(name, n=3):
  _, variables, _ = tiny_vit()
  method = presets.build_method("vit_b16", name, **MIXED[name])
  return {f"{name}{k}": peft.Adapter(method, random_adapter(method, variables["params"], k), None, {})
          for k in range(n)}


@pytest.mark.parametrize("name", MIXED)
def test_a_mixed_batch_equals_each_example_with_its_own_adapter(name):
  model, variables, x = tiny_vit()
  adapters = bank_of(name)
  bank = peft.AdapterBank(model, variables)
  for key, adapter in adapters.items():
    bank.add(key, adapter)
  names = [f"{name}{k}" for k in (2, 0, 1, 1, 0, 2)]
  mixed = bank.apply_mixed(names, x, train=False)
  alone = {k: single_forward(a.method)(variables, a.trainable) for k, a in adapters.items()}
  expected = np.stack([alone[n][i] for i, n in enumerate(names)])
  np.testing.assert_allclose(mixed, expected, atol=1e-5, rtol=0)
  outs = list(alone.values())  # the adapters really differ
  assert min(float(jnp.abs(p - q).max()) for i, p in enumerate(outs) for q in outs[i + 1:]) > 1e-3


def test_adapters_with_their_own_batchnorm_statistics_mix():
  # BN-tuned adapters carry their statistics; one without any runs with the base model's.
  model = models.create_model("resnet18", num_classes=3, **presets.TINY_MODELS["resnet"])
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  method = presets.build_method("resnet18", "bias")
  stats = [jax.tree.map(lambda s, k=k: s * (1 + 0.5 * k) + 0.1 * k, variables["batch_stats"]) for k in (1, 2)]
  adapters = {f"bn{k}": peft.Adapter(method, random_adapter(method, variables["params"], k, 0.1), s, {})
              for k, s in enumerate([*stats, None])}
  stack = peft.stack_adapters(adapters, variables)
  names = ["bn2", "bn0", "bn1", "bn0"]
  mixed = peft.mixed_forward(model, train=False)(variables, stack, stack.index(names), x)
  single = jax.jit(lambda v, t: method.apply(model, v, t, x, train=False))
  for i, name in enumerate(names):
    a = adapters[name]
    alone = single({**variables, "batch_stats": a.batch_stats or variables["batch_stats"]}, a.trainable)
    np.testing.assert_allclose(mixed[i], alone[i], atol=1e-5, rtol=0, err_msg=name)
  with pytest.raises(ValueError, match="pass the base `variables`"):
    peft.stack_adapters(adapters)


def test_switching_adapters_reuses_the_compiled_forward():
  model, variables, x = tiny_vit()
  adapters = bank_of("lora")
  forward = peft.mixed_forward(model, train=False)
  stack = peft.stack_adapters(adapters, variables)
  first = forward(variables, stack, stack.index(["lora0"] * 3 + ["lora1"] * 3), x)
  again = forward(variables, stack, stack.index(["lora2", "lora1", "lora0", "lora2", "lora1", "lora0"]), x)
  swapped = peft.stack_adapters(dict(reversed(adapters.items())), variables)  # other values, same shapes
  third = forward(variables, swapped, swapped.index(["lora0"] * 3 + ["lora1"] * 3), x)
  assert forward.cache_size() == 1
  np.testing.assert_allclose(third, first, atol=1e-6, rtol=0)
  assert not np.allclose(again, first)


def test_stacking_refuses_other_head_sizes_and_other_methods():
  _, variables, _ = tiny_vit()
  adapters = bank_of("lora", 1)
  method = adapters["lora0"].method
  five = jax.tree.map(jnp.zeros_like, method.init(jax.random.key(0), variables["params"]))
  five["params"] = {**five["params"], "head/kernel": jnp.zeros((32, 5)), "head/bias": jnp.zeros(5)}
  with pytest.raises(ValueError, match=r"head/bias \(5,\) vs \(3,\).*same head size"):
    peft.stack_adapters({**adapters, "five": peft.Adapter(method, five, None, {})})
  with pytest.raises(ValueError, match="differ in hyperparameters \\['rank'\\]"):
    peft.stack_adapters({**adapters, "r4": peft.Adapter(dataclasses.replace(method, rank=4), five, None, {})})


# --- arithmetic: parity with peft's add_weighted_adapter ----------------------------------------------------

_ALL = ["conv1", "conv2", "conv3", "fc1", "fc2"]


def hf_model(configs: dict, seed=0):
  """A peft model of `tiny()` with one randomised adapter per `configs` item (name -> LoraConfig kwargs)."""
  _, variables, _ = tiny()
  names = list(configs)
  ref = hf_peft.get_peft_model(torch_tiny(variables["params"]), hf_peft.LoraConfig(**configs[names[0]]),
                               adapter_name=names[0])
  for name in names[1:]:
    ref.add_adapter(name, hf_peft.LoraConfig(**configs[name]))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif "lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return ref.eval()


def converted(ref, name):
  """Our (method, trainable) for peft adapter `name` (LoRA or DoRA), through `interop.hf_peft`."""
  _, variables, _ = tiny()
  tensors = {k: v.numpy() for k, v in hf_peft.get_peft_model_state_dict(ref, adapter_name=name).items()}
  method, trained, _ = from_hf_peft(ref.peft_config[name].to_dict(), tensors, lambda m: m.replace(".", "/"),
                                    variables["params"])
  return method, trained


def hf_kernel(weight: torch.Tensor) -> np.ndarray:
  """A torch weight (out, in[, kh, kw]) in our kernel layout."""
  w = weight.detach().numpy()
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T


def our_deltas(method, trained) -> dict[str, np.ndarray]:
  base = tiny()[1]["params"]
  merged = method.merge(base, trained)
  return {m: np.asarray(merged[m]["kernel"] - base[m]["kernel"]) for m in trained["adapters"]}


@pytest.fixture(scope="module")
def two_loras():
  # a on every layer, b on three of them with another alpha: modules only one adapts combine that one.
  return hf_model({"p": {"r": 2, "lora_alpha": 3, "target_modules": _ALL},
                   "q": {"r": 2, "lora_alpha": 5, "target_modules": ["conv2", "conv3", "fc1"]}})


class MaskRecorder:
  """Records the Bernoulli masks peft's DARE draws, in draw order."""

  def __init__(self):
    self.masks, self._bernoulli = [], torch.bernoulli

  def __call__(self, p, *args, **kwargs):
    mask = self._bernoulli(p, *args, **kwargs)
    self.masks.append(mask.clone())
    return mask


def peft_masks(recorded, combination, sources) -> dict:
  """peft's masks keyed as ours: per module (peft's order), A's then B's of each adapter, or one per delta."""
  order = [(m, leaf, i) for m in _ALL for leaf in (("delta",) if combination.endswith("svd") else ("a", "b"))
           for i, (_, t) in enumerate(sources) if m in t["adapters"]]
  assert len(order) == len(recorded)
  kinds = {"a": "kernel", "b": "matrix", "delta": "kernel"}
  return {key: to_ours(mask.numpy(), kinds[key[1]], tuple(mask.shape[2:]))
          for key, mask in zip(order, recorded)}


WEIGHTS = [0.7, -0.4]


@pytest.mark.parametrize("combination", ["linear", "svd", "cat", "ties", "dare_linear", "dare_ties",
                                         "ties_svd", "dare_ties_svd", "magnitude_prune"])
def test_combinations_match_hf_peft_add_weighted_adapter(two_loras, combination, monkeypatch):
  ref, new = two_loras, f"m_{combination}"
  recorder = MaskRecorder()
  monkeypatch.setattr(merge_utils.torch, "bernoulli", recorder)
  ref.add_weighted_adapter(["p", "q"], WEIGHTS, new, combination_type=combination, density=0.5)
  sources = [converted(ref, "p"), converted(ref, "q")]
  masks = peft_masks(recorder.masks, combination, sources) if combination.startswith("dare") else None
  method, trained = peft.combine(sources, WEIGHTS, combination, density=0.5, masks=masks)
  assert method.scale == 1 and sorted(trained["adapters"]) == _ALL
  ours = our_deltas(method, trained)
  for module in _ALL:
    layer = ref.base_model.model.get_submodule(module)
    np.testing.assert_allclose(ours[module], hf_kernel(layer.get_delta_weight(new)), atol=1e-4, rtol=0,
                               err_msg=module)
  if combination in peft.arithmetic.FACTORWISE:  # the factors themselves, not only their product
    all_close(trained["adapters"], converted(ref, new)[1]["adapters"], atol=1e-5)


def test_dare_without_masks_draws_from_the_seed():
  method = peft.get_method("lora", targets="fc1", rank=2, head=None)
  sources = [(method, random_adapter(method, tiny()[1]["params"], k)) for k in range(2)]
  one = peft.combine(sources, [1, 1], "dare_linear", density=0.5, rng=0)[1]
  two = peft.combine(sources, [1, 1], "dare_linear", density=0.5, rng=0)[1]
  jax.tree.map(np.testing.assert_array_equal, one, two)
  kept = np.mean(np.asarray(one["adapters"]["fc1"]["a"]) != 0)
  assert 0.5 < kept < 0.95  # two half-dense masks: about 3/4 of the entries survive
  with pytest.raises(ValueError, match="dare_linear draws random masks: pass rng="):
    peft.combine(sources, [1, 1], "dare_linear", density=0.5)


# --- peft #3761: weighted combinations exact for rsLoRA and DoRA -------------------------------------------

@pytest.fixture(scope="module")
def rslora_pair():
  config = {"r": 4, "lora_alpha": 2, "use_rslora": True, "target_modules": _ALL}
  return hf_model({"p": config, "q": config}, seed=1)


def test_rslora_combinations_are_exact(rslora_pair):
  sources = [converted(rslora_pair, n) for n in "pq"]
  assert sources[0][0].rslora and sources[0][0].scale == 1.0  # alpha / sqrt(r) = 2 / 2
  by_hand = [our_deltas(*s) for s in sources]
  for combination, options in (("cat", {}), ("svd", {"svd_rank": 8})):  # exact: rank 8 holds both
    method, trained = peft.combine(sources, WEIGHTS, combination, **options)
    got = our_deltas(method, trained)
    for module in _ALL:
      expected = WEIGHTS[0] * by_hand[0][module] + WEIGHTS[1] * by_hand[1][module]
      np.testing.assert_allclose(got[module], expected, atol=1e-5, rtol=0, err_msg=f"{combination} {module}")
  # One adapter with weight 1 gives that adapter back (peft #3761's check); peft's own is sqrt(r)-scaled.
  method, trained = peft.combine(sources[:1], [1.0], "svd")
  all_close(our_deltas(method, trained), by_hand[0], atol=1e-6)
  # linear (factor-wise) as peft's formula, with the scale where it belongs.
  rslora_pair.add_weighted_adapter(["p", "q"], WEIGHTS, "lin", combination_type="linear")
  method, trained = peft.combine(sources, WEIGHTS, "linear")
  theirs = converted(rslora_pair, "lin")[1]
  all_close(trained["adapters"], theirs["adapters"], atol=1e-6)
  a, b = trained["adapters"]["fc1"]["a"], trained["adapters"]["fc1"]["b"]
  np.testing.assert_allclose(our_deltas(method, trained)["fc1"], a @ b, atol=1e-6)  # scale 1, not sqrt(r)


@pytest.fixture(scope="module")
def two_doras():
  config = {"r": 2, "lora_alpha": 3, "use_dora": True, "target_modules": ["conv1", "conv3", "fc1", "fc2"]}
  return hf_model({"p": config, "q": config}, seed=2)


def test_two_dora_adapters_on_one_module_merge_as_peft_applies_both(two_doras):
  # peft #3608: merging several DoRA adapters on one module was 2.6-13.9 % off peft's forward with all active,
  # where each adapter rescales what the ones before it built.
  ref = two_doras
  model, variables, x = tiny()
  ref.base_model.set_adapter(["p", "q"])
  theirs = torch_outputs(ref)
  ref.set_adapter("p")
  sources = [converted(ref, n) for n in "pq"]
  method, trained = peft.compose(sources, params=variables["params"])
  assert method.name == "dora" and trained["adapters"]["fc1"]["a"].shape == (8, 4)
  np.testing.assert_allclose(model.apply({"params": method.merge(variables["params"], trained)}, x), theirs,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(method.apply(model, variables, trained, x), theirs, atol=1e-4, rtol=0)
  method, trained = peft.compose(sources[::-1], params=variables["params"])  # the order matters for DoRA
  merged = method.merge(variables["params"], trained)
  assert float(np.abs(model.apply({"params": merged}, x) - theirs).max()) > 1e-3


def test_weighted_dora_combination_is_the_weighted_sum_of_merged_updates(two_doras):
  base = tiny()[1]["params"]
  sources = [converted(two_doras, n) for n in "pq"]
  by_hand = [our_deltas(*s) for s in sources]
  for weights, combination in (([0.5, 0.5], "cat"), ([1.0], "linear"), ([0.8, -0.3], "cat"),
                               ([0.8, -0.3], "svd")):
    method, trained = peft.combine(sources[:len(weights)], weights, combination, params=base, svd_rank=4)
    got = our_deltas(method, trained)  # svd at rank 4 = the sum of the ranks: exact
    for module in got:
      expected = sum(w * d[module] for w, d in zip(weights, by_hand))
      np.testing.assert_allclose(got[module], expected, atol=1e-5, rtol=0, err_msg=f"{weights} {module}")
  with pytest.raises(ValueError, match=r"'ties' is undefined for DoRA.*huggingface/peft#3761.*'cat'"):
    peft.combine(sources, [0.5, 0.5], "ties", density=0.5, params=base)
  with pytest.raises(ValueError, match="needs the base parameters: pass params="):
    peft.combine(sources, [0.5, 0.5], "cat")


def test_pissa_sources_combine_by_their_whole_update():
  base = tiny()[1]["params"]
  pissa = peft.get_method("lora", targets="fc1|fc2", rank=2, alpha=4.0, init_weights="pissa", head=None)
  plain = peft.get_method("lora", targets="fc1", rank=2, head=None)
  sources = [(pissa, random_adapter(pissa, base, 0, 0.1)), (plain, random_adapter(plain, base, 1))]
  by_hand = [our_deltas(*source) for source in sources]  # s(AB - A0B0) and sAB
  for combination in ("cat", "svd"):  # svd rank 6 holds the PiSSA update (rank 4) and the LoRA one
    method, trained = peft.combine(sources, [0.5, 2.0], combination, params=base, svd_rank=6)
    for module, delta in our_deltas(method, trained).items():
      expected = 0.5 * by_hand[0][module] + 2.0 * by_hand[1].get(module, 0)
      np.testing.assert_allclose(delta, expected, atol=1e-5, rtol=0, err_msg=f"{combination} {module}")
  with pytest.raises(ValueError, match="'linear' mixes A and B factors, but a PiSSA adapter"):
    peft.combine(sources, [0.5, 2.0], "linear", params=base)
  bias = peft.get_method("bias", head=None)
  with pytest.raises(TypeError, match="Adapter 1 is a bias adapter; arithmetic combines LoRA-family"):
    peft.combine([sources[1], (bias, bias.init(jax.random.key(0), base))], [1, 1], "cat")


# --- peft #3531: DoRA on the transposed layout; merging is pure ---------------------------------------------

def test_dora_merge_of_a_converted_adapter_equals_hf_peft_merged_weight(two_doras):
  base = tiny()[1]["params"]
  before = jax.tree.map(np.array, base)
  method, trained = converted(two_doras, "q")
  merged = method.merge(base, trained)
  hf = copy.deepcopy(two_doras)
  hf.set_adapter("q")
  weights = dict(hf.merge_and_unload().named_parameters())
  for module in ("conv1", "conv3", "fc1", "fc2"):  # their (out, in[, kh, kw]) against our (.., in, out)
    np.testing.assert_allclose(merged[module]["kernel"], hf_kernel(weights[f"{module}.weight"]), atol=1e-5,
                               rtol=0, err_msg=module)
  # Our merge returns new arrays and leaves the base untouched: "unmerge" is keeping the base.
  jax.tree.map(np.testing.assert_array_equal, base, before)
  assert all(merged[m]["kernel"] is not base[m]["kernel"] for m in trained["adapters"])


# --- peft #3737: per-layer ranks survive save -> combine -> reload; the command line -----------------------

def test_per_layer_ranks_survive_save_merge_reload_through_the_command_line(tmp_path):
  model, variables, x = tiny()
  base = variables["params"]
  a_method = peft.get_method("lora", targets="conv1|fc1", rank=2, alpha=4.0, head=None)
  b_method = peft.get_method("lora", targets="fc1|fc2", rank=3, rslora=True, head=None)
  a, b = random_adapter(a_method, base, 0), random_adapter(b_method, base, 1)
  for name, method, trained in (("a", a_method, a), ("b", b_method, b)):
    peft.save_adapter(tmp_path / name, method, trained, base_model="tiny", class_names=list("uvwxyz"))
  by_hand = {m: 0.5 * our_deltas(a_method, a).get(m, 0) + 2.0 * our_deltas(b_method, b).get(m, 0)
             for m in ("conv1", "fc1", "fc2")}

  subprocess.run([sys.executable, "-m", "launch.merge_adapters", "--weights=0.5,2", "--combination=cat",
                  f"--adapters={tmp_path / 'a'},{tmp_path / 'b'}", f"--out={tmp_path / 'cat'}"],
                 cwd=REPO, check=True, capture_output=True)
  cat = peft.load_adapter(tmp_path / "cat")
  ranks = {m: ad["a"].shape[-1] for m, ad in cat.trainable["adapters"].items()}
  assert ranks == {"conv1": 2, "fc1": 5, "fc2": 3}
  assert cat.class_names == tuple("uvwxyz") and cat.method.name == "lora" and cat.method.scale == 1
  assert cat.config["merged_from"] == {"combination": "cat", "weights": [0.5, 2.0],
                                       "adapters": [str(tmp_path / "a"), str(tmp_path / "b")]}
  for module, delta in our_deltas(cat.method, cat.trainable).items():
    np.testing.assert_allclose(delta, by_hand[module], atol=1e-5, rtol=0, err_msg=module)
  # A combined adapter with per-layer ranks combines again; svd ranks are capped at each kernel's bound.
  again, trained = peft.combine([(cat.method, cat.trainable)], [1.0], "svd", svd_rank=7)
  svd = peft.combine([(cat.method, cat.trainable), (a_method, a)], [1.0, 0.0], "svd", svd_rank=7)[1]
  assert {m: ad["a"].shape[-1] for m, ad in svd["adapters"].items()} == {"conv1": 7, "fc1": 7, "fc2": 6}
  np.testing.assert_allclose(jax.jit(lambda t: cat.method.apply(model, variables, t, x))(cat.trainable),
                             model.apply({"params": again.merge(base, trained)}, x), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="ties needs equal ranks, but at fc1 the adapters have ranks"):
    peft.combine([(a_method, a), (b_method, b)], [1, 1], "ties", density=0.5)


def test_a_combined_folder_evaluates_like_its_source(easy, tmp_path):
  # Trainer-written folders (run config, classes, preprocessing) in, a folder launch.evaluate reads out.
  config = smoke_config(easy)
  names = data.Split(data.load("image_folder", **easy), "test").class_names
  method = presets.build_method(config.model, config.method, **dict(config.peft))
  params = trainer.build_model(config, len(names))[1]["params"]
  sources = []
  for k in range(2):
    peft.save_adapter(tmp_path / f"s{k}", method, random_adapter(method, params, k, 0.05),
                      base_model=config.model, config=config.to_dict(), class_names=list(names))
    sources.append(peft.load_adapter(tmp_path / f"s{k}"))
  with pytest.raises(ValueError, match="Adapters 0 and 1 both carry trained base leaves.*params_from"):
    peft.combine_adapters(sources, [1.0, 0.0], "linear")
  merged = peft.combine_adapters(sources, [1.0, 0.0], "linear", params_from=0)  # = source 0, its head
  merged.save(tmp_path / "merged")
  assert adapters_io.evaluate_adapter(tmp_path / "merged", "test") == adapters_io.evaluate_adapter(
      tmp_path / "s0", "test")
