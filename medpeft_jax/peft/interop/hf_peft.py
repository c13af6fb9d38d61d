"""Converts adapters between Hugging Face PEFT folders (adapter_config.json + adapter_model.safetensors/.bin)
and ours, both ways: LoRA (plain, rsLoRA, PiSSA-initialised), DoRA, AdaLoRA, (IA)³, VeRA, LoHa, LoKr,
OFT and BOFT.

One table, `FORMATS`, says per `peft_type` which of our methods it is, how the configs' fields map, and
each tensor's kind; a tensor converts by its kind alone (HF stores factors output-first, we store them
input-first with a conv's taps leading, like our kernels; `taps` = a conv's (kh, kw), () for dense):
  kernel    (rows, cols, kh, kw)  <-> (kh, kw, cols, rows)  a conv's input side kept 4-D: lora_A, lokr_w2
  flat      (rows, cols·kh·kw)    <-> (kh, kw, cols, rows)  taps flattened: hada_w1_b, AdaLoRA's lora_A
  matrix    (rows, cols)          <-> (cols, rows)          hada_w1_a, lokr_w1, AdaLoRA's lora_B
  pointwise (rows, cols[, 1, 1])  <-> (cols, rows)          LoRA's lora_B (a 1x1 conv for a conv)
  vector    (n,) / IA3's (out, 1), (1, in), (1, n, 1, 1)  <-> (n,)
  magnitude (n,) / a conv's (1, n, 1, 1)                <-> (n,)     DoRA's lora_magnitude_vector
  column    (n, 1)                <-> (n,)                  AdaLoRA's lora_E
  outputs   (out, 1) / a conv's (1, out)  <-> (out,)          BOFT's boft_s
  same    unchanged                                            OFT's skew-symmetric blocks, BOFT's blocks
The taps come from our base kernels (`params`), needed where HF flattens them (LoHa, LoKr). Module
names map through the base checkpoints' layouts (`keymaps`) on import, or through any function.

Per-module LoRA/DoRA ranks: ours are the factors' shapes under one scale (the method's); HF's are `r` plus
`rank_pattern`, each module scaled by its own alpha (`lora_alpha` / `alpha_pattern`) over r (sqrt(r) with
rsLoRA). Export writes r = the most common rank and, for the other modules, their exact names in
rank_pattern with the alpha giving them our scale. Import matches pattern keys as peft's `get_pattern_key`
(a regex over the module name or a dotted suffix of it) and keeps the config's r/lora_alpha as the method's
scale; a module whose HF scale differs has the ratio folded into its B, so it computes what HF's does (to
float32 rounding; training on from there sees that B rescaled, as if its learning rate changed).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from medpeft_jax.models.weights.keymaps import LAYOUTS
from medpeft_jax.models.weights.readers import read_checkpoint
from medpeft_jax.models.zoo import get_spec
from medpeft_jax.peft.adalora import AdaLoRA
from medpeft_jax.peft.core import Flat, Method, flatten, get_method
from medpeft_jax.peft.lora import DoRA, LoRA
from medpeft_jax.peft.vera import A as VERA_A
from medpeft_jax.peft.vera import B as VERA_B

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_VERA_KEYS = {VERA_A: "base_model.vera_A", VERA_B: "base_model.vera_B"}
_LORA_INITS = {True: "default", False: "default", "gaussian": "default", "pissa": "pissa", "olora": "olora"}


def _lora(config: dict) -> dict:
  init = config.get("init_lora_weights", True)
  if init not in _LORA_INITS:
    raise ValueError(f"LoRA init_lora_weights={init!r} changes the base weights in a way not reproduced "
                     f"here; convertible: {sorted(map(str, _LORA_INITS))}.")
  if _LORA_INITS[init] != "default" and any(map(config.get, ("use_dora", "rank_pattern", "alpha_pattern"))):
    raise ValueError(f"LoRA init_lora_weights={init!r} converts without use_dora, rank_pattern and "
                     "alpha_pattern (its initial factors here have one rank and scale); train those with "
                     "init_lora_weights=true.")
  return dict(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
              rslora=bool(config.get("use_rslora", False)), init_weights=_LORA_INITS[init])


_OFT_SERIES = (0, 18)  # the peft version whose Cayley-Neumann series OFT implements


def _oft(config: dict) -> dict:
  if config.get("r") or config.get("coft") or config.get("block_share"):
    raise ValueError("OFT adapters convert with oft_block_size set (r=0), coft=false and block_share=false.")
  terms = int(config.get("num_cayley_neumann_terms", 5)) if config.get("use_cayley_neumann", True) else 0
  version = tuple(int(p) for p in config.get("peft_version", "0.0").partition("@")[0].split(".")[:2])
  if terms and version < _OFT_SERIES:
    raise ValueError(f"OFT adapter saved by peft {config.get('peft_version', '< 0.18')}: its Cayley-Neumann "
                     "series predates peft 0.18's, the one implemented here; retrain it with peft >= 0.18.")
  return dict(block_size=int(config["oft_block_size"]), cayley_neumann_terms=terms)


def _boft(config: dict) -> dict:
  """HF's BOFT sets one of boft_block_size and boft_block_num (the other 0); ours uses block_num when set."""
  blocks = int(config.get("boft_block_num", 0))
  size = dict(block_num=blocks) if blocks else dict(block_size=int(config["boft_block_size"]))
  return dict(size, n_butterfly_factor=int(config.get("boft_n_butterfly_factor", 1)))


