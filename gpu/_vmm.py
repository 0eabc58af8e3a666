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

from ._driver import check as _check
from ._driver import driver
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

    def grant(self, ordinal: int, *, write: bool = False) -> None:
        """Let GPU ``ordinal`` read (or also write) this memory: a peer copy runs on one
        device's copy engine, and VMM memory is reachable only from devices granted access."""
        if ordinal == self.ordinal:
            return
        access = _AccessDesc(_Location(_ON_DEVICE, ordinal), _READ_WRITE if write else _READ)
        _check(driver().cuMemSetAccess(ctypes.c_ulonglong(self.ptr), ctypes.c_size_t(self.size), ctypes.byref(access),
                                       ctypes.c_size_t(1)), "cuMemSetAccess")

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
