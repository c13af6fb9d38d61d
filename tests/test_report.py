"""Reports on hand-made results: ranks (both tie conventions), averages, FID ascending, files."""

import numpy as np
import pytest

from medpeft_jax import bench
from medpeft_jax.bench import report


def record(model, dataset, method, value, seed=0, regime=1.0, metric="f1_macro", params=1000, size=100):
  return {"kind": "final", "status": "ok", "model": model, "dataset": dataset, "method": method,
          "regime": regime, "seed": seed, "lr": 1e-3, "dataset_size": int(size * regime),
          "trainable_params": params, "metrics": {metric: value}}


def test_rank_conventions():
  values = {"a": 0.9, "b": 0.9, "c": 0.8, "d": 0.95}
  assert bench.rank_values(values, "dense") == {"d": 1, "a": 2, "b": 2, "c": 3}
  assert bench.rank_values(values, "average") == {"d": 1, "a": 2.5, "b": 2.5, "c": 4}
  fid = {"a": 30.0, "b": 20.0, "c": 20.0}
  assert bench.rank_values(fid, "dense", ascending=True) == {"b": 1, "c": 1, "a": 2}
  assert bench.rank_values(fid, "average", ascending=True) == {"b": 1.5, "c": 1.5, "a": 3}
  with pytest.raises(ValueError, match="ties"):
    bench.rank_values(values, "min")


HAND = [  # model m1 on two datasets, two seeds; "lora" ties "full" on d2
    record("m1", "d1", "full", 0.80, 0, params=23_514_179), record("m1", "d1", "full", 0.90, 1, params=23_514_179),
    record("m1", "d1", "lora", 0.70, 0, params=592_131), record("m1", "d1", "lora", 0.72, 1, params=592_131),
    record("m1", "d1", "bias", 0.60, 0, params=32_707), record("m1", "d1", "bias", 0.60, 1, params=59_267),
    record("m1", "d2", "full", 0.50, 0, params=23_514_179), record("m1", "d2", "lora", 0.50, 0, params=592_131),
    record("m1", "d2", "bias", 0.70, 0, params=32_707),
]


@pytest.mark.parametrize("ties,ranks", [("dense", {"full": 1.5, "lora": 2.0, "bias": 2.0}),
                                        ("average", {"full": 1.75, "lora": 2.25, "bias": 2.0})])
def test_table_means_best_averages_and_ranks(ties, ranks):
  table = bench.build_table(HAND + [{**HAND[0], "status": "failed"}, {**HAND[0], "kind": "lr_search"}], "m1",
                            ties=ties)
  assert table.methods == ["full", "lora", "bias"]
  assert table.headers == ["full (23.5M)", "lora (592K)", "bias (32.7K–59.3K)"]
  (label1, row1), (label2, row2) = table.rows
  assert label1 == "d1 (100)" and label2 == "d2 (100)"
  assert row1["full"].mean == pytest.approx(0.85) and row1["full"].std == pytest.approx(np.std([0.8, 0.9], ddof=1))
  assert table.best == [{"full"}, {"bias"}]
  assert table.average == pytest.approx({"full": 0.675, "lora": 0.605, "bias": 0.65})
  assert table.average_rank == pytest.approx(ranks)
  markdown = report.to_markdown(table)
  assert "| d1 (100) | **0.8500 ± 0.0707** | 0.7100 ± 0.0141 | 0.6000 ± 0.0000 |" in markdown
  assert "| Average F1 | 0.6750 | 0.6050 | 0.6500 |" in markdown


def test_fid_is_ranked_ascending():
  records = [record("unet", "mimic", m, v, metric="fid") for m, v in (("full", 40.0), ("lora", 35.0), ("bias", 60.0))]
  table = bench.build_table(records, "unet", metric="fid", ties="dense")
  assert table.best == [{"lora"}] and table.average_rank == {"full": 2, "lora": 1, "bias": 3}
  assert "Average FID" in report.to_markdown(table)


def test_regime_rows_and_combined_rank():
  records = [record("m1", "d1", m, v, regime=r) for r in (0.1, 1.0) for m, v in (("full", 0.5 + r / 2), ("lora", 0.7))]
  records += [record("m2", "d1", m, v) for m, v in (("full", 0.9), ("lora", 0.8))]
  table = bench.build_table(records, "m1")
  assert [label for label, _ in table.rows] == ["d1 @ 0.1 (10)", "d1 @ 1 (100)"]
  assert table.best == [{"lora"}, {"full"}]
  # m1: lora wins at 10 %, full at 100 %; m2: full wins. Full: (2 + 1 + 1) / 3.
  assert bench.combined_average_rank(records) == pytest.approx({"full": 4 / 3, "lora": 5 / 3})


def test_bootstrap_intervals_from_confusion_matrices():
  small = {**record("m", "d", "a", 0.8), "metrics": {"f1_macro": 0.8, "confusion_matrix": [[8, 2], [2, 8]]}}
  large = {**small, "metrics": {"f1_macro": 0.8, "confusion_matrix": [[800, 200], [200, 800]]}}
  lo_s, hi_s = report.bootstrap_interval([small], "f1_macro", 500)
  lo_l, hi_l = report.bootstrap_interval([large], "f1_macro", 500)
  assert lo_s < 0.8 < hi_s and lo_l < 0.8 < hi_l and (hi_l - lo_l) < (hi_s - lo_s) / 5
  assert report.bootstrap_interval([record("m", "d", "a", 0.8)], "auc", 100) is None


def test_write_report_files(tmp_path):
  records = [record("m1", "d1", m, v + 0.01 * s, seed=s, regime=r, params=p)
             for r in (0.05, 0.2, 1.0) for s in (0, 1)
             for m, v, p in (("full", 0.4 + 0.5 * r, 10**7), ("lora", 0.6 + 0.2 * r, 10**5))]
  markdown = bench.write_report(records, tmp_path, ties="dense", combine_models=True, bootstrap=50)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["combined_rank.md", "params_m1.png", "rank_stability_m1.png", "regimes_m1_d1.png", "report.md",
                   "table_m1.csv", "table_m1.md", "table_m1.tex"]
  assert "Combined Average Rank" in markdown and r"\textbf" in (tmp_path / "table_m1.tex").read_text()
  # full and lora cross between 20 % and 100 %: the Fig. 1 helper finds the crossing.
  crossing = report._crossings([5, 20, 100], [0.425, 0.5, 0.9], [0.61, 0.64, 0.8])
  assert len(crossing) == 1 and 20 < crossing[0][0] < 100
