"""The daemon's checkpoint cache: storages resident in shared memory, shared by every client.

A cached checkpoint (an *entry*) is identified by its resolved path's
``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``, checked at every load and again
after every read, so a replaced file is a new entry and never served stale, and a read
the file changed under is neither cached nor returned (the load reads the file again).
The ctime catches an in-place rewrite that restores the mtime.

Storages live in anonymous shared-memory arenas (``memfd``) whose descriptors reach
clients over the descriptor socket (:meth:`Cache.arena_fd`); clients map them
copy-on-write. No arena is named in a filesystem, so the kernel frees it with its last
user: a SIGKILLed daemon leaves behind only what its clients still map, and that goes
when they do.

Loads of one entry are single-flight: the first reads what is missing while the others
wait on the entry's lock, then find it resident. Under the host budget, least recently
used entries that no lease holds are evicted; a load that cannot fit fails with
:class:`OverBudgetError` instead of exhausting memory.

An entry's life: created by a load, it is *dropped* (arenas freed, forgotten) by
eviction, by a failed first load, or, once *retired* (its file changed), when its last
lease goes. An entry whose lock a load holds is never dropped (eviction is refused, a
retired one waits for the load to end), so no load attaches an arena to a dropped
entry; a load that finds its entry dropped or retired once it holds the lock starts
again on the current one.

With a GPU backend (a :class:`DeviceTier`), storages that ``map_location`` sends to a GPU
are kept there instead, placed by the GPU's UUID: the client sends its own ``cuda:N`` →
UUID table, so ``cuda:0`` under ``CUDA_VISIBLE_DEVICES=1`` is the daemon's GPU 1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ckptd.engine import (
    ArenaInfo,
    CheckpointBusyError,
    DaemonError,
    DeviceError,
    Manifest,
    OverBudgetError,
    PathNotAllowedError,
    Placement,
    Select,
    UnsupportedFormatError,
    UsageError,
    keys_of,
    plan_storages,
    read_storages,
    wanted_entries,
)
from ckptd.formats import (
    CheckpointError,
    CheckpointNotFoundError,
    Format,
    Layout,
    ShardedIndex,
    checkpoint_in_directory,
    is_sharded_index,
    open_source,
    read_layout,
    read_sharded_index,
)
from ckptd.gpu import Arena, cpu_arena

from ._devtier import DeviceTier
from ._leases import LeaseTable
from ._policy import TierPolicy

logger = logging.getLogger(__name__)

Identity = tuple[int, int, int, int, int]
_CPU = torch.device("cpu")
_T = TypeVar("_T")
_ATTEMPTS = 3  # reads of one request: the first, and again after the file changed under a read
_MAX_TURNS = 1000  # entries one request may find dropped or retired under it before giving up


class CacheSettings(Protocol):
    """The settings the cache reads (a subset of the daemon's :class:`Settings`)."""

    @property
    def roots(self) -> Sequence[Path]: ...
    @property
    def host_budget(self) -> int: ...
    @property
    def lease_ttl(self) -> float: ...


class CacheMetrics(Protocol):
    """What the cache reports (the daemon's Prometheus :class:`Metrics`)."""

    def read(self, nbytes: int) -> None: ...
    def hit(self) -> None: ...
    def miss(self) -> None: ...
    def evicted(self) -> None: ...
    def observe_load(self, seconds: float) -> None: ...
    def set_resident(self, device: str, nbytes: int) -> None: ...
    def set_leases(self, n: int) -> None: ...
    def set_budget(self, device: str, nbytes: int) -> None: ...
    def set_sessions(self, n: int) -> None: ...
    def gpu_evicted(self, n: int = 1) -> None: ...


@dataclass(frozen=True)
class CheckpointInfo:
    """One cached checkpoint, as ``ckptd ls`` shows it."""

    id: str
    path: str
    identity: Identity
    format: str
    resident_bytes: dict[str, int]
    storages_resident: int
    storages_total: int
    leases: int
    hits: int
    misses: int
    last_used: float
    freed_bytes: dict[str, int] = field(default_factory=dict)  # what the eviction that returned this freed

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**vars(self), "identity": list(self.identity)}


