#!/usr/bin/env bash
# Download the cp312 wheels the daemon needs on the GPU machine into `.whl/` (git-ignored),
# to be carried there (see bench/device_run.sh). The device tool's image has Python 3.12,
# torch 2.11, cupy-cuda13x, safetensors, httpx and pytest, but not the server extra
# (fastapi, uvicorn, pydantic-settings, prometheus-client) nor what those pull in, and it
# reaches no registry. Works from a fresh checkout: any Python 3 with pip will do (no
# virtual environment assumed); pip resolves the server extra's dependencies for 3.12.
# The output is a few MB, far under the 64 MiB a device command carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# The server extra (pyproject.toml) and tqdm; what the image has is not downloaded again.
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl \
  "fastapi>=0.110" "uvicorn>=0.29" "h11>=0.14" "pydantic-settings>=2.2" "prometheus-client>=0.20" "tqdm>=4.60" "pyyaml>=6"
ls -la .whl
du -sh .whl
size=$(du -sm .whl | cut -f1)
if [ "$size" -gt 60 ]; then
  echo ".whl is ${size} MiB: too big to carry (64 MiB with the tree)" >&2
  exit 1
fi
