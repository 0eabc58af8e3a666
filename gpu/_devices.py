"""GPU devices behind one interface: CUDA (through cupy) and simulated devices for tests.

A process names GPUs by ordinal (``cuda:0`` ...) but which physical GPU that is depends
on ``CUDA_VISIBLE_DEVICES``; between processes a GPU is named by its UUID. A
:class:`Devices` backend lists the GPUs this process sees (ordinal → UUID), allocates
one :class:`DeviceBuffer` per arena outside torch's caching allocator, moves bytes
host → device, device → host and device → device, exports a buffer as an IPC handle
(plain JSON) and opens such a handle in another process as a torch storage.

:class:`SimulatedDevices` backs each "GPU" with a shared-memory file, so the daemon's
placement, peer-copy, tiering, lease and IPC-lifecycle logic runs in CI without CUDA;
it counts every byte it moves so tests can tell a peer copy from a disk read.

Nothing here touches CUDA at import time, and making a :class:`CudaDevices` creates no
context: identity comes from the driver (``_driver``), cupy is imported on first use.

>>> import tempfile
>>> sim = SimulatedDevices(2, tempfile.mkdtemp())
>>> [d.index for d in sim.visible()], sim.visible()[1].uuid
([0, 1], 'GPU-5e1a0000-0000-4000-8000-000000000001')
"""

from __future__ import annotations

import abc
import base64
import contextlib
import ctypes
import functools
import importlib.util
import logging
import mmap
import os
import secrets
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from . import _driver, _vmm
from ._arena import map_arena
from ._buffers import DeviceBuffer, DeviceInfo, HostCounter, StagingPool, is_pinned, owned_host_memory
from ._errors import DeviceError, missing_cuda_device
from ._oom import DeviceOutOfMemoryError
from ._reader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, Copy, fill_device

logger = logging.getLogger(__name__)

__all__ = ["CudaDevices", "DeviceBuffer", "DeviceInfo", "Devices", "SimulatedDevices", "StagingPool", "local_devices"]

SIMULATED_UUID = "GPU-5e1a0000-0000-4000-8000-{:012x}"


