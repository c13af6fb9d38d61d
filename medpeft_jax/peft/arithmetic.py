"""Adapter arithmetic: one adapter from a weighted combination of LoRA-family adapters, with the formulas of
Hugging Face PEFT's `LoraModel.add_weighted_adapter` (peft 0.21) and without its known bugs.

  method, trainable = combine([(m_a, t_a), (m_b, t_b)], [0.7, 0.3], "ties", density=0.5)
  adapter = combine_adapters([load_adapter(a), load_adapter(b)], [1, 1], "cat", params=base)
  adapter.save(folder)   # a normal adapter folder (load_adapter, launch.evaluate, launch.export)

Per adapted module, with s_i adapter i's scale (alpha/r, or alpha/sqrt(r) with rsLoRA) and w_i its weight:
  linear, ties, dare_linear, dare_ties, magnitude_prune (factor-wise, peft's cheap approximation):
      A = merge(sign(w_i s_i)·sqrt|w_i s_i|·A_i), B = merge(sqrt|w_i s_i|·B_i)  (so AB != sum w_i s_i A_i B_i)
  cat: A = [w_1 s_1 A_1, ..., w_n s_n A_n], B = [B_1; ...; B_n]: exactly sum w_i s_i A_i B_i, rank sum r_i
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd:
      the best rank-`svd_rank` factorisation of merge(s_i A_i B_i) (default rank: the largest source rank,
      at most the module's rank bound: a module of lower bound keeps a lower rank, which is exact there)
`merge` is task arithmetic (sum w_i T_i), TIES (magnitude pruning to `density`, sign election, disjoint mean),
DARE (Bernoulli(density) masks, rescaled by 1/density, then a sum or TIES' election) or magnitude pruning, as
peft's `merge_utils`. Modules only some sources adapt combine those sources. The combined adapter has scale 1
(alpha = rank, no rsLoRA): the sources' scales live in its factors. peft copies `use_rslora` from the first
source onto that adapter, so its combinations of rsLoRA adapters come out sqrt(r) times too large (peft #3761,
#3449); here they are exact. Ranks are per module (the factors' shapes), so ranks that differ across modules
survive save -> combine -> load (peft #3737: merged adapters with a `rank_pattern` do not reload).

DoRA (W' = m·(W + sAB)/||W + sAB||, norms per output feature; peft's add_weighted_adapter silently keeps the
base's magnitudes, #3761) combines as task arithmetic on the adapters' whole weight updates: the combined
weight is W + sum w_i (W'_i - W). With r_i = m_i/||W + s_i A_i B_i|| (1 for a LoRA source) and
c = 1 + sum w_i (r_i - 1), that is W·diag(c) + sum w_i s_i A_i B_i diag(r_i): a DoRA adapter with
A = [w_i s_i A_i], B = [B_i diag(r_i/c)] and m = sign(c)·||W + sum w_i (W'_i - W)|| (exact with `cat`; `svd`
recompresses the direction's factors, m stays exact; where the weights outvote the base, c < 0 and m < 0).
The factor-wise kinds and TIES/DARE have no rule for magnitudes and are refused. `compose` instead does what
peft does with several DoRA adapters active on one module (#3608): each rescales the weight the ones before it
built, W_k = (W_{k-1} + s_k A_k B_k)·r_k — order-dependent, and also one exact DoRA adapter. PiSSA-initialised
sources (update s(AB - A0B0)) take the update-wise kinds. DoRA and PiSSA/OLoRA sources need the base `params`.

DARE is random: masks come from `rng` (a seed or numpy Generator), or are given per tensor as
`masks[(module, leaf, i)]` (leaf "a"/"b" for dare_linear/dare_ties, "delta" for their _svd kinds; in our
layout) — e.g. peft's own masks, since torch's generator cannot be replayed here. The arithmetic runs once,
offline, in float32 numpy on the host (like peft's eager torch): no program is compiled for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from medpeft_jax.peft.adapters import Adapter
from medpeft_jax.peft.core import Flat, Method, Params, flatten, get_method
from medpeft_jax.peft.lora import DoRA, LoRA

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
UPDATEWISE = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTORWISE + UPDATEWISE
_DORA_KINDS = ("cat", "svd")


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How a list of tensors merges: peft's `merge_utils` functions."""

  kind: str  # linear, ties, dare_linear, dare_ties, magnitude_prune
  density: float | None
  sign_method: str
  rng: np.random.Generator | None
  masks: Mapping[tuple[str, str, int], np.ndarray]

  def prune(self, t: np.ndarray, key: tuple[str, str, int]) -> np.ndarray:
    if self.density >= 1:
      return t
    if self.kind.startswith("dare"):
      mask = self.masks.get(key)
      if mask is None:
        if self.rng is None:
          raise ValueError(f"{self.kind} draws random masks: pass rng= (or masks=); none for {key}.")
        mask = self.rng.random(t.shape) < self.density
      elif np.shape(mask) != t.shape:
        raise ValueError(f"masks[{key}] has shape {np.shape(mask)}, expected {t.shape} (our layout).")
      return t * np.asarray(mask, t.dtype) / np.float32(self.density)
    k = int(self.density * t.size)  # peft's magnitude pruning: keep the k largest |values|
    keep = np.zeros(t.size, t.dtype)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = 1
    return t * keep.reshape(t.shape)

  def merge(self, tensors: list[np.ndarray], weights: list[float], keys: list[tuple[str, str, int]]
            ) -> np.ndarray:
    if self.kind != "linear":
      tensors = [self.prune(t, key) for t, key in zip(tensors, keys)]
    stack = np.stack(tensors)
    weighted = stack * np.asarray(weights, np.float32).reshape((-1,) + (1,) * (stack.ndim - 1))
    if self.kind not in ("ties", "dare_ties"):
      return weighted.sum(0)
    sign = np.sign(stack)
    votes = stack.sum(0) if self.sign_method == "total" else sign.sum(0)
    agree = sign == np.where(votes >= 0, 1, -1).astype(np.float32)
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1).astype(np.float32)


