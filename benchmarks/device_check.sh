#!/usr/bin/env bash
# The accelerator benchmark (benchmarks/accelerator.py) on the device machine: one prepared script.
#
#   1. Here, once per checkout (needs PyPI):   bash benchmarks/device_check.sh prepare
#   2. The device tool's `run`, carry [".whl"], timeout_s 500:   bash benchmarks/device_check.sh
#      Rows land in $OUT/accelerator.jsonl as each case ends (the log in $OUT/accelerator.log).
#
# The device machine has Python 3.12 with jax, flax and optax, and no network
# (/work/.library/device/README.md, KINDS.md). The U-Net cases import the text-to-image trainer, whose data
# modules need packages it lacks; `prepare` downloads them, at the versions constraints.txt pins, into .whl/
# (git-ignored), and the run installs them under /tmp/site (the ViT and ResNet cases need none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(array_record googleapis-common-protos grain immutabledict ml_collections portpicker promise protobuf
        tensorflow-datasets tensorflow-metadata toml)  # protobuf: googleapis-common-protos needs >= 6.33.5

if [[ "${1:-}" == prepare ]]; then
  pins=()
  for name in "${WHEELS[@]}"; do
    pins+=("$(grep -iE "^${name//[-_]/[-_]}==" constraints.txt)") || { echo "constraints.txt pins no $name" >&2; exit 1; }
  done
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $(printf '%s\n' "${pins[@]}" | grep -v '^promise')
  python3 -m pip wheel -q --no-deps -w .whl $(printf '%s\n' "${pins[@]}" | grep '^promise')  # PyPI has its sdist only
  du -sh .whl && exit
fi

out="${OUT:-/tmp}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# A rerun on the same (warm) machine loads its programs from this cache; compile_s then measures the load.
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda.*|flax|optax|numpy|etils|protobuf) ' || true
timeout 300 python3 -m benchmarks.accelerator --out "$out/accelerator.jsonl" 2>&1 | tee "$out/accelerator.log"
# Runs trained together vs apart (train/runs.py): small models under-use an accelerator, where this pays.
timeout 90 python3 -m benchmarks.vmapped_runs --runs=8 --cases=mobilenet_v2:lora,mobilenet_v2:full \
  2>&1 | tee "$out/vmapped_runs.log" || true