class Devices(abc.ABC):
    """A GPU backend: the GPUs this process sees and what can be done with them.

    A client needs only :meth:`visible` (ordinal ↔ UUID), :meth:`current` and :meth:`open`;
    the staging pool is made on the first fill, so a worker that only opens what the daemon
    placed pins nothing (:attr:`pinned` counts the host bytes this backend holds pinned).
    """

    kind: str
    sharing: str  # how other processes map buffers, for ``ckptd stats``
    staging_buffers: int = DEFAULT_THREADS
    staging_bytes: int = DEFAULT_CHUNK_BYTES

    def __init__(self) -> None:
        self.pinned = HostCounter()  # pinned host bytes held now: staging pool and host-tier copies
        self._staging_lock = threading.Lock()
        self._staging: StagingPool | None = None

    @property
    def staging(self) -> StagingPool:
        """The host staging buffers, made (and pinned) on first use."""
        with self._staging_lock:
            if self._staging is None:
                self._staging = StagingPool(self.host_buffer, count=self.staging_buffers, nbytes=self.staging_bytes)
            return self._staging

    @staging.setter
    def staging(self, pool: StagingPool) -> None:
        """Use ``pool`` for staging (before the first fill; a smaller one in tests)."""
        with self._staging_lock:
            self._staging = pool

    @property
    def has_staging(self) -> bool:
        """Whether the staging pool has been made (a client's never is)."""
        return self._staging is not None

    def read_file(self, path: str, buffer: DeviceBuffer, copies: Iterable[Copy]) -> None:
        """Copy file ranges into ``buffer``: chunked reads through :attr:`staging`."""
        from ckptd.formats import open_source

        with open_source(path) as source:
            fill_device(source, buffer, list(copies), staging=self.staging)

    @abc.abstractmethod
    def current(self) -> int:
        """The calling thread's current GPU ordinal: what a bare ``"cuda"`` means now."""

    @abc.abstractmethod
    def visible(self) -> tuple[DeviceInfo, ...]:
        """The GPUs this process sees, by ordinal."""

    def by_uuid(self, uuid: str) -> DeviceInfo:
        """The visible GPU with this UUID; :class:`DeviceError` if it is not one of them."""
        for device in self.visible():
            if device.uuid == uuid:
                return device
        raise DeviceError(f"GPU {uuid} is not visible to this process (visible: {[d.uuid for d in self.visible()]})")

    def uuid_of(self, index: int) -> str:
        """The UUID of ``cuda:<index>``, with torch's error when there is no such device."""
        devices = self.visible()
        if not 0 <= index < len(devices):
            raise missing_cuda_device(index, len(devices))
        return devices[index].uuid

    def table(self) -> dict[str, str]:
        """``{'cuda:0': uuid, ...}``: what a client sends so the daemon places by UUID."""
        return {f"cuda:{d.index}": d.uuid for d in self.visible()}

    @abc.abstractmethod
    def allocate(self, uuid: str, nbytes: int) -> DeviceBuffer:
        """A new buffer of ``nbytes`` on the GPU ``uuid`` (outside torch's caching allocator)."""

    @abc.abstractmethod
    def open(self, handle: Mapping[str, Any], fd: int | None = None) -> tuple[torch.UntypedStorage, object]:
        """Open an exported buffer: its bytes as a storage, and the mapping object.

        Handles with ``"fd": true`` come with a file descriptor the daemon passed (the
        caller closes it afterwards). The mapping lives as long as any storage built on
        it (weakly referenceable: its owner learns when it is gone); it is closed then.
        """

    def host_buffer(self, nbytes: int) -> memoryview:
        """``nbytes`` of host memory (pinned where the backend pins), freed with its last view
        and counted in :attr:`pinned` until then: staging buffers and host-tier copies.
        Simulated devices count theirs as if pinned."""
        backing = bytearray(max(nbytes, 1))
        address = ctypes.addressof(ctypes.c_char.from_buffer(backing))
        return owned_host_memory(address, nbytes, lambda: None, self.pinned, pinned=False, keep=backing)


# ---------------------------------------------------------------------------------------
# Simulated devices
# ---------------------------------------------------------------------------------------