def _check_sources(sources) -> list[LoRA]:
  methods = [m for m, _ in sources]
  for i, m in enumerate(methods):
    if not isinstance(m, LoRA):
      raise TypeError(f"Adapter {i} is a {m.name} adapter; arithmetic combines LoRA-family adapters "
                      "(lora, dora).")
  return methods


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _delta(a, b) -> np.ndarray:
  """A·B in the kernel's own layout (lora.py's `_delta`, on the host)."""
  return np.einsum("...ir,ro->...io", a, b)


def _column_norm(w) -> np.ndarray:
  """L2 norm of each output feature's weights, as DoRA's (lora.py)."""
  return np.sqrt(np.sum(np.square(w), axis=tuple(range(w.ndim - 1))))


def _updates(method: LoRA, module: str, adapter, flat: Flat) -> tuple[np.ndarray, np.ndarray]:
  """(P, Q) with P·Q = the source's whole update of the module's kernel, its scale folded into P."""
  scale = np.float32(method.scale)
  if method.init_weights == "default":
    return scale * _np(adapter["a"]), _np(adapter["b"])
  a0, b0 = _np(flat[f"{module}/init_a0"]), _np(flat[f"{module}/init_b0"])
  return scale * np.concatenate([_np(adapter["a"]), -a0], -1), np.concatenate([_np(adapter["b"]), b0], 0)


def _rescale(method: LoRA, adapter, w: np.ndarray) -> np.ndarray:
  """DoRA's per-output-feature factor r = m/||W + sAB||; 1 for a LoRA source."""
  if not isinstance(method, DoRA):
    return np.ones(w.shape[-1], np.float32)
  update = np.float32(method.scale) * _delta(_np(adapter["a"]), _np(adapter["b"]))
  return _np(adapter["m"]) / _column_norm(w + update)


def _dora_weight(pq: dict, r: dict, weights: list[float], sequential: bool):
  """(c, terms): the combined kernel is W·diag(c) + the sum of P·Q over `terms`.

  Additive: W + sum w_i (W'_i - W), W'_i = (W + P_i Q_i)·r_i. Sequential (peft's forward with several active
  adapters, and its merge since #3609): W_k = (W_{k-1} + P_k Q_k)·r_k, each r_k from the base W alone.
  """
  if not sequential:
    c = 1 + sum(weights[i] * (r[i] - 1) for i in pq)
    return c, [(weights[i] * p, q * r[i]) for i, (p, q) in pq.items()]
  c, terms = 1.0, []
  for i, (p, q) in pq.items():
    c, terms = c * r[i], [(tp, tq * r[i]) for tp, tq in terms] + [(p, q * r[i])]
  return c, terms


def _svd(delta, rank: int, clamp: float | None):
  """peft's recompression: U·S and Vh of the truncated SVD (here B and A), optionally clamped (a quantile)."""
  u, s, vt = np.linalg.svd(delta.reshape(-1, delta.shape[-1]), full_matrices=False)
  k = min(rank, s.shape[0])
  a, b = u[:, :k], s[:k, None] * vt[:k]
  if clamp is not None:
    hi = np.quantile(np.concatenate([b.reshape(-1), a.reshape(-1)]), clamp).astype(np.float32)
    a, b = np.clip(a, -hi, hi), np.clip(b, -hi, hi)
  return a.reshape(*delta.shape[:-1], k), b


