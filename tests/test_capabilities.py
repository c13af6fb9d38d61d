"""README.md's capability matrix is the one the tests' parametrisations generate (tests/capabilities.py)."""

import pathlib

from tests import capabilities


def test_readme_capability_matrix_is_generated_from_the_tests():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  start, end = readme.index(capabilities.BEGIN), readme.index(capabilities.END) + len(capabilities.END)
  assert readme[start:end] == capabilities.markdown(), "README.md is stale: run `python -m tests.capabilities`"
