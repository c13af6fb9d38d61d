"""The foundation ViTs: tiny random references in their real file formats, read torch-free, match PyTorch.

References: transformers `Dinov2Model`, `Dinov2WithRegistersModel`, `CLIPModel` (vision tower),
`SiglipModel` (vision tower); timm `VisionTransformer` with layer scale, register tokens and SwiGLUPacked
(the pathology ViTs), and inside an open_clip `.bin` (BiomedCLIP). Each way a source resamples its
position grid at a non-native resolution is checked once: torch bicubic (DINOv2, SigLIP) and antialiased
bicubic (DINOv2 with registers, timm). About 50 s on 2 CPU cores with a cold XLA cache.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import transformers
from flax import traverse_util

from medpeft_jax import models
from medpeft_jax.models.vit import resample_pos_embed
from tests.helpers import random_images, randomise

TOL = 1e-4
TINY = {"patch_size": 8, "width": 32, "depth": 2, "num_heads": 4}


def assert_features_match(name, path, reference, size=32, num_classes=0, **overrides):
  """Our pooled features (or logits) from the file at `path` equal `reference(x_nchw)`'s."""
  x, x_torch = random_images(size=size)
  model, variables, report = models.load_pretrained(name, path, num_classes=num_classes, image_size=size,
                                                    **TINY, **overrides)
  assert report.ok and not report.unexpected and not report.reinitialized, report
  with torch.no_grad():
    ref = reference(x_torch).numpy()
  ours = np.asarray(model.apply(variables, x))
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  return report


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", [(37, 16), (4, 6), (6, 4), (3, 7)])
def test_position_grid_resampling_is_torchs_bicubic(old, new, antialias):
  """torch's bicubic (a = -0.75, edge clamped) and its antialiased variant (a = -0.5, renormalised)."""
  pe = np.random.default_rng(0).standard_normal((1, 1 + old * old, 5)).astype(np.float32)
  ours = resample_pos_embed(jnp.asarray(pe), 1 + new * new, 1, "bicubic_aa" if antialias else "bicubic")
  grid = torch.from_numpy(pe[:, 1:]).reshape(1, old, old, 5).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False,
                                        antialias=antialias).permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
  np.testing.assert_array_equal(np.asarray(ours)[:, :1], pe[:, :1])
  np.testing.assert_allclose(np.asarray(ours)[:, 1:], ref, atol=1e-5, rtol=0)
  if old < new and not antialias:  # jax.image.resize's cubic (a = -0.5) is not torch's a = -0.75 kernel
    other = jax.image.resize(jnp.asarray(pe[:, 1:].reshape(1, old, old, 5)), (1, new, new, 5), "cubic")
    assert np.abs(np.asarray(other).reshape(1, -1, 5) - ref).max() > 1e-3


@pytest.fixture(scope="module")
def dinov2_files(tmp_path_factory):
  """save_pretrained folders: DINOv2 with a SwiGLU MLP (as the g model), with registers, and a registers model
  with its linear-evaluation classifier (class token and mean patch token, concatenated)."""
  root = tmp_path_factory.mktemp("dinov2")
  common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
  refs = {"swiglu": randomise(transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=True, **common))),
          "registers": randomise(transformers.Dinov2WithRegistersModel(
              transformers.Dinov2WithRegistersConfig(num_register_tokens=3, **common))),
          "classifier": randomise(transformers.Dinov2WithRegistersForImageClassification(
              transformers.Dinov2WithRegistersConfig(num_register_tokens=3, num_labels=3, **common)))}
  for kind, ref in refs.items():
    ref.save_pretrained(root / kind)
  # transformers 5's in-memory names (q_proj/o_proj, the SwiGLU split into gate/up/down_proj)
  torch.save(refs["swiglu"].state_dict(), root / "swiglu.bin")
  return root, refs


@pytest.mark.parametrize("kind,size,file", [("swiglu", 32, "swiglu"), ("swiglu", 32, "swiglu.bin"),
                                            ("registers", 32, "registers"), ("classifier", 32, "classifier"),
                                            ("swiglu", 48, "swiglu"), ("registers", 48, "registers")])
def test_dinov2_matches_transformers(dinov2_files, kind, size, file):
  """At 48 px transformers interpolates the 4 x 4 grid to 6 x 6 bicubically (antialiased with registers);
  we do so when loading."""
  root, refs = dinov2_files
  registers = {"mlp_dim": 128, "num_registers": 3}
  name, fields = {"swiglu": ("dinov2_g14", {"mlp_dim": 88}),  # (int(128 * 2 / 3) + 7) // 8 * 8
                  "registers": ("dinov2_s14_reg", registers),
                  "classifier": ("dinov2_s14_reg", {**registers, "pool": "token_mean", "num_classes": 3})}[kind]
  out = lambda x: refs[kind](pixel_values=x)
  reference = (lambda x: out(x).logits) if kind == "classifier" else (lambda x: out(x).pooler_output)
  report = assert_features_match(name, root / file, reference, size=size, **fields)
  prefix = "dinov2_with_registers." if kind == "classifier" else ""
  assert report.layout == "dinov2" and report.ignored == [f"{prefix}embeddings.mask_token"]
  assert report.resampled == ([] if size == 32 else ["params/pos_embed (1, 17, 32) -> (1, 37, 32)"])


_TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "image_size": 32, "patch_size": 8}


def test_clip_vision_tower_matches_transformers(tmp_path):
  """A whole CLIPModel folder (as openai/clip-vit-large-patch14): quick-GELU, pre-LayerNorm, no patch bias."""
  config = transformers.CLIPConfig(
      text_config=_TINY_TEXT, vision_config=_TINY_VISION, projection_dim=8)
  ref = randomise(transformers.CLIPModel(config))
  ref.save_pretrained(tmp_path)
  report = assert_features_match("clip_l14", tmp_path, lambda x: ref.vision_model(pixel_values=x).pooler_output,
                                 mlp_dim=64)
  assert any(k.startswith("text_model.") for k in report.ignored) and "visual_projection.weight" in report.ignored


def test_siglip_vision_tower_matches_transformers(tmp_path):
  """A whole SiglipModel folder (as google/medsiglip-448): no class token, MAP head, tanh GELU; also at
  40 px, where transformers interpolates the position grid (interpolate_pos_encoding=True)."""
  config = transformers.SiglipConfig(
      text_config=_TINY_TEXT, vision_config=_TINY_VISION)
  ref = randomise(transformers.SiglipModel(config))
  ref.save_pretrained(tmp_path)
  vision = lambda x: ref.vision_model(pixel_values=x, interpolate_pos_encoding=True).pooler_output
  assert_features_match("siglip_so400m14", tmp_path, vision, mlp_dim=64)
  report = assert_features_match("siglip_so400m14", tmp_path, vision, size=40, mlp_dim=64)
  assert report.resampled == ["params/pos_embed (1, 16, 32) -> (1, 25, 32)"]


_SWIGLU_PACKED = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
_TIMM_PATHOLOGY = {  # our name: (our fields, timm kwargs) at tiny size; the full ones are in zoo.py
    "uni_l16": ({"mlp_dim": 128}, {"mlp_ratio": 4}),
    "uni2_h14": ({"mlp_dim": 64, "num_registers": 2},
                 {"mlp_ratio": 4, "reg_tokens": 2, "no_embed_class": True, **_SWIGLU_PACKED}),
    "virchow2_h14": ({"mlp_dim": 64, "num_registers": 2}, {"mlp_ratio": 4, "reg_tokens": 2, **_SWIGLU_PACKED}),
}


def tiny_timm_vit(**kwargs):
  return randomise(timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, dynamic_img_size=True, **kwargs))


@pytest.mark.parametrize("name,size", [("uni_l16", 32), ("uni2_h14", 32), ("virchow2_h14", 32),
                                       ("virchow2_h14", 48)])
def test_timm_pathology_vits_match_timm(tmp_path, name, size):
  """Layer scale, registers (with and without positions), SwiGLUPacked; at 48 px timm resamples the
  4 x 4 grid with antialiased bicubic (`dynamic_img_size`), and so do we when loading. Logits through a
  head, except Virchow2: the embedding its card computes from all tokens (class token, mean patch token)."""
  fields, kwargs = _TIMM_PATHOLOGY[name]
  if name == "virchow2_h14":
    ref = tiny_timm_vit(init_values=1e-5, num_classes=0, global_pool="", **kwargs)
    tokens = lambda x: ref(x)
    reference = lambda x: torch.cat([tokens(x)[:, 0], tokens(x)[:, ref.num_prefix_tokens:].mean(1)], dim=-1)
  else:
    ref = reference = tiny_timm_vit(init_values=1e-5, num_classes=3, **kwargs)
  safetensors.torch.save_file(ref.state_dict(), tmp_path / "model.safetensors")
  assert_features_match(name, tmp_path / "model.safetensors", reference, size=size,
                        num_classes=0 if name == "virchow2_h14" else 3, **fields)


def test_biomedclip_trunk_from_an_open_clip_bin(tmp_path):
  """open_clip's `.bin` (a pickle, read by the restricted unpickler): the timm trunk under `visual.trunk.`,
  beside the projection and the text tower, which are not used."""
  ref = tiny_timm_vit(num_classes=0)
  state = {f"visual.trunk.{k}": v for k, v in ref.state_dict().items()}
  state.update({"visual.head.proj.weight": torch.randn(8, 32), "logit_scale": torch.tensor(1.0),
                "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 16)})
  torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
  report = assert_features_match("biomedclip_b16", tmp_path, ref, mlp_dim=128)
  assert sorted(report.ignored) == ["logit_scale", "text.transformer.embeddings.word_embeddings.weight",
                                    "visual.head.proj.weight"]


def _count_ours(name, size):
  model = models.create_model(name, num_classes=0)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return sum(int(np.prod(s.shape)) for s in traverse_util.flatten_dict(shapes).values())


def _hf_dinov2(name):
  size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[name[len("dinov2_")]]
  hidden, layers, heads = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                           "giant": (1536, 40, 24)}[size]
  kw = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "patch_size": 14,
        "image_size": 518, "use_swiglu_ffn": size == "giant"}
  if name.endswith("_reg"):
    return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw)), 518, hidden
  return transformers.Dinov2Model(transformers.Dinov2Config(**kw)), 518, hidden


