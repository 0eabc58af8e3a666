"""CUDA virtual memory management through the driver API (ctypes on ``libcuda``).

The daemon allocates an arena with ``cuMemCreate`` (exportable as a POSIX file
descriptor), maps it read-write for itself, and exports a descriptor per client; a
client imports the descriptor and maps the same physical memory *read-only*, so a worker
that writes into a served tensor faults in its own context instead of corrupting the
cache or its neighbours. cupy's runtime makes each device's primary context current;
the driver calls here run in it.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

from ._errors import DeviceError

_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_ON_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_READ = 1  # CU_MEM_ACCESS_FLAGS_PROT_READ
_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_RECOMMENDED = 1  # CU_MEM_ALLOC_GRANULARITY_RECOMMENDED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_driver: Any = None


def driver() -> Any:
    """``libcuda`` (loaded once); :class:`DeviceError` where there is none."""
    global _driver
    if _driver is None:
        try:
            _driver = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise DeviceError(f"CUDA virtual memory management needs the driver library: {exc}") from exc
    return _driver


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        driver().cuGetErrorName(result, ctypes.byref(name))
        raise DeviceError(f"{call} failed: {(name.value or b'?').decode()} ({result})")


def _prop(ordinal: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _PINNED
    prop.requestedHandleTypes = _POSIX_FD
    prop.location = _Location(_ON_DEVICE, ordinal)
    return prop


def granularity(ordinal: int) -> int:
    """The allocation size unit on GPU ``ordinal`` (usually 2 MiB)."""
    size = ctypes.c_size_t()
    prop = _prop(ordinal)
    _check(driver().cuMemGetAllocationGranularity(ctypes.byref(size), ctypes.byref(prop), _GRANULARITY_RECOMMENDED),
           "cuMemGetAllocationGranularity")
    return size.value


def _map(handle: ctypes.c_ulonglong, size: int, ordinal: int, flags: int) -> int:
    """Reserve an address range, map ``handle`` there, grant ``flags`` access on ``ordinal``."""
    lib = driver()
    ptr = ctypes.c_ulonglong()
    _check(lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0), ctypes.c_ulonglong(0),
                                   ctypes.c_ulonglong(0)), "cuMemAddressReserve")
    try:
        _check(lib.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle, ctypes.c_ulonglong(0)), "cuMemMap")
        access = _AccessDesc(_Location(_ON_DEVICE, ordinal), flags)
        _check(lib.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1)), "cuMemSetAccess")
    except DeviceError:
        lib.cuMemUnmap(ptr, ctypes.c_size_t(size))
        lib.cuMemAddressFree(ptr, ctypes.c_size_t(size))
        raise
    return ptr.value


def _unmap(ptr: int, size: int, handle: int) -> None:
    lib = driver()
    lib.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size))
    lib.cuMemAddressFree(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size))
    lib.cuMemRelease(ctypes.c_ulonglong(handle))


class VmmAllocation:
    """Physical memory on GPU ``ordinal``, mapped read-write here, exportable as descriptors."""

    def __init__(self, ordinal: int, nbytes: int) -> None:
        unit = granularity(ordinal)
        self.size = max(unit, -(-nbytes // unit) * unit)
        self.ordinal = ordinal
        handle = ctypes.c_ulonglong()
        prop = _prop(ordinal)
        _check(driver().cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(self.size), ctypes.byref(prop), ctypes.c_ulonglong(0)),
               "cuMemCreate")
        self._handle = handle.value
        try:
            self.ptr = _map(handle, self.size, ordinal, _READ_WRITE)
        except DeviceError:
            driver().cuMemRelease(handle)
            raise

    def export_fd(self) -> int:
        """A new file descriptor for this memory (the caller sends it, then closes it)."""
        fd = ctypes.c_int(-1)
        _check(driver().cuMemExportToShareableHandle(ctypes.byref(fd), ctypes.c_ulonglong(self._handle), _POSIX_FD,
                                                     ctypes.c_ulonglong(0)), "cuMemExportToShareableHandle")
        return fd.value

    def free(self) -> None:
        if self.ptr:
            _unmap(self.ptr, self.size, self._handle)
            self.ptr = 0


class ReadOnlyMapping:
    """Memory imported from a descriptor and mapped read-only; unmapped when garbage-collected."""

    def __init__(self, fd: int, size: int, ordinal: int) -> None:
        handle = ctypes.c_ulonglong()
        _check(driver().cuMemImportFromShareableHandle(ctypes.byref(handle), ctypes.c_void_p(fd), _POSIX_FD),
               "cuMemImportFromShareableHandle")
        try:
            self.ptr = _map(handle, size, ordinal, _READ)
        except DeviceError:
            driver().cuMemRelease(handle)
            raise
        self.size = size
        self.ordinal = ordinal
        weakref.finalize(self, _unmap, self.ptr, size, handle.value)
