"""The device layer: where storages live and how their bytes get there.

An :class:`Arena` is one block of memory per (checkpoint, device): shared memory on the
CPU, one device allocation elsewhere. :func:`fill` streams file ranges into an arena
with parallel positional reads. :class:`Devices` is the GPU backend the daemon places
storages with, by GPU UUID: :class:`CudaDevices` (cupy) or :class:`SimulatedDevices`
(host memory, for tests); :func:`fill_device` streams file ranges into a GPU buffer
through host staging. This layer knows nothing of HTTP and touches no device
until asked to allocate on it.

>>> import torch
>>> from ckptd.formats import open_source
>>> arena = allocate(torch.device("cpu"), 3)
>>> fill(open_source(b"xyz"), arena, [Copy(0, 0, 3)])
>>> bytes(arena.view(0, 3).tolist())
b'xyz'
"""

from __future__ import annotations

from ._arena import ALIGNMENT, Arena, align, allocate, cpu_arena, map_arena, pack, shm_arena
from ._devices import CudaDevices, DeviceBuffer, DeviceInfo, Devices, SimulatedDevices, StagingPool, local_devices
from ._errors import DeviceError
from ._reader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, Copy, chunks, fill, fill_device

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
    "Devices",
    "SimulatedDevices",
    "StagingPool",
    "align",
    "allocate",
    "chunks",
    "cpu_arena",
    "fill",
    "fill_device",
    "local_devices",
    "map_arena",
    "pack",
    "shm_arena",
]
