"""The daemon's sockets: who may reach or replace them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptd
from ckptd.server._server import bind_unix

FOREIGN_UID = 4242  # an account that is neither this process nor root


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))  # a socket path must stay under 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("making a directory another user owns needs root")


def test_missing_socket_dir_is_made_owner_only(folder: Path) -> None:
    sock = bind_unix(folder / "run" / "d.sock")
    sock.close()
    assert (folder / "run").stat().st_mode & 0o777 == 0o700
    assert (folder / "run" / "d.sock").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_our_writable_socket_dir_gets_its_mode_fixed(folder: Path, mode: int, caplog: pytest.LogCaptureFixture) -> None:
    folder.chmod(mode)
    bind_unix(folder / "d.sock").close()
    assert folder.stat().st_mode & 0o777 == mode & ~0o022
    assert "writable by other users" in caplog.text


def test_sticky_shared_dir_is_accepted(folder: Path) -> None:
    """Like /tmp: others may write there, but only a file's owner may unlink or rename it."""
    folder.chmod(0o1777)
    bind_unix(folder / "d.sock").close()
    assert folder.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o755])
def test_foreign_socket_dir_is_refused(folder: Path, mode: int) -> None:
    _needs_root()
    os.chown(folder, FOREIGN_UID, FOREIGN_UID)
    folder.chmod(mode)
    with pytest.raises(ckptd.UsageError, match="another user"):
        bind_unix(folder / "d.sock")
    assert not (folder / "d.sock").exists()
    assert folder.stat().st_mode & 0o777 == mode  # not ours to change

