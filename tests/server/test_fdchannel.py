"""The descriptor socket: host arenas (and read-only GPU mappings) reach clients as descriptors."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptd
from ckptd._client import receive_fd
from ckptd.gpu import cpu_arena, map_fd
from ckptd.server._fdchannel import FdServer, fd_socket_path


@pytest.fixture
def sock() -> Iterator[Path]:
    sockdir = tempfile.mkdtemp(prefix="ckfd", dir="/tmp")  # Unix socket paths stay under 108 bytes
    yield Path(sockdir) / "d.sock"
    shutil.rmtree(sockdir, ignore_errors=True)


class _OutOfDescriptorsAtFirst(FdServer):
    """Its first accepts fail as they do when the daemon has no descriptor left (EMFILE)."""

    failures = 2

    def _accept(self) -> object:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()


def test_accepting_survives_running_out_of_descriptors(sock: Path) -> None:
    """Every host arena is reached through this socket: a failed accept must not end it."""
    with cpu_arena(64, name="ckptd-test") as arena:
        arena.host[:4] = b"ckpt"

        def lookup(lease: str, arena_id: str) -> int:
            if lease != "lease-1":
                raise ckptd.LeaseLostError(f"lease {lease!r} expired or was released")
            return arena.share_fd()

        server = _OutOfDescriptorsAtFirst(fd_socket_path(sock), lookup)
        try:
            fd = receive_fd(f"unix://{sock}", "lease-1", "a1")
            try:
                storage, _mapping = map_fd(fd, 64)
            finally:
                os.close(fd)
            assert bytes(storage[:4].tolist()) == b"ckpt" and server.failures == 0
            with pytest.raises(ckptd.LeaseLostError):
                receive_fd(f"unix://{sock}", "lease-2", "a1")
        finally:
            server.close()
    assert not os.path.exists(fd_socket_path(sock))