class _SimBuffer(DeviceBuffer):
    def __init__(self, owner: SimulatedDevices, device: DeviceInfo, nbytes: int) -> None:
        super().__init__(device, nbytes)
        self._owner = owner
        self.path = os.path.join(owner.directory, f"ckptd-gpu{device.index}-{secrets.token_hex(8)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._map: mmap.mmap | None = mmap.mmap(fd, nbytes) if nbytes else None
        finally:
            os.close(fd)

    def _mem(self) -> memoryview:
        if self._map is None:
            if self.nbytes:
                raise DeviceError(f"buffer on {self.device.uuid} was freed")
            return memoryview(b"")
        return memoryview(self._map)

    def write(self, offset: int, data: memoryview) -> None:
        self._check(offset, len(data))
        self._mem()[offset : offset + len(data)] = data
        self._owner.count("h2d", len(data))

    def read(self, offset: int, out: memoryview) -> None:
        self._check(offset, len(out))
        out[:] = self._mem()[offset : offset + len(out)]
        self._owner.count("d2h", len(out))

    def copy_from(self, offset: int, source: DeviceBuffer, source_offset: int, nbytes: int) -> None:
        self._check(offset, nbytes)
        if not isinstance(source, _SimBuffer):
            raise DeviceError("a simulated buffer copies only from another simulated buffer")
        source._check(source_offset, nbytes)
        self._mem()[offset : offset + nbytes] = source._mem()[source_offset : source_offset + nbytes]
        self._owner.count("peer", nbytes)

    def export(self) -> dict[str, Any]:
        if self._owner.read_only:
            return {"kind": "simulated", "uuid": self.device.uuid, "nbytes": self.nbytes, "fd": True}
        return {"kind": "simulated", "uuid": self.device.uuid, "path": self.path, "nbytes": self.nbytes}

    def share_fd(self) -> int:
        if not self._owner.read_only:
            return super().share_fd()
        if self._map is None and self.nbytes:
            raise DeviceError(f"buffer on {self.device.uuid} was freed")
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def free(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            self._owner.freed(self)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class SimulatedDevices(Devices):
    """``count`` fake GPUs backed by shared-memory files in ``directory``.

    ``visible`` lists the physical GPUs this process sees, in order, as
    ``CUDA_VISIBLE_DEVICES`` would (default: all). ``memory`` is each GPU's size.
    :attr:`moved` counts bytes per direction (``h2d``, ``d2h``, ``peer``) and
    :attr:`allocated` the bytes held per UUID.
    """

    kind = "simulated"

    def __init__(self, count: int, directory: str | os.PathLike[str], *, visible: Sequence[int] | None = None,
                 memory: int = 16 << 30, read_only: bool = False) -> None:
        if count < 0:
            raise DeviceError(f"simulated GPU count must be >= 0, not {count}")
        super().__init__()
        self.directory = os.fspath(directory)
        order = list(range(count)) if visible is None else list(visible)
        if any(not 0 <= i < count for i in order) or len(set(order)) != len(order):
            raise DeviceError(f"visible GPUs {order} do not name distinct GPUs among {count}")
        self._devices = tuple(
            DeviceInfo(local, SIMULATED_UUID.format(physical), f"Simulated GPU {physical}", memory)
            for local, physical in enumerate(order)
        )
        self.moved = {"h2d": 0, "d2h": 0, "peer": 0}
        self.allocated: dict[str, int] = {d.uuid: 0 for d in self._devices}
        self._lock = threading.Lock()
        self.staging_bytes = 1 << 20
        self._current = threading.local()
        # read_only simulates CUDA VMM: descriptors passed over a socket, mapped read-only
        self.read_only = read_only
        self.sharing = (
            "simulated read-only (descriptors passed over the socket, mapped read-only)"
            if read_only
            else "simulated (shared-memory files mapped copy-on-write)"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], directory: str | os.PathLike[str]) -> SimulatedDevices:
        """``CKPTD_SIMULATED_GPUS`` fake GPUs, seen through ``CUDA_VISIBLE_DEVICES`` like real ones."""
        count = int(environ.get("CKPTD_SIMULATED_GPUS", "0") or 0)
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        order = None if visible is None else [int(part) for part in visible.split(",") if part.strip()]
        return cls(count, directory, visible=order)

    def visible(self) -> tuple[DeviceInfo, ...]:
        return self._devices

    def current(self) -> int:
        return int(getattr(self._current, "index", 0))

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        """Make ``cuda:<index>`` this thread's current GPU inside the block (``torch.cuda.device``)."""
        self.uuid_of(index)
        before = self.current()
        self._current.index = index
        try:
            yield
        finally:
            self._current.index = before

    def allocate(self, uuid: str, nbytes: int) -> DeviceBuffer:
        device = self.by_uuid(uuid)
        with self._lock:
            if self.allocated[uuid] + nbytes > device.total_memory:
                raise DeviceOutOfMemoryError(
                    f"out of memory on {uuid}: {nbytes} bytes requested, {self.allocated[uuid]} in use"
                )
            self.allocated[uuid] += nbytes
        return _SimBuffer(self, device, nbytes)

    def freed(self, buffer: _SimBuffer) -> None:
        with self._lock:
            self.allocated[buffer.device.uuid] -= buffer.nbytes

    def count(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.moved[direction] += nbytes

    def open(self, handle: Mapping[str, Any], fd: int | None = None) -> tuple[torch.UntypedStorage, object]:
        if handle.get("kind") != "simulated":
            raise DeviceError(f"cannot open a {handle.get('kind')!r} handle with simulated devices")
        self.by_uuid(str(handle["uuid"]))  # the GPU must be visible here too, as with CUDA IPC
        if not handle["nbytes"]:
            return torch.UntypedStorage(0), _Opened()
        if handle.get("fd"):
            if fd is None:
                raise DeviceError("this buffer is opened from a file descriptor the daemon passes")
            return _map_read_only(fd, int(handle["nbytes"]))
        return map_arena(str(handle["path"]), int(handle["nbytes"]))


class _ReadOnlyMap(mmap.mmap):
    """A read-only mapping that can be weakly referenced."""

    def storage(self) -> torch.UntypedStorage:
        with warnings.catch_warnings():  # read-only on purpose: a write faults, as on a read-only GPU mapping
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self, dtype=torch.uint8).untyped_storage()


def _map_read_only(fd: int, nbytes: int) -> tuple[torch.UntypedStorage, object]:
    mapping = _ReadOnlyMap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    return mapping.storage(), mapping


class _Opened:
    """A weakly referenceable token for an empty opened buffer."""

    def storage(self) -> torch.UntypedStorage:
        return torch.UntypedStorage(0)


# ---------------------------------------------------------------------------------------
# CUDA, through cupy
# ---------------------------------------------------------------------------------------


_CUDA_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation


class _CudaBuffer(DeviceBuffer):
    def __init__(self, owner: CudaDevices, device: DeviceInfo, nbytes: int) -> None:
        super().__init__(device, nbytes)
        self._cp = owner.cupy
        self._owner = owner
        with self._cp.cuda.Device(device.index):
            self.ptr = self._allocate(nbytes) if nbytes else 0

    def _allocate(self, nbytes: int) -> int:
        return int(self._cp.cuda.runtime.malloc(nbytes))

    def write(self, offset: int, data: memoryview) -> None:
        self._check(offset, len(data))
        if is_pinned(data):
            self._h2d(offset, data, len(data))
            return
        staging = self._owner.staging
        for start in range(0, len(data), staging.nbytes):
            n = min(staging.nbytes, len(data) - start)
            with staging.lend() as host:  # one chunk at a time: concurrent copies share the pool
                host[:n] = data[start : start + n]
                self._h2d(offset + start, host, n)

    def write_pinned(self, offset: int, pinned: Any, nbytes: int) -> None:
        """Host → device from a pinned buffer (:meth:`CudaDevices.host_buffer`), no extra copy."""
        self._check(offset, nbytes)
        self._h2d(offset, pinned, nbytes)

    def _h2d(self, offset: int, host: memoryview, nbytes: int) -> None:
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device.index):
            stream = self._owner.stream(self.device.index)
            rt.memcpyAsync(self.ptr + offset, _address(host), nbytes, rt.memcpyHostToDevice, stream.ptr)
            stream.synchronize()

    def read(self, offset: int, out: memoryview) -> None:
        self._check(offset, len(out))
        if is_pinned(out):
            self._d2h(offset, out, len(out))
            return
        staging = self._owner.staging
        for start in range(0, len(out), staging.nbytes):
            n = min(staging.nbytes, len(out) - start)
            with staging.lend() as host:
                self._d2h(offset + start, host, n)
                out[start : start + n] = host[:n]

    def _d2h(self, offset: int, host: memoryview, nbytes: int) -> None:
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device.index):
            stream = self._owner.stream(self.device.index)
            rt.memcpyAsync(_address(host), self.ptr + offset, nbytes, rt.memcpyDeviceToHost, stream.ptr)
            stream.synchronize()

    def copy_from(self, offset: int, source: DeviceBuffer, source_offset: int, nbytes: int) -> None:
        self._check(offset, nbytes)
        if not isinstance(source, _CudaBuffer):
            raise DeviceError("a CUDA buffer copies only from another CUDA buffer")
        source._check(source_offset, nbytes)
        if nbytes == 0:
            return
        self._grant_peer(source)
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device.index):
            stream = self._owner.stream(self.device.index)
            rt.memcpyPeerAsync(self.ptr + offset, self.device.index, source.ptr + source_offset, source.device.index,
                               nbytes, stream.ptr)
            # A peer copy returns before it is done; the buffer is exported (and may be mapped
            # by another process) as soon as this returns.
            stream.synchronize()

    def _grant_peer(self, source: _CudaBuffer) -> None:
        """Plain device allocations need no grant for a peer copy (VMM ones do)."""

    def export(self) -> dict[str, Any]:
        handle = self._cp.cuda.runtime.ipcGetMemHandle(self.ptr) if self.nbytes else b""
        return {"kind": "cuda-ipc", "uuid": self.device.uuid, "nbytes": self.nbytes, "handle": base64.b64encode(handle).decode()}

    def free(self) -> None:
        if self.ptr:
            with self._cp.cuda.Device(self.device.index):
                self._cp.cuda.runtime.free(self.ptr)
            self.ptr = 0


