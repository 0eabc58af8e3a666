"""GPU residency for the cache: arenas per (checkpoint, GPU UUID), GPU budgets, a host tier.

The cache decides *what* a load needs on which GPU (by UUID: the client translated its
``cuda:N`` names); this tier makes it resident there, taking the bytes from the cheapest
place that has them:

1. the host tier (a GPU arena evicted earlier was copied back to host memory): host → device;
2. another GPU holding the same storages: a peer copy, device → device;
3. the cache's host arenas (the storages are host-resident anyway): host → device;
4. the file: chunked reads through host staging, host → device.

Under a GPU's budget, the least recently used arenas of checkpoints no lease holds move to
the host tier (under its own budget; past it they are freed). Leased arenas are never
touched, and a load that cannot fit raises :class:`OverBudgetError` naming the GPU: over
its budget, or out of memory on the GPU itself after evicting what it may.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ckptd.engine import ArenaInfo, OverBudgetError, Placement, UsageError
from ckptd.formats import Layout
from ckptd.gpu import Copy, DeviceBuffer, DeviceOutOfMemoryError, Devices, pack

logger = logging.getLogger(__name__)

# What a default GPU budget leaves for CUDA contexts (about 0.5 GiB each: the daemon's and
# those of the workers using the GPU, each holding its own) and for other processes.
CONTEXT_ROOM = 4 << 30


def default_gpu_budget(total_memory: int) -> int:
    """The cache's default budget on a GPU of ``total_memory`` bytes: all but a tenth of it
    or :data:`CONTEXT_ROOM`, whichever is more (never less than half the GPU).

    >>> default_gpu_budget(80 << 30) / (1 << 30), default_gpu_budget(16 << 30) / (1 << 30)
    (72.0, 12.0)
    """
    return max(total_memory // 2, total_memory - max(total_memory // 10, CONTEXT_ROOM))


HostBytes = Callable[[str], memoryview | None]  # storage key -> its host-resident bytes, if any
Evictable = Callable[[str], bool]  # entry id -> may its arenas be moved now (no lease, not loading)


@dataclass(eq=False)
class _GpuArena:
    id: str
    uuid: str
    buffer: DeviceBuffer
    placements: dict[str, Placement]
    handle: dict[str, object] = field(default_factory=dict)  # exported once, handed to every client
    last_used: float = field(default_factory=time.time)


@dataclass(eq=False)
class _TierCopy:
    """A GPU arena's bytes kept in host memory after eviction (same offsets)."""

    uuid: str
    host: memoryview  # pinned where the backend pins: it comes back at host-to-device speed
    placements: dict[str, Placement]
    last_used: float = field(default_factory=time.time)


@dataclass
class _Entry:
    arenas: list[_GpuArena] = field(default_factory=list)
    tier: list[_TierCopy] = field(default_factory=list)

    def tiered(self, uuid: str) -> dict[str, tuple[_TierCopy, Placement]]:
        return {k: (c, p) for c in self.tier if c.uuid == uuid for k, p in c.placements.items()}

    def placed(self, uuid: str) -> dict[str, tuple[_GpuArena, Placement]]:
        return {k: (a, p) for a in self.arenas if a.uuid == uuid for k, p in a.placements.items()}

    def anywhere(self) -> dict[str, tuple[_GpuArena, Placement]]:
        return {k: (a, p) for a in self.arenas for k, p in a.placements.items()}


