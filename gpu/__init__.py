"""The device layer: where storages live and how their bytes get there.

An :class:`Arena` is one block of memory per (checkpoint, device): shared memory on the
CPU, one device allocation elsewhere. :func:`fill` streams file ranges into an arena
with parallel positional reads. :class:`Devices` is the GPU backend the daemon places
storages with, by GPU UUID: :class:`CudaDevices` (cupy) or :class:`SimulatedDevices`
(host memory, for tests); :func:`fill_device` streams file ranges into a GPU buffer
through host staging. This layer knows nothing of HTTP and touches no device
until asked to allocate on it; importing it is torch-free (each name imports its module,
and torch, on first use).

The public surface (``__all__``; everything else is private):

* arenas: :class:`Arena`, :func:`allocate`, :func:`cpu_arena`, :func:`shm_arena`,
  :func:`map_arena`, :func:`map_fd` (another process's arena, from the descriptor
  :meth:`Arena.share_fd` gave); their layout: :func:`pack`, :func:`align`, :data:`ALIGNMENT`;
* reading into them: :class:`Copy`, :func:`fill`, :func:`fill_device`, :func:`chunks`,
  with :data:`DEFAULT_THREADS` reader threads and :data:`DEFAULT_CHUNK_BYTES` chunks;
* GPU backends: :class:`Devices` (:class:`CudaDevices`, :class:`SimulatedDevices`,
  :func:`local_devices`), :class:`DeviceInfo`, :class:`DeviceBuffer`, :class:`StagingPool`,
  :func:`is_pinned`;
* :class:`DeviceError`, and :class:`DeviceOutOfMemoryError` when a GPU itself is full;
  :func:`missing_cuda_device`, torch.load's error for a GPU that does not exist.

>>> import torch
>>> from ckptd.formats import open_source
>>> arena = allocate(torch.device("cpu"), 3)
>>> fill(open_source(b"xyz"), arena, [Copy(0, 0, 3)])
>>> bytes(arena.view(0, 3).tolist())
b'xyz'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptd.formats import lazy_attributes as _lazy_attributes

from ._errors import DeviceError, missing_cuda_device

if TYPE_CHECKING:
    from ._arena import ALIGNMENT, Arena, align, allocate, cpu_arena, map_arena, map_fd, pack, shm_arena
    from ._buffers import DeviceBuffer, DeviceInfo, StagingPool, is_pinned
    from ._devices import CudaDevices, Devices, SimulatedDevices, local_devices
    from ._oom import DeviceOutOfMemoryError
    from ._reader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, Copy, chunks, fill, fill_device

_LAZY = {
    **dict.fromkeys(("ALIGNMENT", "Arena", "align", "allocate", "cpu_arena", "map_arena", "map_fd", "pack", "shm_arena"),
                    "._arena"),
    **dict.fromkeys(("DeviceBuffer", "DeviceInfo", "StagingPool", "is_pinned"), "._buffers"),
    **dict.fromkeys(("CudaDevices", "Devices", "SimulatedDevices", "local_devices"), "._devices"),
    "DeviceOutOfMemoryError": "._oom",
    **dict.fromkeys(("DEFAULT_CHUNK_BYTES", "DEFAULT_THREADS", "Copy", "chunks", "fill", "fill_device"), "._reader"),
}



__all__ = [
    "ALIGNMENT",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_THREADS",
    "Arena",
    "Copy",
    "CudaDevices",
    "DeviceBuffer",
    "DeviceError",
    "DeviceInfo",
    "DeviceOutOfMemoryError",
    "Devices",
    "SimulatedDevices",
    "StagingPool",
    "align",
    "allocate",
    "chunks",
    "cpu_arena",
    "fill",
    "fill_device",
    "is_pinned",
    "local_devices",
    "map_arena",
    "map_fd",
    "missing_cuda_device",
    "pack",
    "shm_arena",
]

__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY, __all__)
