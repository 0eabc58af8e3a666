"""The device layer on the CPU: shared-memory arenas and parallel fills."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptd.formats import CheckpointError, open_source
from ckptd.gpu import Arena, Copy, align, allocate, chunks, cpu_arena, fill


def _bytes(storage: torch.UntypedStorage) -> bytes:
    return bytes(torch.empty(0, dtype=torch.uint8).set_(storage).tolist())


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return path


def test_align_rounds_up_to_64() -> None:
    assert [align(x) for x in (0, 1, 64, 65)] == [0, 64, 64, 128]


def test_chunks_cover_every_byte_once() -> None:
    pieces = list(chunks([Copy(10, 0, 100), Copy(500, 128, 7)], 32))
    covered = [(c.file_offset + i, c.arena_offset + i) for c in pieces for i in range(c.nbytes)]
    expected = [(10 + i, i) for i in range(100)] + [(500 + i, 128 + i) for i in range(7)]
    assert sorted(covered) == expected


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("chunk", [4096, 1 << 20, 64 << 20])
def test_fill_places_bytes_at_arena_offsets(blob: Path, threads: int, chunk: int) -> None:
    data = blob.read_bytes()
    copies = [Copy(0, 0, 1000), Copy(5000, 1024, 2 * 1024 * 1024), Copy(len(data) - 17, align(1024 + 2 * 1024 * 1024), 17)]
    arena = allocate(torch.device("cpu"), copies[-1].arena_offset + 17)
    with open_source(blob) as source:
        fill(source, arena, copies, threads=threads, chunk_bytes=chunk)
    for copy in copies:
        assert _bytes(arena.view(copy.arena_offset, copy.nbytes)) == data[copy.file_offset : copy.file_offset + copy.nbytes]


def test_fill_reports_progress_for_every_byte(blob: Path) -> None:
    seen: list[int] = []
    arena = allocate(torch.device("cpu"), blob.stat().st_size)
    with open_source(blob) as source:
        fill(source, arena, [Copy(0, 0, source.size)], chunk_bytes=1 << 20, progress=seen.append)
    assert sum(seen) == blob.stat().st_size and len(seen) == 4


def test_staged_fill_copies_through_host_buffers(blob: Path) -> None:
    """Arenas without host bytes (device memory) are filled through staging buffers."""
    data = blob.read_bytes()
    target = torch.zeros(len(data), dtype=torch.uint8).untyped_storage()
    arena = Arena(torch.device("cpu"), target, host=None, fd=None)
    with open_source(blob) as source:
        fill(source, arena, [Copy(0, 0, len(data))], threads=3, chunk_bytes=1 << 20)
    assert _bytes(target) == data


def test_short_file_is_a_checkpoint_error(blob: Path) -> None:
    arena = allocate(torch.device("cpu"), 100)
    with open_source(blob) as source, pytest.raises(CheckpointError, match="blob.bin"):
        fill(source, arena, [Copy(source.size - 10, 0, 100)])


def test_cpu_arena_is_shared_memory_another_process_can_map() -> None:
    """The arena's descriptor maps the very pages tensors use: writes show up both ways."""
    arena = cpu_arena(4096)
    assert arena.fd is not None
    tensor = torch.empty(0, dtype=torch.uint8).set_(arena.storage)
    tensor[:5] = torch.tensor(list(b"hello"), dtype=torch.uint8)
    code = (
        "import mmap, os, sys\n"
        "fd = int(sys.argv[1])\n"
        "m = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED)\n"
        "assert m[:5] == b'hello', m[:5]\n"
        "m[5:10] = b'world'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(arena.fd)], check=True, pass_fds=[arena.fd])
    assert bytes(tensor[:10].tolist()) == b"helloworld"
    arena.close()
    assert arena.fd is None
    assert bytes(tensor[:10].tolist()) == b"helloworld"  # the mapping outlives the descriptor


def test_arena_memory_is_not_anonymous_private() -> None:
    """A CPU arena lives in a memfd (shmem), visible in /proc/self/maps, not in the heap."""
    arena = cpu_arena(1 << 20)
    start = arena.storage.data_ptr()
    with open("/proc/self/maps") as maps:
        line = next(l for l in maps if int(l.split("-")[0], 16) <= start < int(l.split("-")[1].split()[0], 16))
    assert "memfd:ckptd-arena" in line
    arena.close()


def test_view_outside_the_arena_is_refused() -> None:
    with cpu_arena(128) as arena, pytest.raises(ValueError):
        arena.view(100, 64)


def test_empty_arena() -> None:
    arena = allocate(torch.device("cpu"), 0)
    assert arena.nbytes == 0 and arena.view(0, 0).nbytes() == 0


def test_kernel_copy_falls_back_to_reads_when_refused(blob: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sendfile into the arena is refused, chunks are read normally: same bytes."""

    def refuse(*args: object) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refuse)
    data = blob.read_bytes()
    arena = allocate(torch.device("cpu"), len(data))
    with open_source(blob) as source:
        fill(source, arena, [Copy(0, 0, len(data))], threads=2, chunk_bytes=1 << 20)
    assert _bytes(arena.storage) == data


def test_file_to_shared_memory_goes_through_the_kernel(blob: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    real = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda o, i, off, n: sent.append(n) or real(o, i, off, n))
    data = blob.read_bytes()
    arena = allocate(torch.device("cpu"), len(data))
    with open_source(blob) as source:
        fill(source, arena, [Copy(0, 0, len(data))], chunk_bytes=1 << 20)
    assert sum(sent) == len(data) and _bytes(arena.storage) == data
