"""GPU residency for the cache: arenas per (checkpoint, GPU UUID), GPU budgets, a host tier.

The cache decides *what* a load needs on which GPU (by UUID: the client translated its
``cuda:N`` names); this tier makes it resident there, taking the bytes from the cheapest
place that has them:

1. the host tier (a GPU arena evicted earlier was copied back to host memory): host → device;
2. another GPU holding the same storages: a peer copy, device → device;
3. the cache's host arenas (the storages are host-resident anyway): host → device;
4. the file: chunked reads through host staging, host → device.

Each GPU, and the host tier, is a tier under the cache's one policy (``_policy``, shared
with host memory): under a GPU's budget, the least recently used arenas of checkpoints no
lease holds move to the host tier (under its own budget, least recently used copies
first; past it they are freed). Leased arenas are never touched, and a load that cannot
fit raises :class:`OverBudgetError` naming the GPU: over its budget, or out of memory on
the GPU itself after evicting what it may.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ckptd.engine import ArenaInfo, OverBudgetError, Placement, UsageError, lay_out
from ckptd.formats import Layout
from ckptd.gpu import Copy, DeviceBuffer, DeviceOutOfMemoryError, Devices

from ._policy import TierPolicy

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
    entry_id: str  # the checkpoint it belongs to (what a lease holds)
    handle: dict[str, object] = field(default_factory=dict)  # exported once, handed to every client
    last_used: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


@dataclass(eq=False)
class _TierCopy:
    """A GPU arena's bytes kept in host memory after eviction (same offsets)."""

    uuid: str
    host: memoryview  # pinned where the backend pins: it comes back at host-to-device speed
    placements: dict[str, Placement]
    entry_id: str
    last_used: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return len(self.host)


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
        self.evictions = 0
        self.promotions = 0
        # One policy per GPU, and one for the host tier: the cache's host memory runs the same.
        self._gpus: dict[str, TierPolicy[_GpuArena]] = {}
        self._host_tier: TierPolicy[_TierCopy] = TierPolicy(
            "host tier", host_tier_budget, self._lock, self._tier_copies, self._detach_copy
        )

    def _gpu(self, uuid: str) -> TierPolicy[_GpuArena]:
        """GPU ``uuid``'s policy (no limit for a GPU without a budget)."""
        with self._lock:
            policy = self._gpus.get(uuid)
            if policy is None:
                policy = self._gpus[uuid] = TierPolicy(
                    f"GPU {uuid}", self.budgets.get(uuid), self._lock,
                    lambda: [a for e in self._entries.values() for a in e.arenas if a.uuid == uuid],
                    self._detach_arena, self._to_host_tier,
                )
            return policy

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
        offsets, total, _, _ = lay_out([layout.storages[k] for k in missing], merge=False)  # the placement plan's layout
        may_go = self._evictable_besides(entry_id, evictable)
        with self._gpu(uuid).reservation(total, may_go, functools.partial(self._over_budget_message, uuid)):
            buffer = self._allocate(uuid, total, may_go)
            try:
                from_file = self._fill(entry, path, layout, uuid, buffer, offsets, host)
            except BaseException:
                buffer.free()
                raise
            arena_id = f"gpu-{secrets.token_hex(8)}"
            placements = {k: Placement(k, arena_id, off, layout.storages[k].nbytes) for k, off in offsets.items()}
            arena = _GpuArena(arena_id, uuid, buffer, placements, entry_id, buffer.export())
            with self._lock:
                entry.arenas.append(arena)
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
            with self._lock:
                self._detach_copy(copy)
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
        return self._host_tier.resident()

    @staticmethod
    def _evictable_besides(loading: str, evictable: Evictable) -> Callable[[_GpuArena], bool]:
        """May a GPU arena go: not the loading checkpoint's, and the cache says its checkpoint may."""
        return lambda arena: arena.entry_id != loading and evictable(arena.entry_id)

    def _over_budget_message(self, uuid: str, nbytes: int, used: int) -> str:
        return (
            f"needs {nbytes} bytes on GPU {uuid}; its budget is {self.budgets.get(uuid)} bytes, {used} resident or "
            "being loaded, held by leases. Release leases, evict checkpoints (`ckptd evict`), or raise --gpu-budget."
        )

    def _allocate(self, uuid: str, nbytes: int, evictable: Callable[[_GpuArena], bool]) -> DeviceBuffer:
        """A buffer on GPU ``uuid``. The budget counts only the cache's own arenas (CUDA
        contexts and other processes use the GPU too), so the GPU itself may be full:
        then unleased arenas move out (LRU first) and the allocation is tried once more."""
        try:
            return self.devices.allocate(uuid, nbytes)
        except DeviceOutOfMemoryError as exc:
            failure = exc
        freed = self._gpu(uuid).evict(nbytes, evictable)
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

    def _detach_arena(self, arena: _GpuArena) -> None:
        """A GPU policy's eviction, first half (lock held): no client can be handed it from now on."""
        entry = self._entries.get(arena.entry_id)
        if entry is not None and arena in entry.arenas:
            entry.arenas.remove(arena)

    def _to_host_tier(self, arena: _GpuArena) -> None:
        """A GPU policy's eviction, second half: copy the (detached, unleased) arena to host
        memory, or free it when the host tier cannot take it."""
        self.evictions += 1
        try:
            if self._host_tier.fits(arena.nbytes, lambda copy: True):
                try:
                    host = self.devices.host_buffer(arena.nbytes)
                    arena.buffer.read(0, host)
                    with self._lock:
                        entry = self._entries.get(arena.entry_id)
                        if entry is not None:  # not dropped meanwhile
                            entry.tier.append(_TierCopy(arena.uuid, host, dict(arena.placements), arena.entry_id))
                finally:
                    self._host_tier.release(arena.nbytes)
                logger.info("GPU arena %s (%d bytes) moved to the host tier", arena.id, arena.nbytes)
            else:
                logger.info("GPU arena %s (%d bytes) freed (host tier full)", arena.id, arena.nbytes)
        finally:
            arena.buffer.free()

    def _tier_copies(self) -> list[_TierCopy]:
        return [c for e in self._entries.values() for c in e.tier]

    def _detach_copy(self, copy: _TierCopy) -> None:
        """The host tier's eviction (lock held): forget the copy; its memory goes with its last reference."""
        entry = self._entries.get(copy.entry_id)
        if entry is not None and copy in entry.tier:
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
