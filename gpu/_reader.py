"""Streaming storages from a checkpoint file into arenas with parallel positional reads.

Each storage is split into chunks of at most ``chunk_bytes``; a pool of threads reads the
chunks with ``preadv`` (which releases the GIL) straight into the arena when it is host
memory (or copy it inside the kernel with ``sendfile`` into a shared-memory arena), or into a per-thread host staging buffer that is then copied to the device
arena. No CPU tensor is built and then moved, and nothing synchronises per tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ckptd.formats import FileSource, Source

from ._arena import Arena, host_view

if TYPE_CHECKING:
    from ._buffers import DeviceBuffer, StagingPool

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = min(8, max(2, os.cpu_count() or 2))

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Copy:
    """Copy ``nbytes`` from ``file_offset`` in the source to ``arena_offset`` in the arena."""

    file_offset: int
    arena_offset: int
    nbytes: int


def chunks(copies: Iterable[Copy], chunk_bytes: int) -> Iterator[Copy]:
    """Split copies into pieces of at most ``chunk_bytes`` so threads share big storages.

    >>> [c.nbytes for c in chunks([Copy(0, 0, 10)], 4)]
    [4, 4, 2]
    """
    for copy in copies:
        for start in range(0, copy.nbytes, chunk_bytes):
            n = min(chunk_bytes, copy.nbytes - start)
            yield Copy(copy.file_offset + start, copy.arena_offset + start, n)


def fill(
    source: Source,
    arena: Arena,
    copies: Iterable[Copy],
    *,
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
) -> None:
    """Read every copy from ``source`` into ``arena``; returns when all bytes are in place.

    >>> from ckptd.formats import open_source
    >>> from ckptd.gpu import allocate
    >>> arena = allocate(torch.device("cpu"), 4)
    >>> fill(open_source(b"abcdef"), arena, [Copy(2, 0, 4)])
    >>> bytes(arena.view(0, 4).tolist())
    b'cdef'
    """
    work = sorted(chunks(copies, chunk_bytes), key=lambda c: c.file_offset)
    if not work:
        return
    if threads <= 1 or len(work) == 1 or source.fileno() is None:
        threads = 1  # in-memory and stream sources gain nothing from threads
    with _stepper(source, arena, chunk_bytes) as step:
        if threads == 1:
            for copy in work:
                step(source, copy)
                if progress:
                    progress(copy.nbytes)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptd-read") as pool:
            for copy in pool.map(lambda c: (step(source, c), c)[1], work):
                if progress:
                    progress(copy.nbytes)


@contextlib.contextmanager
def _stepper(source: Source, arena: Arena, chunk_bytes: int) -> Iterator[Callable[[Source, Copy], None]]:
    """The fastest way to move one chunk here: kernel copy, read into host memory, or staging."""
    if arena.fd is not None and isinstance(source, FileSource):
        with _kernel_copy_step(arena.fd, _host_step(arena)) as step:
            yield step
    elif arena.host is not None:
        yield _host_step(arena)
    else:
        yield _staged_step(arena, chunk_bytes)


@contextlib.contextmanager
def _kernel_copy_step(
    arena_fd: int, fallback: Callable[[Source, Copy], None]
) -> Iterator[Callable[[Source, Copy], None]]:
    """Copy file → shared-memory arena inside the kernel (``sendfile``).

    The kernel writes the arena's pages directly, without faulting them into this
    process's mapping one by one: about a third less CPU than ``preadv`` into the
    mapping. ``sendfile`` writes at the output's file position, so each thread gets its
    own open file description of the arena (through ``/proc/self/fd``) to seek.
    Where the kernel refuses (old kernels, odd files), the chunk is read normally.
    """
    local = threading.local()
    opened: list[int] = []
    lock = threading.Lock()

    def step(source: Source, copy: Copy) -> None:
        out = getattr(local, "fd", None)
        if out is None:
            out = local.fd = os.open(f"/proc/self/fd/{arena_fd}", os.O_RDWR | os.O_CLOEXEC)
            with lock:
                opened.append(out)
        try:
            os.lseek(out, copy.arena_offset, os.SEEK_SET)
            assert isinstance(source, FileSource)
            source.send(out, copy.file_offset, copy.nbytes)
        except OSError as exc:
            logger.debug("sendfile refused (%s); reading the chunk instead", exc)
            fallback(source, copy)

    try:
        yield step
    finally:
        for fd in opened:
            os.close(fd)


def _host_step(arena: Arena) -> Callable[[Source, Copy], None]:
    host = arena.host
    assert host is not None

    def step(source: Source, copy: Copy) -> None:
        source.readinto(host[copy.arena_offset : copy.arena_offset + copy.nbytes], copy.file_offset)

    return step


def _staged_step(arena: Arena, chunk_bytes: int) -> Callable[[Source, Copy], None]:
    """Read into a host staging buffer per thread, then copy it to the device arena.

    On CUDA the staging buffer is pinned and each thread copies on its own stream, so
    while one thread's chunk crosses the bus the others read theirs; a thread waits for
    its own copy only before reusing its buffer. The arena came from torch's caching
    allocator on the caller's current stream, where kernels may still be using the block
    it reuses: each side stream first waits for that stream (:attr:`Arena.ready`), and
    the arena is recorded on each side stream that writes it, as torch's CUDA semantics
    ask of memory used on a stream it was not allocated on. Without pinning (refused, or
    another device) the buffer is plain host memory.
    """
    local = threading.local()
    target = torch.empty(0, dtype=torch.uint8, device=arena.device).set_(arena.storage)
    cuda = arena.device.type == "cuda"

    def step(source: Source, copy: Copy) -> None:
        staging = getattr(local, "staging", None)
        if staging is None:
            staging = local.staging = _staging_tensor(chunk_bytes, pinned=cuda)
            local.stream = _side_stream(arena, target) if cuda else None
        source.readinto(host_view(staging.data_ptr(), copy.nbytes), copy.file_offset)
        destination = target[copy.arena_offset : copy.arena_offset + copy.nbytes]
        if local.stream is None:
            destination.copy_(staging[: copy.nbytes])
            return
        with torch.cuda.stream(local.stream):
            destination.copy_(staging[: copy.nbytes], non_blocking=True)
        local.stream.synchronize()  # this thread's buffer is free again; other threads kept reading

    return step


def _side_stream(arena: Arena, target: torch.Tensor) -> torch.cuda.Stream:
    """A new stream on the arena's GPU, ordered after the work pending where the arena was
    allocated, with the arena recorded on it."""
    stream = torch.cuda.Stream(arena.device)
    if arena.ready is not None:
        stream.wait_event(arena.ready)
    target.record_stream(stream)
    return stream


def _staging_tensor(nbytes: int, *, pinned: bool) -> torch.Tensor:
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            logger.warning("pinning a %d-byte staging buffer failed (%s); staging through pageable memory", nbytes, exc)
    return torch.empty(nbytes, dtype=torch.uint8)


def fill_device(
    source: Source,
    buffer: DeviceBuffer,
    copies: Iterable[Copy],
    *,
    staging: StagingPool,
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Stream file ranges into a GPU buffer: for each chunk a reader thread borrows a host
    staging buffer from ``staging`` (pinned for CUDA, made once), reads the chunk into it,
    copies it to the device and gives the buffer back.

    >>> import tempfile
    >>> from ckptd.formats import open_source
    >>> from ckptd.gpu import SimulatedDevices
    >>> gpus = SimulatedDevices(1, tempfile.mkdtemp())
    >>> buf = gpus.allocate(gpus.visible()[0].uuid, 4)
    >>> fill_device(open_source(b"abcdef"), buf, [Copy(1, 0, 4)], staging=gpus.staging)
    >>> out = memoryview(bytearray(4)); buf.read(0, out); bytes(out)
    b'bcde'
    >>> buf.free()
    """
    work = sorted(chunks(copies, min(chunk_bytes, staging.nbytes)), key=lambda c: c.file_offset)
    if not work:
        return
    pinned_write = getattr(buffer, "write_pinned", None)

    def step(copy: Copy) -> None:
        # One buffer per chunk, given back at once: fills running side by side share the
        # pool (holding one to the end of a fill lets two fills wait on each other forever).
        with staging.lend() as host:
            piece = host[: copy.nbytes]
            source.readinto(piece, copy.file_offset)
            if pinned_write is not None:
                pinned_write(copy.arena_offset, piece, copy.nbytes)  # the staging buffer is pinned: no extra copy
            else:
                buffer.write(copy.arena_offset, piece)

    threads = min(threads, staging.count)  # more readers than buffers would only wait
    if threads <= 1 or len(work) == 1 or source.fileno() is None:
        for copy in work:
            step(copy)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptd-gpu-read") as pool:
        list(pool.map(step, work))
