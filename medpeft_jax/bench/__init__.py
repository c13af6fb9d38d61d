"""Benchmark sweeps, the results store and paper-format reports."""

from medpeft_jax.bench.report import build_table, combined_average_rank, rank_values, write_report
from medpeft_jax.bench.runner import RunSpec, run_sweep
from medpeft_jax.bench.store import ResultsStore

__all__ = ["ResultsStore", "RunSpec", "build_table", "combined_average_rank", "rank_values", "run_sweep",
           "write_report"]
