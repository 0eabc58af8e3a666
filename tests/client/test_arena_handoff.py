"""How a client reaches a host arena of the daemon that it cannot receive over the
descriptor socket (a TCP URL on the same host): the daemon's descriptor through /proc,
accepted only if it is that very arena."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import pytest

import ckptd
from ckptd._client import open_proc_arena
from ckptd.engine import ArenaInfo
from ckptd.gpu import cpu_arena


def _arena_info(fd: int, name: str, nbytes: int) -> ArenaInfo:
    return ArenaInfo(name.removeprefix("ckptd-"), f"/proc/{os.getpid()}/fd/{fd}", nbytes, handle={"fd": True, "name": name})


def test_a_tcp_client_on_the_host_maps_the_arena_through_proc() -> None:
    name = f"ckptd-{secrets.token_hex(12)}"
    with cpu_arena(4096, name=name) as arena, ckptd.Client("http://127.0.0.1:9") as client:
        arena.host[:5] = b"hello"
        assert arena.fd is not None
        storage, mapping = client._open(_arena_info(arena.fd, name, 4096), lease="unused")
        assert bytes(storage[:5].tolist()) == b"hello"
        storage[0] = ord("j")  # copy-on-write: the arena keeps its bytes
        assert bytes(arena.host[:5]) == b"hello"
        del storage, mapping


def test_a_proc_path_naming_another_file_is_refused() -> None:
    """Another host's daemon pid, or a descriptor number reused since: not mapped."""
    other = f"ckptd-{secrets.token_hex(12)}"
    with cpu_arena(4096, name=f"ckptd-{secrets.token_hex(12)}") as arena, ckptd.Client("http://127.0.0.1:9") as client:
        assert arena.fd is not None
        with pytest.raises(FileNotFoundError, match="is not the daemon's arena"):
            client._open(_arena_info(arena.fd, other, 4096), lease="unused")
        with pytest.raises(FileNotFoundError):
            client._open(_arena_info(123456, other, 4096), lease="unused")


def test_a_proc_path_naming_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    """Another PID namespace's process at that number may hold a pipe: opening it would
    block until a writer comes (forever). The link is checked first, nothing is opened."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO with no writer
    outcome: list[BaseException | int] = []

    def open_it() -> None:
        try:
            outcome.append(open_proc_arena(f"/proc/self/fd/{reader}", f"ckptd-{secrets.token_hex(12)}"))
        except BaseException as exc:  # noqa: BLE001 - looked at below
            outcome.append(exc)

    thread = threading.Thread(target=open_it)
    thread.start()
    thread.join(timeout=10)
    try:
        assert not thread.is_alive(), "opening the FIFO blocked"
        (error,) = outcome
        assert isinstance(error, FileNotFoundError) and "is not the daemon's arena" in str(error)
    finally:
        if thread.is_alive():  # let the blocked open return, so the thread ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join()
            for fd in outcome:
                if isinstance(fd, int):
                    os.close(fd)
        os.close(reader)