def _to_lora(m) -> dict:
  if type(m) not in (LoRA, DoRA):
    raise ValueError(f"{m.name} adapters have no Hugging Face LoRA equivalent here.")
  return dict(r=m.rank, lora_alpha=_lora_alpha(m, m.rank), use_rslora=m.rslora, use_dora=type(m) is DoRA,
              init_lora_weights=m.init_weights if m.init_weights != "default" else True)


def _lora_alpha(m: LoRA, rank: int) -> float:
  """HF's lora_alpha giving a module of `rank` our scale as alpha / r (alpha / sqrt(r) with rsLoRA)."""
  if rank == m.rank:
    return m.rank if m.alpha is None else m.alpha
  return m.scale * (math.sqrt(rank) if m.rslora else rank)


def _rank_patterns(m: LoRA, ranks: dict[str, int]) -> dict:
  """HF's r (the most common rank) and lora_alpha, and rank_pattern/alpha_pattern for the other modules of
  `ranks` (HF module name -> rank), keyed by their anchored names: peft's `get_pattern_key` matches a key as a
  regex over a module's name or a dotted suffix of it, so a bare "conv1" would also match "layer1.0.conv1"."""
  counts = collections.Counter(ranks.values())
  r = max(counts, key=lambda k: (counts[k], k == m.rank, k))
  others = {f"^{re.escape(name)}": rank for name, rank in sorted(ranks.items()) if rank != r}
  patterns = dict(rank_pattern=others, alpha_pattern={k: _lora_alpha(m, k_r) for k, k_r in others.items()})
  return dict(r=r, lora_alpha=_lora_alpha(m, r), **(patterns if others else {}))


def _pattern(patterns: dict | None, module: str, default):
  """The value of HF module `module` in a rank_pattern/alpha_pattern, as peft's `get_pattern_key` finds it."""
  patterns = patterns or {}
  key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), module)
  return patterns.get(key, default)


def _lora_scales(config: dict, method: LoRA, adapters: dict, names: dict[str, str], source: str) -> dict:
  """`adapters` (ours) with each module's HF scale (rank from its tensors, alpha from alpha_pattern) made the
  method's: the ratio is folded into B, only where the two differ in float32."""
  out = {}
  for ours, adapter in adapters.items():
    module, rank = names[ours], adapter["a"].shape[-1]
    expected = int(_pattern(config.get("rank_pattern"), module, config["r"]))
    if rank != expected:
      raise ValueError(f"{source}: {module}'s factors have rank {rank}, but r/rank_pattern give it "
                       f"{expected}; peft would not load it either: fix rank_pattern.")
    alpha = float(_pattern(config.get("alpha_pattern"), module, config["lora_alpha"]))
    scale = alpha / (math.sqrt(rank) if method.rslora else rank)
    same = np.float32(scale) == np.float32(method.scale)
    out[ours] = adapter if same else {**adapter, "b": jnp.asarray(adapter["b"] * (scale / method.scale))}
  return out


