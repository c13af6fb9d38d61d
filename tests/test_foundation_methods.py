"""Every paper method, VPT and DoRA on every registered foundation model, through the model's roles.

Abstract only (`jax.eval_shape` of the model's and the method's `init` at 112 px, no compile), so the
full-size models cost their tracing: about 20 s of CPU for 20 models x 11 methods. What each method adapts is
written out from the model's own fields (depth, stages, registers), not from the role regexes under test.
Methods whose layers a model lacks (attention tuning and VPT on ConvNeXt, TSA on a ViT) raise the role error.
VPT's token layout with register tokens is checked numerically on a tiny ViT against a hand-written reference.
"""

from __future__ import annotations

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medpeft_jax import models, peft, presets
from medpeft_jax.models import vit
from medpeft_jax.peft.core import flatten

SIZE = 112  # a multiple of every patch size (14, 16) and of ConvNeXt's stride 32
METHODS = ("full", "linear", "bias", "norm", "attention", "lora", "dora", "ssf", "adaptformer", "vpt", "tsa")
FOUNDATION = [n for n in models.classifiers()
              if models.get_spec(n).family in ("vit", "convnext") and not re.fullmatch(r"vit_\w+", n)]
# The layers each method needs and a family lacks: building it is the role error, not a half-working method.
NOT_APPLICABLE = {"vit": {"tsa"}, "convnext": {"attention", "vpt"}}


def test_the_issue_models_are_all_registered():
  wanted = {f"dinov2_{s}14{r}" for s in "sblg" for r in ("", "_reg")} | {
      "rad_dino", "biomedclip_b16", "clip_l14", "siglip_b16", "siglip_so400m14", "uni_l16", "uni2_h14",
      "virchow2_h14", "gigapath_g14", "convnext_t", "convnext_s", "convnext_b"}
  assert wanted <= set(FOUNDATION)


@functools.cache
def abstract(name: str):
  """The model (3 classes) and its full-size parameters as ShapeDtypeStructs, flattened."""
  model = models.create_model(name, num_classes=3)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
  return model, shapes["params"]


def vit_expected(model: vit.ViT, method: str, flat) -> tuple[set[str], set[str]]:
  """(adapted modules, trained base leaves besides the head) of `method` on a foundation ViT."""
  blocks = [f"block{i}" for i in range(model.depth)]
  norms = {"norm"} | {f"{b}/norm{j}" for b in blocks for j in (1, 2)}
  norms |= ({"norm_pre"} if model.pre_norm else set()) | ({"map_head/norm"} if model.pool == "map" else set())
  dense = [f"attn/{t}" for t in ("query", "key", "value", "out")] + ["mlp/fc1", "mlp/fc2"]
  return {
      "full": (set(), set(flat)),
      "linear": (set(), set()),
      "bias": (set(), {p for p in flat if p.endswith("/bias") and not re.search(r"norm[^/]*/bias$", p)}),
      "norm": (set(), {f"{n}/{leaf}" for n in norms for leaf in ("scale", "bias")}),
      "attention": (set(), {p for p in flat if re.fullmatch(r"block\d+/attn/.*", p)} | {"pos_embed"}),
      "lora": ({f"{b}/attn/{t}" for b in blocks for t in ("query", "value")}, set()),
      "ssf": ({f"{b}/{d}" for b in blocks for d in dense} | norms, set()),
      "adaptformer": ({f"{b}/mlp" for b in blocks}, set()),
      "vpt": ({"block0"}, set()),
  }[{"dora": "lora"}.get(method, method)]


def convnext_expected(model, method: str, flat) -> tuple[set[str], set[str]]:
  """The same for a ConvNeXt: adapters on the dense convs (stem, downsampling, pointwise), never depthwise."""
  blocks = [f"stage{s}/block{j}" for s, depth in enumerate(model.depths) for j in range(depth)]
  pointwise = {f"{b}/mlp/fc{j}" for b in blocks for j in (1, 2)}
  convs = {"stem_conv"} | {f"stage{s}/downsample_conv" for s in range(1, len(model.depths))} | pointwise
  norms = {"stem_norm", "norm"} | {f"stage{s}/downsample_norm" for s in range(1, len(model.depths))} | {
      f"{b}/norm" for b in blocks}
  return {
      "full": (set(), set(flat)),
      "linear": (set(), set()),
      "bias": (set(), {p for p in flat if p.endswith("/bias") and not re.search(r"norm[^/]*/bias$", p)}),
      "norm": (set(), {f"{n}/{leaf}" for n in norms for leaf in ("scale", "bias")}),
      "lora": (convs, set()), "dora": (convs, set()), "tsa": (convs, set()),
      "ssf": (pointwise | norms, set()),
      "adaptformer": ({f"{b}/mlp" for b in blocks}, set()),
  }[method]


