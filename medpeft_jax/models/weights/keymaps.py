"""Checkpoint layouts: how each source's tensor names map onto our parameter paths.

A layout is a table of (source module regex, our module path, kind). The kind says which tensors a
module has and how each converts: torch `conv` weights go OIHW -> HWIO, `linear` weights are
transposed, `bn` running statistics go to the `batch_stats` collection, flax `heads_in`/`heads_out`
kernels of the original ViT are (D, heads, head_dim) and are flattened to our D x D projections.
Targets are '/'-joined paths that start with the collection (`params/...`, `batch_stats/...`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]
Target = str | Callable[[re.Match], str]

_conv = lambda w: np.transpose(w, (2, 3, 1, 0))  # torch OIHW -> flax HWIO
_same = lambda w: w

# kind -> [(source tensor name, collection, our tensor name, transform)]
KINDS: dict[str, list[tuple[str, str, str, Transform]]] = {
    "param": [("", "params", "", _same)],
    "token": [("", "params", "", lambda w: w.reshape(1, -1, w.shape[-1]))],  # (D,) or (N, D) -> (1, N, D)
    "embedding": [("weight", "params", "", lambda w: w[None])],  # nn.Embedding (N, D) -> (1, N, D)
    "conv": [("weight", "params", "kernel", _conv), ("bias", "params", "bias", _same)],
    "linear": [("weight", "params", "kernel", np.transpose), ("bias", "params", "bias", _same)],
    "ln": [("weight", "params", "scale", _same), ("bias", "params", "bias", _same)],
    "bn": [("weight", "params", "scale", _same), ("bias", "params", "bias", _same),
           ("running_mean", "batch_stats", "mean", _same), ("running_var", "batch_stats", "var", _same)],
    "flax": [(n, "params", n, _same) for n in ("kernel", "bias", "scale")],
    "heads_in": [("kernel", "params", "kernel", lambda w: w.reshape(w.shape[0], -1)),
                 ("bias", "params", "bias", lambda b: b.reshape(-1))],
    "heads_out": [("kernel", "params", "kernel", lambda w: w.reshape(-1, w.shape[-1])),
                  ("bias", "params", "bias", _same)],
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """One source naming scheme for one model family."""

  name: str
  signature: str  # a key matching this regex identifies the layout
  modules: tuple[tuple[str, Target, str], ...]
  sep: str = "."
  prefix: str = ""  # optional regex before every source key (e.g. Hugging Face's `vit.`)
  ignore: tuple[str, ...] = ()  # source keys that are expected and deliberately unused
  preprocess: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

  def matches(self, keys) -> bool:
    sig = re.compile(self.signature)
    return any(sig.fullmatch(k) for k in keys)

  def _rules(self):
    for src, dst, kind in self.modules:
      for src_name, coll, dst_name, fn in KINDS[kind]:
        pattern = self.prefix + src + (self.sep + re.escape(src_name) if src_name else "")
        yield re.compile(pattern), dst, coll, dst_name, fn

  def convert(self, state: dict[str, np.ndarray]):
    """Returns ({our path: array}, unexpected source keys, ignored source keys)."""
    if self.preprocess:
      state = self.preprocess(state)
    rules = list(self._rules())
    ignore = [re.compile(p) for p in self.ignore + (r".*num_batches_tracked",)]
    out, unexpected, ignored = {}, [], []
    for key, value in state.items():
      for pattern, dst, coll, dst_name, fn in rules:
        m = pattern.fullmatch(key)
        if m:
          module = dst(m) if callable(dst) else m.expand(dst)
          out["/".join(p for p in (coll, module, dst_name) if p)] = fn(np.asarray(value))
          break
      else:
        (ignored if any(p.fullmatch(key) for p in ignore) else unexpected).append(key)
    return out, unexpected, ignored


def _split_fused(state, pattern: str, names: str):
  """Splits every fused query/key/value tensor whose key fully matches `pattern` (groups: module, leaf)
  into three, keyed `names.format(module, "q"|"k"|"v", leaf)`."""
  out = {}
  for key, value in state.items():
    m = re.fullmatch(pattern, key)
    if m:
      for name, part in zip("qkv", np.split(value, 3, axis=0)):
        out[names.format(m[1], name, m[2])] = part
    else:
      out[key] = value
  return out


# timm fuses query/key/value into one `qkv` linear; torch's `nn.MultiheadAttention` (SigLIP's pooling head)
# into `in_proj_*`.
_split_timm_qkv = functools.partial(_split_fused, pattern=r"(.*\.attn)\.qkv\.(weight|bias)", names="{}.{}.{}")
_split_in_proj = functools.partial(_split_fused, pattern=r"(.*)\.in_proj_(weight|bias)", names="{}.{}_proj.{}")


def _pack_gate_up(state):
  """A transformers 5 DINOv2 state dict splits the SwiGLU `weights_in` into gate/up; pack them back."""
  out = {}
  for key, value in state.items():
    m = re.fullmatch(r"(.*\.mlp)\.(gate|up)_proj\.(weight|bias)", key)
    if not m:
      out[key] = value
    elif m[2] == "gate":
      out[f"{m[1]}.weights_in.{m[3]}"] = np.concatenate([value, state[f"{m[1]}.up_proj.{m[3]}"]], axis=0)
  return out


def _unstack_scanned_blocks(state):
  """big_vision may save the encoder scanned: one `encoderblock/...` tensor with a depth axis."""
  out = {}
  for key, value in state.items():
    m = re.fullmatch(r"(.*Transformer)/encoderblock/(.*)", key)
    if m:
      for i, v in enumerate(value):
        out[f"{m[1]}/encoderblock_{i}/{m[2]}"] = v
    else:
      out[key] = value
  return out


_B = r"blocks\.(\d+)\."
_L = r"(?:encoder\.layer|layers)\.(\d+)\."  # hub files | transformers 5 in-memory names
_E = r"Transformer/encoderblock_(\d+)/"
_C = r"encoder\.layers\.(\d+)\."

VIT_LAYOUTS = (
    # timm, also inside open_clip checkpoints (BiomedCLIP: `visual.trunk.`; projection and text tower unused).
    Layout("timm", r"(?:visual\.trunk\.)?patch_embed\.proj\.weight", (
        ("cls_token", "cls_token", "param"), ("pos_embed", "pos_embed", "param"),
        ("reg_token", "reg_token", "param"),
        (r"patch_embed\.proj", "patch_embed", "conv"), ("norm_pre", "norm_pre", "ln"),
        (_B + r"ls1\.gamma", r"block\1/ls1/scale", "param"), (_B + r"ls2\.gamma", r"block\1/ls2/scale", "param"),
        (_B + "norm1", r"block\1/norm1", "ln"), (_B + "norm2", r"block\1/norm2", "ln"),
        (_B + r"attn\.q", r"block\1/attn/query", "linear"),
        (_B + r"attn\.k", r"block\1/attn/key", "linear"),
        (_B + r"attn\.v", r"block\1/attn/value", "linear"),
        (_B + r"attn\.proj", r"block\1/attn/out", "linear"),
        (_B + r"mlp\.fc1", r"block\1/mlp/fc1", "linear"), (_B + r"mlp\.fc2", r"block\1/mlp/fc2", "linear"),
        ("norm", "norm", "ln"), ("head", "head", "linear"),
    ), prefix=r"(?:visual\.trunk\.)?", ignore=(r"visual\.head\..*", r"text\..*", "logit_scale"),
        preprocess=_split_timm_qkv),
    # transformers `Dinov2Model` / `Dinov2WithRegistersModel` (RAD-DINO); before "huggingface", whose
    # signature DINOv2's names also match. Hub files have `attention.attention.query`, `weights_in` (SwiGLU);
    # a transformers 5 `state_dict()` has q_proj/o_proj and gate/up/down_proj.
    Layout("dinov2", r"(?:dinov2\.|dinov2_with_registers\.)?encoder\.layer\.\d+\.layer_scale1\.lambda1", (
        (r"embeddings\.cls_token", "cls_token", "param"), (r"embeddings\.register_tokens", "reg_token", "param"),
        (r"embeddings\.position_embeddings", "pos_embed", "param"),
        (r"embeddings\.patch_embeddings\.projection", "patch_embed", "conv"),
        (_L + "norm1", r"block\1/norm1", "ln"), (_L + "norm2", r"block\1/norm2", "ln"),
        (_L + r"attention\.(?:attention\.query|q_proj)", r"block\1/attn/query", "linear"),
        (_L + r"attention\.(?:attention\.key|k_proj)", r"block\1/attn/key", "linear"),
        (_L + r"attention\.(?:attention\.value|v_proj)", r"block\1/attn/value", "linear"),
        (_L + r"attention\.(?:output\.dense|o_proj)", r"block\1/attn/out", "linear"),
        (_L + r"layer_scale1\.lambda1", r"block\1/ls1/scale", "param"),
        (_L + r"layer_scale2\.lambda1", r"block\1/ls2/scale", "param"),
        (_L + r"mlp\.(?:fc1|weights_in)", r"block\1/mlp/fc1", "linear"),
        (_L + r"mlp\.(?:fc2|weights_out|down_proj)", r"block\1/mlp/fc2", "linear"),
        ("layernorm", "norm", "ln"), ("classifier", "head", "linear"),  # *ForImageClassification: pool="token_mean"
    ), prefix=r"(?:dinov2\.|dinov2_with_registers\.)?",
        ignore=(r"(?:dinov2\.|dinov2_with_registers\.)?embeddings\.mask_token",),
        preprocess=_pack_gate_up),
    # transformers `CLIPVisionModel` / `SiglipVisionModel`, or the vision tower of a whole CLIP/SigLIP
    # checkpoint (`vision_model.`; its text tower and projections unused).
    Layout("clip", r"(?:vision_model\.)?encoder\.layers\.\d+\.self_attn\.q_proj\.weight", (
        (r"embeddings\.class_embedding", "cls_token", "token"),
        (r"embeddings\.position_embedding", "pos_embed", "embedding"),
        (r"embeddings\.patch_embedding", "patch_embed", "conv"), ("pre_layrnorm", "norm_pre", "ln"),
        (_C + "layer_norm1", r"block\1/norm1", "ln"), (_C + "layer_norm2", r"block\1/norm2", "ln"),
        (_C + r"self_attn\.q_proj", r"block\1/attn/query", "linear"),
        (_C + r"self_attn\.k_proj", r"block\1/attn/key", "linear"),
        (_C + r"self_attn\.v_proj", r"block\1/attn/value", "linear"),
        (_C + r"self_attn\.out_proj", r"block\1/attn/out", "linear"),
        (_C + r"mlp\.fc1", r"block\1/mlp/fc1", "linear"), (_C + r"mlp\.fc2", r"block\1/mlp/fc2", "linear"),
        ("post_layernorm", "norm", "ln"), (r"head\.probe", "map_head/probe", "param"),
        (r"head\.attention\.q_proj", "map_head/attn/query", "linear"),
        (r"head\.attention\.k_proj", "map_head/attn/key", "linear"),
        (r"head\.attention\.v_proj", "map_head/attn/value", "linear"),
        (r"head\.attention\.out_proj", "map_head/attn/out", "linear"),
        (r"head\.layernorm", "map_head/norm", "ln"),
        (r"head\.mlp\.fc1", "map_head/mlp/fc1", "linear"), (r"head\.mlp\.fc2", "map_head/mlp/fc2", "linear"),
    ), prefix=r"(?:vision_model\.)?", ignore=(r"text_model\..*", r"(?:visual|text)_projection\..*",
                                              r"logit_(?:scale|bias)", r".*position_ids"),
        preprocess=_split_in_proj),
    Layout("huggingface", r"(vit\.)?embeddings\.patch_embeddings\.projection\.weight", (
        (r"embeddings\.cls_token", "cls_token", "param"),
        (r"embeddings\.position_embeddings", "pos_embed", "param"),
        (r"embeddings\.patch_embeddings\.projection", "patch_embed", "conv"),
        (_L + "layernorm_before", r"block\1/norm1", "ln"), (_L + "layernorm_after", r"block\1/norm2", "ln"),
        # Hub files keep the old names; a transformers 5 `state_dict()` has q/k/v/o_proj and mlp.
        (_L + r"attention\.(?:attention\.query|q_proj)", r"block\1/attn/query", "linear"),
        (_L + r"attention\.(?:attention\.key|k_proj)", r"block\1/attn/key", "linear"),
        (_L + r"attention\.(?:attention\.value|v_proj)", r"block\1/attn/value", "linear"),
        (_L + r"attention\.(?:output\.dense|o_proj)", r"block\1/attn/out", "linear"),
        (_L + r"(?:intermediate\.dense|mlp\.fc1)", r"block\1/mlp/fc1", "linear"),
        (_L + r"(?:output\.dense|mlp\.fc2)", r"block\1/mlp/fc2", "linear"),
        ("layernorm", "norm", "ln"), ("classifier", "head", "linear"),
    ), prefix=r"(?:vit\.)?", ignore=(r"(?:vit\.)?pooler\..*",)),
    Layout("big_vision", r"(?:params/)?Transformer/encoderblock(?:_\d+)?/MultiHead\w+/query/kernel", (
        ("cls", "cls_token", "param"), ("Transformer/posembed_input/pos_embedding", "pos_embed", "param"),
        ("embedding", "patch_embed", "flax"),
        (_E + "LayerNorm_0", r"block\1/norm1", "flax"), (_E + "LayerNorm_[12]", r"block\1/norm2", "flax"),
        (_E + r"MultiHeadDotProductAttention_\d/query", r"block\1/attn/query", "heads_in"),
        (_E + r"MultiHeadDotProductAttention_\d/key", r"block\1/attn/key", "heads_in"),
        (_E + r"MultiHeadDotProductAttention_\d/value", r"block\1/attn/value", "heads_in"),
        (_E + r"MultiHeadDotProductAttention_\d/out", r"block\1/attn/out", "heads_out"),
        (_E + r"MlpBlock_\d/Dense_0", r"block\1/mlp/fc1", "flax"),
        (_E + r"MlpBlock_\d/Dense_1", r"block\1/mlp/fc2", "flax"),
        ("Transformer/encoder_norm", "norm", "flax"), ("head", "head", "flax"),
    ), sep="/", prefix=r"(?:params/)?", ignore=(r"(?:params/)?pre_logits/.*",),
        preprocess=_unstack_scanned_blocks),
)

_HF_STAGE = r"encoder\.stages\.(\d)\.layers\.(\d+)\."


def _hf_stage(module: str) -> Callable[[re.Match], str]:
  """Hugging Face counts stages and inner layers from 0, we from 1: `{0}` is the inner layer + 1."""
  return lambda m: f"layer{int(m[1]) + 1}/block{m[2]}/" + module.format(*(int(g) + 1 for g in m.groups()[2:]))


RESNET_LAYOUTS = (
    Layout("torchvision", r"layer1\.0\.conv1\.weight", (  # also timm's resnet*.tv_in1k etc.
        ("conv1", "stem_conv", "conv"), ("bn1", "stem_bn", "bn"),
        (r"layer(\d)\.(\d+)\.conv(\d)", r"layer\1/block\2/conv\3", "conv"),
        (r"layer(\d)\.(\d+)\.bn(\d)", r"layer\1/block\2/bn\3", "bn"),
        (r"layer(\d)\.(\d+)\.downsample\.0", r"layer\1/block\2/downsample_conv", "conv"),
        (r"layer(\d)\.(\d+)\.downsample\.1", r"layer\1/block\2/downsample_bn", "bn"),
        ("fc", "head", "linear"),
    )),
    Layout("huggingface", r"(resnet\.)?embedder\.embedder\.convolution\.weight", (
        (r"embedder\.embedder\.convolution", "stem_conv", "conv"),
        (r"embedder\.embedder\.normalization", "stem_bn", "bn"),
        (_HF_STAGE + r"shortcut\.convolution", _hf_stage("downsample_conv"), "conv"),
        (_HF_STAGE + r"shortcut\.normalization", _hf_stage("downsample_bn"), "bn"),
        (_HF_STAGE + r"layer\.(\d)\.convolution", _hf_stage("conv{0}"), "conv"),
        (_HF_STAGE + r"layer\.(\d)\.normalization", _hf_stage("bn{0}"), "bn"),
        (r"classifier\.1", "head", "linear"),
    ), prefix=r"(?:resnet\.)?"),
)

_F = r"features\.(\d+)\.conv\."

MOBILENET_V2_LAYOUTS = (
    Layout("torchvision", r"features\.0\.0\.weight", (
        (r"features\.0\.0", "stem_conv", "conv"), (r"features\.0\.1", "stem_bn", "bn"),
        # features.1 has no expansion (t = 1): its conv.0 is the depthwise conv.
        (r"features\.1\.conv\.0\.0", "block1/depthwise_conv", "conv"),
        (r"features\.1\.conv\.0\.1", "block1/depthwise_bn", "bn"),
        (r"features\.1\.conv\.1", "block1/project_conv", "conv"),
        (r"features\.1\.conv\.2", "block1/project_bn", "bn"),
        (_F + r"0\.0", r"block\1/expand_conv", "conv"), (_F + r"0\.1", r"block\1/expand_bn", "bn"),
        (_F + r"1\.0", r"block\1/depthwise_conv", "conv"), (_F + r"1\.1", r"block\1/depthwise_bn", "bn"),
        (_F + r"2", r"block\1/project_conv", "conv"), (_F + r"3", r"block\1/project_bn", "bn"),
        (r"features\.18\.0", "final_conv", "conv"), (r"features\.18\.1", "final_bn", "bn"),
        (r"classifier\.1", "head", "linear"),
    )),
)

_CB = r"stages\.(\d)\.blocks\.(\d+)\."

CONVNEXT_LAYOUTS = (  # stages and blocks count from 0 in both sources and in ours
    Layout("timm", r"stages\.0\.blocks\.0\.conv_dw\.weight", (
        (r"stem\.0", "stem_conv", "conv"), (r"stem\.1", "stem_norm", "ln"),
        (r"stages\.(\d)\.downsample\.0", r"stage\1/downsample_norm", "ln"),
        (r"stages\.(\d)\.downsample\.1", r"stage\1/downsample_conv", "conv"),
        (_CB + "conv_dw", r"stage\1/block\2/dwconv", "conv"), (_CB + "norm", r"stage\1/block\2/norm", "ln"),
        (_CB + r"mlp\.fc1", r"stage\1/block\2/mlp/fc1", "linear"),
        (_CB + r"mlp\.fc2", r"stage\1/block\2/mlp/fc2", "linear"),
        (_CB + "gamma", r"stage\1/block\2/gamma", "param"),
        (r"head\.norm", "norm", "ln"), (r"head\.fc", "head", "linear"),
    )),
    Layout("huggingface", r"(convnext\.)?embeddings\.patch_embeddings\.weight", (
        (r"embeddings\.patch_embeddings", "stem_conv", "conv"), (r"embeddings\.layernorm", "stem_norm", "ln"),
        (r"encoder\.stages\.(\d)\.downsampling_layer\.0", r"stage\1/downsample_norm", "ln"),
        (r"encoder\.stages\.(\d)\.downsampling_layer\.1", r"stage\1/downsample_conv", "conv"),
        (_HF_STAGE + "dwconv", r"stage\1/block\2/dwconv", "conv"),
        (_HF_STAGE + "layernorm", r"stage\1/block\2/norm", "ln"),
        (_HF_STAGE + "pwconv1", r"stage\1/block\2/mlp/fc1", "linear"),
        (_HF_STAGE + "pwconv2", r"stage\1/block\2/mlp/fc2", "linear"),
        (_HF_STAGE + "layer_scale_parameter", r"stage\1/block\2/gamma", "param"),
        ("layernorm", "norm", "ln"), ("classifier", "head", "linear"),
    ), prefix=r"(?:convnext\.)?"),
)

LAYOUTS = {"vit": VIT_LAYOUTS, "resnet": RESNET_LAYOUTS, "mobilenet_v2": MOBILENET_V2_LAYOUTS,
           "convnext": CONVNEXT_LAYOUTS}


def detect_layout(family: str, keys) -> Layout:
  keys = list(keys)
  for layout in LAYOUTS[family]:
    if layout.matches(keys):
      return layout
  names = ", ".join(layout.name for layout in LAYOUTS[family])
  raise ValueError(f"The checkpoint is in none of the {family} layouts we read ({names}); "
                   f"its first keys are {keys[:5]}.")
