"""Plugins: modules imported before any registry lookup, so that what they register is known by name.

A new PEFT method, dataset or model family lives in its own module (yours, outside this package) that
registers itself on import (`@peft.core.register("name")`, `data.builders.register`, `models.register_model`);
`plugins=my_pkg.my_method` in a config's argument string (beside the `method=` it defines) makes every
launcher, sweep and worker import it first; the config keeps it in `config.plugins`. See README "Extending".
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def load(modules: Iterable[str] | str | None) -> None:
  """Imports each module (a '+'- or ','-separated string or a sequence); a failure names the module."""
  if isinstance(modules, str):
    modules = modules.replace("+", ",").split(",")
  for name in filter(None, (m.strip() for m in modules or ())):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"Plugin module {name!r} (config.plugins) could not be imported: {e}. Give an importable "
                        "module path (the repository root or your package must be on PYTHONPATH).") from e