class _VmmBuffer(_CudaBuffer):
    """A buffer from CUDA virtual memory management: clients map it read-only from a descriptor."""

    def _allocate(self, nbytes: int) -> int:
        self._cp.cuda.runtime.free(0)  # the device's primary context, current for the driver calls
        self._vmm = _vmm.VmmAllocation(self.device.index, nbytes)
        return self._vmm.ptr

    def _grant_peer(self, source: _CudaBuffer) -> None:
        """VMM memory is reachable only from devices granted access: the peer reads the
        source and writes here, whichever device's copy engine runs the copy."""
        if source.device.index == self.device.index:
            return
        with self._cp.cuda.Device(self.device.index):
            if isinstance(source, _VmmBuffer):
                source._vmm.grant(self.device.index)
            self._vmm.grant(source.device.index, write=True)

    def export(self) -> dict[str, Any]:
        size = self._vmm.size if self.nbytes else 0
        return {"kind": "cuda-vmm", "uuid": self.device.uuid, "nbytes": self.nbytes, "size": size, "fd": True}

    def share_fd(self) -> int:
        with self._cp.cuda.Device(self.device.index):
            return self._vmm.export_fd()

    def free(self) -> None:
        if self.ptr:
            with self._cp.cuda.Device(self.device.index):
                self._vmm.free()
            self.ptr = 0


