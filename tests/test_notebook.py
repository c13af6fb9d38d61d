"""The Colab quickstart notebook runs top to bottom (small), without its install cell."""

import nbformat
from nbclient import NotebookClient

from tests.test_train import REPO


def test_quickstart_notebook_runs(tmp_path, monkeypatch, br35h_data_dir):
  notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  skipped = [c for c in notebook.cells if "colab-install" in c.metadata.get("tags", [])]
  assert len(skipped) == 1 and "pip install" in skipped[0].source
  notebook.cells = [c for c in notebook.cells if c not in skipped]
  monkeypatch.setenv("MEDPEFT_SMOKE", "1")
  monkeypatch.setenv("MEDPEFT_DATA_DIR", str(br35h_data_dir))  # built once for the session
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "trainable params:" in text and "loss " in text and "confusion matrix" in text
  difference = float(text.split("merged vs adapter max difference:")[1].split()[0])
  assert difference < 1e-4
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in notebook.cells for o in c.get("outputs", []))