def _timm(arch, size=224, **kwargs):
  return timm.create_model(arch, num_classes=0, img_size=size, **kwargs), size, 0


_SWIGLU = {**_SWIGLU_PACKED, "init_values": 1e-5}
# name: the reference at full size -> (torch module, image size, parameters it has that we do not)
_REFERENCES = {
    **{f"dinov2_{s}14{r}": functools.partial(_hf_dinov2, f"dinov2_{s}14{r}") for s in "sblg" for r in ("", "_reg")},
    "rad_dino": functools.partial(_hf_dinov2, "dinov2_b14"),
    "clip_l14": lambda: (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=224)), 224, 0),
    "siglip_b16": lambda: (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224)), 224, 0),
    "siglip_so400m14": lambda: (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
        image_size=448)), 448, 0),
    "uni_l16": lambda: _timm("vit_large_patch16_224", init_values=1e-5),
    "uni2_h14": lambda: _timm("vit_giant_patch14_224", patch_size=14, depth=24, num_heads=24, embed_dim=1536,
                              mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, **_SWIGLU),
    "virchow2_h14": lambda: _timm("vit_huge_patch14_224", mlp_ratio=5.3375, reg_tokens=4, **_SWIGLU),
    "gigapath_g14": lambda: _timm("vit_giant_patch14_dinov2", patch_size=16, init_values=1e-5, mlp_ratio=5.33334),
    "biomedclip_b16": lambda: _timm("vit_base_patch16_224"),
}


@pytest.mark.parametrize("name", sorted(_REFERENCES))
def test_full_size_parameter_counts_match_the_references(name):
  """Counted at the reference checkpoint's grid, against the reference module built on the meta device.

  The one difference: transformers' DINOv2 has a `mask_token` (one width-sized vector, used only by
  masked-image pre-training), which we do not build.
  """
  with torch.device("meta"):
    ref, size, not_ours = _REFERENCES[name]()
  assert _count_ours(name, size) == sum(p.numel() for p in ref.parameters()) - not_ours


def test_foundation_vits_keep_the_peft_paths():
  """Fused/packed checkpoints are split on import, so LoRA's q/v and the norms select the same paths."""
  model = models.create_model("siglip_b16", num_classes=2, **TINY, mlp_dim=64)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  paths = ["/".join(p) for p in traverse_util.flatten_dict(shapes["params"])]
  assert [p for p in paths if re.fullmatch(r"(.*/)?attn/query/kernel", p)] == [
      "block0/attn/query/kernel", "block1/attn/query/kernel", "map_head/attn/query/kernel"]
  assert "cls_token" not in paths and "map_head/probe" in paths


def test_a_variant_with_more_weights_is_refused(dinov2_files):
  """DINOv2 with registers read as DINOv2 without: its register tokens have no place, so loading refuses
  rather than silently running another network."""
  root, _ = dinov2_files
  with pytest.raises(models.CheckpointMismatchError, match=r"not in the model .*params/reg_token"):
    models.load_pretrained("dinov2_s14", root / "registers", num_classes=0, image_size=32, **TINY, mlp_dim=128)


def test_missing_checkpoint_names_the_hub_repo(tmp_path):
  with pytest.raises(FileNotFoundError, match="microsoft/rad-dino"):
    models.load_pretrained("rad_dino", tmp_path / "rad-dino", num_classes=2)


def test_inconsistent_vit_fields_name_the_field():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="pool='token' needs class_token=True"):
    models.create_model("dinov2_s14", num_classes=0, class_token=False, **TINY, mlp_dim=64).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="mlp_act='relu' is not one of"):
    models.create_model("dinov2_s14", num_classes=0, mlp_act="relu", **TINY, mlp_dim=64).init(jax.random.key(0), x)


def test_mean_pool_is_the_patch_half_of_token_mean():
  """`mean` averages the patch tokens only (registers excluded), as the checked `token_mean` does."""
  x = jnp.asarray(random_images()[0])
  build = lambda pool: models.create_model("dinov2_s14_reg", num_classes=0, pool=pool, **TINY, mlp_dim=64)
  variables = build("mean").init(jax.random.key(0), x)
  both = np.asarray(build("token_mean").apply(variables, x))
  np.testing.assert_array_equal(np.asarray(build("mean").apply(variables, x)), both[:, 32:])
  np.testing.assert_array_equal(np.asarray(build("token").apply(variables, x)), both[:, :32])
