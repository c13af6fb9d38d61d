"""Paper-format reports from the results store: tables, ranks and plots.

Per model, the paper's layout: one row per dataset (with its training size), or per (dataset,
regime) when the records span regimes; one column per method headed `name (trainable params)`; mean
± std over seeds, the best of each row in bold; then "Average <metric>" (column means) and "Average
Rank" (methods ranked within each row, best = 1, averaged over rows). Ties: "dense" (tied methods
share a rank, the next rank follows on: the paper's ResNet table) or "average" (tied methods get the
mean of their positions: its ViT table); values are compared at 6 decimals. Metrics where lower is
better (FID, KID) rank ascending. `combine_models` adds the "Combined Average Rank" over every
(model, dataset) row. Written as Markdown, CSV and LaTeX, plus PNG plots of the metric against the %
of training data (the paper's Fig. 1, crossings marked) and against trainable parameters (Fig. 3).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import zlib

import numpy as np

LOWER_IS_BETTER = {"fid", "kid", "loss"}
NAMES = {"f1_macro": "F1", "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "auc": "AUC",
         "fid": "FID", "kid": "KID"}
_CM_METRICS = {"f1_macro", "accuracy", "balanced_accuracy"}  # recomputable from a confusion matrix


def final_records(records: list[dict]) -> list[dict]:
  return [r for r in records if r.get("status") == "ok" and r.get("kind", "final") == "final"]


def rank_values(values: dict[str, float], ties: str = "average", ascending: bool = False) -> dict[str, float]:
  """Rank of each key (1 = best). `ties`: "dense" or "average"."""
  if ties not in ("dense", "average"):
    raise ValueError(f"ties must be 'dense' or 'average', not {ties!r}.")
  rounded = {k: round(v, 6) for k, v in values.items()}
  order = sorted(set(rounded.values()), reverse=not ascending)
  ranks, position = {}, 1
  for level, value in enumerate(order, 1):
    tied = [k for k, v in rounded.items() if v == value]
    rank = level if ties == "dense" else position + (len(tied) - 1) / 2
    ranks.update({k: float(rank) for k in tied})
    position += len(tied)
  return ranks


def _format_count(n: float) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.0f}{unit}"
  return f"{n:.0f}"


def _cm_metric(cm: np.ndarray, metric: str) -> float:
  tp = np.diag(cm).astype(np.float64)
  if metric == "accuracy":
    return float(tp.sum() / max(cm.sum(), 1))
  if metric == "balanced_accuracy":
    support = cm.sum(axis=1)
    return float(np.mean(tp[support > 0] / support[support > 0]))
  denom = cm.sum(axis=0) + cm.sum(axis=1)
  return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def bootstrap_means(records: list[dict], metric: str, samples: int, rng: np.random.Generator) -> np.ndarray | None:
  """`samples` bootstrap replicates of the seed-mean of `metric`: the seeds resampled with replacement and,
  within each, its test examples resampled from its confusion matrix (F1, accuracy, balanced accuracy;
  other metrics: the seeds only). None when there is nothing to resample (one seed, no confusion matrix)."""
  with_cm = metric in _CM_METRICS and all("confusion_matrix" in r["metrics"] for r in records)
  if not with_cm and len(records) < 2:
    return None
  values = np.asarray([r["metrics"][metric] for r in records], np.float64)
  cms = [np.asarray(r["metrics"]["confusion_matrix"]) for r in records] if with_cm else None
  out = np.empty(samples)
  for b in range(samples):
    chosen = rng.integers(0, len(records), len(records))
    if cms is None:
      out[b] = values[chosen].mean()
    else:
      out[b] = np.mean([_cm_metric(rng.multinomial(cms[i].sum(), (cms[i] / cms[i].sum()).ravel())
                                   .reshape(cms[i].shape), metric) for i in chosen])
  return out


def bootstrap_interval(records: list[dict], metric: str, samples: int, seed: int = 0):
  """95 % percentile interval of the seed-mean, bootstrap over seeds and test examples (see `bootstrap_means`)."""
  means = bootstrap_means(records, metric, samples, np.random.default_rng(seed))
  return None if means is None else (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


@dataclasses.dataclass
class Cell:
  values: list[float]
  interval: tuple[float, float] | None = None
  replicates: np.ndarray | None = None  # bootstrap replicates of the mean (for the interval and rank stability)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def std(self) -> float:
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


@dataclasses.dataclass
class Table:
  model: str
  metric: str
  methods: list[str]
  headers: list[str]  # "method (params)"
  rows: list[tuple[str, dict[str, Cell]]]  # (label, {method: cell})
  best: list[set[str]]
  average: dict[str, float]
  average_rank: dict[str, float]
  seeds: int = 1  # the most runs (seeds) behind one cell
  stability: dict[str, tuple[float, float]] | None = None  # method -> (keeps its row rank, keeps its place)


def _rows(records: list[dict]):
  """{(dataset, regime): records}; regimes collapse to one row per dataset when each has one."""
  by_row = collections.defaultdict(list)
  for r in records:
    by_row[(r["dataset"], float(r["regime"]))].append(r)
  datasets = list(dict.fromkeys(r["dataset"] for r in records))
  span = any(len({reg for (d, reg) in by_row if d == ds}) > 1 for ds in datasets)
  keys = sorted(by_row, key=lambda k: (datasets.index(k[0]), k[1]))
  return [(k, by_row[k], span) for k in keys]


def build_table(records: list[dict], model: str, metric: str = "f1_macro", ties: str = "average",
                bootstrap: int = 0) -> Table:
  records = [r for r in final_records(records) if r["model"] == model and metric in r["metrics"]]
  if not records:
    raise ValueError(f"No finished records of {model} with metric {metric!r}.")
  ascending = metric in LOWER_IS_BETTER
  methods = list(dict.fromkeys(r["method"] for r in records))
  headers = []
  for m in methods:
    counts = sorted({r["trainable_params"] for r in records if r["method"] == m and "trainable_params" in r})
    span = (_format_count(counts[0]) if len(counts) == 1 or _format_count(counts[0]) == _format_count(counts[-1])
            else f"{_format_count(counts[0])}–{_format_count(counts[-1])}") if counts else "?"
    headers.append(f"{m} ({span})")
  rows, best, ranks = [], [], collections.defaultdict(list)
  for (dataset, regime), row_records, span in _rows(records):
    size = max(r.get("dataset_size", 0) for r in row_records)
    label = f"{dataset} @ {regime:g} ({size:,})" if span else f"{dataset} ({size:,})"
    cells = {}
    for m in methods:
      runs = [r for r in row_records if r["method"] == m]
      if runs:
        check_cell(runs, metric)
        # A cell's own seeded stream: its interval does not change when other cells are added.
        rng = np.random.default_rng(zlib.crc32(f"{model}/{dataset}/{regime}/{m}/{metric}".encode()))
        replicates = bootstrap_means(runs, metric, bootstrap, rng) if bootstrap else None
        interval = None if replicates is None else (float(np.percentile(replicates, 2.5)),
                                                    float(np.percentile(replicates, 97.5)))
        cells[m] = Cell([float(r["metrics"][metric]) for r in runs], interval, replicates)
    means = {m: c.mean for m, c in cells.items()}
    target = min(means.values()) if ascending else max(means.values())
    best.append({m for m, v in means.items() if round(v, 6) == round(target, 6)})
    for m, rank in rank_values(means, ties, ascending).items():
      ranks[m].append(rank)
    rows.append((label, cells))
  average = {m: float(np.mean([cells[m].mean for _, cells in rows if m in cells])) for m in methods}
  average_rank = {m: float(np.mean(ranks[m])) for m in methods}
  seeds = max(len(c.values) for _, cells in rows for c in cells.values())
  return Table(model, metric, methods, headers, rows, best, average, average_rank, seeds,
               rank_stability(rows, methods, average_rank, ties, ascending) if bootstrap else None)


def _protocol(record: dict) -> str:
  """What a cell's runs must share: everything in their config but the seed (and the learning rate)."""
  config = {k: v for k, v in (record.get("config") or {}).items() if k != "seed"}
  return json.dumps([config, record.get("lr")], sort_keys=True, default=str)


