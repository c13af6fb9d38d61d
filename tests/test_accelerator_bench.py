"""benchmarks/accelerator.py at tiny shapes on CPU: every case runs and reports, and its FLOP count is right."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accelerator
from medpeft_jax import presets
from medpeft_jax.models import layers

TINY = accelerator.Settings(tiny=True, steps=1, warmup=1)


def vit_full_step_flops(case: accelerator.Case, vit: dict) -> int:
  """Forward F = patch embedding + per block (4 projections, q·kᵀ and p·v, the MLP) + head; full fine-tuning
  adds dX and dW of every product (2F), less the patch embedding's dX (the images need no gradient)."""
  b, d, m, p = case.tiny_batch, vit["width"], vit["mlp_dim"], vit["patch_size"]
  n = (case.tiny_size // p) ** 2
  t = n + 1  # the class token
  patch = 2 * n * p * p * 3 * d
  block = 4 * 2 * t * d * d + 2 * 2 * t * t * d + 2 * 2 * t * d * m
  forward = b * (patch + vit["depth"] * block + 2 * d * 3)
  return 3 * forward - b * patch


def test_every_case_runs_at_tiny_shapes_in_bfloat16(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  rows = accelerator.run(list(accelerator.CASES), TINY, budget_s=600, out=str(out), isolate=False)
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # each row written as it ended
  assert [r["case"] for r in rows] == list(accelerator.CASES)
  printed = capsys.readouterr().out
  for r in rows:
    assert "skipped" not in r and "error" not in r, r
    assert math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0, r
    assert r["model_flops"] > 0 and r["xla_flops"] > 0 and r["memory_bytes"] > 0, r
    assert r["memory_source"].startswith("XLA estimate")  # a CPU reports no device peak
    assert r["mfu"] is None and r["peak_tflops"] is None and "MFU n/a" in printed  # no stated CPU peak
    assert r["bf16_flop_share"] == 1.0, r  # every product runs in bfloat16 ...
    assert r["loss_dtype"] == "float32" and math.isfinite(r["loss"]), r  # ... and the loss in float32
    assert f"{r['case']} ({r['batch']} x {r['shape']}" in printed
  full, lora = rows[0], rows[1]
  assert full["model_flops"] == vit_full_step_flops(accelerator.CASES["vit_b16:full"], presets.TINY_MODELS["vit"])
  assert lora["trainable_params"] < full["trainable_params"] and lora["model_flops"] < full["model_flops"]


def test_conv_flops_count_strided_gradients_once():
  """A strided conv's gradients cost what its forward does: dX (a dilated conv) counts no holes."""
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 5))
  conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
  forward = 2 * 2 * 4 * 4 * 5 * (3 * 3 * 3)
  assert accelerator.step_flops(jax.make_jaxpr(conv)(w, x)) == {"float32": forward}
  assert accelerator.step_flops(jax.make_jaxpr(jax.grad(conv, (0, 1)))(w, x)) == {"float32": 3 * forward}
  scanned = jax.make_jaxpr(lambda w, xs: jax.lax.scan(lambda c, x: (c + conv(w, x), None), 0.0, xs))(
      w, np.ones((4, 2, 8, 8, 3), np.float32))
  assert accelerator.step_flops(scanned) == {"float32": 4 * forward}


