#!/usr/bin/env bash
# What runs on a lent GPU machine, one step per device-tool command (with `.whl` carried,
# see bench/device_wheels.sh). A lent machine gives 15 minutes of device time in all and at
# most 10 minutes a command, so each step has its own budget and is cut off at it:
#
#   bash bench/device_run.sh a   # (a) the GPU tests (`-m gpu`, the CUDA stand-in tests)  <= 4 min
#   bash bench/device_run.sh b   # (b) the GPU benchmark on a 2 GB checkpoint              <= 4 min
#   bash bench/device_run.sh c   # (c) the 8 GB benchmark: only if time is left after (a) and (b); <= 6 min
#
# Results go to $OUT (raw output, JSON, markdown, SVG) for the tool to bring back; commit
# them under bench/results/. `DRY_RUN=1` runs a step here, on simulated GPUs (no CUDA):
# (a) then runs the stand-in tests and skips the `gpu` ones, (b) and (c) run the daemon rows
# on a smaller checkpoint (this shared machine must not write multi-GB files).
set -uo pipefail
step=${1:-}
OUT=${OUT:-/tmp/ckptd-out}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

case "$step" in
  a) budget=240 ;;
  b) budget=240 ;;
  c) budget=360 ;;
  *) echo "usage: bash bench/device_run.sh a|b|c   (a: gpu tests, b: 2 GB benchmark, c: 8 GB benchmark)" >&2; exit 2 ;;
esac
started=$(date +%s)

if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-python3}  # the checkout's own environment (ckptd installed)
else
  PY=python3
  # The wheels the image lacks, then the package laid out as pyproject's package-dir maps it
  # (no build backend offline).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  rm -rf /tmp/ckptd && mkdir -p /tmp/ckptd/ckptd
  cp -r client/. /tmp/ckptd/ckptd/ && cp -r server /tmp/ckptd/ckptd/server && cp -r gpu /tmp/ckptd/ckptd/gpu \
    && cp -r formats /tmp/ckptd/ckptd/formats || exit 1
  export PYTHONPATH=/tmp/ckptd:/tmp/site
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>&1 | head -20; "$PY" -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'; } \
  > "$OUT/device-$step.txt" 2>&1

case "$step" in
  a)
    # gpu-marked tests everywhere, plus the CUDA backend against its stand-ins (seconds)
    timeout --signal=INT "$budget" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu-tests.txt"
    rc=${PIPESTATUS[0]}
    timeout --signal=INT 60 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_standins.py 2>&1 | tee -a "$OUT/gpu-tests.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
    ;;
  b|c)
    size=2; [ "$step" = c ] && size=8
    extra=()
    if [ "$DRY_RUN" = 1 ]; then size=0.05; extra=(--simulated --tensors 20); fi
    timeout --signal=INT "$budget" "$PY" bench/gpu_load.py --size-gb "$size" --dir /tmp/ckptd-gpu-bench --out "$OUT" "${extra[@]}" \
      2>&1 | tee "$OUT/gpu-bench-$step.txt"
    rc=${PIPESTATUS[0]}
    ;;
esac
elapsed=$(( $(date +%s) - started ))
echo "step $step: exit $rc in ${elapsed}s (budget ${budget}s)" | tee -a "$OUT/device-$step.txt"
exit "$rc"