def check_cell(runs: list[dict], metric: str) -> None:
  """A cell averages seeds of one protocol: runs made under other configs or learning rates (two sweeps
  in one results file), a seed twice, or a non-finite metric are errors, never a silently pooled mean."""
  where = f"{runs[0]['model']} {runs[0]['method']} on {runs[0]['dataset']} @ {runs[0]['regime']}"
  protocols = collections.Counter(_protocol(r) for r in runs)
  if len(protocols) > 1:
    lrs = sorted({r.get("lr") for r in runs})
    raise ValueError(f"{where}: its runs were made under {len(protocols)} different configs (learning rates "
                     f"{lrs}); report them from separate results files (one workdir per protocol), or drop the "
                     "records of the protocol you do not want.")
  seeds = [r.get("seed") for r in runs]
  if len(set(seeds)) < len(seeds):
    raise ValueError(f"{where}: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} recorded more than "
                     "once; keep one record per seed.")
  bad = [r.get("seed") for r in runs if not math.isfinite(float(r["metrics"][metric]))]
  if bad:
    raise ValueError(f"{where}: {metric} is not finite for seed(s) {bad} (e.g. an AUC on a test split with one "
                     "class); choose another --metric or fix the test split.")


def rank_stability(rows, methods: list[str], average_rank: dict[str, float], ties: str, ascending: bool):
  """How often each method keeps its rank when every cell is replaced by a bootstrap replicate.

  Returns {method: (share of (replicate, row) pairs where its rank in the row equals the observed
  one, share of replicates where its place in the Average Rank order equals the observed one)}.
  Needs every cell of a row to have replicates; rows without are left out.
  """
  usable = [cells for _, cells in rows if cells and all(c.replicates is not None for c in cells.values())]
  if not usable:
    return None
  samples = min(len(c.replicates) for cells in usable for c in cells.values())
  observed_place = rank_values({m: -v for m, v in average_rank.items()}, "dense")
  kept_row, kept_place = collections.Counter(), collections.Counter()
  for b in range(samples):
    resampled = collections.defaultdict(list)
    for cells in usable:
      observed = rank_values({m: c.mean for m, c in cells.items()}, ties, ascending)
      for m, rank in rank_values({m: float(c.replicates[b]) for m, c in cells.items()}, ties, ascending).items():
        kept_row[m] += rank == observed[m]
        resampled[m].append(rank)
    place = rank_values({m: -float(np.mean(v)) for m, v in resampled.items()}, "dense")
    for m in place:
      kept_place[m] += place[m] == observed_place[m]
  rows_per = {m: sum(m in cells for cells in usable) for m in methods}
  return {m: (kept_row[m] / (samples * rows_per[m]), kept_place[m] / samples) for m in methods if rows_per[m]}