@dataclasses.dataclass(frozen=True)
class Format:
  method: str  # our registered name
  leaves: dict[str, tuple[str, str]]  # HF tensor name (after the module's) -> (our leaf, kind)
  from_config: Callable[[dict], dict]  # adapter_config.json -> our fields (but targets)
  to_config: Callable[[Method], dict]  # our method -> adapter_config.json fields (but targets)
  needs_params: bool = False  # HF flattens conv taps into its tensors: import needs our kernels' shapes
  variant: tuple[str, str] | None = None  # (config flag, our method it selects): LoRA's use_dora -> DoRA


_ADALORA_FIELDS = {"init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "tinit": "tinit",
                   "tfinal": "tfinal", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2",
                   "orth_reg_weight": "orth_reg_weight", "total_step": "total_step"}


def _to_adalora(m) -> dict:
  if m.total_step <= 0:
    raise ValueError("Hugging Face's AdaLoraConfig requires total_step > 0: set the method's total_step "
                     "(the run's number of steps) before exporting.")
  return {theirs: getattr(m, ours) for ours, theirs in _ADALORA_FIELDS.items()}


def _adalora_full_rank(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF saves a budgeted AdaLoRA adapter with the masked triplets dropped (its `rank_pattern`); ours keeps
  init_r triplets with the masked ones at zero (a masked triplet computes nothing either way)."""
  out = dict(tensors)
  for key, kept in (config.get("rank_pattern") or {}).items():
    kept = np.asarray(kept, bool)
    for name in ("lora_A", "lora_E", "lora_B"):
      full = f"{_PREFIX}{key.removesuffix('.lora_E')}.{name}"
      t = np.asarray(tensors[full])
      if name == "lora_B":
        out[full] = np.zeros((t.shape[0], kept.size), t.dtype)
        out[full][:, kept] = t
      else:
        out[full] = np.zeros((kept.size, *t.shape[1:]), t.dtype)
        out[full][kept] = t
  return out


def _lycoris(config: dict) -> dict:
  return dict(rank=int(config["r"]), alpha=float(config["alpha"]))


FORMATS: dict[str, Format] = {
    "LORA": Format("lora", {"lora_A.weight": ("a", "kernel"), "lora_B.weight": ("b", "pointwise"),
                            "lora_magnitude_vector": ("m", "magnitude")},
                   _lora, _to_lora, variant=("use_dora", "dora")),
    "ADALORA": Format("adalora",
                      {"lora_A": ("a", "flat"), "lora_E": ("e", "column"), "lora_B": ("b", "matrix")},
                      lambda c: {ours: type(getattr(AdaLoRA, ours))(c[theirs])
                                 for ours, theirs in _ADALORA_FIELDS.items()}, _to_adalora,
                      needs_params=True),
    "IA3": Format("ia3", {"ia3_l": ("scale", "vector")}, lambda c: {}, lambda m: {}),
    "VERA": Format("vera", {"vera_lambda_d": ("lambda_d", "vector"), "vera_lambda_b": ("lambda_b", "vector")},
                   lambda c: dict(rank=int(c["r"]), d_initial=float(c.get("d_initial", 0.1)),
                                  seed=int(c.get("projection_prng_key", 0))),
                   lambda m: dict(r=m.rank, d_initial=m.d_initial, projection_prng_key=m.seed,
                                  save_projection=True)),
    "LOHA": Format("loha", {"hada_w1_a": ("w1_a", "matrix"), "hada_w1_b": ("w1_b", "flat"),
                            "hada_w2_a": ("w2_a", "matrix"), "hada_w2_b": ("w2_b", "flat")},
                   _lycoris, lambda m: dict(r=m.rank, alpha=m.alpha), needs_params=True),
    "LOKR": Format("lokr", {"lokr_w1": ("w1", "matrix"), "lokr_w1_a": ("w1_a", "matrix"),
                            "lokr_w1_b": ("w1_b", "matrix"), "lokr_w2": ("w2", "kernel"),
                            "lokr_w2_a": ("w2_a", "matrix"), "lokr_w2_b": ("w2_b", "flat")},
                   lambda c: dict(_lycoris(c), decompose_both=bool(c.get("decompose_both", False)),
                                  decompose_factor=int(c.get("decompose_factor", -1))),
                   lambda m: dict(r=m.rank, alpha=m.alpha, decompose_both=m.decompose_both,
                                  decompose_factor=m.decompose_factor), needs_params=True),
    "OFT": Format("oft", {"oft_R.weight": ("skew", "same")}, _oft,
                  lambda m: dict(r=0, oft_block_size=m.block_size,
                                 use_cayley_neumann=m.cayley_neumann_terms > 0,
                                 num_cayley_neumann_terms=m.cayley_neumann_terms or 5,
                                 peft_version=".".join(map(str, _OFT_SERIES)) + ".0"), needs_params=True),
    "BOFT": Format("boft", {"boft_R": ("r", "same"), "boft_s": ("s", "outputs")}, _boft,
                   lambda m: dict(boft_block_size=0 if m.block_num else m.block_size,
                                  boft_block_num=m.block_num, boft_n_butterfly_factor=m.n_butterfly_factor),
                   needs_params=True),
}
_PATCH_ROTATIONS = "HF's (B)OFT rotates a conv's flattened kh·kw·in patch, ours its channels: 1x1 convs only"


def to_ours(t: np.ndarray, kind: str, taps: tuple[int, ...]) -> np.ndarray:
  t = np.asarray(t, np.float32)
  if kind == "same":
    return t
  if kind in ("vector", "column", "magnitude", "outputs"):
    return t.reshape(-1)
  if kind in ("matrix", "pointwise"):
    return t.reshape(t.shape[0], -1).T
  return np.moveaxis(t.reshape(t.shape[0], -1, *taps), (0, 1), (-1, -2))


def to_theirs(t: np.ndarray, kind: str, taps: tuple[int, ...], ia3_input: bool | None = None) -> np.ndarray:
  """The inverse of `to_ours`; `ia3_input`: for an IA3 vector, whether it scales the layer's input."""
  t = np.asarray(t, np.float32)
  if kind == "same":
    return t
  if kind == "vector":
    if ia3_input is None:
      return t
    return t.reshape(1, -1, 1, 1) if taps else t.reshape((1, -1) if ia3_input else (-1, 1))
  if kind == "column":
    return t.reshape(-1, 1)
  if kind == "outputs":
    return t.reshape((1, -1) if taps else (-1, 1))
  if kind == "magnitude":
    return t.reshape(1, -1, *(1,) * len(taps)) if taps else t
  if kind == "matrix":
    return t.T
  if kind == "pointwise":
    return t.T[..., None, None] if taps else t.T
  t = np.moveaxis(t, (-1, -2), (0, 1))
  return t.reshape(t.shape[0], -1) if kind == "flat" else t


def _module_weight_to_ours(w: np.ndarray) -> np.ndarray:
  """A torch Linear (out, in) or Conv2d (out, in, kh, kw) weight as our kernel (in, out) / (kh, kw, in, out)."""
  w = np.asarray(w)
  return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)