@dataclass(eq=False)
class _Entry:
    id: str
    path: str
    identity: Identity
    lock: threading.Lock = field(default_factory=threading.Lock)
    layout: Layout | None = None
    arenas: dict[str, Arena] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    last_used: float = field(default_factory=time.time)
    stale: bool = False  # retired: the file changed; dropped once no lease and no load holds it
    dropped: bool = False  # arenas freed and forgotten: a load that finds this starts again

    @property
    def nbytes(self) -> int:
        return sum(arena.nbytes for arena in self.arenas.values())


class Cache:
    """Checkpoints resident in shared memory, handed out under leases.

    >>> import tempfile, types
    >>> root = tempfile.mkdtemp()
    >>> settings = types.SimpleNamespace(roots=[Path(root)], host_budget=1 << 30, shm_dir=Path(root), lease_ttl=30.0)
    >>> cache = Cache(settings, metrics=None)
    >>> cache.checkpoints()
    []
    """

    def __init__(self, settings: CacheSettings, metrics: CacheMetrics | None, tier: DeviceTier | None = None) -> None:
        self._roots = [Path(os.path.realpath(root)) for root in settings.roots]
        self._budget = settings.host_budget
        self._metrics = metrics
        self.leases = LeaseTable(settings.lease_ttl)
        self._entries: dict[str, _Entry] = {}
        self._current: dict[str, str] = {}  # resolved path -> id of the entry serving it
        self._evictions = 0
        self._lock = threading.RLock()
        # Host memory is a tier like each GPU: the same budget / LRU / lease policy.
        self._host: TierPolicy[_Entry] = TierPolicy(
            "host memory", self._budget, self._lock, self._entries.values, self._evict_entry, self._evicted,
            unheld=self._unreclaimed_bytes,
        )
        self._tier = tier
        self._unreclaimed: dict[str, int] = {}  # dropped entry -> bytes clients with lapsed leases may map
        self._gpu_evictions_reported = 0
        if metrics:
            metrics.set_budget("cpu", self._budget)
            for uuid, budget in (tier.budgets if tier else {}).items():
                metrics.set_budget(uuid, budget)

    @property
    def has_gpus(self) -> bool:
        """Whether this cache keeps storages on GPUs (a device tier)."""
        return self._tier is not None

    # --- requests -------------------------------------------------------------------

    def load(
        self,
        path: str,
        *,
        map_location: str | dict[str, str] | None = None,
        tensor_name: str | None = None,
        prefix: str | None = None,
        select: Select = None,
        devices: Mapping[str, str] | None = None,
        session: str | None = None,
    ) -> Manifest:
        """Make the requested storages resident; return where they are, under a new lease.

        ``map_location`` is a device string or a dict of location tags. Storages it sends
        to ``cuda:N`` go to the GPU whose UUID is ``devices['cuda:N']`` (the client's own
        table) when the daemon has GPUs; everything else stays in host memory and the
        client places it. The lease belongs to ``session`` when given (see :meth:`end_session`).
        """
        _check_map_location(map_location)  # every argument is checked before any I/O or lease
        if tensor_name is not None and select is not None:
            raise UsageError("pass either tensor_name= or select=, not both")
        started = time.perf_counter()

        def load_entry(entry: _Entry) -> Manifest:
            layout = self._layout(entry)
            wanted = wanted_entries(layout, tensor_name, prefix, select)
            keys = list(layout.storages) if wanted is None else keys_of(wanted)
            gpu = self._gpu_targets(layout, keys, map_location, devices)
            on_gpu = {k for ks in gpu.values() for k in ks}
            swap = layout.byteorder != sys.byteorder  # GPU copies come from the host copy, swapped there
            hosted = [k for k in keys if k not in on_gpu or swap or layout.storages[k].compressed_size is not None]
            fresh = self._make_resident(entry, layout, hosted)  # (and so do inflated ones)
            for uuid, gpu_keys in gpu.items():
                fresh = self._place_on_gpu(entry, layout, uuid, gpu_keys) or fresh
            self._count(entry, fresh)
            lease = self.leases.create(entry.id, session)
            return self._manifest(entry, layout, [k for k in keys if k not in on_gpu], lease.id, gpu)

        manifest = self._with_entry(path, load_entry)
        self._observe(started)
        return manifest

    def prefetch(self, path: str) -> CheckpointInfo:
        """Make every storage of ``path`` resident, with no lease (the next load is a hit)."""

        def prefetch_entry(entry: _Entry) -> CheckpointInfo:
            layout = self._layout(entry)
            self._count(entry, self._make_resident(entry, layout, list(layout.storages)))
            return self._info(entry)

        return self._with_entry(path, prefetch_entry)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every cached checkpoint, most recently used first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
        return [self._info(entry) for entry in entries]

    def evict(self, ident: str) -> CheckpointInfo:
        """Drop a checkpoint (by id or path) that no lease holds: its info after the eviction
        (nothing resident), with ``freed_bytes`` what was resident before, per device."""
        _check_path(ident)
        with self._lock:
            entry = self._entries.get(ident) or self._entries.get(self._current.get(os.path.realpath(ident), ""))
            if entry is None:
                raise CheckpointNotFoundError(ident, "is not cached (see `ckptd ls`)")
            info = self._info(entry)
            if info.leases:
                raise CheckpointBusyError(f"{entry.path}: {info.leases} lease(s) hold it; it is evicted once released")
            if entry.lock.locked():  # dropping it now would leave the load's arena to no one
                raise CheckpointBusyError(f"{entry.path}: a load is reading it right now; evict it once that is done")
            self._drop(entry)
            self._evictions += 1
        if self._metrics:
            self._metrics.evicted()
        gone = {device: 0 for device in info.resident_bytes}
        return replace(info, resident_bytes=gone, storages_resident=0, freed_bytes=dict(info.resident_bytes))

    def renew(self, lease: str) -> float:
        """Extend a lease; :class:`LeaseLostError` if it is gone."""
        return self.leases.renew(lease)

    def release(self, lease: str) -> None:
        """Drop a lease (idempotent); a replaced checkpoint goes once its last lease does."""
        checkpoint = self.leases.release(lease)
        if checkpoint is not None:
            self._forget_if_stale(checkpoint)
        self._report()

    def arena_fd(self, lease: str, arena: str) -> int:
        """A new descriptor of ``arena`` (host memory, or a GPU buffer shared by descriptor),
        for the holder of ``lease`` only: the descriptor socket's check. The caller closes it.
        """
        checkpoint = self.leases.checkpoint_of(lease)
        with self._lock:
            entry = self._entries.get(checkpoint)
            host = entry.arenas.get(arena) if entry is not None else None
            if host is not None:
                return host.share_fd()  # under the lock: not closed by an eviction meanwhile
        if self._tier is None:
            raise CheckpointNotFoundError(arena, "is no arena of the checkpoint this lease holds")
        return self._tier.buffer(checkpoint, arena).share_fd()

    def sharded_index(self, path: str) -> ShardedIndex:
        """A sharded checkpoint's ``*.index.json``, read here (inside the roots) for clients that
        cannot read the file themselves: they then load it shard by shard."""
        real = os.path.realpath(path)
        if not any(Path(real).is_relative_to(root) for root in self._roots):
            raise PathNotAllowedError(f"{path} resolves to {real}, outside the daemon's roots")
        if not is_sharded_index(real):
            raise UsageError(f"{path} is not a sharded checkpoint index (*.index.json)")
        return read_sharded_index(real)

    def host_arena(self, lease: str, arena: str) -> Arena:
        """Host arena ``arena`` of the checkpoint ``lease`` holds, for streaming its bytes to a
        client that cannot map it (:class:`LeaseLostError` without a live lease; valid while
        the returned arena object lives, even if evicted meanwhile)."""
        checkpoint = self.leases.checkpoint_of(lease)
        with self._lock:
            entry = self._entries.get(checkpoint)
            found = entry.arenas.get(arena) if entry is not None else None
        if found is None:
            raise CheckpointNotFoundError(arena, "is no host arena of the checkpoint this lease holds")
        return found

    def begin_session(self, session: str) -> None:
        """A client opened a session connection (counted in :meth:`stats`)."""
        self.leases.open_session(session)
        self._report()

    def end_session(self, session: str) -> int:
        """A client's session connection dropped; when it was the session's last (its process
        died), release the session's leases now. Returns how many were released."""
        ended = self.leases.close_session(session)
        for lease in ended:
            logger.info("lease %s on %s released: its client's connection closed", lease.id, lease.checkpoint)
            self._forget_if_stale(lease.checkpoint)
        self._report()
        return len(ended)

    def reap(self) -> int:
        """Expire overdue leases (clients that died); returns how many."""
        expired = self.leases.reap()
        for lease in expired:
            logger.info("lease %s on %s expired", lease.id, lease.checkpoint)
            self._forget_if_stale(lease.checkpoint)
        if expired:
            self._report()
        return len(expired)

    def stats(self) -> dict[str, object]:
        """Totals for ``ckptd stats`` and ``/v1/stats``."""
        with self._lock:
            entries = list(self._entries.values())
            resident = sum(e.nbytes for e in entries)
        return {
            "checkpoints": len(entries),
            "resident_bytes": {"cpu": resident, **(self._tier.resident() if self._tier else {})},
            "budget_bytes": {"cpu": self._budget, **(self._tier.budgets if self._tier else {})},
            "leases": self.leases.total(),
            "sessions": self.leases.sessions(),
            "unreclaimed_bytes": self._unreclaimed_bytes(),
            "hits": sum(e.hits for e in entries),
            "misses": sum(e.misses for e in entries),
            "evictions": self._evictions,
            "gpu_sharing": self._tier.devices.sharing if self._tier else "none (no GPU backend: host memory only)",
            "host_tier_bytes": self._tier.tier_bytes() if self._tier else 0,
            "pinned_bytes": self._tier.devices.pinned.bytes if self._tier else 0,
            "gpudirect_storage": bool(getattr(self._tier.devices, "gds", False)) if self._tier else False,
            "gpu_evictions": self._tier.evictions if self._tier else 0,
        }

    def close(self) -> None:
        """Free every arena (daemon shutdown); clients that mapped them keep their pages."""
        with self._lock:
            for entry in list(self._entries.values()):
                self.leases.drop_checkpoint(entry.id)
                self._drop(entry)
            if self._tier:
                self._tier.close()

    # --- entries --------------------------------------------------------------------

    def _with_entry(self, path: str, work: Callable[[_Entry], _T]) -> _T:
        """Run ``work`` on the current entry of ``path`` under its lock (single flight).

        An entry dropped or retired while this request waited for its lock is left for the
        current one; a read the file changed under is thrown away and done again on the
        file as it is now (``_ATTEMPTS`` in all). A failed first load leaves no trace.
        """
        changes = 0  # counted, not kept: an exception's traceback would keep the thrown-away arenas mapped
        for _ in range(_MAX_TURNS):
            entry = self._entry_for(path)
            try:
                with entry.lock:
                    if entry.dropped or entry.stale:  # its first load failed, or its file changed: take the current one
                        continue
                    with self._forget_on_failure(entry):
                        return work(entry)
            except _FileChangedError:
                logger.info("%s changed while being read; reading it again", entry.path)
                changes += 1
            finally:
                self._forget_if_stale(entry.id)  # retired while this load held it: its turn now
            if changes == _ATTEMPTS:
                raise CheckpointError(path, f"changed on disk during {_ATTEMPTS} reads in a row; nothing was cached or "
                                      "returned. Load it again once it is completely written")
        raise CheckpointError(path, "was replaced again and again while being loaded; load it again once it settles")

    def _entry_for(self, path: str) -> _Entry:
        real, identity = self._resolve(path)
        with self._lock:
            current = self._entries.get(self._current.get(real, ""))
            if current is not None and current.identity == identity:
                current.last_used = time.time()
                return current
            if current is not None:
                logger.info("%s changed on disk; the cached copy is retired", real)
                current.stale = True
                del self._current[real]
                self._forget_if_stale(current.id)
            entry = _Entry(_entry_id(real, identity), real, identity)
            self._entries[entry.id] = entry
            self._current[real] = entry.id
            return entry

    @contextlib.contextmanager
    def _forget_on_failure(self, entry: _Entry) -> Iterator[None]:
        """A load that fails leaves no trace: an entry it created holding nothing is dropped."""
        try:
            yield
        except BaseException:
            with self._lock:
                if not entry.arenas and not self.leases.count(entry.id):
                    self._drop(entry)
            raise

    def _resolve(self, path: str) -> tuple[str, Identity]:
        """The real path (symlinks and ``..`` resolved), checked against the roots, and its identity."""
        _check_path(path)
        real = self._inside_roots(path, os.path.realpath(path))
        if os.path.isdir(real):  # a Hugging Face model directory: its checkpoint file, checked again
            real = self._inside_roots(path, os.path.realpath(checkpoint_in_directory(real)))
        if is_sharded_index(real):
            raise UnsupportedFormatError(real, "sharded checkpoints go through the daemon shard by shard")
        try:
            st = _settled_stat(real)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(path, "no such file") from exc
        except OSError as exc:
            raise CheckpointError(path, f"cannot stat: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(path, "is not a regular file")
        return real, _identity(st)

    def _inside_roots(self, path: str, real: str) -> str:
        if not any(Path(real).is_relative_to(root) for root in self._roots):
            roots = ", ".join(map(str, self._roots))
            raise PathNotAllowedError(f"{path} resolves to {real}, outside the daemon's roots ({roots})")
        return real

    def _layout(self, entry: _Entry) -> Layout:
        if entry.layout is None:
            with open_source(entry.path) as source, self._unchanged_around(entry, source.fileno()):
                # the scan's object record is the client's to rebuild from; not kept while cached
                layout = replace(read_layout(source), scanned=None)
            entry.layout = layout
        return entry.layout

    def _make_resident(self, entry: _Entry, layout: Layout, keys: list[str]) -> bool:
        """Read what of ``keys`` is not in host memory yet; whether anything had to be read."""
        missing = [k for k in keys if k not in entry.placements and layout.storages[k].nbytes]
        if not missing:
            return False
        need = sum(layout.storages[k].nbytes for k in missing) + 64 * len(missing)
        refusal = functools.partial(self._over_budget_message, loading=entry)
        with self._host.reservation(need, lambda other: self._may_evict(other, entry), refusal):
            self._read(entry, layout, missing)
        self._report()
        return True

    def _count(self, entry: _Entry, fresh: bool) -> None:
        """A load that had to read or copy anything is a miss; one served as it was, a hit."""
        if fresh:
            entry.misses += 1
        else:
            entry.hits += 1
        if self._metrics:
            self._metrics.miss() if fresh else self._metrics.hit()

    def _read(self, entry: _Entry, layout: Layout, keys: list[str]) -> None:
        """Read ``keys`` into one new arena; record where each storage landed."""
        created: dict[str, Arena] = {}

        def allocate(_device: torch.device, nbytes: int) -> Arena:
            arena_id = secrets.token_hex(12)
            created[arena_id] = cpu_arena(nbytes, name=f"ckptd-{arena_id}")
            return created[arena_id]

        try:
            with open_source(entry.path) as source, self._unchanged_around(entry, source.fileno()):
                storages = read_storages(source, layout, keys, "cpu", allocator=allocate, keep_open=True)
            with self._lock:
                if entry.dropped:  # only close() drops an entry a load holds
                    raise DaemonError(f"{entry.path}: the cache was closed while the checkpoint was read")
                for arena_id, arena in created.items():  # one: every storage goes to host memory
                    entry.arenas[arena_id] = arena
                    for planned in storages.planned():  # where the placement plan put each storage
                        entry.placements[planned.key] = Placement(planned.key, arena_id, planned.offset, planned.nbytes)
        except BaseException:
            for arena in created.values():  # a failed read frees its memory now
                arena.close()
            raise
        nbytes = sum(layout.storages[k].nbytes for k in keys)
        if self._metrics:
            self._metrics.read(nbytes)
        logger.info("read %d storages (%d bytes) of %s", len(keys), nbytes, entry.path)

    @contextlib.contextmanager
    def _unchanged_around(self, entry: _Entry, fd: int | None) -> Iterator[None]:
        """The file is the one identified before the read, and still after it: what was read
        is not torn by a writer. A write already under way when the identity was taken is
        waited for first (its change is in the identity; its bytes must be too). A read that
        fails while the file changes failed because of the change (a torn structure is no
        corrupt file): it is read again too."""
        if fd is not None:
            try:
                _wait_for_writes_in_progress(fd)
            except OSError as exc:
                raise CheckpointError(entry.path, f"cannot read: {exc.strerror}") from exc
        self._check_unchanged(entry, fd)
        try:
            yield
        except Exception:
            self._check_unchanged(entry, fd)
            raise
        self._check_unchanged(entry, fd)

    def _check_unchanged(self, entry: _Entry, fd: int | None) -> None:
        """The file opened, and the one the path names now, must still be the one identified
        (either may change at any time); if not, the entry is retired and the load retried."""
        opened: Identity | None = None
        named: Identity | None = None
        try:
            opened = _identity(os.fstat(fd)) if fd is not None else entry.identity
            named = _identity(os.stat(entry.path))
        except OSError as exc:  # gone: as changed as it gets
            logger.info("%s: cannot stat: %s", entry.path, exc)
        if opened == entry.identity and named == entry.identity:
            return
        with self._lock:
            entry.stale = True
            if self._current.get(entry.path) == entry.id:
                del self._current[entry.path]
        raise _FileChangedError(entry.path, "changed while being read")

    def _manifest(self, entry: _Entry, layout: Layout, keys: list[str], lease: str, gpu: Mapping[str, list[str]]) -> Manifest:
        placements = [entry.placements[k] for k in keys if k in entry.placements]
        used = {p.arena for p in placements}
        arenas = [
            ArenaInfo(arena_id, _proc_path(arena), arena.nbytes, handle={"fd": True, "name": f"ckptd-{arena_id}"})
            for arena_id, arena in entry.arenas.items()
            if arena_id in used
        ]
        if gpu and self._tier:
            gpu_arenas, gpu_placements = self._tier.manifest(entry.id, gpu)
            arenas += gpu_arenas
            placements += gpu_placements
        return Manifest(entry.id, entry.path, layout, tuple(arenas), tuple(placements), lease, self.leases.ttl)

    # --- GPUs ---------------------------------------------------------------------------

    def _gpu_targets(
        self, layout: Layout, keys: list[str], map_location: str | dict[str, str] | None, devices: Mapping[str, str] | None
    ) -> dict[str, list[str]]:
        """GPU UUID -> the keys the placement plan sends there (none without GPUs or a client table)."""
        groups: dict[str, list[str]] = {}
        if self._tier is None or not devices:
            return groups  # host memory; the client places (and raises torch's errors)
        for planned in plan_storages(layout, keys, map_location, gpus=devices).storages.values():
            uuid = planned.target.gpu
            if uuid is not None:
                self._tier.devices.by_uuid(uuid)  # the daemon must see that GPU too
                groups.setdefault(uuid, []).append(planned.key)
        return groups

    def _place_on_gpu(self, entry: _Entry, layout: Layout, uuid: str, keys: list[str]) -> bool:
        """Make ``keys`` resident on GPU ``uuid``; whether anything had to be copied there."""
        assert self._tier is not None

        def host(key: str) -> memoryview | None:
            placement = entry.placements.get(key)
            return None if placement is None else entry.arenas[placement.arena].host_bytes(placement.offset, placement.nbytes)

        def evictable(entry_id: str) -> bool:
            other = self._entries.get(entry_id)
            return not self.leases.count(entry_id) and (other is None or not other.lock.locked())

        placed, read = self._tier.place(entry.id, entry.path, layout, uuid, keys, host=host, evictable=evictable)
        if self._metrics and read:
            self._metrics.read(read)
        self._report()
        return placed > 0

    # --- budget and eviction ----------------------------------------------------------

    def _may_evict(self, entry: _Entry, loading: _Entry) -> bool:
        """An entry may go to make room: it holds host memory, and no lease and no load holds it."""
        return entry is not loading and bool(entry.arenas) and not self.leases.count(entry.id) and not entry.lock.locked()

    def _evict_entry(self, entry: _Entry) -> None:
        """The host policy's eviction: drop the entry (lock held)."""
        logger.info("evicting %s (%d bytes) to make room", entry.path, entry.nbytes)
        self._drop(entry)
        self._evictions += 1

    def _evicted(self, _entry: _Entry) -> None:
        if self._metrics:
            self._metrics.evicted()

    def _over_budget_message(self, nbytes: int, used: int, *, loading: _Entry) -> str:
        with self._lock:
            held = sum(e.nbytes for e in self._entries.values() if self.leases.count(e.id))
            resident = self._resident()
        return (
            f"{loading.path}: needs {nbytes} more bytes of host memory; the host budget is {self._budget} bytes, "
            f"{resident} resident ({held} held by leases), {self._unreclaimed_bytes()} still mapped by clients "
            "whose leases lapsed. Release leases, evict checkpoints "
            "(`ckptd evict`), or start the daemon with a larger --host-budget."
        )

    def _resident(self) -> int:
        return self._host.resident()

    def _unreclaimed_bytes(self) -> int:
        """Host memory of dropped entries that clients whose leases lapsed may still map.

        Unlinking an arena frees nothing while a process maps it; a client that stopped
        renewing (hung, stopped) but never released keeps its pages. That memory stays
        counted against the host budget until the lease ends for good (see ``_leases``).
        """
        with self._lock:
            lapsed = self.leases.lapsed_checkpoints()
            for checkpoint in [c for c in self._unreclaimed if c not in lapsed]:
                del self._unreclaimed[checkpoint]
            return sum(self._unreclaimed.values())

    def _forget_if_stale(self, checkpoint: str) -> None:
        """Drop a retired entry that no lease holds and no load is using (the load drops it after)."""
        with self._lock:
            entry = self._entries.get(checkpoint)
            if entry is not None and entry.stale and not self.leases.count(entry.id) and not entry.lock.locked():
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        """Free the entry's arenas (clients' mappings stay valid) and forget it."""
        if entry.nbytes and entry.id in self.leases.lapsed_checkpoints():
            self._unreclaimed[entry.id] = self._unreclaimed.get(entry.id, 0) + entry.nbytes
        entry.dropped = True
        for arena in entry.arenas.values():
            arena.unlink()
            arena.close()
        entry.arenas.clear()
        entry.placements.clear()
        if self._tier:
            self._tier.drop(entry.id)
        self._entries.pop(entry.id, None)
        if self._current.get(entry.path) == entry.id:
            del self._current[entry.path]
        self._report()

    # --- reporting --------------------------------------------------------------------

    def _info(self, entry: _Entry) -> CheckpointInfo:
        layout = entry.layout
        return CheckpointInfo(
            id=entry.id,
            path=entry.path,
            identity=entry.identity,
            format=layout.format.value if layout else Format.TORCH_ZIP.value,
            resident_bytes={"cpu": entry.nbytes, **(self._tier.resident_of(entry.id) if self._tier else {})},
            storages_resident=len(entry.placements),
            storages_total=len(layout.storages) if layout else 0,
            leases=self.leases.count(entry.id),
            hits=entry.hits,
            misses=entry.misses,
            last_used=entry.last_used,
        )

    def _observe(self, started: float) -> None:
        if self._metrics:
            self._metrics.observe_load(time.perf_counter() - started)
            self._metrics.set_leases(self.leases.total())

    def _report(self) -> None:
        if self._metrics:
            with self._lock:
                resident = self._resident()
            self._metrics.set_resident("cpu", resident)
            self._metrics.set_sessions(self.leases.sessions())
            if self._tier:
                for uuid, nbytes in self._tier.resident().items():
                    self._metrics.set_resident(uuid, nbytes)
                self._metrics.set_resident("host-tier", self._tier.tier_bytes())
                self._metrics.set_pinned(self._tier.devices.pinned.bytes)
                if self._tier.evictions > self._gpu_evictions_reported:
                    self._metrics.gpu_evicted(self._tier.evictions - self._gpu_evictions_reported)
                    self._gpu_evictions_reported = self._tier.evictions
            self._metrics.set_leases(self.leases.total())


def _proc_path(arena: Arena) -> str:
    """Where a process on this host that cannot use the descriptor socket (a TCP client)
    opens the arena: this process's descriptor, through /proc (it checks the name)."""
    return f"/proc/{os.getpid()}/fd/{arena.fd}"


class _FileChangedError(CheckpointError):
    """The checkpoint's file changed while it was being read: what was read is thrown away."""


_CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # the clock file times come from (Linux)
_SETTLE_S = 0.05


def _settled_stat(path: str) -> os.stat_result:
    """``os.stat(path)``, taken once the clock has left the tick of the file's last change.

    File times move in clock ticks: a change made in the same tick as the last one leaves
    the ctime as it was, so an identity taken during that tick could miss a write that
    follows it. Waiting out the tick (a few ms, only for a file changed just now) means
    every later change shows. Bounded, for a file whose times lie in the future.
    """
    st = os.stat(path)
    deadline = time.monotonic() + _SETTLE_S
    while st.st_ctime_ns >= time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) and time.monotonic() < deadline:
        time.sleep(0.001)
        st = os.stat(path)
    return st


