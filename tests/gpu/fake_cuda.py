"""Stand-ins for cupy and the CUDA driver, for the CUDA backend's tests on a machine without a GPU.

They model what the real ones do where the backend's correctness depends on it, after
cupy 14's source and the CUDA documentation:

- ``getDeviceProperties()['uuid']`` is built from a ``char[16]`` by a C-string
  conversion: it stops at the first zero byte;
- ``memcpyAsync``/``memcpyPeerAsync`` run when their stream is synchronised;
  ``cudaMemcpyPeer`` is asynchronous to the host too (it runs on the legacy default stream,
  here only at ``deviceSynchronize``);
- cupy's ``alloc_pinned_memory`` goes through its pinned pool: each request rounded up to
  a power of two, freed blocks kept;
- VMM memory is reachable only from the devices ``cuMemSetAccess`` granted;
- ``cudaMalloc`` past a GPU's memory fails with ``cudaErrorMemoryAllocation``.

Device memory is host ``bytearray``s at made-up addresses; host addresses are real.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.abc
import importlib.machinery
import itertools
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

OUT_OF_MEMORY = 2
ILLEGAL_ADDRESS = 700


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"fake CUDA error {status}")
        self.status = status


@dataclass
class Allocation:
    device: int
    memory: bytearray
    vmm: bool = False
    access: set[int] = field(default_factory=set)


def _value(x: Any) -> int:
    return int(x.value) if hasattr(x, "value") else int(x)


class FakeGpus:
    """The GPUs (their memory) that the fake runtime and driver share."""

    def __init__(self, uuids: list[bytes], memory: int = 1 << 22) -> None:
        self.uuids, self.memory = uuids, memory
        self.allocations: dict[int, Allocation] = {}
        self.used = [0] * len(uuids)
        self.current = 0
        self.legacy: list[Callable[[], None]] = []  # work on the legacy default stream
        self.host: dict[int, ctypes.Array] = {}  # cudaHostAlloc'd buffers by address
        self.host_allocs: list[int] = []  # bytes asked of cudaHostAlloc, call by call
        self.host_frees = 0
        self._addresses = itertools.count(0x7F0000000000, 1 << 32)

    def new_address(self) -> int:
        return next(self._addresses)

    def find(self, ptr: int, nbytes: int) -> tuple[Allocation, int]:
        for base, allocation in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + len(allocation.memory):
                return allocation, ptr - base
        raise CUDARuntimeError(ILLEGAL_ADDRESS)

    def touch(self, ptr: int, nbytes: int, device: int) -> tuple[bytearray, int]:
        """Device ``device`` reaches ``[ptr, ptr + nbytes)``: VMM memory only where granted."""
        allocation, offset = self.find(ptr, nbytes)
        if allocation.vmm and device not in allocation.access:
            raise CUDARuntimeError(ILLEGAL_ADDRESS)
        return allocation.memory, offset

    def bytes_at(self, ptr: int, nbytes: int) -> bytes:
        allocation, offset = self.find(ptr, nbytes)
        return bytes(allocation.memory[offset : offset + nbytes])


class FakeStream:
    def __init__(self, gpus: FakeGpus, streams: dict[int, FakeStream]) -> None:
        self.gpus, self.device = gpus, gpus.current
        self.pending: list[Callable[[], None]] = []
        self.ptr = gpus.new_address()
        streams[self.ptr] = self

    def synchronize(self) -> None:
        work, self.pending = self.pending, []
        for job in work:
            job()


def make_cupy(gpus: FakeGpus) -> types.ModuleType:
    """A module that stands in for ``cupy`` over ``gpus``."""
    streams: dict[int, FakeStream] = {}
    rt = types.SimpleNamespace(
        CUDARuntimeError=CUDARuntimeError, memcpyHostToDevice=1, memcpyDeviceToHost=2, hostAllocPortable=1
    )

    def queue(stream_ptr: int, job: Callable[[], None]) -> None:
        streams[stream_ptr].pending.append(job)

    def malloc(nbytes: int) -> int:
        if gpus.used[gpus.current] + nbytes > gpus.memory:
            raise CUDARuntimeError(OUT_OF_MEMORY)
        gpus.used[gpus.current] += nbytes
        ptr = gpus.new_address()
        gpus.allocations[ptr] = Allocation(gpus.current, bytearray(nbytes))
        return ptr

    def free(ptr: int) -> None:
        if ptr:  # free(0): makes the primary context current
            allocation = gpus.allocations.pop(ptr)
            gpus.used[allocation.device] -= len(allocation.memory)

    def memcpyAsync(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:  # noqa: N802
        device = streams[stream].device
        if kind == rt.memcpyHostToDevice:

            def h2d() -> None:
                memory, offset = gpus.touch(dst, nbytes, device)
                memory[offset : offset + nbytes] = ctypes.string_at(src, nbytes)

            queue(stream, h2d)
        else:

            def d2h() -> None:
                memory, offset = gpus.touch(src, nbytes, device)
                ctypes.memmove(dst, bytes(memory[offset : offset + nbytes]), nbytes)

            queue(stream, d2h)

    def memcpy(dst: int, src: int, nbytes: int, kind: int) -> None:
        stream = FakeStream(gpus, streams)
        memcpyAsync(dst, src, nbytes, kind, stream.ptr)
        stream.synchronize()

    def peer(dst: int, dst_device: int, src: int, src_device: int, nbytes: int) -> Callable[[], None]:
        def job() -> None:
            source, source_offset = gpus.touch(src, nbytes, dst_device)  # the destination's copy engine reads
            target, target_offset = gpus.touch(dst, nbytes, dst_device)
            target[target_offset : target_offset + nbytes] = source[source_offset : source_offset + nbytes]

        return job

    def memcpyPeerAsync(dst: int, dst_device: int, src: int, src_device: int, nbytes: int, stream: int) -> None:  # noqa: N802
        queue(stream, peer(dst, dst_device, src, src_device, nbytes))

    def memcpyPeer(dst: int, dst_device: int, src: int, src_device: int, nbytes: int) -> None:  # noqa: N802
        gpus.legacy.append(peer(dst, dst_device, src, src_device, nbytes))  # asynchronous to the host

    def deviceSynchronize() -> None:  # noqa: N802
        work, gpus.legacy = gpus.legacy, []
        for job in work:
            job()

    def hostAlloc(nbytes: int, flags: int) -> int:  # noqa: N802
        buffer = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buffer)
        gpus.host[address] = buffer
        gpus.host_allocs.append(nbytes)
        return address

    def freeHost(ptr: int) -> None:  # noqa: N802
        del gpus.host[ptr]
        gpus.host_frees += 1

    def getDeviceProperties(index: int) -> dict[str, Any]:  # noqa: N802
        return {
            "uuid": gpus.uuids[index].split(b"\0")[0],  # cupy: std::string from a char[16]
            "name": b"Fake GPU",
            "totalGlobalMem": gpus.memory,
            "pciDomainID": 0,
            "pciBusID": index,
            "pciDeviceID": 0,
        }

    rt.__dict__.update(
        malloc=malloc, free=free, memcpyAsync=memcpyAsync, memcpy=memcpy, memcpyPeerAsync=memcpyPeerAsync,
        memcpyPeer=memcpyPeer, deviceSynchronize=deviceSynchronize, hostAlloc=hostAlloc, freeHost=freeHost,
        getDeviceProperties=getDeviceProperties, getDeviceCount=lambda: len(gpus.uuids),
        ipcGetMemHandle=lambda ptr: bytes(64),
    )

    pool: list[int] = []  # cupy's pinned pool keeps what it hands out

    def alloc_pinned_memory(nbytes: int) -> Any:
        rounded = 1 << max(0, (nbytes - 1).bit_length())  # cupy's pool rounds up to a power of two
        address = hostAlloc(rounded, 0)
        pool.append(address)
        array = type("PinnedMemoryPointer", (ctypes.c_char * rounded,), {}).from_address(address)
        array.ptr = address
        return array

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        before, gpus.current = gpus.current, index
        try:
            yield
        finally:
            gpus.current = before

    cuda = types.SimpleNamespace(
        runtime=rt, Device=device, Stream=lambda non_blocking=False: FakeStream(gpus, streams),
        alloc_pinned_memory=alloc_pinned_memory,
    )
    module = types.ModuleType("cupy")
    module.cuda = cuda  # type: ignore[attr-defined]
    module.__version__ = "14.0.0-fake"  # type: ignore[attr-defined]
    return module


class FakeDriver:
    """A stand-in for ``libcuda`` over ``gpus`` (the calls ckptd makes, by ctypes)."""

    def __init__(self, gpus: FakeGpus) -> None:
        self.gpus = gpus
        self.handles: dict[int, tuple[int, int]] = {}  # handle -> (device, size)
        self.calls: list[str] = []
        self._handles = itertools.count(1)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("cu"):
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)

    def cuInit(self, flags: int) -> int:  # noqa: N802
        return 0

    def cuGetErrorName(self, result: int, name: Any) -> int:  # noqa: N802
        name._obj.value = f"FAKE_ERROR_{result}".encode()
        return 0

    def cuDeviceGetCount(self, count: Any) -> int:  # noqa: N802
        count._obj.value = len(self.gpus.uuids)
        return 0

    def cuDeviceGet(self, device: Any, ordinal: int) -> int:  # noqa: N802
        device._obj.value = _value(ordinal)
        return 0

    def cuDeviceGetUuid_v2(self, uuid: Any, device: Any) -> int:  # noqa: N802
        ctypes.memmove(uuid._obj, self.gpus.uuids[_value(device)], 16)
        return 0

    def cuDeviceGetName(self, name: Any, length: Any, device: Any) -> int:  # noqa: N802
        name.value = f"Fake GPU {_value(device)}".encode()[: _value(length) - 1]
        return 0

    def cuDeviceTotalMem_v2(self, total: Any, device: Any) -> int:  # noqa: N802
        total._obj.value = self.gpus.memory
        return 0

    def cuMemGetAllocationGranularity(self, size: Any, prop: Any, option: int) -> int:  # noqa: N802
        size._obj.value = 4096
        return 0

    def cuMemCreate(self, handle: Any, size: Any, prop: Any, flags: Any) -> int:  # noqa: N802
        device = prop._obj.location.id
        if self.gpus.used[device] + _value(size) > self.gpus.memory:
            return OUT_OF_MEMORY
        self.gpus.used[device] += _value(size)
        handle._obj.value = next(self._handles)
        self.handles[handle._obj.value] = (device, _value(size))
        return 0

    def cuMemAddressReserve(self, ptr: Any, size: Any, alignment: Any, address: Any, flags: Any) -> int:  # noqa: N802
        ptr._obj.value = self.gpus.new_address()
        return 0

    def cuMemMap(self, ptr: Any, size: Any, offset: Any, handle: Any, flags: Any) -> int:  # noqa: N802
        device, nbytes = self.handles[_value(handle)]
        self.gpus.allocations[_value(ptr)] = Allocation(device, bytearray(nbytes), vmm=True)
        return 0

    def cuMemSetAccess(self, ptr: Any, size: Any, desc: Any, count: Any) -> int:  # noqa: N802
        self.gpus.allocations[_value(ptr)].access.add(desc._obj.location.id)
        return 0

    def cuMemUnmap(self, ptr: Any, size: Any) -> int:  # noqa: N802
        allocation = self.gpus.allocations.pop(_value(ptr), None)
        if allocation is not None:
            self.gpus.used[allocation.device] -= len(allocation.memory)
        return 0

    def cuMemAddressFree(self, ptr: Any, size: Any) -> int:  # noqa: N802
        return 0

    def cuMemRelease(self, handle: Any) -> int:  # noqa: N802
        self.handles.pop(_value(handle), None)
        return 0


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the fake as ``cupy`` and records each time it is imported."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.imports = module, 0

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name == "cupy" else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        self.imports += 1
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@dataclass
class FakeCuda:
    gpus: FakeGpus
    cupy: types.ModuleType
    driver: FakeDriver
    finder: _Finder

    @property
    def cupy_imported(self) -> bool:
        return self.finder.imports > 0


def install(monkeypatch: Any, uuids: list[bytes], memory: int = 1 << 22) -> FakeCuda:
    """Make ``import cupy`` give the fake and ``libcuda`` the fake driver (undone by ``monkeypatch``)."""
    gpus = FakeGpus(uuids, memory)
    fake = FakeCuda(gpus, make_cupy(gpus), FakeDriver(gpus), _Finder(types.ModuleType("cupy")))
    fake.finder.module = fake.cupy
    # setitem first so that undoing restores (or removes) whatever ``cupy`` was, then
    # delitem so that ``import cupy`` reaches the finder and is counted
    monkeypatch.setitem(sys.modules, "cupy", fake.cupy)
    monkeypatch.delitem(sys.modules, "cupy")
    monkeypatch.setattr(sys, "meta_path", [fake.finder, *sys.meta_path])
    try:
        from ckptd.gpu import _driver
    except ImportError:  # a tree without the driver module: cupy alone tells identity there
        return fake
    monkeypatch.setattr(_driver, "_lib", fake.driver)
    return fake