def test_budget_skips_cases_with_a_note(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  rows = accelerator.run(["vit_b16:full", "unet:lora@64"], TINY, budget_s=0, out=str(out), isolate=False)
  assert [r["case"] for r in rows] == ["vit_b16:full", "unet:lora@64"] and all("skipped" in r for r in rows)
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows
  assert "--budget_s=0" in capsys.readouterr().out


def test_stated_peaks():
  assert accelerator.stated_peak("NVIDIA H200")[0] == 989
  assert accelerator.stated_peak("NVIDIA H100 PCIe")[0] == 756
  assert accelerator.stated_peak("NVIDIA A100-SXM4-80GB")[0] == 312
  assert accelerator.stated_peak("cpu")[0] is None
  assert accelerator.stated_peak("cpu", 100.0) == (100.0, "--peak_tflops")


@pytest.fixture
def cudnn_traceable(monkeypatch):
  """cuDNN's attention traceable on a CPU: its hardware checks answer as a Hopper GPU with cuDNN 9.10 would."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415

  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)


def test_fused_attention_flops_match_the_xla_products(cudnn_traceable):
  """cuDNN's attention counts as XLA's q·kᵀ and p·v do: forward 4·B·T·N·H·S, its backward twice that."""
  q, kv = jnp.ones((2, 16, 4, 8), jnp.bfloat16), jnp.ones((2, 12, 4, 8), jnp.bfloat16)
  counts = {}
  for kernel in ("cudnn", "xla"):
    f = lambda q, k, v, kernel=kernel: jax.nn.dot_product_attention(q, k, v, implementation=kernel).sum(
        dtype=jnp.float32)
    counts[kernel] = [sum(accelerator.step_flops(jax.make_jaxpr(g)(q, kv, kv)).values())
                      for g in (f, jax.grad(f, (0, 1, 2)))]
  forward = 4 * 2 * 16 * 4 * 8 * 12
  assert counts["cudnn"] == counts["xla"] == [forward, 3 * forward]


def test_gpu_attention_is_cudnn_in_bfloat16_when_it_takes_the_shapes(cudnn_traceable, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kernels = lambda shape, dtype: {p for p in accelerator.primitives(jax.make_jaxpr(jax.grad(
      lambda q: layers.attention(q, q, q).sum(dtype=jnp.float32)))(jnp.ones(shape, dtype)))
      if p.startswith("dot_product_attention")}
  assert kernels((2, 16, 4, 8), jnp.bfloat16) == {"dot_product_attention_fwd_wrapper",
                                                  "dot_product_attention_bwd_wrapper"}
  assert kernels((2, 16, 4, 8), jnp.float32) == set()  # XLA's attention for float32
  assert kernels((2, 16, 4, 12), jnp.bfloat16) == set()  # head size not a multiple of 8: XLA's too


def test_bfloat16_policy_holds_in_every_module():
  """With dtype=bfloat16 every module of the benchmarked models outputs bfloat16 and every parameter stays
  float32; only the model's output (logits, the U-Net's prediction) is float32, for the loss."""
  from medpeft_jax import models  # noqa: PLC0415
  from medpeft_jax.models.unet import UNet2DConditionModel  # noqa: PLC0415

  image, t = jnp.ones((2, 32, 32, 3)), jnp.zeros((2,))
  latent, text = jnp.ones((2, 8, 8, 4)), jnp.ones((2, 77, 32), jnp.float16)
  unet = UNet2DConditionModel(accelerator.tiny_unet_config(), dtype=jnp.bfloat16)
  cases = [(unet, (latent, t, text), {})]
  for name in ("vit_b16", "resnet50"):
    overrides = presets.TINY_MODELS[models.get_spec(name).family]
    cases.append((models.create_model(name, num_classes=3, dtype=jnp.bfloat16, **overrides), (image,),
                  {"train": True}))
  for model, inputs, kwargs in cases:
    variables = jax.eval_shape(lambda *x, model=model: model.init(jax.random.key(0), *x), *inputs)
    assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
    mutable = ["intermediates", *(["batch_stats"] if "batch_stats" in variables else [])]
    out, state = jax.eval_shape(lambda v, *x, model=model, kw=kwargs, mutable=mutable: model.apply(
        v, *x, **kw, capture_intermediates=True, mutable=mutable), variables, *inputs)
    assert out.dtype == jnp.float32
    outputs = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    not_bf16 = [jax.tree_util.keystr(path) for path, x in outputs if x.dtype != jnp.bfloat16]
    assert len(outputs) > 20 and not_bf16 == ["['__call__'][0]"], (type(model).__name__, not_bf16)