def _wait_for_writes_in_progress(fd: int) -> None:
    """Return once every ``write()`` already begun on the file is complete.

    A write changes the ctime as it begins, then copies its bytes: one that began before
    the identity was taken changes nothing more when it ends, yet a read that meets it
    midway gets half old, half new bytes, and no check after the read could tell. The
    filesystem holds the file's inode lock through a write; seeking for data (ext4,
    tmpfs, btrfs) and a one-byte read (xfs) take that lock, so they wait for such a write.
    Called after the identity was taken: writes begun after it show in the check after
    the read.
    """
    position = os.lseek(fd, 0, os.SEEK_CUR)
    with contextlib.suppress(OSError):  # ENXIO: no data at all (an empty file)
        os.lseek(fd, 0, os.SEEK_DATA)
    os.lseek(fd, position, os.SEEK_SET)
    os.pread(fd, 1, 0)


def _identity(st: os.stat_result) -> Identity:
    """What makes a file the same file: replaced (inode), resized, rewritten (mtime), or
    rewritten with its mtime put back (ctime, which no user can set)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _entry_id(path: str, identity: Identity) -> str:
    return hashlib.sha256(f"{path}\0{identity}".encode()).hexdigest()[:12]


MAX_PATH = 4096  # PATH_MAX


def _check_path(path: str) -> None:
    """Refuse what no file can be named, before resolving costs a system call per component."""
    if "\x00" in path:
        raise UsageError("a path cannot contain a NUL byte")
    if len(path) > MAX_PATH or len(os.fsencode(path)) > MAX_PATH:
        raise UsageError(f"a path is at most {MAX_PATH} bytes (PATH_MAX)")


def _check_map_location(map_location: object) -> None:
    """Only the JSON forms travel (a device string or a dict of location tags), each tag a device torch can name.

    Only the syntax is checked here: whether ``cuda:3`` exists is the client's question
    (its GPUs), asked when it places the storages.
    """
    if map_location is None:
        return
    if isinstance(map_location, str):
        tags = [map_location]
    elif isinstance(map_location, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in map_location.items()):
        tags = list(map_location.values())
    else:
        raise UsageError("map_location must be a device string or a dict of location tags when sent to the daemon")
    for tag in tags:
        try:
            torch.device(tag)
        except RuntimeError as exc:
            raise DeviceError(f"map_location {tag!r} names no device: {exc}") from exc