def _keeper(trained: list, params_from: int | None, what: str) -> int | None:
  """Which source's `what` the combination keeps: `params_from`, else the one (or equal ones) having any."""
  if params_from is not None:
    if not 0 <= params_from < len(trained):
      raise ValueError(f"params_from={params_from}: expected an adapter index below {len(trained)}.")
    return params_from
  holders = [i for i, t in enumerate(trained) if t]
  if len(holders) > 1:
    ref = flatten(trained[holders[0]])
    for i in holders[1:]:
      other = flatten(trained[i])
      if set(other) != set(ref) or any(not np.array_equal(other[k], ref[k]) for k in ref):
        raise ValueError(f"Adapters {holders[0]} and {i} both carry {what} (e.g. their heads), with "
                         "different values, which no weighted sum combines (peft refuses the same for "
                         "modules_to_save): choose whose to keep with params_from=<index> "
                         "(launch.merge_adapters --params_from).")
  return holders[0] if holders else None


def combine(sources: Sequence[tuple[Method, Params]], weights: Sequence[float], combination: str = "svd", *,
            params: Params | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
            density: float | None = None, majority_sign_method: str = "total",
            rng: int | np.random.Generator | None = None,
            masks: Mapping[tuple[str, str, int], np.ndarray] | None = None, params_from: int | None = None,
            _sequential: bool = False) -> tuple[LoRA, Params]:
  """`(method, trainable)` of the combined adapter (see the module docstring for each `combination`).

  `params`: the base parameters, needed for DoRA and PiSSA sources. Trained copies of base leaves (the head)
  come from the one source that has them, or `params_from`. (`_sequential`: `compose`'s DoRA rule.)
  """
  methods = _check_sources(sources)
  if len(weights) != len(sources):
    raise ValueError(f"{len(sources)} adapters but {len(weights)} weights; give one weight per adapter.")
  if combination not in COMBINATIONS:
    raise ValueError(f"combination {combination!r} is not one of {', '.join(COMBINATIONS)}.")
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"majority_sign_method {majority_sign_method!r}: expected 'total' or 'frequency'.")
  dora = any(isinstance(m, DoRA) for m in methods)
  pissa = any(m.init_weights != "default" for m in methods)  # PiSSA or OLoRA: updates s(AB - A0B0)
  if len(sources) == 1 and not _sequential:  # peft: one adapter combines linearly (`cat`: the same, for DoRA)
    combination = "cat" if dora or pissa else "linear"
  if dora and combination not in _DORA_KINDS:
    raise ValueError(f"combination {combination!r} is undefined for DoRA adapters: their magnitude vectors "
                     "have no factor-wise, TIES or DARE rule (peft silently keeps the base's magnitudes, "
                     "huggingface/peft#3761). Use 'cat' (exact) or 'svd'.")
  if pissa and combination in FACTORWISE:
    raise ValueError(f"combination {combination!r} mixes A and B factors, but a PiSSA adapter's update is "
                     "s(AB - A0B0); use an update-wise kind: " + ", ".join(UPDATEWISE) + ".")
  kind = {"cat": "linear", "svd": "linear"}.get(combination, combination.removesuffix("_svd"))
  if kind != "linear" and (density is None or not 0 <= density <= 1):
    raise ValueError(f"combination {combination!r} needs density in [0, 1] (the fraction kept; "
                     f"launch.merge_adapters --density), got {density}.")
  if (dora or pissa) and params is None:
    raise ValueError("Combining DoRA or PiSSA adapters needs the base parameters: pass params=.")
  flat = flatten(params) if params is not None else {}
  if pissa:
    for m in {m for m in methods if m.init_weights != "default"}:
      flat.update(m.derived_state(params))
  rng = None if rng is None else np.random.default_rng(rng)
  rule = _Rule(kind, density, majority_sign_method, rng, masks or {})
  scaled = [float(w) * m.scale for w, m in zip(weights, methods)]
  svd_rank = svd_rank or max(ad["a"].shape[-1] for _, t in sources for ad in t["adapters"].values())
  modules = sorted({p for _, t in sources for p in t["adapters"]})
  out: dict[str, dict[str, np.ndarray]] = {}
  for module in modules:
    present = [i for i, (_, t) in enumerate(sources) if module in t["adapters"]]
    ads = {i: sources[i][1]["adapters"][module] for i in present}
    if combination in FACTORWISE:
      ranks = {i: ads[i]["a"].shape[-1] for i in present}
      if len(set(ranks.values())) > 1:
        raise ValueError(f"{combination} needs equal ranks, but at {module} the adapters have ranks {ranks}; "
                         "use 'cat' or an _svd combination.")
      wb = [math.sqrt(abs(scaled[i])) for i in present]  # peft: the sign goes on A only
      wa = [w if scaled[i] >= 0 else -w for i, w in zip(present, wb)]
      out[module] = {leaf: rule.merge([_np(ads[i][leaf]) for i in present], ws,
                                      [(module, leaf, i) for i in present])
                     for leaf, ws in (("a", wa), ("b", wb))}
      continue
    pq = {i: _updates(methods[i], module, ads[i], flat) for i in present}
    if dora:
      w = _np(flat[f"{module}/kernel"])
      r = {i: _rescale(methods[i], ads[i], w) for i in present}
      c, terms = _dora_weight(pq, r, [float(x) for x in weights], _sequential)
      if not np.all(np.abs(c) > 1e-6):
        raise ValueError(f"At {module}, output feature(s) {np.flatnonzero(np.abs(c) <= 1e-6)[:5].tolist()} "
                         "of the combined weight lose their base component (1 + sum w_i (r_i - 1) = 0), so "
                         "no DoRA direction W + AB expresses them; change the weights slightly.")
      target = w * c + sum(_delta(p, q) for p, q in terms)
      terms = [(p, q / c) for p, q in terms]
      if combination == "cat":
        a, b = np.concatenate([p for p, _ in terms], -1), np.concatenate([q for _, q in terms], 0)
      else:
        a, b = _svd(sum(_delta(p, q) for p, q in terms), svd_rank, svd_clamp)
      out[module] = {"a": a, "b": b, "m": np.sign(c) * _column_norm(target)}
    elif combination == "cat":
      out[module] = {"a": np.concatenate([np.float32(weights[i]) * pq[i][0] for i in present], -1),
                     "b": np.concatenate([pq[i][1] for i in present], 0)}
    else:
      delta = rule.merge([_delta(*pq[i]) for i in present], [float(weights[i]) for i in present],
                         [(module, "delta", i) for i in present])
      out[module] = dict(zip("ab", _svd(delta, svd_rank, svd_clamp)))
  rank = max(ad["a"].shape[-1] for ad in out.values())
  keep = _keeper([t["params"] for _, t in sources], params_from, "trained base leaves")
  head = methods[keep if keep is not None else 0].head
  method = get_method("dora" if dora else "lora", targets="|".join(re.escape(m) for m in modules), rank=rank,
                      alpha=float(rank), head=head)
  adapters = {m: {leaf: jnp.asarray(v, jnp.float32) for leaf, v in ad.items()} for m, ad in out.items()}
  kept = dict(sources[keep][1]["params"]) if keep is not None else {}
  return method, {"params": kept, "adapters": adapters}


