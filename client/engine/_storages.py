"""Reading a checkpoint's storages into arenas, and handing them out by key.

The placement plan (:mod:`ckptd.engine._plan`) says which arenas to allocate on which
device and where each storage lies in them; this module allocates them and fills every
arena with parallel positional reads. :class:`StorageSet` then answers torch's
``persistent_load`` with views into those arenas, applying a callable ``map_location``
once per storage.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ckptd.formats import Layout, Source, StorageRecord, inflate_storage
from ckptd.gpu import Arena, Copy, allocate, fill

from ._exceptions import UsageError
from ._placement import MapLocation, apply_callable, restore
from ._plan import Plan, StoragePlan, Target, plan_storages, target_for
from ._settings import settings

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
    placed: frozenset[str] = frozenset()  # views already on their device (the daemon's GPU arenas)
    plan: Plan | None = None  # where read_storages put each storage (None: views made elsewhere)

    _pending: Future[None] | None = None
    _targets: dict[str, Target] = field(default_factory=dict)

    def start(self, job: Callable[[], None]) -> None:
        """Run ``job`` (the reads) on a background thread; :meth:`wait` joins it."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptd-fill")
        self._pending = pool.submit(job)
        pool.shutdown(wait=False)  # the thread ends with the job

    def wait(self) -> None:
        """Return once every byte is in place; re-raise what the reads raised."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    @functools.cached_property
    def _meta_safe(self) -> frozenset[str]:
        """Keys whose every user rebuilds fine around a meta storage (skipped ones cost nothing)."""
        unsafe = {key for entry in self.layout.tensors if entry.kind not in _META_SAFE for key in entry.storage_keys}
        named = {key for entry in self.layout.tensors for key in entry.storage_keys}
        return frozenset(named - unsafe)

    def _target(self, location: str) -> Target:
        """Where ``map_location`` sends storages saved at ``location`` (worked out once per location)."""
        found = self._targets.get(location)
        if found is None:
            found = self._targets[location] = target_for(self.map_location, location)
        return found

    def planned(self) -> list[StoragePlan]:
        """The storages :func:`read_storages` read into :attr:`arenas`, each with its arena
        (an index into :attr:`arenas`) and offset there, as the placement plan laid them out.

        >>> import io
        >>> from ckptd.formats import open_source, read_layout
        >>> buf = io.BytesIO(); torch.save({"w": torch.arange(3)}, buf)
        >>> src = open_source(buf.getvalue()); layout = read_layout(src)
        >>> [(p.key, p.arena, p.offset, p.nbytes) for p in read_storages(src, layout, ["0"], "cpu").planned()]
        [('0', 0, 0, 24)]
        """
        if self.plan is None:
            raise UsageError("these storages were not read by read_storages (mmap=True, or views made elsewhere)")
        return [planned for planned in self.plan.storages.values() if planned.arena is not None]

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
        if view is not None and key in self.placed:
            return view
        if view is None:  # nothing was read: an empty storage, or a meta target
            view = torch.UntypedStorage(record.nbytes, device=_META if record.nbytes else _CPU)
        target = self._target(location)
        tag, device = target.tag, target.device
        if tag is None or view.device != device:
            self.wait()  # the callable, or the copy to another device, needs the bytes
        if tag is None:
            return apply_callable(self.map_location, view, location)  # type: ignore[arg-type]
        if view.device != device:
            return restore(view, tag)  # staged through the CPU (big-endian files, mmap)
        return view


def _reader_tunables() -> dict[str, int]:
    """``fill``'s threads and chunk size from ``ckptd.settings`` (unset: the device layer's defaults)."""
    current = settings.current()
    tunables = {"threads": current.reader_threads, "chunk_bytes": current.chunk_bytes}
    return {name: value for name, value in tunables.items() if value is not None}


def read_storages(
    source: Source,
    layout: Layout,
    keys: Collection[str],
    map_location: MapLocation,
    *,
    mmap: bool = False,
    progress: Callable[[int], None] | None = None,
    wait: bool = True,
    allocator: Callable[[torch.device, int], Arena] = allocate,
    keep_open: bool = False,
    skip_data: bool = False,
) -> StorageSet:
    """Read the storages named by ``keys`` straight to their devices.

    Arenas are allocated and views handed out at once; with ``wait=False`` the bytes
    arrive in the background (call :meth:`StorageSet.wait` before using them), so the
    object can be unpickled while the disk is read. ``allocator`` makes the arenas;
    ``keep_open`` keeps their descriptors (the daemon passes them on to its clients).
    ``skip_data`` places the storages but reads none (``torch.serialization.skip_data``).
    The reader's threads and chunk size are ``ckptd.settings``' ``reader_threads`` and
    ``chunk_bytes``, as in effect where this is called.

    >>> import io
    >>> from ckptd.formats import open_source, read_layout
    >>> buf = io.BytesIO(); torch.save({"w": torch.arange(3)}, buf)
    >>> src = open_source(buf.getvalue()); layout = read_layout(src)
    >>> storages = read_storages(src, layout, layout.storages, None)
    >>> storages.get("0", "cpu").nbytes()
    24
    """
    tunables = _reader_tunables()  # read here: the fill may run on another thread
    result = StorageSet(layout, map_location, frozenset(keys))
    records = [layout.storages[key] for key in keys]
    swap = layout.byteorder != sys.byteorder
    if mmap:
        _map_file(source, records, result)
        jobs: list[tuple[Arena, list[Copy], int]] = []
    else:
        result.plan = plan_storages(layout, keys, map_location)
        jobs = [_allocate_arena(allocator, result, index) for index in range(len(result.plan.arenas))]
    swapped = [r for r in records if swap and r.key in result.views and result.views[r.key].device.type == "cpu"]
    deflated = [r for r in records if r.compressed_size is not None and r.key in result.views]

    if skip_data:
        jobs, deflated, swapped = [(arena, [], 0) for arena, _, _ in jobs], [], []

    def finish() -> None:
        for arena, copies, useful in jobs:
            try:
                fill(source, arena, copies, progress=_in_storage_bytes(progress, copies, useful), **tunables)
            finally:
                if not keep_open:
                    arena.close()  # tensors keep the mapping; the descriptor is not needed in-process
        for record in deflated:  # torch writes none; a deflated storage is inflated into its place
            _bytes_of(result.views[record.key]).copy_(torch.frombuffer(inflate_storage(source, record), dtype=torch.uint8))
        for record in swapped:
            result.views[record.key].byteswap(record.dtype)

    if wait:
        finish()
    else:
        result.start(finish)
    return result


def _in_storage_bytes(progress: Callable[[int], None] | None, copies: list[Copy], useful: int) -> Callable[[int], None] | None:
    """``progress`` counted in storage bytes, though a copy may span the bytes between storages."""
    span = sum(copy.nbytes for copy in copies)
    if progress is None or span == useful or span == 0:
        return progress
    done = [0, 0]  # span bytes read, storage bytes reported

    def report(nbytes: int) -> None:
        done[0] += nbytes
        target = done[0] * useful // span
        step, done[1] = target - done[1], target
        if step:
            progress(step)

    return report


def _allocate_arena(allocator: Callable[[torch.device, int], Arena], result: StorageSet, index: int) -> tuple[Arena, list[Copy], int]:
    """Allocate the plan's arena ``index``, hand out each of its storages' views; return what
    to copy where, and how many storage bytes those copies carry."""
    assert result.plan is not None
    planned = result.plan.arenas[index]
    arena = allocator(planned.device, planned.nbytes)
    result.arenas.append(arena)
    for storage in result.plan.in_arena(index):
        result.views[storage.key] = arena.view(storage.offset, storage.nbytes)
    return arena, list(planned.copies), planned.useful


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _map_file(source: Source, records: list[StorageRecord], result: StorageSet) -> None:
    """``mmap=True``: storages are private views of the file itself, as torch.load makes them."""
    assert source.path is not None
    shared = torch.serialization.get_default_mmap_options() == getattr(torch.serialization, "MAP_SHARED", 1)
    size = os.path.getsize(source.path)
    whole = torch.UntypedStorage.from_file(source.path, shared, size)
    for record in records:
        if record.compressed_size is not None:
            result.views[record.key] = torch.UntypedStorage(record.nbytes)  # inflated, not mapped
        elif record.nbytes:
            result.views[record.key] = whole[record.offset : record.offset + record.nbytes]
