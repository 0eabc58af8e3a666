"""A ``write()`` stopped midway, on demand: its source buffer's second part is memory that
userfaultfd holds back until :meth:`StalledWrite.release` (Linux x86-64; root or
``vm.unprivileged_userfaultfd=1``, else :class:`StallUnavailable`).

The kernel updates the file's ctime as the write begins and copies the bytes after, all
under the inode's lock; stopped in the copy, the write leaves the file half old, half new,
with no further change to come until it is released: the state a writer preempted in the
middle of a ``write()`` leaves for as long as it is off the CPU.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import select
import struct
import threading

__all__ = ["StallUnavailable", "StalledWrite", "blocked_in_syscall"]

_NR_USERFAULTFD = 323  # x86-64
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
_MODE_MISSING = 1
_PAGE = mmap.PAGESIZE


class StallUnavailable(Exception):
    """userfaultfd is not available here (architecture, permissions)."""


class StalledWrite:
    """``os.pwrite(fd, data, offset)`` in a thread, stopped after its first ``stall_at``
    bytes (a page multiple) until :meth:`release`; :meth:`wait_stalled` returns once it is."""

    def __init__(self, fd: int, data: bytes, offset: int, stall_at: int) -> None:
        if platform.machine() != "x86_64":
            raise StallUnavailable(f"userfaultfd numbers here are x86-64's, not {platform.machine()}'s")
        libc = ctypes.CDLL(None, use_errno=True)
        self._uffd = libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self._uffd < 0:
            raise StallUnavailable(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
        size = -(-len(data) // _PAGE) * _PAGE
        self._buf = mmap.mmap(-1, size)
        self._src = ctypes.create_string_buffer(data.ljust(size, b"\0"), size)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._size, self._stall_at = size, stall_at
        try:
            fcntl.ioctl(self._uffd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, 0, 0)))
            fcntl.ioctl(self._uffd, _UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", self._addr, size, _MODE_MISSING, 0)))
        except OSError as exc:
            os.close(self._uffd)
            raise StallUnavailable(f"userfaultfd refused: {exc}") from exc
        self._copy(0, stall_at)
        self.written: int | None = None
        self._thread = threading.Thread(target=self._write, args=(fd, len(data), offset), name="stalled-write")
        self._thread.start()

    def _copy(self, start: int, length: int) -> None:
        """Fill ``length`` bytes of the held-back buffer from the data (waking a faulting write)."""
        if length:
            arg = struct.pack("QQQQq", self._addr + start, ctypes.addressof(self._src) + start, length, 0, 0)
            fcntl.ioctl(self._uffd, _UFFDIO_COPY, bytearray(arg))

    def _write(self, fd: int, nbytes: int, offset: int) -> None:
        self.written = os.pwrite(fd, memoryview(self._buf)[:nbytes], offset)

    def wait_stalled(self, timeout: float = 10.0) -> None:
        """Return once the write has reached the held-back memory (it is stopped there)."""
        ready, _, _ = select.select([self._uffd], [], [], timeout)
        if not ready:
            raise AssertionError(f"the write did not reach the held-back memory within {timeout}s")

    def release(self) -> None:
        """Let the write finish; wait for it."""
        self._copy(self._stall_at, self._size - self._stall_at)
        self._thread.join()
        os.close(self._uffd)


def blocked_in_syscall(thread: threading.Thread, numbers: set[int]) -> bool:
    """Whether ``thread`` is asleep inside one of the system calls ``numbers`` (``/proc``'s view)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            fields = f.read().split()
    except OSError:  # ended
        return False
    return bool(fields) and fields[0] in {str(n) for n in numbers}
