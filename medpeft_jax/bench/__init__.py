"""Benchmark sweeps, the results store and paper-format reports."""

from medpeft_jax.bench.report import build_table, combined_average_rank, rank_values, write_report
from medpeft_jax.bench.store import ResultsStore
from medpeft_jax.bench.sweep import RunSpec

__all__ = ["ResultsStore", "RunSpec", "build_table", "combined_average_rank", "rank_values", "run_sweep",
           "write_report"]


def run_sweep(bench, workdir) -> list[dict]:
  """Runs every missing run of a sweep config (configs/bench.py, or `task="t2i"`: configs/paper_table4.py)."""
  if bench.get("task", "classification") == "t2i":
    from medpeft_jax.bench import t2i  # noqa: PLC0415  (Stable Diffusion and FID load only for t2i sweeps)
    return t2i.run_t2i_sweep(bench, workdir)
  from medpeft_jax.bench import runner  # noqa: PLC0415
  return runner.run_classification_sweep(bench, workdir)
