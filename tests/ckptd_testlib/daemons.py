"""A real daemon for the tests: a ``ckptd serve`` subprocess and ways to watch it.

* :func:`start_daemon` / :func:`daemon_in` -- run ``ckptd serve`` (a generator: use it in a
  fixture); :class:`Daemon` is what it yields.
* :func:`wait_for` -- poll a condition (never sleep for a fixed time).
* :func:`report_of` -- the JSON report of a client subprocess; :func:`cached_entry` -- the
  daemon's entry for one checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "READY_PREFIX",
    "ArenaFile",
    "Daemon",
    "arenas_of",
    "start_daemon",
    "daemon_in",
    "wait_for",
    "report_of",
    "cached_entry",
]


# ---------------------------------------------------------------------------------------
# A real daemon.
# ---------------------------------------------------------------------------------------


READY_PREFIX = "ckptd: serving on "


@dataclasses.dataclass
class Daemon:
    """A running daemon: its process, socket, checkpoint root and shared-memory dir (where
    simulated GPUs keep their memory; host arenas are anonymous: :meth:`arenas`)."""

    proc: subprocess.Popen
    sock: str
    root: Path
    shm: Path
    tcp: str | None = None  # http://host:port when started with --port

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def arenas(self) -> list[ArenaFile]:
        """The daemon's host-memory arenas (anonymous memory files it holds open)."""
        return arenas_of(self.proc.pid)


_ARENA_LINK = re.compile(r"/memfd:(ckptd-[0-9a-f]{24}) \(deleted\)")


@dataclasses.dataclass(frozen=True, order=True)
class ArenaFile:
    """One arena of a daemon: a memory file no filesystem names, reached through the
    daemon's descriptor in ``/proc``. Equal by name (descriptor numbers are reused)."""

    name: str
    path: Path = dataclasses.field(compare=False)

    def __str__(self) -> str:
        return f"/memfd:{self.name}"  # as /proc/*/maps names a mapping of it

    def stat(self) -> os.stat_result:
        return self.path.stat()

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def exists(self) -> bool:
        """Whether the daemon still holds it (by name: the descriptor number may be another file's now)."""
        try:
            return os.readlink(self.path) == f"/memfd:{self.name} (deleted)"
        except OSError:
            return False


def arenas_of(pid: int) -> list[ArenaFile]:
    """The ckptd arenas process ``pid`` holds a descriptor of (each once: a daemon passing
    one on holds a second descriptor for a moment)."""
    found: dict[str, ArenaFile] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            match = _ARENA_LINK.fullmatch(os.readlink(fd_dir / fd))
        except OSError:  # closed meanwhile
            continue
        if match:
            found.setdefault(match[1], ArenaFile(match[1], fd_dir / fd))
    return sorted(found.values())


def start_daemon(root: Path, shm: Path, *extra: str) -> Iterator[Daemon]:
    """Run ``ckptd serve`` until the generator resumes; then SIGTERM it and check it left cleanly.

    The socket lives in a short directory under /tmp (a Unix socket path must stay under
    108 bytes, which pytest's tmp_path can exceed); the ready line printed once the
    daemon listens is the start signal, so nothing sleeps.
    """
    sockdir = tempfile.mkdtemp(prefix="ck", dir="/tmp")
    sock = os.path.join(sockdir, "d.sock")
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(root), "--shm-dir", str(shm), "--lease-ttl", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the daemon is listening (or exits)
        assert line.startswith(READY_PREFIX), f"daemon did not start: {line!r} (exit {proc.poll()})"
        unix, *tcp = line.strip().removeprefix(READY_PREFIX).split(" and ")
        assert unix == f"unix://{sock}"
        yield Daemon(proc, sock, root, shm, tcp[0] if tcp else None)
        assert proc.poll() is None, "daemon died during the test"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.exists(sock), "socket left behind after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def daemon_in(base: Path, *extra: str) -> Iterator[Daemon]:
    """:func:`start_daemon` with its checkpoint root and shared-memory dir made under ``base``."""
    (base / "root").mkdir()
    (base / "shm").mkdir()
    yield from start_daemon(base / "root", base / "shm", *extra)


def wait_for(condition: Callable[[], Any], what: str = "condition", timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it is true (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def report_of(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> dict:
    """The JSON a client process writes to ``out`` (then it blocks on stdin); fails if it exits first."""

    def written() -> bool:
        if proc.poll() is not None and not out.exists():
            raise AssertionError(f"client process exited with {proc.returncode} before reporting")
        return out.exists()

    wait_for(written, "the client's report", timeout)
    return json.loads(out.read_text())


def cached_entry(client: Any, path: Path) -> dict:
    """The daemon's one entry for ``path`` (``Client.checkpoints()``), symlinks resolved."""
    matches = [c for c in client.checkpoints() if os.path.realpath(c["path"]) == os.path.realpath(path)]
    assert len(matches) == 1, client.checkpoints()
    return matches[0]