def _module_weight_to_theirs(k: np.ndarray) -> np.ndarray:
  return k.T if k.ndim == 2 else k.transpose(3, 2, 0, 1)


def _hf_matches(spec, module: str) -> bool:
  """HF's target matching: a str is a regex over the full name, a list holds names or dotted suffixes."""
  if spec is None:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, module) is not None
  return any(module == name or module.endswith(f".{name}") for name in spec)


def _alternatives(paths) -> str:
  return "|".join(re.escape(p) for p in sorted(paths))


def _format(kind, source: str) -> Format:
  if kind not in FORMATS:
    raise ValueError(f"{source}: peft_type {kind!r} is not convertible; supported: {', '.join(FORMATS)}.")
  return FORMATS[kind]


def from_hf_peft(config: dict, tensors: dict[str, np.ndarray], our_module: Callable[[str], str | None],
                 params=None, source: str = "the adapter") -> tuple[Method, dict, Flat]:
  """`(method, trainable, derived)` from an HF adapter's config and tensors.

  `our_module` maps an HF module name ("vit.encoder.layer.0.attention.attention.query") to our path
  (None: unknown); `params` (our base parameters) gives conv taps. `derived` is {} except for VeRA,
  whose shared projections torch drew: pass it as `derived=` to the method's `apply` and `merge`.
  """
  kind = config.get("peft_type")
  fmt = _format(kind, source)
  if config.get("lora_bias"):
    raise ValueError(f"{source}: lora_bias=true (a trained bias on LoRA's B) is not supported; train without it.")
  if kind != "LORA" and (config.get("alpha_pattern") or (config.get("rank_pattern") and kind != "ADALORA")):
    raise ValueError(f"{source}: per-module ranks/alphas (rank_pattern/alpha_pattern) convert for LoRA and "
                     f"DoRA only, not {kind}; train it with one r and alpha.")
  if kind == "ADALORA":
    tensors = _adalora_full_rank(config, tensors)
  if fmt.needs_params and params is None:
    raise ValueError(f"{source}: {kind} flattens conv taps into its tensors; pass our base `params`.")
  flat = flatten(params) if params is not None else {}
  bare = {n.removesuffix(".weight"): n for n in fmt.leaves}  # saved names may carry an adapter name
  # An optional trailing adapter name ("lora_A.default"), never a tensor kind (".bias" must reach the refusal).
  leaf = re.compile(rf"(?:{re.escape(_PREFIX)})?(.+)\.({'|'.join(map(re.escape, bare))})(?:\.(?!(?:bias|weight)$)[^.]+)?")
  found: dict[str, dict[str, np.ndarray]] = {}
  saved_modules = {f"{_PREFIX}{name}.{leaf}": (name, leaf) for name in config.get("modules_to_save") or ()
                   for leaf in ("weight", "bias")}
  whole: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    m = leaf.fullmatch(key.removesuffix(".weight"))
    if key in saved_modules:
      name, part = saved_modules[key]
      ours = our_module(name)
      if ours is None:
        raise ValueError(f"{source}: modules_to_save {name!r} maps to no parameter of our model.")
      whole[f"{ours}/{'kernel' if part == 'weight' else 'bias'}"] = jnp.asarray(_module_weight_to_ours(value)
                                                                               if part == "weight" else value)
    elif m:
      found.setdefault(m[1], {})[bare[m[2]]] = value
    elif re.search(r"\.(hada_t[12]|lokr_t2)$", key):
      raise ValueError(f"{source}: {key} is an effective-conv (CP) factor (use_effective_conv2d=true), "
                       "which is not supported; train with use_effective_conv2d=false.")
    elif not key.startswith(("base_model.vera_", "base_model.model.vera_")):
      raise ValueError(f"{source}: tensor {key!r} is neither a {kind} factor nor a module in modules_to_save; "
                       "refusing to drop it (it would silently leave that part of the model untrained).")
  if not found:
    raise ValueError(f"{source} holds no {kind} tensors ({', '.join(fmt.leaves)}).")
  adapters, feedforward, names = {}, [], {}
  for module, leaves in found.items():
    ours = our_module(module)
    if ours is None:
      raise ValueError(f"{source}: module {module!r} maps to no parameter of our model.")
    names[ours], kernel = module, flat.get(f"{ours}/kernel")
    four_d = [t.shape[2:] for n, t in leaves.items() if np.ndim(t) == 4 and fmt.leaves[n][1] == "kernel"]
    taps = tuple(kernel.shape[:-2]) if kernel is not None else (tuple(four_d[0]) if four_d else ())
    if kind in ("OFT", "BOFT") and set(taps) - {1}:
      raise ValueError(f"{source}: {module} is a {taps} conv; {_PATCH_ROTATIONS}.")
    adapters[ours] = {fmt.leaves[n][0]: jnp.asarray(to_ours(t, fmt.leaves[n][1], taps))
                      for n, t in leaves.items()}
    if _hf_matches(config.get("feedforward_modules"), module):
      feedforward.append(ours)
  wholes = sorted({p.rsplit("/", 1)[0] for p in whole})
  hyper = {**fmt.from_config(config), "targets": _alternatives(adapters),
           "head": "|".join(f"{re.escape(m)}/.*" for m in wholes) or None}
  if kind == "IA3":
    hyper["feedforward"] = _alternatives(feedforward) if feedforward else None
  derived = {}
  if kind == "VERA":
    if _VERA_KEYS[VERA_A] not in tensors:
      raise ValueError(f"{source}: VeRA's shared projections were not saved (save_projection=false); torch's "
                       "generator cannot be replayed here. Save the adapter with save_projection=true.")
    derived = {ours: jnp.asarray(to_ours(tensors[key], "matrix", ())) for ours, key in _VERA_KEYS.items()}
  factors = {int(a["r"].shape[0]) for a in adapters.values()} if kind == "BOFT" else set()
  if factors and factors != {hyper["n_butterfly_factor"]}:
    raise ValueError(f"{source}: boft_n_butterfly_factor={hyper['n_butterfly_factor']} in its config, but its "
                     f"boft_R tensors hold {sorted(factors)} factor(s) (peft without its CUDA extension silently "
                     f"trains one factor); set boft_n_butterfly_factor to {sorted(factors)[0]} in {CONFIG} to "
                     "import what it computed.")
  method = get_method(fmt.variant[1] if fmt.variant and config.get(fmt.variant[0]) else fmt.method, **hyper)
  if kind == "LORA":
    if any(("m" in a) != isinstance(method, DoRA) for a in adapters.values()):
      raise ValueError(f"{source}: use_dora={bool(config.get('use_dora'))} disagrees with its tensors "
                       "(lora_magnitude_vector on some modules only, or with use_dora=false); re-save it "
                       "with peft.")
    adapters = _lora_scales(config, method, adapters, names, source)
  return method, {"params": whole, "adapters": adapters}, derived