def combined_average_rank(records: list[dict], metric: str = "f1_macro", ties: str = "average") -> dict[str, float]:
  """Methods ranked within every (model, dataset[, regime]) row of every model, averaged."""
  ranks = collections.defaultdict(list)
  ascending = metric in LOWER_IS_BETTER
  records = [r for r in final_records(records) if metric in r["metrics"]]
  for model in dict.fromkeys(r["model"] for r in records):
    for _, row_records, _ in _rows([r for r in records if r["model"] == model]):
      means = collections.defaultdict(list)
      for r in row_records:
        means[r["method"]].append(float(r["metrics"][metric]))
      for m, rank in rank_values({m: float(np.mean(v)) for m, v in means.items()}, ties, ascending).items():
        ranks[m].append(rank)
  return {m: float(np.mean(v)) for m, v in ranks.items()}


def _cell_text(cell: Cell | None, latex: bool = False) -> str:
  if cell is None:
    return "–"
  pm = r" $\pm$ " if latex else " ± "
  text = f"{cell.mean:.4f}" + (f"{pm}{cell.std:.4f}" if len(cell.values) > 1 else "")
  if cell.interval:
    text += f" [{cell.interval[0]:.4f}, {cell.interval[1]:.4f}]"
  return text


def _summary_rows(table: Table):
  name = NAMES.get(table.metric, table.metric)
  return [(f"Average {name}", {m: f"{v:.4f}" for m, v in table.average.items()}),
          ("Average Rank", {m: f"{v:.2f}" for m, v in table.average_rank.items()})]


