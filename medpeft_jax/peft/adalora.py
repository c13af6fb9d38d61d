"""AdaLoRA (Zhang et al. 2023; Hugging Face PEFT `AdaLoraConfig`): SVD-form adapters whose rank budget
is reallocated across layers during training, on dense and convolution kernels.

  y = op(x) + s·((x·P)·Λ)·Q,   P (.., in, r) (HF lora_A), Λ (r,) (lora_E), Q (r, out) (lora_B)
with s = alpha / (init_r + 1e-5) as HF (its `ranknum` stays init_r). A conv runs P with its own stride
and padding (HF's `SVDConv2d` reshapes B·(A·E) into the kernel: the same function); grouped convs are
refused. P, Q ~ N(0, 0.02) and Λ = 0, so training starts at the base model; `merge` folds W + s·P·diag(Λ)·Q.

Training (HF's `RankAllocator`, inside the jitted step through `after_update`; `step` is the 1-based step
just taken, HF's `global_step`):
  - the loss gains `orth_reg_weight` × the mean over P and Q of ||PᵀP - I||_F, ||QQᵀ - I||_F (`loss_term`);
  - importance of every entry: I = |θ·∇θ| after the update, smoothed Ī ← β1·Ī + (1-β1)·I and uncertainty
    Ū ← β2·Ū + (1-β2)·|I - Ī|, updated while step < total_step - tfinal;
  - a triplet's score is Ī·Ū of its Λ entry plus the mean Ī·Ū of its P column and of its Q row;
  - the budget falls from init_r to target_r per module (summed over modules) as a cubic between tinit
    and total_step - tfinal; every `delta_t` steps (and at total_step - tfinal) the Λ entries whose score
    is at or below the (init - budget)-th smallest are zeroed; after that the final pattern stays applied.
Ranks are masks (Λ entries at zero), so every shape stays static. The budget of each step is HF's
float64 formula tabulated once, so the masks equal HF's on the same scores.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from medpeft_jax.peft.core import AdapterCall, Flat, Method, Params, register
from medpeft_jax.peft.lora import _delta, _down, _kernel, kernel_modules

_LEAVES = ("a", "b", "e")


@register("adalora")
@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
  ROLE_DEFAULTS: ClassVar[dict[str, str]] = {"targets": "{query}|{value}|{conv}"}
  targets: str = r".*attn/(query|value)"
  init_r: int = 12
  target_r: int = 8
  alpha: float = 8.0  # HF lora_alpha
  tinit: int = 0
  tfinal: int = 0
  delta_t: int = 1  # HF deltaT
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: int = 0  # steps of the budget schedule; 0: the run's own length (the trainers call for_run)

  def __post_init__(self):
    if not 0 < self.target_r <= self.init_r:
      raise ValueError(f"adalora: target_r={self.target_r} must be in 1..init_r={self.init_r}.")
    if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
      raise ValueError(f"adalora: beta1={self.beta1} and beta2={self.beta2} must lie in (0, 1).")
    if self.total_step and self.tinit >= self.total_step - self.tfinal:
      raise ValueError(f"adalora: tinit={self.tinit} >= total_step - tfinal = "
                       f"{self.total_step - self.tfinal} leaves no budgeting phase; lower tinit/tfinal or "
                       "raise total_step.")

  @property
  def scale(self) -> float:
    return self.alpha / (self.init_r + 1e-5)

  def adapter_modules(self, flat: Flat) -> list[str]:
    return kernel_modules(flat, self.targets, f"{self.name} targets")

  def for_run(self, total_steps: int) -> AdaLoRA:
    """The budget schedule spans the run unless `total_step` was set."""
    return self if self.total_step else dataclasses.replace(self, total_step=total_steps)

  def init_adapter(self, rng, module: str, flat: Flat):
    w = _kernel(flat, module)
    ka, kb = jax.random.split(rng)
    r = self.init_r
    return {"a": 0.02 * jax.random.normal(ka, (*w.shape[:-1], r), jnp.float32),
            "e": jnp.zeros((r,), jnp.float32),
            "b": 0.02 * jax.random.normal(kb, (r, w.shape[-1]), jnp.float32)}

  def call_adapter(self, adapter, call: AdapterCall):
    y = call.original()
    x = _down(call.module, adapter["a"], call.inputs) * adapter["e"].astype(y.dtype)
    return y + (self.scale * (x @ adapter["b"].astype(x.dtype))).astype(y.dtype)

  def fold_adapter(self, flat, path, adapter):
    w = flat[f"{path}/kernel"]
    delta = _delta(adapter["a"] * adapter["e"], adapter["b"])
    return {**flat, f"{path}/kernel": w + (self.scale * delta).astype(w.dtype)}

  # --- training: the orthogonality regulariser and the rank budget -----------------------------------------
  def loss_term(self, trainable: Params):
    """orth_reg_weight × mean over P and Q of the Frobenius distance of their Gram matrix to I (as HF)."""
    norms = []
    for adapter in trainable["adapters"].values():
      p = adapter["a"].reshape(-1, adapter["a"].shape[-1])
      eye = jnp.eye(p.shape[-1], dtype=p.dtype)
      norms += [jnp.linalg.norm(p.T @ p - eye), jnp.linalg.norm(adapter["b"] @ adapter["b"].T - eye)]
    return self.orth_reg_weight * sum(norms) / max(len(norms), 1)

  def init_step_state(self, trainable: Params) -> Params:
    if self.total_step <= 0:
      raise ValueError("adalora: total_step (the run's number of training steps) is required for its rank "
                       "budget schedule; set it (--config.peft.total_step=N).")
    adapters = trainable["adapters"]
    zeros = {m: {k: jnp.zeros_like(adapter[k]) for k in _LEAVES} for m, adapter in adapters.items()}
    keep = {m: jnp.ones((self.init_r,), bool) for m in adapters}
    return {"ipt": zeros, "unc": jax.tree.map(jnp.copy, zeros), "keep": keep}

  def budgets(self, modules: int) -> np.ndarray:
    """The budget after each step 0..total_step - tfinal (HF's `budget_schedule`, in float64)."""
    init, target, end = self.init_r * modules, self.target_r * modules, self.total_step - self.tfinal
    steps = np.arange(end + 1)
    coeff = 1 - (steps - self.tinit) / (end - self.tinit)
    return np.where(steps <= self.tinit, init, ((init - target) * coeff ** 3 + target).astype(np.int64))

  def scores(self, ipt, unc) -> dict:
    """Each triplet's importance: its Λ entry's, plus the means over its P column and its Q row."""
    out = {}
    for m in ipt:
      s = {k: ipt[m][k] * unc[m][k] for k in _LEAVES}
      a = jnp.mean(s["a"].reshape(-1, s["a"].shape[-1]), axis=0)
      out[m] = s["e"] + (a + jnp.mean(s["b"], axis=1))
    return out

  def keep_within(self, scores: dict, budget) -> dict:
    """The triplets kept under `budget`: scores above the (init - budget)-th smallest (none dropped at 0)."""
    flat = jnp.sort(jnp.concatenate([scores[m] for m in sorted(scores)]))
    k = flat.shape[0] - budget
    threshold = jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -jnp.inf)
    return {m: s > threshold for m, s in scores.items()}

  def after_update(self, trainable: Params, grads: Params, step_state: Params, step):
    adapters, end = trainable["adapters"], self.total_step - self.tfinal
    b1, b2 = self.beta1, self.beta2

    def smoothed(p, g, ipt, unc):
      now = jnp.abs(p * g)
      ipt_new = b1 * ipt + (1 - b1) * now
      return ipt_new, b2 * unc + (1 - b2) * jnp.abs(now - ipt_new)

    updating = step < end
    ipt, unc = {}, {}
    for m, adapter in adapters.items():
      ipt[m], unc[m] = {}, {}
      for k in _LEAVES:
        i, u = smoothed(adapter[k], grads["adapters"][m][k], step_state["ipt"][m][k], step_state["unc"][m][k])
        ipt[m][k] = jnp.where(updating, i, step_state["ipt"][m][k])
        unc[m][k] = jnp.where(updating, u, step_state["unc"][m][k])
    budget = jnp.asarray(self.budgets(len(adapters)), jnp.int32)[jnp.clip(step, 0, end)]
    allocating = ((step > self.tinit) & (step < end) & (step % self.delta_t == 0)) | (step == end)
    chosen = self.keep_within(self.scores(ipt, unc), budget)
    keep = {m: jnp.where(allocating, chosen[m], step_state["keep"][m]) for m in adapters}
    masking = allocating | (step > end)
    adapters = {m: {**a, "e": jnp.where(masking & ~keep[m], 0.0, a["e"]).astype(a["e"].dtype)}
                for m, a in adapters.items()}
    return {**trainable, "adapters": adapters}, {"ipt": ipt, "unc": unc, "keep": keep}

  def ranks(self, step_state: Params) -> dict[str, int]:
    """The rank each module keeps (HF's `rank_pattern`, summed)."""
    return {m: int(np.sum(np.asarray(k))) for m, k in step_state["keep"].items()}
