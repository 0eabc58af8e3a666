"""``ckptd.jit_load``: a TorchScript module whose parameters and buffers live in ckptd's arenas.

torch.jit.load builds the module (types, code, constants, ``_extra_files``); ckptd then
reads every tensor the archive's ``data.pkl`` names into an arena on the same device and
points each parameter and buffer at it (``tensor.data = ...`` swaps the storage inside
the TensorImpl the C++ module holds, so every name of a shared submodule sees it).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import torch

from ckptd.formats import CheckpointError, FileLike, Format, Layout, Source, TensorEntry, open_source, read_layout

from ._placement import MapLocation
from ._storages import read_storages

Provider = Callable[[torch.device, list[str]], dict[str, torch.UntypedStorage]]


def jit_load(
    f: FileLike,
    map_location: MapLocation = None,
    _extra_files: dict[str, Any] | None = None,
) -> torch.jit.ScriptModule:
    """Load a TorchScript archive in this process as :func:`torch.jit.load` does (see :func:`ckptd.jit_load`).

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    >>> jit_load(buf.getvalue())(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """
    with open_source(f) as source:
        return jit_load_source(f, source, map_location, _extra_files)


def jit_load_source(
    f: FileLike, source: Source, map_location: MapLocation, extra_files: dict[str, Any] | None
) -> torch.jit.ScriptModule:
    """:func:`jit_load` on an opened source (also torch.load's route for TorchScript archives)."""
    layout = read_layout(source)
    if layout.format is not Format.TORCHSCRIPT:
        raise CheckpointError(source.name, "not a TorchScript archive; load it with ckptd.load")
    module = torch.jit.load(_for_torch(f, source.start), map_location=map_location, _extra_files=extra_files)
    _adopt_tensors(module, layout, source)
    return module


def _for_torch(f: FileLike, start: int) -> Any:
    """What torch.jit.load can open: the path given, the bytes wrapped, or the stream rewound."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    if isinstance(f, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(f))
    f.seek(start)  # the scan may have moved it; torch reads from the caller's position
    return f


def _adopt_tensors(module: torch.jit.ScriptModule, layout: Layout, source: Source) -> None:
    def read(device: torch.device, keys: list[str]) -> dict[str, torch.UntypedStorage]:
        storages = read_storages(source, layout, keys, str(device))
        return {key: storages.get(key, str(device)) for key in keys}

    adopt_tensors(module, layout, read)


def adopt_tensors(module: torch.jit.ScriptModule, layout: Layout, provide: Provider) -> None:
    """Point each named tensor of the module at storages ``provide(device, keys)`` hands out.

    The storages are asked for on each tensor's own device, so the module stays where
    torch.jit.load's ``map_location`` put it.
    """
    # Plain tensors only: anything rebuilt another way (quantized, subclasses) stays torch's.
    targets = [(entry, _attribute(module, entry)) for entry in layout.tensors]
    targets = [(e, t) for e, t in targets if isinstance(t, torch.Tensor) and e.kind == "_rebuild_tensor_v2"]
    by_device: dict[torch.device, list[str]] = {}
    for entry, tensor in targets:
        by_device.setdefault(tensor.device, []).extend(entry.storage_keys)
    views: dict[str, torch.UntypedStorage] = {}
    for device, keys in by_device.items():
        views.update(provide(device, list(dict.fromkeys(keys))))
    with torch.no_grad():
        for entry, tensor in targets:
            tensor.data = _rebuild(entry, views[entry.storage_keys[0]], tensor)


def _attribute(module: torch.jit.ScriptModule, entry: TensorEntry) -> Any:
    obj: Any = module
    for part in entry.path:
        obj = getattr(obj, str(part), None)
    return obj


def _rebuild(entry: TensorEntry, storage: torch.UntypedStorage, current: torch.Tensor) -> torch.Tensor:
    fresh = torch.empty(0, dtype=entry.dtype, device=storage.device)
    fresh.set_(storage, entry.storage_offset, entry.shape, entry.stride)
    if fresh.shape != current.shape or fresh.dtype != current.dtype:
        raise CheckpointError(
            entry.name, f"archive tensor is {entry.dtype}{list(entry.shape)}, module holds {current.dtype}{list(current.shape)}"
        )
    return fresh