def to_markdown(table: Table) -> str:
  lines = [f"### {table.model} — {NAMES.get(table.metric, table.metric)}", "",
           "| dataset (train size) | " + " | ".join(table.headers) + " |",
           "|---|" + "---:|" * len(table.methods)]
  for (label, cells), best in zip(table.rows, table.best):
    texts = [(f"**{_cell_text(cells.get(m))}**" if m in best else _cell_text(cells.get(m))) for m in table.methods]
    lines.append(f"| {label} | " + " | ".join(texts) + " |")
  for label, values in _summary_rows(table):
    lines.append(f"| {label} | " + " | ".join(values[m] for m in table.methods) + " |")
  lines += ["", _uncertainty_note(table)]
  if table.stability:
    lines += ["", "| rank stability | " + " | ".join(table.methods) + " |", "|---|" + "---:|" * len(table.methods),
              "| keeps its row rank | " + " | ".join(f"{100 * table.stability[m][0]:.0f} %" for m in table.methods)
              + " |",
              "| keeps its Average Rank place | " + " | ".join(f"{100 * table.stability[m][1]:.0f} %"
                                                            for m in table.methods) + " |"]
  return "\n".join(lines) + "\n"


def _uncertainty_note(table: Table) -> str:
  """What the cells are, in one sentence under the table."""
  n = table.seeds
  spread = f"mean ± std over {n} seeds" if n > 1 else "one seed per cell (no spread shown)"
  replicates = next((len(c.replicates) for _, cells in table.rows for c in cells.values()
                     if c.replicates is not None), 0)
  interval = (f"; [lo, hi]: 95 % percentile interval of the mean from {replicates} bootstrap replicates "
              "(seeds resampled, and each seed's test images resampled from its confusion matrix, independently "
              "per seed: with few seeds this is narrower than a t-interval)" if replicates else "")
  return (f"_Cells: {spread}{interval}. Best mean in bold; Average Rank ranks the cell means within each row "
          "and averages them._")


def to_csv(table: Table) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["row"] + [f"{h} {part}" for h in table.headers for part in ("mean", "std", "best")])
  for (label, cells), best in zip(table.rows, table.best):
    out = [label]
    for m in table.methods:
      c = cells.get(m)
      out += [f"{c.mean:.6f}", f"{c.std:.6f}", int(m in best)] if c else ["", "", ""]
    writer.writerow(out)
  for label, values in _summary_rows(table):
    writer.writerow([label] + [x for m in table.methods for x in (values[m], "", "")])
  return buf.getvalue()


