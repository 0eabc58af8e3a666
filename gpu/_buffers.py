"""What the device layer's modules share: a GPU's identity, one device allocation, host memory
owned by an object, and the pool of host staging buffers.

Kept apart from the backends (``_devices``) and the readers (``_reader``) so that neither
has to import the other.
"""

from __future__ import annotations

import abc
import ctypes
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import DeviceError


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as this process sees it: ``cuda:<index>`` is the physical GPU ``uuid``."""

    index: int
    uuid: str
    name: str
    total_memory: int


class DeviceBuffer(abc.ABC):
    """One allocation on one GPU: an arena's memory. Free it with :meth:`free`."""

    def __init__(self, device: DeviceInfo, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes

    def _check(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise DeviceError(f"[{offset}, {offset + nbytes}) is outside a {self.nbytes}-byte buffer on {self.device.uuid}")

    @abc.abstractmethod
    def write(self, offset: int, data: memoryview) -> None:
        """Copy host bytes to ``offset`` (returns once they are on the device)."""

    @abc.abstractmethod
    def read(self, offset: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes at ``offset`` to host memory."""

    @abc.abstractmethod
    def copy_from(self, offset: int, source: DeviceBuffer, source_offset: int, nbytes: int) -> None:
        """Copy device to device (peer copy across GPUs), without the host; returns once
        the bytes are in place (the buffer may be exported right after)."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """An IPC handle another process opens with :meth:`Devices.open` (JSON-ready)."""

    @abc.abstractmethod
    def free(self) -> None:
        """Release the memory (idempotent); processes that opened it keep their mapping."""

    def share_fd(self) -> int:
        """A new file descriptor for this memory, for buffers whose handle says ``"fd": true``
        (the daemon passes it over its descriptor socket, then closes it)."""
        raise DeviceError(f"a buffer on {self.device.uuid} is shared by handle, not by file descriptor")


class HostCounter:
    """Bytes of host memory held right now by :func:`owned_host_memory` views (thread-safe).

    >>> counter = HostCounter(); counter.add(3); counter.add(-1); counter.bytes
    2
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes


def owned_host_memory(address: int, nbytes: int, release: Callable[[], None], counter: HostCounter,
                      *, pinned: bool, keep: object = None) -> memoryview:
    """``nbytes`` at ``address`` as a writable byte view that owns the memory: ``release``
    runs once no view of it is left, and ``counter`` counts the bytes until then.

    ``keep`` is kept alive as long as the memory (a Python object backing it). Whether the
    memory is pinned travels with it: :func:`is_pinned`.

    >>> backing = bytearray(4); counter = HostCounter()
    >>> view = owned_host_memory(ctypes.addressof(ctypes.c_char.from_buffer(backing)), 4, lambda: None, counter,
    ...                          pinned=False, keep=backing)
    >>> counter.bytes, len(view), is_pinned(view)
    (4, 4, False)
    >>> del view; counter.bytes
    0
    """
    # a subclass of the ctypes array type: it takes attributes and weak references
    array = type("HostBytes", (ctypes.c_char * max(nbytes, 1),), {}).from_address(address)
    array.pinned = pinned
    array.keep = keep
    counter.add(nbytes)

    def done() -> None:
        counter.add(-nbytes)
        release()

    weakref.finalize(array, done)
    return memoryview(array).cast("B")[:nbytes]


def is_pinned(view: memoryview) -> bool:
    """Whether ``view`` is page-locked host memory ckptd allocated (host → device without a copy)."""
    return bool(getattr(view.obj, "pinned", False))


class StagingPool:
    """Host staging buffers made once (pinned for CUDA) and lent to reader threads, one
    chunk at a time.

    Pinning is slow and pinned memory is scarce, so the buffers are allocated on first
    use and reused by every load; a borrower waits while all are lent. Borrowers give a
    buffer back after each chunk, so concurrent fills share the pool instead of
    splitting it (a fill that kept its buffers to the end could wait forever on another).

    >>> pool = StagingPool(lambda n: memoryview(bytearray(n)), count=2, nbytes=16)
    >>> with pool.lend() as a:
    ...     len(a), pool.count
    (16, 2)
    """

    def __init__(self, make: Callable[[int], memoryview], *, count: int, nbytes: int) -> None:
        if count < 1 or nbytes < 1:
            raise DeviceError(f"a staging pool needs at least one buffer of at least one byte, not {count} of {nbytes}")
        self.count = count
        self.nbytes = nbytes
        self._free: queue.LifoQueue[memoryview] = queue.LifoQueue()
        for _ in range(count):
            self._free.put(make(nbytes))

    def take(self) -> memoryview:
        """A buffer of :attr:`nbytes`; blocks while every buffer is lent."""
        return self._free.get()

    def give(self, buffer: memoryview) -> None:
        """Return a buffer :meth:`take` lent."""
        self._free.put(buffer)

    def lend(self) -> _Lent:
        """``with pool.lend() as buffer:`` a buffer for one chunk, given back at the end."""
        return _Lent(self)


class _Lent:
    def __init__(self, pool: StagingPool) -> None:
        self._pool = pool
        self._buffer: memoryview | None = None

    def __enter__(self) -> memoryview:
        self._buffer = self._pool.take()
        return self._buffer

    def __exit__(self, *exc: object) -> None:
        if self._buffer is not None:
            self._pool.give(self._buffer)
            self._buffer = None
