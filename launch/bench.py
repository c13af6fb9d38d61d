"""Runs a benchmark sweep, then writes its report (see configs/bench.py).

python -m launch.bench --config configs/embedded.py --workdir runs/embedded
Re-running resumes: finished runs are skipped, an interrupted run continues from its checkpoint.
"""

import pathlib

import jax
from absl import app, flags

from medpeft_jax import bench, config_args

_CONFIG = config_args.define_config_file("config", "Sweep config file and argument.")
_WORKDIR = flags.DEFINE_string("workdir", None, "results.jsonl, runs/ and report/ go here.", required=True)


def main(argv):
  del argv
  c = _CONFIG.value
  if not jax.config.jax_compilation_cache_dir:  # runs that differ only in regime or seed share programs
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_WORKDIR.value).resolve() / "xla_cache"))
  records = bench.run_sweep(c, _WORKDIR.value)
  failed = [r for r in records if r["status"] != "ok"]
  print(bench.write_report(records, f"{_WORKDIR.value}/report", **c.report))
  print(f"Report written to {_WORKDIR.value}/report; {len(records) - len(failed)} runs ok, {len(failed)} failed.")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
