#!/usr/bin/env bash
# Download the cp312 wheels the daemon needs on the GPU machine (the device tool's image
# has Python 3.12, torch 2.11, cupy-cuda13x, safetensors, httpx and pytest, but no
# fastapi, uvicorn or pydantic, and no registry). Run here, in the repository root;
# `.whl/` is git-ignored (.gitignore) and carried to the device (see bench/device_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
# The server extra and what it pulls in that the image lacks (pinned to what CI installs here).
pkgs=$("$PY" - <<'PY'
from importlib.metadata import version
names = ["fastapi", "starlette", "uvicorn", "h11", "click", "pydantic", "pydantic-core", "pydantic-settings",
         "python-dotenv", "annotated-types", "typing-inspection", "typing-extensions", "anyio", "prometheus-client",
         "tqdm", "pyyaml", "annotated-doc", "idna", "sniffio"]
pins = []
for name in names:
    try:
        pins.append(f"{name}=={version(name)}")
    except Exception:
        pass
print(" ".join(pins))
PY
)
for pkg in $pkgs; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "$pkg"
done
ls -la .whl
du -sh .whl
