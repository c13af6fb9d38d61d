"""PEFT methods: identity at init, merge == training path, gradients only where trained, counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medpeft_jax import models, peft, presets
from medpeft_jax.train.step import init_train_state, make_train_step

TINY = {
    "vit": ("vit_b16", dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=4), 16),
    "resnet": ("resnet50", dict(width=8, stage_sizes=(1, 1, 1, 1)), 32),
    "mobilenet_v2": ("mobilenet_v2", dict(width_mult=0.25), 32),
}


def _randomise(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.cache
@functools.cache  # built once per family (tests never mutate it)
def tiny(family):
  """A tiny model with every parameter and BatchNorm statistic random (no identity norms, zero heads)."""
  name, overrides, size = TINY[family]
  model = models.create_model(name, num_classes=3, **overrides)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, size, size, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  variables = {**variables, "params": _randomise(variables["params"], jax.random.key(1), 0.1)}
  if "batch_stats" in variables:  # running means ~ N(0, 0.1), variances ~ |1 + N(0, 0.1)|
    stats = _randomise(variables["batch_stats"], jax.random.key(2), 0.1)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.abs(s) if path[-1].key == "var" else s, stats)
  return model, variables, x


def run(model, variables, x, method, trained, train=False):
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False
  out = jax.jit(lambda v, p: method.apply(model, v, p, x, train=train, mutable=mutable))(variables, trained)
  return out[0] if mutable else out


CASES = {  # (family, method name, hyperparameters for the tiny model)
    "vit": [("full", {}), ("linear", {}), ("bias", {}), ("norm", {}), ("attention", {}),
            ("lora", dict(rank=4)), ("dora", dict(rank=4)), ("ssf", {}), ("adaptformer", dict(bottleneck=6)),
            ("vpt", dict(num_tokens=3)), ("vpt", dict(num_tokens=3, deep=True))],
    "resnet": [("full", {}), ("bias", {}), ("norm", {}), ("ssf", presets.preset("resnet50", "ssf")),
               ("tsa", {}), ("lora", dict(presets.preset("resnet50", "lora"), rank=4)),
               ("dora", dict(presets.preset("resnet50", "dora"), rank=4))],
    "mobilenet_v2": [("tsa", presets.preset("mobilenet_v2", "tsa")),
                     ("lora", dict(presets.preset("mobilenet_v2", "lora"), rank=4))],
}
ALL = [(f, name, kw) for f, cases in CASES.items() for name, kw in cases]
IDS = [f"{f}-{name}{'-deep' if kw.get('deep') else ''}" for f, name, kw in ALL]
IDENTITY_AT_INIT = {"lora", "dora", "tsa", "adaptformer", "ssf", "full", "linear", "bias", "norm",
                    "attention"}
UNFOLDABLE = {"adaptformer", "vpt"}


@pytest.mark.parametrize("family,name,kw", ALL, ids=IDS)
def test_init_is_the_base_model_where_the_method_defines_an_identity(family, name, kw):
  model, variables, x = tiny(family)
  if name == "ssf":
    kw = {**kw, "init_std": 0.0}  # SSF's N(1, 0.02) init is an identity only at std 0
  method = peft.get_method(name, **kw)
  out = run(model, variables, x, method, method.init(jax.random.key(3), variables["params"]))
  base = jax.jit(model.apply)(variables, x)
  if name in IDENTITY_AT_INIT:
    # Equal up to float32 rounding: XLA fuses y·1 + 0 into neighbouring ops differently. DoRA's
    # r = m/||W|| is 1 only within an ulp (m is computed outside the graph), amplified by later layers.
    np.testing.assert_allclose(out, base, atol=1e-5 if name == "dora" else 1e-6, rtol=0)
  else:  # VPT has no identity initialisation
    assert not np.allclose(out, base)


TRAIN_MODE = [("resnet-train", n, kw) for f, n, kw in ALL if f == "resnet"]


@pytest.mark.parametrize("family,name,kw", ALL + TRAIN_MODE,
                         ids=IDS + [f"resnet-train-{n}" for _, n, _ in TRAIN_MODE])
def test_merged_model_equals_training_path(family, name, kw):
  # "resnet-train": BatchNorm normalising with batch statistics, which amplify float32 rounding
  # (1/sigma of a batch of 4): 1e-4 there, 1e-5 everywhere else.
  train = family.endswith("-train")
  family = family.removesuffix("-train")
  model, variables, x = tiny(family)
  method = peft.get_method(name, **kw)
  trained = _randomise(method.init(jax.random.key(3), variables["params"]), jax.random.key(4), 0.05)
  if name in UNFOLDABLE:
    with pytest.raises(peft.MergeError, match="cannot be merged"):
      method.merge(variables["params"], trained)
    return
  merged = {**variables, "params": method.merge(variables["params"], trained)}
  mutable = ["batch_stats"] if train and "batch_stats" in variables else False
  out_merged = jax.jit(lambda v: model.apply(v, x, train=train, mutable=mutable))(merged)
  out_merged = out_merged[0] if mutable else out_merged
  out = run(model, variables, x, method, trained, train=train)
  assert float(jnp.abs(out).max()) > 0.1 and float(out.std(axis=0).min()) > 1e-3  # a real signal
  np.testing.assert_allclose(out_merged, out, atol=1e-4 if train else 1e-5, rtol=0)
  # The merged tree has exactly the base structure: plain parameters, nothing extra.
  assert jax.tree.structure(merged["params"]) == jax.tree.structure(variables["params"])


@pytest.mark.parametrize("family,name,kw", ALL, ids=IDS)
def test_gradients_reach_only_trainable_leaves(family, name, kw):
  model, variables, x = tiny(family)
  method = peft.get_method(name, **kw)
  optimizer = optax.adam(1e-2)
  state = init_train_state(method, variables, optimizer, jax.random.key(5))
  before = jax.tree.map(np.asarray, state.trainable)
  params = variables["params"]
  frozen = jax.tree.map(np.asarray, params)
  step = make_train_step(model, method, optimizer)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 0])}
  for _ in range(2):  # LoRA's A only moves once B is non-zero
    state, metrics = step(state, params, batch)
  assert np.isfinite(float(metrics["loss"]))
  # Optimizer state exists only for the trainable leaves.
  mu = state.opt_state[0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(state.trainable)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.trainable)
  assert all(jax.tree.leaves(changed)), changed
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, params))


# --- trainable counts at full size --------------------------------------------------------------------

@functools.cache
def full_size_params(name, num_classes=3):
  model = models.create_model(name, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)["params"]


def trainable(model_name, method_name, **overrides):
  method = presets.build_method(model_name, method_name, **overrides)
  params = full_size_params(model_name)
  return method.count(params, jax.eval_shape(method.init, jax.random.key(0), params)).trainable


@pytest.mark.parametrize("method,count", [
    ("bias", 32_707), ("norm", 59_267), ("ssf", 59_267), ("tsa", 10_622_979), ("full", 23_514_179)])
def test_resnet50_trainable_counts_match_the_paper(method, count):
  # Paper (3-class head): Bias 32.7K, BN 59.1K, SSF 60.6K, TSA 10.6M, Full 23.5M. Our SSF (one
  # scale/shift per BatchNorm channel) gives 59,267: 2.2 % under the printed 60.6K.
  assert trainable("resnet50", method) == count


PAPER_VIT = {  # printed trainable counts, millions (one significant digit)
    "vit_b16": dict(full=87.2, attention=28.5, bias=0.1, lora=0.6, ssf=0.2, adaptformer=0.1, norm=0.04),
    "vit_l16": dict(full=303, attention=100, bias=0.2, lora=1.5, ssf=0.5, adaptformer=0.3, norm=0.1),
    "vit_h14": dict(full=630, attention=210, bias=0.4, lora=2.6, ssf=0.9, adaptformer=0.5, norm=0.2),
}


@pytest.mark.parametrize("model,method", [(m, k) for m, d in PAPER_VIT.items() for k in d])
def test_vit_trainable_counts_within_15_percent_of_the_paper(model, method):
  printed = PAPER_VIT[model][method] * 1e6
  count = trainable(model, method)
  if (model, method) == ("vit_b16", "adaptformer"):
    # Deliberate: the reference settles on bottleneck 6, which gives B/L/H 0.122M/0.323M/0.537M —
    # each rounds to the printed 0.1M/0.3M/0.5M, but ViT-B is 22 % above 0.1M (bottleneck 5 would be
    # within 15 % for all three). We keep the reference's 6 and check the rounding instead.
    assert count == 122_187 and round(count / 1e6, 1) == PAPER_VIT[model][method]
  else:
    assert abs(count - printed) <= 0.15 * printed


def test_bitfit_counts_exclude_layernorm_biases_unless_asked():
  # The paper's ViT-L BitFit 0.2M excludes LayerNorm biases; with them it would be 0.28M.
  assert trainable("vit_l16", "bias") == 225_283
  assert trainable("vit_l16", "bias", include_norm_bias=True) == 225_283 + 49 * 1024


def test_lora_count_line_in_hugging_face_format():
  method = presets.build_method("vit_b16", "lora")
  assert str(presets.count_parameters("vit_b16", method, num_classes=3)) == (
      "trainable params: 592,131 || all params: 86,390,787 || trainable%: 0.6854")


# --- defaults from model roles -------------------------------------------------------------------

def test_role_defaults_select_the_same_layers_as_the_methods_own_vit_defaults():
  # The methods' plain-regex defaults were written for the ViT: its roles must select exactly those.
  _, variables, _ = tiny("vit")
  params = variables["params"]
  for name in ("lora", "ssf", "norm", "attention", "adaptformer", "vpt"):
    by_roles = presets.build_method("vit_b16", name, **({"rank": 4} if name == "lora" else {}))
    plain = peft.get_method(name, **({"rank": 4} if name == "lora" else {}))
    assert by_roles != plain or name == "vpt"  # the regex fields really come from the roles
    assert jax.tree.structure(by_roles.init(jax.random.key(0), params)) == \
        jax.tree.structure(plain.init(jax.random.key(0), params)), name


def test_a_new_method_needs_no_preset_entry_and_a_new_family_declares_its_roles_once(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class ConvGain(peft.Method):  # stands for any new method adapting whatever the model calls its convs
    ROLE_DEFAULTS = {"targets": "{conv}|{value}"}
    name = "conv_gain_test"
    targets: str = "nothing-by-default"

  monkeypatch.setitem(peft.METHODS._items, ConvGain.name, ConvGain)  # registered for this test only
  spec = models.ModelSpec("roles_test_cnn", "roles_test", lambda **kw: None, 32, (0.5,) * 3, (0.5,) * 3, "none",
                          roles={"conv": r"conv\d"})
  monkeypatch.setitem(models.MODELS._items, spec.name, spec)
  assert presets.preset("resnet50", ConvGain.name) == {"targets": r"(?:layer\d/block\d+/conv\d)"}
  assert presets.preset("vit_b16", ConvGain.name) == {"targets": r"(?:block\d+/attn/value)"}
  assert presets.preset(spec.name, ConvGain.name) == {"targets": r"(?:conv\d)"}
  assert presets.preset(spec.name, "tsa") == {"targets": r"(?:conv\d)"}
  with pytest.raises(ValueError, match=r"adaptformer on roles_test_cnn: its `targets` default adapts the "
                                       r"model's mlp_block layers.*its roles: conv.*--config.peft.targets"):
    presets.preset(spec.name, "adaptformer")


def test_every_plain_hyperparameter_is_settable_from_the_config():
  from configs import classify  # noqa: PLC0415

  c = classify.get_config("model=vit_b16,method=lora")
  assert (c.peft.rank, c.peft.init_weights, c.peft.rslora) == (16, "default", False)  # preset, then defaults
  assert classify.get_config("model=vit_b16,method=vpt").peft.deep is False


def test_unknown_role_names_are_errors():
  with pytest.raises(ValueError, match="unknown role 'qurey'.*query"):
    models.register_model("roles_typo", "x", lambda **kw: None, 32, (0.5,) * 3, (0.5,) * 3, "none",
                          roles={"qurey": "q"})


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_method_and_hyperparameter_errors_list_what_exists():
  with pytest.raises(KeyError, match="Unknown PEFT method 'loraa'.*adaptformer.*lora"):
    peft.get_method("loraa")
  with pytest.raises(TypeError, match="no hyperparameter.*'rnak'.*rank"):
    peft.get_method("lora", rnak=4)


def test_target_regex_selecting_nothing_lists_the_modules():
  _, variables, _ = tiny("vit")
  with pytest.raises(ValueError, match=r"selects nothing\. Available: .*block0/attn/query"):
    peft.get_method("lora", targets=r".*q_proj").init(jax.random.key(0), variables["params"])


def test_lora_on_a_depthwise_conv_is_an_error():
  model, variables, x = tiny("mobilenet_v2")
  method = peft.get_method("lora", targets=r".*_conv", rank=2)
  with pytest.raises(ValueError, match="block1/depthwise_conv.*grouped convolution"):
    run(model, variables, x, method, method.init(jax.random.key(0), variables["params"]))


def test_deep_vpt_gives_every_block_its_own_prompts():
  model, variables, x = tiny("vit")
  shallow = peft.get_method("vpt", num_tokens=3)
  deep = peft.get_method("vpt", num_tokens=3, deep=True)
  assert list(shallow.init(jax.random.key(0), variables["params"])["adapters"]) == ["block0"]
  trained = deep.init(jax.random.key(0), variables["params"])
  assert list(trained["adapters"]) == ["block0", "block1"]
  # Changing block1's prompts changes the output only in the deep variant.
  bumped = jax.tree.map(lambda a: a, trained)
  bumped["adapters"]["block1"] = {"prompts": trained["adapters"]["block1"]["prompts"] + 1.0}
  assert not np.allclose(run(model, variables, x, deep, trained), run(model, variables, x, deep, bumped))
