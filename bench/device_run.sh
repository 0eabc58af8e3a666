#!/usr/bin/env bash
# What runs on the GPU machine (through the device tool, with `.whl` carried):
#   bash bench/device_run.sh            # gpu tests, the whole suite, the GPU benchmark
# Results (raw output, JSON, markdown, SVG) go to $OUT for the tool to bring back.
set -uo pipefail
OUT=${OUT:-/tmp/ckptd-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# The package laid out as pyproject's package-dir maps it (no build backend needed offline).
rm -rf /tmp/ckptd && mkdir -p /tmp/ckptd/ckptd
cp -r client/. /tmp/ckptd/ckptd/ && cp -r server /tmp/ckptd/ckptd/server && cp -r gpu /tmp/ckptd/ckptd/gpu \
  && cp -r formats /tmp/ckptd/ckptd/formats || exit 1
export PYTHONPATH=/tmp/ckptd:/tmp/site
{ date -u; nvidia-smi; python3 -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'; } 2>&1 | tee "$OUT/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
python3 -m pytest -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/all-tests.txt"
python3 bench/gpu_load.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.txt"