def to_hf_peft(method: Method, trainable: dict, params, hf_module: Callable[[str], str],
               derived: Flat | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """`(adapter_config, tensors)` in HF PEFT's layout, for our base `params` (`hf_module`: our module path ->
  HF's name). VeRA saves its projections (`derived`, default: the method's own from its seed)."""
  kind = next((k for k, f in FORMATS.items() if method.name in (f.method, f.variant and f.variant[1])), None)
  fmt = _format(kind, f"A {method.name} adapter")
  flat, ours_of = flatten(params), {ours: n for n, (ours, _) in fmt.leaves.items()}
  tensors, modules, feedforward, saved = {}, [], [], []
  # Whole modules trained in place (the new head) travel as HF's modules_to_save; anything else cannot.
  for module in sorted({p.rsplit("/", 1)[0] for p in trainable["params"]}):
    leaves = {p for p in flat if p.rsplit("/", 1)[0] == module}
    if leaves != {p for p in trainable["params"] if p.rsplit("/", 1)[0] == module} or f"{module}/kernel" not in leaves:
      raise ValueError(f"The adapter trains part of module {module!r} in place ({sorted(trainable['params'])[:3]}"
                       "...), which an HF PEFT adapter cannot hold (only whole modules, as modules_to_save).")
    name = hf_module(module)
    saved.append(name)
    tensors[f"{_PREFIX}{name}.weight"] = _module_weight_to_theirs(np.asarray(trainable["params"][f"{module}/kernel"]))
    if f"{module}/bias" in trainable["params"]:
      tensors[f"{_PREFIX}{name}.bias"] = np.asarray(trainable["params"][f"{module}/bias"])
  for path, adapter in sorted(trainable["adapters"].items()):
    module, kernel = hf_module(path), flat[f"{path}/kernel"]
    taps, ia3_input = tuple(kernel.shape[:-2]), None
    if kind == "IA3":
      ia3_input = method.is_feedforward(path)
      feedforward += [module] if ia3_input else []
    if kind == "VERA" and taps:
      raise ValueError(f"{path} is a convolution; HF PEFT has VeRA on linear layers only.")
    if kind in ("OFT", "BOFT") and set(taps) - {1}:
      raise ValueError(f"{path} is a {taps} conv; {_PATCH_ROTATIONS}.")
    if kind == "BOFT" and not method.block_num and adapter["r"].shape[-1] != method.block_size:
      raise ValueError(f"{path}: BOFT fitted its blocks to {adapter['r'].shape[-1]} features, its width "
                       f"taking no block_size={method.block_size}; HF's BOFT refuses such a layer: exclude it.")
    modules.append(module)
    for leaf, value in adapter.items():
      t = to_theirs(value, fmt.leaves[ours_of[leaf]][1], taps, ia3_input)
      tensors[f"{_PREFIX}{module}.{ours_of[leaf]}"] = t
  config = {"peft_type": kind, "target_modules": modules, **fmt.to_config(method),
            **({"modules_to_save": saved} if saved else {})}
  if kind == "IA3":
    config["feedforward_modules"] = feedforward
  if kind == "LORA":  # per-module ranks: the factors' shapes
    ranks = {hf_module(p): a["a"].shape[-1] for p, a in trainable["adapters"].items()}
    config.update(_rank_patterns(method, ranks))
  if kind == "VERA":
    derived = method.derived_state(params) if derived is None else derived
    tensors.update({key: to_theirs(derived[ours], "matrix", ()) for ours, key in _VERA_KEYS.items()})
  return config, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save_hf_peft(folder: str | os.PathLike, method: Method, trainable: dict, params,
                 hf_module: Callable[[str], str], derived: Flat | None = None) -> pathlib.Path:
  """Writes an HF PEFT adapter folder that `peft.PeftModel.from_pretrained` loads (see `to_hf_peft`)."""
  config, tensors = to_hf_peft(method, trainable, params, hf_module, derived)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(folder / WEIGHTS))
  (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return folder


def _our_module(family: str, module: str) -> str | None:
  """Our module path for a source module, through the first layout that knows its weight name."""
  for layout in LAYOUTS[family]:
    for shape in ((1, 1), (1, 1, 1, 1)):  # a linear's or a conv's weight (the transform checks the rank)
      try:
        out, unexpected, _ = layout.convert({f"{module}.weight": np.zeros(shape, np.float32)})
      except ValueError:
        continue
      if not unexpected and len(out) == 1:
        (path,) = out
        return path.removeprefix("params/").removesuffix("/kernel")
  return None


def hf_module_names(checkpoint: str | os.PathLike, model_name: str) -> Callable[[str], str]:
  """Our module path -> its name in a torch model, read from that model's checkpoint or `state_dict()` file.

  An HF PEFT adapter names modules as the torch model in memory does; a `torch.save(model.state_dict())`
  file holds exactly those names (a hub folder may hold older ones: transformers 5 renamed ViT's).
  """
  family = get_spec(model_name).family
  names: dict[str, str] = {}
  for key in read_checkpoint(checkpoint).tensors:
    module = key.removesuffix(".weight")
    ours = _our_module(family, module) if key.endswith(".weight") else None
    if ours is not None:
      names.setdefault(ours, module)

  def hf_module(path: str) -> str:
    if path not in names:
      raise ValueError(f"Our module {path!r} has no weight in {checkpoint} (it names {len(names)} of our modules, "
                       f"e.g. {sorted(names)[:3]}); give the checkpoint of the torch model the adapter is for.")
    return names[path]

  return hf_module


def load_hf_peft(path: str | os.PathLike, model_name: str, params=None) -> tuple[Method, dict, Flat]:
  """`(method, trainable, derived)` for one of our models from an HF PEFT folder (see `from_hf_peft`);
  the base model loads separately."""
  folder = pathlib.Path(path)
  config = json.loads((folder / CONFIG).read_text())
  family = get_spec(model_name).family
  return from_hf_peft(config, read_checkpoint(folder).tensors, lambda m: _our_module(family, m), params,
                      source=str(folder))


def load_hf_peft_lora(path: str | os.PathLike, model_name: str) -> tuple[LoRA, dict]:
  """`(LoRA method, trainable)` from an HF PEFT LoRA folder."""
  method, trainable, _ = load_hf_peft(path, model_name)
  if not isinstance(method, LoRA):
    raise ValueError(f"{path} is not a LoRA adapter (it is {method.name}); use load_hf_peft.")
  return method, trainable