class DeviceTier:
    """GPU arenas of cached checkpoints, by GPU UUID.

    ``budgets`` maps each GPU's UUID to the bytes the cache may hold there; ``host_tier_budget``
    bounds the host copies of evicted GPU arenas.
    """

    def __init__(self, devices: Devices, budgets: Mapping[str, int], host_tier_budget: int) -> None:
        self.devices = devices
        self.budgets = dict(budgets)
        self.host_tier_budget = host_tier_budget
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._reserved: dict[str, int] = {}  # uuid -> bytes being placed right now
        self.evictions = 0
        self.promotions = 0

    # --- loading --------------------------------------------------------------------

    def place(
        self, entry_id: str, path: str, layout: Layout, uuid: str, keys: list[str], *, host: HostBytes, evictable: Evictable
    ) -> tuple[int, int]:
        """Make ``keys`` resident on GPU ``uuid``; returns how many storages were placed now
        and how many bytes of them came from the file."""
        with self._lock:
            entry = self._entries.setdefault(entry_id, _Entry())
            placed = entry.placed(uuid)
        missing = [k for k in keys if k not in placed and layout.storages[k].nbytes]
        for arena, _ in placed.values():
            arena.last_used = time.time()
        if not missing:
            return 0, 0
        offsets, total = pack(layout.storages[k].nbytes for k in missing)
        self._reserve(uuid, total, entry_id, evictable)
        try:
            buffer = self._allocate(uuid, total, entry_id, evictable)
            try:
                from_file = self._fill(entry, path, layout, uuid, buffer, dict(zip(missing, offsets)), host)
            except BaseException:
                buffer.free()
                raise
            arena_id = f"gpu-{secrets.token_hex(8)}"
            placements = {k: Placement(k, arena_id, off, layout.storages[k].nbytes) for k, off in zip(missing, offsets)}
            arena = _GpuArena(arena_id, uuid, buffer, placements, buffer.export())
            with self._lock:
                entry.arenas.append(arena)
        finally:
            with self._lock:
                self._reserved[uuid] -= total
        self._retire_promoted(entry, uuid)
        return len(missing), from_file

    def _fill(
        self, entry: _Entry, path: str, layout: Layout, uuid: str, buffer: DeviceBuffer, offsets: dict[str, int], host: HostBytes
    ) -> int:
        """Copy each storage into ``buffer`` from the cheapest place holding it."""
        tiered = entry.tiered(uuid)
        peers = entry.anywhere()
        from_disk: list[Copy] = []
        for key, offset in offsets.items():
            nbytes = layout.storages[key].nbytes
            if key in tiered:
                copy, p = tiered[key]
                buffer.write(offset, copy.host[p.offset : p.offset + nbytes])  # pinned: no staging copy
            elif key in peers:
                other, p = peers[key]
                buffer.copy_from(offset, other.buffer, p.offset, nbytes)
            elif (resident := host(key)) is not None:
                buffer.write(offset, resident)
            else:
                from_disk.append(Copy(layout.storages[key].offset, offset, nbytes))
        if from_disk:
            self.devices.read_file(path, buffer, from_disk)
        return sum(c.nbytes for c in from_disk)

    def _retire_promoted(self, entry: _Entry, uuid: str) -> None:
        """Host-tier copies whose every storage is back on the GPU have served their purpose."""
        with self._lock:
            on_gpu = set(entry.placed(uuid))
            done = [c for c in entry.tier if c.uuid == uuid and set(c.placements) <= on_gpu]
        for copy in done:
            self._drop_tier(entry, copy)
            self.promotions += 1

    # --- what clients get -------------------------------------------------------------

    def manifest(self, entry_id: str, wanted: Mapping[str, list[str]]) -> tuple[list[ArenaInfo], list[Placement]]:
        """The arenas and placements of ``wanted`` (uuid -> keys), for a manifest."""
        arenas: dict[str, ArenaInfo] = {}
        placements: list[Placement] = []
        with self._lock:
            entry = self._entries.get(entry_id, _Entry())
            for uuid, keys in wanted.items():
                placed = entry.placed(uuid)
                for key in keys:
                    if key in placed:
                        arena, placement = placed[key]
                        placements.append(placement)
                        if arena.id not in arenas:
                            arenas[arena.id] = ArenaInfo(arena.id, "", arena.buffer.nbytes, uuid, dict(arena.handle))
        return list(arenas.values()), placements

    def buffer(self, entry_id: str, arena_id: str) -> DeviceBuffer:
        """The buffer of GPU arena ``arena_id`` of checkpoint ``entry_id`` (for a descriptor)."""
        with self._lock:
            entry = self._entries.get(entry_id, _Entry())
            for arena in entry.arenas:
                if arena.id == arena_id:
                    return arena.buffer
        raise UsageError(f"GPU arena {arena_id!r} is not part of the checkpoint this lease holds")

    # --- budgets, eviction, the host tier ---------------------------------------------

    def resident(self) -> dict[str, int]:
        """Bytes held per GPU UUID (every GPU, zeros included)."""
        with self._lock:
            totals = {uuid: 0 for uuid in self.budgets}
            for entry in self._entries.values():
                for arena in entry.arenas:
                    totals[arena.uuid] = totals.get(arena.uuid, 0) + arena.buffer.nbytes
        return totals

    def resident_of(self, entry_id: str) -> dict[str, int]:
        with self._lock:
            entry = self._entries.get(entry_id, _Entry())
            totals: dict[str, int] = {}
            for arena in entry.arenas:
                totals[arena.uuid] = totals.get(arena.uuid, 0) + arena.buffer.nbytes
            for copy in entry.tier:
                name = f"host-tier:{copy.uuid}"
                totals[name] = totals.get(name, 0) + len(copy.host)
        return totals

    def tier_bytes(self) -> int:
        with self._lock:
            return sum(len(c.host) for e in self._entries.values() for c in e.tier)

    def _reserve(self, uuid: str, nbytes: int, loading: str, evictable: Evictable) -> None:
        """Count ``nbytes`` against the GPU's budget, moving unleased arenas (LRU first) out to fit."""
        budget = self.budgets.get(uuid)
        while True:
            with self._lock:
                used = self.resident().get(uuid, 0) + self._reserved.get(uuid, 0)
                if budget is None or used + nbytes <= budget:
                    self._reserved[uuid] = self._reserved.get(uuid, 0) + nbytes
                    return
                victim = self._take_victim(uuid, loading, evictable)
            if victim is None:
                raise OverBudgetError(
                    f"needs {nbytes} bytes on GPU {uuid}; its budget is {budget} bytes, {used} resident or being "
                    "loaded, held by leases. Release leases, evict checkpoints (`ckptd evict`), or raise --gpu-budget."
                )
            self._to_host_tier(*victim)

    def _allocate(self, uuid: str, nbytes: int, loading: str, evictable: Evictable) -> DeviceBuffer:
        """A buffer on GPU ``uuid``. The budget counts only the cache's own arenas (CUDA
        contexts and other processes use the GPU too), so the GPU itself may be full:
        then unleased arenas move out (LRU first) and the allocation is tried once more."""
        try:
            return self.devices.allocate(uuid, nbytes)
        except DeviceOutOfMemoryError as exc:
            failure = exc
        freed = self._evict(uuid, nbytes, loading, evictable)
        if freed:
            try:
                return self.devices.allocate(uuid, nbytes)
            except DeviceOutOfMemoryError as exc:
                failure = exc
        raise OverBudgetError(
            f"GPU {uuid} is out of memory for {nbytes} bytes ({failure}); evicting unleased arenas freed {freed} "
            "bytes. Release leases, evict checkpoints (`ckptd evict`), or lower --gpu-budget to leave room for "
            "the CUDA contexts and other processes on that GPU."
        ) from failure

    def _evict(self, uuid: str, nbytes: int, loading: str, evictable: Evictable) -> int:
        """Move unleased arenas on ``uuid`` out (LRU first) until ``nbytes`` are freed or
        none is left; the bytes freed."""
        freed = 0
        while freed < nbytes:
            with self._lock:
                victim = self._take_victim(uuid, loading, evictable)
            if victim is None:
                break
            freed += victim[1].buffer.nbytes
            self._to_host_tier(*victim)
        return freed

    def _take_victim(self, uuid: str, loading: str, evictable: Evictable) -> tuple[_Entry, _GpuArena] | None:
        """The least recently used evictable arena on ``uuid``, removed from its entry (lock held)."""
        candidates = [
            (entry, arena)
            for entry_id, entry in self._entries.items()
            if entry_id != loading and evictable(entry_id)
            for arena in entry.arenas
            if arena.uuid == uuid
        ]
        victim = min(candidates, key=lambda c: c[1].last_used, default=None)
        if victim is not None:
            victim[0].arenas.remove(victim[1])  # no client can be handed it from now on
        return victim

    def _to_host_tier(self, entry: _Entry, arena: _GpuArena) -> None:
        """Move an unleased GPU arena (already taken from its entry) to host memory, or free it
        when the tier is full."""
        self.evictions += 1
        try:
            if self._make_tier_room(arena.buffer.nbytes):
                host = self.devices.host_buffer(arena.buffer.nbytes)
                arena.buffer.read(0, host)
                with self._lock:
                    entry.tier.append(_TierCopy(arena.uuid, host, dict(arena.placements)))
                logger.info("GPU arena %s (%d bytes) moved to the host tier", arena.id, arena.buffer.nbytes)
            else:
                logger.info("GPU arena %s (%d bytes) freed (host tier full)", arena.id, arena.buffer.nbytes)
        finally:
            arena.buffer.free()

    def _make_tier_room(self, nbytes: int) -> bool:
        if nbytes > self.host_tier_budget:
            return False
        while self.tier_bytes() + nbytes > self.host_tier_budget:
            with self._lock:
                oldest = min(
                    ((e, c) for e in self._entries.values() for c in e.tier), key=lambda t: t[1].last_used, default=None
                )
            if oldest is None:
                return False
            self._drop_tier(*oldest)
        return True

    def _drop_tier(self, entry: _Entry, copy: _TierCopy) -> None:
        """Forget a host-tier copy (its memory goes with its last reference)."""
        with self._lock:
            if copy in entry.tier:
                entry.tier.remove(copy)

    def drop(self, entry_id: str) -> None:
        """Free every GPU arena and host-tier copy of a checkpoint (clients keep what they opened)."""
        with self._lock:
            entry = self._entries.pop(entry_id, None)
        if entry is None:
            return
        for arena in entry.arenas:
            arena.buffer.free()
        entry.tier.clear()  # host copies are freed with their last reference

    def close(self) -> None:
        """Free everything (daemon shutdown)."""
        for entry_id in list(self._entries):
            self.drop(entry_id)
