"""The README's quickstart, run exactly as written (in a short temporary directory instead of
/tmp/ckptd-demo): five commands or fewer from nothing to a daemon and two workers sharing
one copy of a model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = "/tmp/ckptd-demo"


def quickstart_commands() -> list[str]:
    """The ``$ `` lines of the README's Quickstart section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```console\n(.*?)```", section, flags=re.DOTALL)
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


@pytest.fixture
def demo() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ckq", dir="/tmp"))  # short: the socket path stays under 108 bytes
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _shims(folder: Path) -> dict[str, str]:
    """``python`` and ``ckptd`` on PATH meaning this interpreter (whatever its venv's scripts say)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, command in (("python", f'"{sys.executable}"'), ("ckptd", f'"{sys.executable}" -m ckptd')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow  # five Python start-ups (torch imports): ~20 s on a quiet 2-core machine
def test_quickstart_runs_as_written(demo: Path) -> None:
    commands = quickstart_commands()
    assert 0 < len(commands) <= 5
    work = demo / "d"  # the README's folder: made by the first command, not by the test
    script = "\n".join(
        [
            "set -e",
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",  # stop the daemon the quickstart started
            *(command.replace(DEMO, str(work)) for command in commands),
        ]
    )
    run = subprocess.run(["bash", "-c", script], cwd=REPO, env=_shims(demo), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = run.stdout
    assert out.count("loaded in ") == 2 and out.count(f"(unix://{work}/ckptd.sock)") == 2  # both through the daemon
    assert f"wrote {work}/tinylm.pt" in out
    (row,) = [line for line in out.splitlines() if line.endswith("ago") and "tinylm.pt" in line]
    *_, leases, hits, _, _ = row.split()
    assert (leases, hits) == ("0", "1")  # read once, loaded twice; both leases released on exit