def compose(sources: Sequence[tuple[Method, Params]], *, params: Params | None = None,
            params_from: int | None = None) -> tuple[LoRA, Params]:
  """One adapter that does what applying `sources` together does in peft (several active adapters on a module,
  merged or not; peft #3608): LoRA updates add up, and each DoRA adapter rescales, with its magnitude over the
  base's norm, the weight the adapters before it built. Exact (rank: the sum of the sources'); the order
  matters for DoRA."""
  return combine(sources, [1.0] * len(sources), "cat", params=params, params_from=params_from,
                 _sequential=True)


def combine_adapters(adapters: Sequence[Adapter], weights: Sequence[float], combination: str = "svd", *,
                     names: Sequence[str] | None = None, **options) -> Adapter:
  """`combine` on loaded adapters, as an `Adapter` (`.save(folder)` writes it): BatchNorm statistics, class
  names, preprocessing and run config come from the source whose trained leaves it keeps (else the first)."""
  if not adapters:
    raise ValueError("combine_adapters: no adapters given.")
  bases = {a.base_model for a in adapters}
  if len(bases) > 1:
    raise ValueError(f"The adapters were trained on different base models {sorted(map(str, bases))}; "
                     "combine adapters of one base model.")
  method, trainable = combine([(a.method, a.trainable) for a in adapters], weights, combination, **options)
  keep = _keeper([a.trainable["params"] for a in adapters], options.get("params_from"), "trained base leaves")
  source = adapters[keep if keep is not None else 0]
  stats_from = _keeper([a.batch_stats or {} for a in adapters], keep, "BatchNorm statistics")
  names = list(names or (str(a) for a in adapters))
  svd = combination.endswith("svd")
  used = {"density": combination not in ("linear", "cat", "svd"), "svd_rank": svd, "svd_clamp": svd,
          "majority_sign_method": "ties" in combination, "params_from": True}
  recipe = {"combination": combination, "weights": [float(w) for w in weights], "adapters": names,
            **{k: v for k, v in options.items() if used.get(k) and v is not None}}
  config = {**source.config, "method": method.name, "hyperparameters": dataclasses.asdict(method),
            "merged_from": recipe}
  stats = adapters[stats_from].batch_stats if stats_from is not None else None
  return Adapter(method, trainable, stats, config)
