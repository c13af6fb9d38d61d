"""Paper-format tables and plots from a results file.

python -m launch.report --results runs/embedded/results.jsonl --metric f1_macro --ties dense --out runs/report
python -m launch.report --results runs/vit/results.jsonl --combine-models --bootstrap 1000 --out runs/vit_report
"""

from absl import app, flags

from medpeft_jax import bench

_RESULTS = flags.DEFINE_string("results", None, "The sweep's results.jsonl.", required=True)
_METRIC = flags.DEFINE_string("metric", "f1_macro", "Metric to tabulate (fid/kid rank ascending).")
_TIES = flags.DEFINE_enum("ties", "average", ["dense", "average"], "Rank tie convention.")
_OUT = flags.DEFINE_string("out", None, "Folder for the tables (md, csv, tex) and plots.", required=True)
_COMBINE = flags.DEFINE_bool("combine-models", False, "Add the combined average rank over all models.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 0, "Bootstrap samples for 95% intervals (0: none).")


def main(argv):
  del argv
  records = bench.ResultsStore(_RESULTS.value).records()
  print(bench.write_report(records, _OUT.value, metric=_METRIC.value, ties=_TIES.value,
                           combine_models=_COMBINE.value, bootstrap=_BOOTSTRAP.value))


if __name__ == "__main__":
  app.run(main)