def _address(buffer: memoryview) -> int:
    """The host address of a writable buffer (a pinned buffer's or a bytearray's)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class _IpcMapping:
    """An opened CUDA IPC handle (or read-only VMM mapping): closed when the last storage
    built on it is gone."""

    def __init__(self, cp: Any, device_index: int, ptr: int, nbytes: int, keep: object = None) -> None:
        self._cp, self._device, self._ptr, self._nbytes = cp, device_index, ptr, nbytes
        self._keep = keep  # a read-only VMM mapping unmaps itself when this goes
        if keep is None:
            weakref.finalize(self, _close_ipc, cp, device_index, ptr)

    def storage(self) -> torch.UntypedStorage:
        """The whole buffer as a torch storage on its GPU (it keeps this mapping alive)."""
        cp = self._cp
        with cp.cuda.Device(self._device):
            memory = cp.cuda.UnownedMemory(self._ptr, self._nbytes, self, self._device)
            array = cp.ndarray((self._nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(memory, 0))
            return torch.from_dlpack(array).untyped_storage()


def _close_ipc(cp: Any, device_index: int, ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit the context may already be gone
        with cp.cuda.Device(device_index):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)


def _free_host(cp: Any, ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit the runtime may already be gone
        cp.cuda.runtime.freeHost(ptr)


class CudaDevices(Devices):
    """The real GPUs: identity from the driver, memory and copies through cupy (the ``gpu`` extra).

    Making one touches no GPU and imports nothing: which ordinal is which UUID comes
    from the driver without a context, cupy is imported on first use, the pinned staging
    pool is made on the first fill (pageable memory, with a warning, where pinning is
    refused). A worker that only opens what the daemon placed pins nothing.
    ``gds=True`` reads files straight into GPU memory with GPUDirect Storage through
    kvikio, falling back to staged reads when kvikio is missing or refuses. ``vmm=True``
    allocates with CUDA virtual memory management so clients map arenas read-only
    (legacy read-write IPC handles where VMM does not work); :attr:`sharing` says which.
    """

    kind = "cuda"

    def __init__(self, *, gds: bool = False, vmm: bool = False, staging_buffers: int = DEFAULT_THREADS,
                 staging_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__()
        self._devices = tuple(
            DeviceInfo(found.ordinal, found.uuid_string, found.name, found.total_memory) for found in _driver.identities()
        )
        self._local = threading.local()
        self.staging_buffers, self.staging_bytes = staging_buffers, staging_bytes
        self.gds = gds and self._kvikio() is not None
        self.vmm = vmm and self._vmm_works()
        self.sharing = (
            "cuda-vmm (read-only client mappings from descriptors)" if self.vmm else "cuda-ipc (legacy read-write handles)"
        )

    @functools.cached_property
    def cupy(self) -> Any:
        """The cupy module, imported on first use (:class:`DeviceError` without the ``gpu`` extra)."""
        try:
            import cupy
        except ImportError as exc:
            raise DeviceError("CUDA devices need cupy: pip install 'ckptd[gpu]'") from exc
        return cupy

    def visible(self) -> tuple[DeviceInfo, ...]:
        return self._devices

    def current(self) -> int:
        """torch's current device for the calling thread (``torch.cuda.set_device``/``torch.cuda.device``)."""
        return int(torch.cuda.current_device())

    def stream(self, index: int) -> Any:
        """This thread's stream on GPU ``index`` (one per reader thread and device)."""
        streams = self._local.__dict__.setdefault("streams", {})
        if index not in streams:
            with self.cupy.cuda.Device(index):
                streams[index] = self.cupy.cuda.Stream(non_blocking=True)
        return streams[index]

    def _vmm_works(self) -> bool:
        """Whether read-only VMM sharing can be used here (else legacy IPC, with a warning)."""
        try:
            for device in self._devices:
                with self.cupy.cuda.Device(device.index):
                    self.cupy.cuda.runtime.free(0)
                    _vmm.VmmAllocation(device.index, 1).free()
        except DeviceError as exc:
            logger.warning("read-only GPU sharing (CUDA VMM) unavailable (%s); using legacy CUDA IPC handles", exc)
            return False
        return True

    @staticmethod
    def _kvikio() -> Any:
        try:
            import kvikio
        except ImportError:
            logger.warning("GPUDirect Storage asked for, but kvikio is not installed: reading through host staging")
            return None
        return kvikio

    def read_file(self, path: str, buffer: DeviceBuffer, copies: Iterable[Copy]) -> None:
        """With GPUDirect Storage, file → GPU through kvikio; otherwise (or if it fails) staged."""
        copies = list(copies)
        if self.gds and isinstance(buffer, _CudaBuffer):
            try:
                self._read_gds(path, buffer, copies)
                return
            except Exception as exc:  # noqa: BLE001  (kvikio/cuFile errors have many types: fall back)
                logger.warning("GPUDirect Storage read of %s failed (%s); reading through host staging", path, exc)
        super().read_file(path, buffer, copies)

    def _read_gds(self, path: str, buffer: _CudaBuffer, copies: list[Copy]) -> None:
        kvikio = self._kvikio()
        cp = self.cupy
        with cp.cuda.Device(buffer.device.index), kvikio.CuFile(path, "r") as f:
            futures = []
            for copy in copies:
                memory = cp.cuda.UnownedMemory(buffer.ptr + copy.arena_offset, copy.nbytes, buffer, buffer.device.index)
                view = cp.ndarray((copy.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(memory, 0))
                futures.append(f.pread(view, copy.nbytes, copy.file_offset))
            for copy, future in zip(copies, futures):
                if future.get() != copy.nbytes:
                    raise DeviceError(f"{path}: short GPUDirect read")

    def host_buffer(self, nbytes: int) -> memoryview:
        """Pinned host memory allocated for this request alone (``cudaHostAlloc``, portable to
        every device) and freed (``cudaFreeHost``) with its last view: not cupy's pinned
        pool, which rounds each request up to a power of two and keeps freed blocks."""
        if nbytes == 0:
            return memoryview(bytearray())
        cp = self.cupy
        rt = cp.cuda.runtime
        try:
            ptr = int(rt.hostAlloc(nbytes, rt.hostAllocPortable))
        except rt.CUDARuntimeError as exc:  # pinning may be refused (memlock limits, no memory)
            logger.warning("pinning %d bytes failed (%s); using pageable memory", nbytes, exc)
            return memoryview(bytearray(nbytes))
        return owned_host_memory(ptr, nbytes, functools.partial(_free_host, cp, ptr), self.pinned, pinned=True)

    def allocate(self, uuid: str, nbytes: int) -> DeviceBuffer:
        device = self.by_uuid(uuid)
        rt = self.cupy.cuda.runtime
        try:
            return (_VmmBuffer if self.vmm else _CudaBuffer)(self, device, nbytes)
        except rt.CUDARuntimeError as exc:
            error = DeviceOutOfMemoryError if getattr(exc, "status", None) == _CUDA_OUT_OF_MEMORY else DeviceError
            raise error(f"cannot allocate {nbytes} bytes on {uuid}: {exc}") from exc

    def open(self, handle: Mapping[str, Any], fd: int | None = None) -> tuple[torch.UntypedStorage, object]:
        index = self.by_uuid(str(handle["uuid"])).index
        if handle.get("kind") != "cuda-vmm":
            return open_cuda_ipc(handle, self.cupy, index)
        nbytes = int(handle["nbytes"])
        if nbytes == 0:
            return torch.UntypedStorage(0, device=torch.device("cuda", index)), _Opened()
        if fd is None:
            raise DeviceError("a read-only GPU mapping is opened from a file descriptor the daemon passes")
        with self.cupy.cuda.Device(index):
            self.cupy.cuda.runtime.free(0)
            mapped = _vmm.ReadOnlyMapping(fd, int(handle["size"]), index)
        mapping = _IpcMapping(self.cupy, index, mapped.ptr, nbytes, keep=mapped)
        return mapping.storage(), mapping


def open_cuda_ipc(handle: Mapping[str, Any], cp: Any, device_index: int) -> tuple[torch.UntypedStorage, object]:
    """Open a ``cuda-ipc`` handle on ``cuda:<device_index>`` as a torch storage (through DLPack)."""
    if handle.get("kind") != "cuda-ipc":
        raise DeviceError(f"cannot open a {handle.get('kind')!r} handle as CUDA IPC")
    nbytes = int(handle["nbytes"])
    if nbytes == 0:
        return torch.UntypedStorage(0, device=torch.device("cuda", device_index)), _Opened()
    with cp.cuda.Device(device_index):
        ptr = cp.cuda.runtime.ipcOpenMemHandle(base64.b64decode(handle["handle"]))
    mapping = _IpcMapping(cp, device_index, ptr, nbytes)
    return mapping.storage(), mapping


def local_devices(environ: Mapping[str, str], directory: str | os.PathLike[str] = "/dev/shm") -> Devices | None:
    """The GPUs a client process sees: simulated ones where ``CKPTD_SIMULATED_GPUS`` is set,
    else CUDA ones where torch sees CUDA and cupy is installed, else ``None``.

    Only identity is learnt here (no cupy import, no context, nothing pinned): a worker
    opens what the daemon placed and never stages a byte itself.
    """
    if environ.get("CKPTD_SIMULATED_GPUS"):
        return SimulatedDevices.from_env(environ, directory)
    if not torch.cuda.is_available():
        return None
    if importlib.util.find_spec("cupy") is None:
        logger.warning("CUDA devices need cupy (pip install 'ckptd[gpu]'); GPU storages from the daemon are staged through host memory")
        return None
    try:
        return CudaDevices()
    except DeviceError as exc:
        logger.warning("%s; GPU storages from the daemon are staged through host memory", exc)
    return None
