"""The CUDA driver API through ctypes on ``libcuda``: GPU identity without a context, and
the calls of CUDA virtual memory management (``_vmm``).

Identity comes from the driver because nothing else gives all of it cheaply and right:
``cuDeviceGetUuid_v2`` fills 16 raw bytes (cupy's ``getDeviceProperties()['uuid']``
passes the same ``char[16]`` through a C-string conversion that stops at the first zero
byte), and ``cuInit`` + ``cuDeviceGet*`` create no CUDA context, so a worker learning
which ordinal is which GPU pins nothing and touches no device it does not use. Ordinals
are the runtime's (both honour ``CUDA_VISIBLE_DEVICES``).

Every driver function the package calls is named in :data:`ARITY`; :func:`driver`
refuses any other name, and CI checks the table against the driver API's declarations.
"""

from __future__ import annotations

import ctypes
import threading
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from ._errors import DeviceError
from ._oom import DeviceOutOfMemoryError

# name -> number of parameters: the driver functions ckptd calls (and nothing else).
ARITY: dict[str, int] = {
    "cuInit": 1,
    "cuGetErrorName": 2,
    "cuDeviceGetCount": 1,
    "cuDeviceGet": 2,
    "cuDeviceGetUuid_v2": 2,
    "cuDeviceGetUuid": 2,
    "cuDeviceGetName": 3,
    "cuDeviceTotalMem_v2": 2,
    "cuMemGetAllocationGranularity": 3,
    "cuMemCreate": 4,
    "cuMemAddressReserve": 5,
    "cuMemMap": 5,
    "cuMemSetAccess": 4,
    "cuMemUnmap": 2,
    "cuMemAddressFree": 2,
    "cuMemRelease": 1,
    "cuMemExportToShareableHandle": 4,
    "cuMemImportFromShareableHandle": 3,
}

_lib: Any = None
_init_lock = threading.Lock()


class _Driver:
    """``libcuda`` restricted to :data:`ARITY`'s functions (a name not there is a bug)."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        if name not in ARITY:
            raise AttributeError(f"{name} is not a driver function ckptd declares (gpu/_driver.py ARITY)")
        return getattr(self._lib, name)


def driver() -> _Driver:
    """``libcuda`` (loaded once); :class:`DeviceError` where there is none."""
    global _lib
    with _init_lock:
        if _lib is None:
            try:
                _lib = ctypes.CDLL("libcuda.so.1")
            except OSError as exc:
                raise DeviceError(f"no CUDA driver library (libcuda.so.1): {exc}") from exc
        return _Driver(_lib)


def check(result: int, call: str) -> None:
    """Raise :class:`DeviceError` (:class:`DeviceOutOfMemoryError` for out of memory)
    naming the driver's error when ``result`` is not ``CUDA_SUCCESS``."""
    if result == 0:
        return
    name = ctypes.c_char_p()
    driver().cuGetErrorName(result, ctypes.byref(name))
    message = f"{call} failed: {(name.value or b'?').decode()} ({result})"
    if result == CUDA_ERROR_OUT_OF_MEMORY:
        raise DeviceOutOfMemoryError(message)
    raise DeviceError(message)


CUDA_ERROR_OUT_OF_MEMORY = 2


@dataclass(frozen=True)
class Identity:
    """What the driver says of the GPU at ``ordinal``: its 16 UUID bytes, name and memory."""

    ordinal: int
    uuid: bytes
    name: str
    total_memory: int

    @property
    def uuid_string(self) -> str:
        """``GPU-xxxxxxxx-xxxx-...``, as ``nvidia-smi -L`` prints it.

        >>> Identity(0, bytes(16), "x", 0).uuid_string
        'GPU-00000000-0000-0000-0000-000000000000'
        """
        return uuid_string(self.uuid)


def uuid_string(raw: bytes) -> str:
    """``GPU-...`` from exactly 16 raw bytes (zero bytes included); :class:`DeviceError` otherwise.

    >>> uuid_string(bytes([0, 1]) + bytes(14))
    'GPU-00010000-0000-0000-0000-000000000000'
    """
    if len(raw) != 16:
        raise DeviceError(f"a GPU UUID is 16 bytes, got {len(raw)}: {raw!r}")
    return f"GPU-{uuidlib.UUID(bytes=bytes(raw))}"


def identities() -> tuple[Identity, ...]:
    """Every GPU this process sees, by ordinal, without creating a CUDA context."""
    lib = driver()
    check(lib.cuInit(0), "cuInit")
    count = ctypes.c_int()
    check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    return tuple(_identity(lib, ordinal) for ordinal in range(count.value))


def _identity(lib: _Driver, ordinal: int) -> Identity:
    device = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
    raw = (ctypes.c_ubyte * 16)()
    try:
        result = lib.cuDeviceGetUuid_v2(ctypes.byref(raw), device)
    except AttributeError:  # a driver without the _v2 symbol: the same 16 bytes for a whole GPU
        result = lib.cuDeviceGetUuid(ctypes.byref(raw), device)
    check(result, "cuDeviceGetUuid")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, ctypes.c_int(len(name)), device), "cuDeviceGetName")
    total = ctypes.c_size_t()
    check(lib.cuDeviceTotalMem_v2(ctypes.byref(total), device), "cuDeviceTotalMem_v2")
    return Identity(ordinal, bytes(raw), name.value.decode(errors="replace"), total.value)
