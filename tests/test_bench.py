"""A CPU smoke sweep: runs, resumes after interruption without redoing finished runs, reports."""

import pathlib
import signal
import subprocess
import sys
import time

from absl import flags

from configs import bench as bench_config
from medpeft_jax import bench
from tests.test_train import REPO

flags.FLAGS.mark_as_parsed()


def smoke_sweep(easy):
  c = bench_config.sweep(["vit_b16"], ["linear", "lora"], ["image_folder"], [0.5, 1.0], [0, 1], smoke=True)
  c.manual_dirs["image_folder"] = easy["manual_dir"]
  c.run.data_dir = easy["data_dir"]
  c.run.epochs = 1
  c.lr["linear"] = 1e-2  # fixed; lora's is searched over two candidates
  c.lr_search.grid["default"] = (1e-3, 3e-3)
  c.lr_search.total_steps = 3
  return c


def test_smoke_sweep_resumes_and_reports(easy, tmp_path):
  config = smoke_sweep(easy)
  # Interrupt a first attempt once two runs are recorded; a re-run must not redo them.
  results = tmp_path / "results.jsonl"
  script = ("import sys; sys.argv = ['x']; from absl import flags; flags.FLAGS.mark_as_parsed(); "
            "from tests.test_bench import smoke_sweep; from medpeft_jax import bench; "
            f"bench.run_sweep(smoke_sweep({easy!r}), {str(tmp_path)!r})")
  process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 2):
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()
  first = bench.ResultsStore(results).records()
  assert 2 <= len(first) < 10
  records = bench.run_sweep(config, tmp_path)
  stored = bench.ResultsStore(results).records()
  keys = [bench.store.run_key(r) for r in stored]
  assert len(keys) == len(set(keys)) == 10  # 2 searches + 2 methods x 2 regimes x 2 seeds, each once
  assert stored[:len(first)] == first  # the finished runs were kept, not redone
  assert all(r["status"] == "ok" for r in records)
  final = [r for r in records if r["kind"] == "final"]
  searched = {r["lr"] for r in final if r["method"] == "lora"}
  assert len(searched) == 1 and searched <= {1e-3, 3e-3}
  assert {r["dataset_size"] for r in final} == {27, 54}
  r = final[0]
  for field in ("metrics", "trainable_params", "total_params", "step_time_s", "xla_memory_estimate_bytes", "adapter_bytes",
                "versions", "config"):
    assert field in r, field
  assert {"f1_macro", "accuracy", "balanced_accuracy", "auc"} <= set(r["metrics"])
  markdown = bench.write_report(records, tmp_path / "report", combine_models=True)
  assert "| image_folder @ 0.5 (27) |" in markdown
  assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
      "combined_rank.md", "params_vit_b16.png", "regimes_vit_b16_image_folder.png", "report.md",
      "table_vit_b16.csv", "table_vit_b16.md", "table_vit_b16.tex"]


def test_readme_sweep_commands_run_at_smoke_size(tmp_path):
  """The README's sweep and report commands as written, on a fake HAM10000 folder, with `smoke=True` (tiny
  random models) added to the sweep's argument: the only other changes are the data and output paths."""
  import os  # noqa: PLC0415
  import re  # noqa: PLC0415

  from tests import data_fakes  # noqa: PLC0415

  data_fakes.ham10000(tmp_path / "ham10000")
  text = (REPO / "README.md").read_text()
  block = re.search(r"## Benchmarks and reports\n\n```bash\n(.*?)```", text, re.S)[1]
  script = (block.replace("seeds=0+1+2 ", "seeds=0+1+2,smoke=True ").replace("/data/ham10000", str(tmp_path / "ham10000"))
            .replace("runs/sweep", str(tmp_path / "sweep")))
  assert "smoke=True" in script
  env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  records = bench.ResultsStore(tmp_path / "sweep" / "results.jsonl").records()
  final = [r for r in records if r["kind"] == "final"]
  assert len(final) == 18 and all(r["status"] == "ok" for r in records)  # 3 methods x 2 regimes x 3 seeds
  assert {r["method"] for r in records if r["kind"] == "lr_search"} == {"full", "bias", "lora"}
  assert (tmp_path / "sweep" / "report" / "table_vit_b16.md").is_file()