def _latex_escape(text: str) -> str:
  return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(table: Table) -> str:
  lines = [r"\begin{tabular}{l" + "r" * len(table.methods) + "}", r"\toprule",
           "Dataset & " + " & ".join(_latex_escape(h) for h in table.headers) + r" \\", r"\midrule"]
  for (label, cells), best in zip(table.rows, table.best):
    texts = [(rf"\textbf{{{_cell_text(cells.get(m), True)}}}" if m in best else _cell_text(cells.get(m), True))
             for m in table.methods]
    lines.append(_latex_escape(label) + " & " + " & ".join(texts) + r" \\")
  lines.append(r"\midrule")
  for label, values in _summary_rows(table):
    lines.append(f"{label} & " + " & ".join(values[m] for m in table.methods) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(lines) + "\n"


def _crossings(xs, a, b):
  """Points (x, y) where curve a crosses curve b between consecutive x (interpolated in log x)."""
  out = []
  for i in range(len(xs) - 1):
    d0, d1 = a[i] - b[i], a[i + 1] - b[i + 1]
    if d0 * d1 < 0:
      t = d0 / (d0 - d1)
      lx = math.log(xs[i]) + t * (math.log(xs[i + 1]) - math.log(xs[i]))
      out.append((math.exp(lx), a[i] + t * (a[i + 1] - a[i])))
  return out


def plot_regimes(records: list[dict], metric: str, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Fig. 1: the metric against the % of training data, one line per method, crossings marked."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  records = [r for r in final_records(records) if metric in r["metrics"]]
  paths = []
  for model in dict.fromkeys(r["model"] for r in records):
    for dataset in dict.fromkeys(r["dataset"] for r in records if r["model"] == model):
      runs = [r for r in records if r["model"] == model and r["dataset"] == dataset]
      regimes = sorted({float(r["regime"]) for r in runs})
      if len(regimes) < 2:
        continue
      fig, ax = plt.subplots(figsize=(6, 4))
      curves = {}
      for method in dict.fromkeys(r["method"] for r in runs):
        xs, ys, es = [], [], []
        for regime in regimes:
          v = [r["metrics"][metric] for r in runs if r["method"] == method and float(r["regime"]) == regime]
          if v:
            xs.append(regime * 100)
            ys.append(float(np.mean(v)))
            es.append(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        curves[method] = (xs, ys)
      names = list(curves)
      for i, a in enumerate(names):
        for b in names[i + 1:]:
          if curves[a][0] == curves[b][0]:
            for x, y in _crossings(curves[a][0], curves[a][1], curves[b][1]):
              ax.plot([x], [y], marker="X", color="black", markersize=9, zorder=5)
      ax.set_xscale("log")
      ax.set_xticks([x * 100 for x in regimes], [f"{x * 100:g}" for x in regimes])
      ax.set_xlabel("% of training data")
      ax.set_ylabel(NAMES.get(metric, metric))
      ax.set_title(f"{model} on {dataset} (X: crossings)")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      paths.append(_save(fig, out_dir / f"regimes_{model}_{dataset}.png"))
  return paths


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_parameters(records: list[dict], metric: str, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Fig. 3: each method's metric (mean over datasets, full training data) against its trainable
  parameters, log x, marker area proportional to the parameter count."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  records = [r for r in final_records(records) if metric in r["metrics"] and "trainable_params" in r]
  paths = []
  for model in dict.fromkeys(r["model"] for r in records):
    runs = [r for r in records if r["model"] == model]
    top = {d: max(float(r["regime"]) for r in runs if r["dataset"] == d) for d in {r["dataset"] for r in runs}}
    runs = [r for r in runs if float(r["regime"]) == top[r["dataset"]]]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    params = [float(np.mean([r["trainable_params"] for r in runs if r["method"] == m])) for m in methods]
    values = [float(np.mean([r["metrics"][metric] for r in runs if r["method"] == m])) for m in methods]
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [30 + 600 * p / max(params) for p in params]
    ax.scatter(params, values, s=sizes, alpha=0.6)
    for m, p, v in zip(methods, params, values):
      ax.annotate(m, (p, v), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{NAMES.get(metric, metric)} (mean over datasets)")
    ax.set_title(model)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"params_{model}.png"))
  return paths


def plot_rank_stability(table: Table, out_dir: pathlib.Path) -> pathlib.Path:
  """How often each method keeps its row rank and its Average Rank place under bootstrap resampling."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  methods = list(table.stability)
  x = np.arange(len(methods))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(x - 0.2, [100 * table.stability[m][0] for m in methods], 0.4, label="keeps its row rank")
  ax.bar(x + 0.2, [100 * table.stability[m][1] for m in methods], 0.4, label="keeps its Average Rank place")
  ax.set_xticks(x, methods)
  ax.set_ylim(0, 100)
  ax.set_ylabel("% of bootstrap replicates")
  ax.set_title(f"{table.model}: rank stability")
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
  ax.grid(alpha=0.3, axis="y")
  return _save(fig, out_dir / f"rank_stability_{table.model}.png")


def write_report(records: list[dict], out_dir: str | os.PathLike, metric: str = "f1_macro",
                 ties: str = "average", combine_models: bool = False, bootstrap: int = 0) -> str:
  """Writes every table (md, csv, tex) and plot into `out_dir`; returns the Markdown of the tables."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  records = final_records(records)
  if not records:
    raise ValueError("No finished final runs to report.")
  parts, tables = [], []
  for model in dict.fromkeys(r["model"] for r in records):
    table = build_table(records, model, metric, ties, bootstrap)
    tables.append(table)
    for suffix, text in (("md", to_markdown(table)), ("csv", to_csv(table)), ("tex", to_latex(table))):
      (out_dir / f"table_{model}.{suffix}").write_text(text)
    parts.append(to_markdown(table))
  if combine_models:
    ranks = combined_average_rank(records, metric, ties)
    text = ("### Combined Average Rank (all models and datasets)\n\n| " + " | ".join(ranks) + " |\n|"
            + "---:|" * len(ranks) + "\n| " + " | ".join(f"{v:.2f}" for v in ranks.values()) + " |\n")
    (out_dir / "combined_rank.md").write_text(text)
    parts.append(text)
  plots = (plot_regimes(records, metric, out_dir) + plot_parameters(records, metric, out_dir)
           + [plot_rank_stability(t, out_dir) for t in tables if t.stability])
  markdown = "\n".join(parts)
  (out_dir / "report.md").write_text(markdown + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
  return markdown
