"""The paper's protocol in a sweep: seeds, LR chosen on validation, and a report whose numbers can be
recomputed by hand from the records (mean, std, bootstrap interval over seeds and test images)."""

import re

import numpy as np
from absl import flags

from configs import bench as bench_config
from medpeft_jax import bench

flags.FLAGS.mark_as_parsed()


def _f1(cm: np.ndarray) -> float:
  tp = np.diag(cm).astype(float)
  denom = cm.sum(0) + cm.sum(1)
  return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def _hand_interval(cms, samples=4000, seed=123):
  """The interval by an independent route: seeds resampled, then each seed's test set from its confusion matrix."""
  rng = np.random.default_rng(seed)
  means = []
  for _ in range(samples):
    chosen = rng.integers(0, len(cms), len(cms))
    means.append(np.mean([_f1(rng.multinomial(cms[i].sum(), (cms[i] / cms[i].sum()).ravel()).reshape(cms[i].shape))
                          for i in chosen]))
  return np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_three_seeds_lr_selection_and_a_report_recomputed_by_hand(easy, tmp_path):
  c = bench_config.sweep(["vit_b16"], ["linear", "bias"], ["image_folder"], [1.0], [0, 1, 2], smoke=True)
  c.manual_dirs["image_folder"] = easy["manual_dir"]
  c.run.data_dir, c.run.epochs, c.run.min_steps = easy["data_dir"], 1, 8
  c.lr["linear"] = 3e-2  # fixed; bias is chosen on validation over two candidates with the runs' own schedule
  c.lr_search.grid["default"] = (1e-3, 1e-2)
  records = bench.run_sweep(c, tmp_path)
  assert all(r["status"] == "ok" for r in records)
  search = [r for r in records if r["kind"] == "lr_search"]
  final = [r for r in records if r["kind"] == "final"]
  assert len(search) == 2 and len(final) == 6
  chosen = max(search, key=lambda r: (r["validation"]["f1_macro"], -r["lr"]))["lr"]
  assert {r["lr"] for r in final if r["method"] == "bias"} == {chosen}
  # The winner (seed 0, largest regime, same config) is the final run of that seed: trained once.
  adopted = [r for r in final if r.get("adopted_from") == "lr_search"]
  assert len(adopted) == 1 and adopted[0]["seed"] == 0 and adopted[0]["method"] == "bias"
  assert all(r["last_step"] >= 8 for r in final)  # the step floor of a tiny regime

  markdown = bench.write_report(records, tmp_path / "report", bootstrap=2000)
  for method in ("linear", "bias"):
    runs = [r for r in final if r["method"] == method]
    values = np.array([r["metrics"]["f1_macro"] for r in runs])
    cms = [np.array(r["metrics"]["confusion_matrix"]) for r in runs]
    assert np.allclose([_f1(cm) for cm in cms], values)  # the records' F1 is their confusion matrices'
    column = [h.split(" (")[0] for h in re.search(r"\| dataset \(train size\) \| (.*) \|", markdown)[1].split(" | ")]
    row = re.search(r"\| image_folder \(54\) \| (.*) \|", markdown)[1].split(" | ")
    text = row[column.index(method)].strip("*")
    mean, std, lo, hi = map(float, re.fullmatch(r"([\d.]+) ± ([\d.]+) \[([\d.]+), ([\d.]+)\]", text).groups())
    assert mean == round(values.mean(), 4) and std == round(values.std(ddof=1), 4)
    hand_lo, hand_hi = _hand_interval(cms)
    assert abs(lo - hand_lo) < 0.03 and abs(hi - hand_hi) < 0.03, (text, hand_lo, hand_hi)
    assert lo <= mean <= hi
  assert "95 % percentile interval of the mean from 2000 bootstrap replicates" in markdown
  assert "| keeps its row rank |" in markdown
