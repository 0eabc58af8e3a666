"""Reading a checkpoint's storages into arenas, and handing them out by key.

The plan groups the storages a load needs by the device they will live on, lays them
out at aligned offsets in one arena per device, and fills every arena with parallel
positional reads. :class:`StorageSet` then answers torch's ``persistent_load`` with
views into those arenas, applying a callable ``map_location`` once per storage.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from ckptd.formats import Layout, Source, StorageRecord
from ckptd.gpu import Arena, Copy, align, allocate, fill

from ._placement import MapLocation, apply_callable, device_for_tag, restore, target_tag

logger = logging.getLogger(__name__)

# Rebuild functions that accept a meta storage in place of a skipped one; quantized and other
# exotic tensors get an unwritten CPU storage (big allocations are mapped lazily: no cost).
_META_SAFE = frozenset(
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter "
    "_rebuild_parameter_with_state _rebuild_from_type_v2".split()
)
_META = torch.device("meta")
_CPU = torch.device("cpu")


@dataclass
class StorageSet:
    """Storages of one checkpoint, by key, placed where ``map_location`` says."""

    layout: Layout
    map_location: MapLocation
    wanted: frozenset[str] = frozenset()
    views: dict[str, torch.UntypedStorage] = field(default_factory=dict)
    arenas: list[Arena] = field(default_factory=list)

    @functools.cached_property
    def _meta_safe(self) -> frozenset[str]:
        """Keys whose every user rebuilds fine around a meta storage (skipped ones cost nothing)."""
        unsafe = {key for entry in self.layout.tensors if entry.kind not in _META_SAFE for key in entry.storage_keys}
        named = {key for entry in self.layout.tensors for key in entry.storage_keys}
        return frozenset(named - unsafe)

    def get(self, key: str, location: str) -> torch.UntypedStorage:
        """The final storage for ``key`` (saved at ``location``), as torch's restore would give it.

        Storages a selective load does not need come back as ``meta`` storages of the right
        size: the object can be rebuilt around them without reading a byte.
        """
        record = self.layout.storages[key]
        if key not in self.wanted:
            device = _META if key in self._meta_safe else _CPU
            return torch.UntypedStorage(record.nbytes, device=device)
        view = self.views.get(key)
        if view is None:  # nothing was read: an empty storage, or a meta target
            view = torch.UntypedStorage(record.nbytes, device=_META if record.nbytes else _CPU)
        tag = target_tag(self.map_location, location)
        if tag is None:
            return apply_callable(self.map_location, view, location)  # type: ignore[arg-type]
        if view.device != device_for_tag(tag):
            return restore(view, tag)  # staged through the CPU (big-endian files, mmap)
        return view


def read_storages(
    source: Source,
    layout: Layout,
    keys: Collection[str],
    map_location: MapLocation,
    *,
    mmap: bool = False,
    progress: Callable[[int], None] | None = None,
) -> StorageSet:
    """Read the storages named by ``keys`` straight to their devices.

    >>> import io
    >>> from ckptd.formats import open_source, read_layout
    >>> buf = io.BytesIO(); torch.save({"w": torch.arange(3)}, buf)
    >>> src = open_source(buf.getvalue()); layout = read_layout(src)
    >>> storages = read_storages(src, layout, layout.storages, None)
    >>> storages.get("0", "cpu").nbytes()
    24
    """
    result = StorageSet(layout, map_location, frozenset(keys))
    records = [layout.storages[key] for key in keys]
    swap = layout.byteorder != sys.byteorder
    if mmap:
        _map_file(source, records, result)
    else:
        by_device = _group_by_device(records, map_location, swap)
        for device, group in by_device.items():
            _read_group(source, device, group, result, progress)
    if swap:
        for record in records:
            view = result.views.get(record.key)
            if view is not None and view.device.type == "cpu":
                view.byteswap(record.dtype)
    return result


def _group_by_device(
    records: list[StorageRecord], map_location: MapLocation, swap: bool
) -> dict[torch.device, list[StorageRecord]]:
    groups: dict[torch.device, list[StorageRecord]] = {}
    for record in records:
        if record.nbytes == 0:
            continue  # torch gives empty storages no data pointer; StorageSet makes fresh ones
        tag = target_tag(map_location, record.location)
        device = _CPU if tag is None else device_for_tag(tag)
        if device.type == "meta":
            continue  # torch reads nothing for meta targets
        if swap and device.type != "cpu":
            device = _CPU  # bytes are swapped on the host, then copied to the device
        groups.setdefault(device, []).append(record)
    return groups


def _read_group(
    source: Source,
    device: torch.device,
    records: list[StorageRecord],
    result: StorageSet,
    progress: Callable[[int], None] | None,
) -> None:
    offsets: list[int] = []
    total = 0
    for record in records:
        total = align(total)
        offsets.append(total)
        total += record.nbytes
    arena = allocate(device, total)
    result.arenas.append(arena)
    copies = [Copy(r.offset, off, r.nbytes) for r, off in zip(records, offsets)]
    fill(source, arena, copies, progress=progress)
    for record, offset in zip(records, offsets):
        result.views[record.key] = arena.view(offset, record.nbytes)
    arena.close()  # the mapping stays alive with the tensors; the descriptor is not needed in-process


def _map_file(source: Source, records: list[StorageRecord], result: StorageSet) -> None:
    """``mmap=True``: storages are private views of the file itself, as torch.load makes them."""
    assert source.path is not None
    shared = torch.serialization.get_default_mmap_options() == getattr(torch.serialization, "MAP_SHARED", 1)
    size = os.path.getsize(source.path)
    whole = torch.UntypedStorage.from_file(source.path, shared, size)
    for record in records:
        if record.nbytes:
            result.views[record.key] = whole[record.offset : record.offset + record.nbytes]