@pytest.mark.parametrize("name,method_name", list(itertools.product(FOUNDATION, METHODS)))
def test_every_method_adapts_the_right_layers_of_every_foundation_model(name, method_name):
  family = models.get_spec(name).family
  if method_name in NOT_APPLICABLE[family]:
    with pytest.raises(ValueError, match=rf"{method_name} on {name}: its `\w+` default adapts the model's .* "
                                         rf"layers, and {name} declares none of them.*--config\.peft\."):
      presets.build_method(name, method_name)
    return
  model, params = abstract(name)
  method = presets.build_method(name, method_name)
  trainable = jax.eval_shape(method.init, jax.random.key(1), params)
  flat = flatten(params)
  count = method.count(params, trainable)
  assert count.trainable > 0
  assert (count.trainable == count.total) == (method_name == "full"), count
  adapters, tuned = (vit_expected if family == "vit" else convnext_expected)(model, method_name, flat)
  assert set(trainable["adapters"]) == adapters
  assert set(trainable["params"]) == tuned | {"head/kernel", "head/bias"}
  if method_name not in ("full", "bias", "norm", "ssf"):  # these take every bias/norm, the pooling head's too
    assert not any(p.startswith("map_head") for p in [*trainable["adapters"], *trainable["params"]])
  if method_name == "dora":
    assert all(set(a) == {"a", "b", "m"} for a in trainable["adapters"].values())
  if method_name == "vpt":  # the prompts go after the class and register tokens, however many the model has
    assert method.num_prefix_tokens(flat) == model.num_prefix_tokens
    assert trainable["adapters"]["block0"]["prompts"].shape == (10, model.width)


# --- VPT's token layout with register tokens, against a hand-written reference ---------------------------

TINY = {"patch_size": 8, "width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64}


def hand_reference(model: vit.ViT, params, images, prompts: list) -> list:
  """The block outputs of `model` (class token, registers without a position, as DINOv2 with registers) when
  `prompts[i]` sits after the class and register tokens at the input of block i (None: the previous stay)."""
  p, d, g = params, model.width, images.shape[1] // model.patch_size
  b, ps = images.shape[0], model.patch_size
  patches = images.reshape(b, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, ps * ps * 3)
  tokens = patches @ p["patch_embed"]["kernel"].reshape(-1, d) + p["patch_embed"]["bias"]
  pos = p["pos_embed"]
  cls = jnp.broadcast_to(p["cls_token"] + pos[:, :1], (b, 1, d))
  regs = jnp.broadcast_to(p["reg_token"], (b, model.num_registers, d))
  n = 1 + model.num_registers
  x = jnp.concatenate([cls, regs, tokens + pos[:, 1:]], axis=1)
  outputs = []
  for i in range(model.depth):
    if prompts[i] is not None:
      rest = x[:, n:] if i == 0 else x[:, n + prompts[i].shape[0]:]
      x = jnp.concatenate([x[:, :n], jnp.broadcast_to(prompts[i], (b, *prompts[i].shape)), rest], axis=1)
    block = vit.EncoderBlock(model.num_heads, model.mlp_dim, model.norm_eps, init_values=model.init_values)
    x = block.apply({"params": p[f"block{i}"]}, x)
    outputs.append(x)
  return outputs


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_follow_the_class_and_register_tokens(deep):
  model = models.create_model("dinov2_s14_reg", num_classes=0, **TINY)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.3), shapes)
  method = peft.get_method("vpt", num_tokens=3, deep=deep, head=None)
  trainable = method.init(jax.random.key(2), variables["params"])
  assert method.num_prefix_tokens(flatten(variables["params"])) == 5  # class token + 4 registers

  out, state = method.apply(model, variables, trainable, images, capture_intermediates=True,
                            mutable=["intermediates"])
  got = [state["intermediates"][f"block{i}"]["__call__"][0] for i in range(model.depth)]
  prompts = [trainable["adapters"][f"block{i}"]["prompts"] if f"block{i}" in trainable["adapters"] else None
             for i in range(model.depth)]
  want = hand_reference(model, variables["params"], images, prompts)
  assert got[0].shape == (2, 5 + 3 + 16, 32)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
  final = nn.LayerNorm(epsilon=model.norm_eps).apply({"params": variables["params"]["norm"]}, want[-1])[:, 0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(final), atol=1e-5, rtol=0)
  # The hand reference is the model's own computation: without prompts it gives the plain model's output.
  plain = hand_reference(model, variables["params"], images, [None] * model.depth)[-1]
  np.testing.assert_allclose(np.asarray(model.apply(variables, images)),
                             np.asarray(nn.LayerNorm(epsilon=model.norm_eps).apply(
                                 {"params": variables["params"]["norm"]}, plain)[:, 0]), atol=1e-5, rtol=0)
