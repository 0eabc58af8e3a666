"""Arenas: one block of memory per (checkpoint, device), storages at aligned offsets.

A CPU arena is an anonymous shared-memory file (``memfd``) mapped into this process;
its descriptor is what another process needs to map the same pages. Arenas on other
devices (CUDA and any device torch knows) are one device allocation each, filled through
a host staging buffer. Tensors built on an arena keep it alive; nothing needs freeing by
hand, but :meth:`Arena.close` drops the descriptor early.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
from collections.abc import Iterable
from types import TracebackType

import torch

ALIGNMENT = 64


def align(offset: int, alignment: int = ALIGNMENT) -> int:
    """Round ``offset`` up to a multiple of ``alignment``.

    >>> align(65)
    128
    """
    return (offset + alignment - 1) // alignment * alignment


def pack(sizes: Iterable[int]) -> tuple[list[int], int]:
    """Offsets of blocks of ``sizes`` laid out in order, each at an aligned offset, and the
    bytes the whole layout spans: how storages sit in an arena.

    >>> pack([10, 3, 100])
    ([0, 64, 128], 228)
    """
    offsets: list[int] = []
    total = 0
    for size in sizes:
        total = align(total)
        offsets.append(total)
        total += size
    return offsets, total


def host_view(address: int, nbytes: int) -> memoryview:
    """``nbytes`` of host memory at ``address`` as a writable byte view, without a copy
    (valid while whatever owns the memory lives)."""
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class Arena:
    """Memory on one device holding storages at offsets; a context manager."""

    def __init__(
        self, device: torch.device, storage: torch.UntypedStorage, *, host: memoryview | None, fd: int | None
    ) -> None:
        self.device = device
        self.storage = storage
        self.nbytes = storage.nbytes()
        self._host = host
        self._fd = fd
        self.path: str | None = None  # the shared-memory file's name, for named arenas
        # CUDA: an event recorded on the stream the arena was allocated on (see device_arena)
        self.ready: torch.cuda.Event | None = None

    def view(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        """The arena's bytes ``[offset, offset + nbytes)`` as a storage that aliases it."""
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"view [{offset}, {offset + nbytes}) outside arena of {self.nbytes} bytes")
        return self.storage[offset : offset + nbytes]

    def host_bytes(self, offset: int, nbytes: int) -> memoryview:
        """``[offset, offset + nbytes)`` of a CPU arena as bytes, even after :meth:`close`
        (valid while the arena's storage lives): what is copied to a GPU.

        >>> with cpu_arena(8) as arena:
        ...     arena.host[:3] = b"abc"
        ...     arena.close()
        ...     bytes(arena.host_bytes(1, 2))
        b'bc'
        """
        if self.device.type != "cpu":
            raise ValueError(f"an arena on {self.device} has no host bytes")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) outside arena of {self.nbytes} bytes")
        return host_view(self.storage.data_ptr() + offset, nbytes)

    @property
    def host(self) -> memoryview | None:
        """Writable bytes of the arena when it is host memory, else ``None`` (fill through staging)."""
        return self._host

    @property
    def fd(self) -> int | None:
        """The shared-memory file descriptor of a CPU arena (``None`` once closed or on devices)."""
        return self._fd

    def share_fd(self) -> int:
        """A new, read-only descriptor of a CPU arena's memory, for another process to map
        copy-on-write (:func:`map_fd`); the caller closes it once passed on.

        Read-only, so a process it reaches cannot write into the shared pages (its
        copy-on-write mapping still can write into its own copy).

        >>> with cpu_arena(8) as arena:
        ...     arena.host[:2] = b"hi"
        ...     fd = arena.share_fd()
        >>> storage, mapping = map_fd(fd, 8)
        >>> os.close(fd)
        >>> bytes(storage[:2].tolist())
        b'hi'
        """
        if self._fd is None:
            raise ValueError("this arena has no descriptor (closed, empty, or not in host memory)")
        # Reopening through /proc gives a new open file description, read-only, on the same memory.
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the shared-memory descriptor; the mapping lives on while tensors use it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._host is not None:
            self._host.release()
            self._host = None

    def unlink(self) -> None:
        """Remove a named arena's file; processes that mapped it keep their pages."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None

    def __enter__(self) -> Arena:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self.unlink()


def cpu_arena(nbytes: int, *, name: str = "ckptd-arena") -> Arena:
    """A shared-memory arena on the CPU: an anonymous memory file (``memfd``, called
    ``name`` in ``/proc/*/maps``) that lives while its descriptor or any mapping of it
    does, so the kernel frees it with its last user, whoever that is and however it ends.

    >>> with cpu_arena(128) as arena:
    ...     arena.host[:2] = b"hi"
    ...     bytes(arena.view(0, 2).tolist())
    b'hi'
    """
    if nbytes == 0:
        return Arena(torch.device("cpu"), torch.UntypedStorage(0), host=memoryview(bytearray()), fd=None)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mapping = _map(fd, nbytes, shared=True)
    except OSError:
        os.close(fd)
        raise
    storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()
    return Arena(torch.device("cpu"), storage, host=memoryview(mapping), fd=fd)


def shm_arena(nbytes: int, directory: str, *, prefix: str = "ckptd-") -> Arena:
    """A CPU arena in a named shared-memory file (``directory``, usually ``/dev/shm``).

    The file is created owner-only (0600) with an unguessable name, so only processes of
    the same user can map it: the daemon's way of handing arenas to its clients. Call
    :meth:`Arena.unlink` to remove the name; mappings stay valid until unmapped.

    >>> import tempfile
    >>> with shm_arena(64, tempfile.gettempdir()) as arena:
    ...     arena.path is not None and os.stat(arena.path).st_mode & 0o777 == 0o600
    True
    """
    path = os.path.join(directory, f"{prefix}{secrets.token_hex(12)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mapping = _map(fd, nbytes, shared=True) if nbytes else None
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage() if mapping else torch.UntypedStorage(0)
    arena = Arena(torch.device("cpu"), storage, host=memoryview(mapping) if mapping else None, fd=fd)
    arena.path = path
    return arena


class _Mapping(mmap.mmap):
    """An mmap that can be weakly referenced (plain mmap objects cannot): owners learn when it dies."""

    def storage(self) -> torch.UntypedStorage:
        """The whole mapping as a storage (it keeps the mapping alive), like every opened arena."""
        return torch.frombuffer(self, dtype=torch.uint8).untyped_storage()


def map_arena(path: str, nbytes: int) -> tuple[torch.UntypedStorage, mmap.mmap]:
    """Map a shared-memory arena file copy-on-write: reads share the pages, writes stay private.

    Returns the arena as a storage and the mapping object (weakly referenceable, alive as
    long as any tensor built on the storage).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mapping = _Mapping(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mapping.storage(), mapping


def map_fd(fd: int, nbytes: int) -> tuple[torch.UntypedStorage, mmap.mmap]:
    """Map ``nbytes`` of a shared-memory descriptor (:meth:`Arena.share_fd`) copy-on-write,
    as :func:`map_arena` maps a file: reads share the pages, writes stay private. The
    descriptor may be closed once this returns; the mapping keeps the memory alive."""
    mapping = _Mapping(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mapping.storage(), mapping


def _map(fd: int, nbytes: int, *, shared: bool) -> mmap.mmap:
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def device_arena(device: torch.device, nbytes: int) -> Arena:
    """An arena on a non-CPU device (one allocation through torch), filled via host staging.

    On CUDA the block comes from torch's caching allocator on the caller's current stream,
    where kernels still pending may use it: :attr:`Arena.ready` marks that point, and the
    streams that fill the arena wait for it.
    """
    storage = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
    arena = Arena(device, storage, host=None, fd=None)
    if device.type == "cuda":
        arena.ready = torch.cuda.Event()
        arena.ready.record(torch.cuda.current_stream(device))
    return arena


def allocate(device: torch.device, nbytes: int) -> Arena:
    """An arena of ``nbytes`` on ``device``: shared memory for the CPU, device memory otherwise."""
    if device.type == "cpu":
        return cpu_arena(nbytes)
    return device_arena(device, nbytes)
