"""The daemon's log: one format with timestamps for ckptd's records and uvicorn's, text or JSON."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import ckptd

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")


def _serve_and_log(tmp_path: Path, *flags: str) -> list[str]:
    """Run ``ckptd serve`` through a health check, a load of a missing file and SIGTERM: its stderr lines."""
    sockdir = tempfile.mkdtemp(prefix="ck", dir="/tmp")
    sock = f"{sockdir}/d.sock"
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(tmp_path), "--shm-dir", str(tmp_path), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ckptd: serving on ")
        with ckptd.Client(f"unix://{sock}") as client:
            assert client.health()["status"] == "ok"
            with pytest.raises(ckptd.CheckpointNotFoundError):
                client.load(str(tmp_path / "missing.pt"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        Path(sockdir).rmdir()
    assert proc.returncode == 0, err
    return err.splitlines()


def _loggers(names: list[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_text_log_is_one_format_with_timestamps(tmp_path: Path) -> None:
    lines = _serve_and_log(tmp_path)
    assert lines and all(TEXT_LINE.match(line) for line in lines), "\n".join(lines)
    names = [line.split()[3].rstrip(":") for line in lines]
    assert _loggers(names) == {"ckptd", "uvicorn"}  # uvicorn's access and error lines too
    assert any("GET /healthz" in line for line in lines)  # the access log, same format


def test_json_log(tmp_path: Path) -> None:
    records = [json.loads(line) for line in _serve_and_log(tmp_path, "--log-format", "json")]
    assert all(set(record) >= {"time", "level", "logger", "message"} for record in records)
    assert all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", record["time"]) for record in records)
    assert _loggers([record["logger"] for record in records]) == {"ckptd", "uvicorn"}
    assert any("ckptd serving on unix://" in record["message"] for record in records)
    assert any("missing.pt" in record["message"] for record in records)  # the refused load, logged by ckptd
