"""The daemon's cache in-process: identity, single flight, budgets, leases, roots."""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd.engine import Manifest
from ckptd.server import _cache as cache_module
from ckptd.server._cache import Cache
from ckptd_testlib import StalledWrite, StallUnavailable, blocked_in_syscall, wait_for

MB = 1 << 20
_MEMFD = re.compile(r"/memfd:(ckptd-[0-9a-f]{24}) \(deleted\)")


def _live_arenas() -> dict[str, int]:
    """The cache's memory files alive in this process, held by a descriptor or a mapping: name -> bytes."""
    live: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found = _MEMFD.fullmatch(os.readlink(f"/proc/self/fd/{fd}"))
            if found:
                live[found[1]] = os.stat(f"/proc/self/fd/{fd}").st_size
        except OSError:  # closed meanwhile (listdir's own descriptor, another thread's)
            continue
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            found = _MEMFD.fullmatch(fields[5].strip()) if len(fields) == 6 else None
            if found:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                live.setdefault(found[1], end - start)
    return live


@pytest.fixture
def live() -> Callable[[], dict[str, int]]:
    """The cache's arenas that came to life during this test and are still alive (name -> bytes)."""
    before = set(_live_arenas())
    return lambda: {name: n for name, n in _live_arenas().items() if name not in before}


def _alive(info: Any) -> bool:
    """Whether arena ``info`` (an :class:`ArenaInfo`) still exists in this process."""
    return info.handle["name"] in _live_arenas()


def _settings(root: Path, *, budget: int = 64 * MB, ttl: float = 30.0) -> types.SimpleNamespace:
    shm = root / "shm"
    shm.mkdir(exist_ok=True)
    return types.SimpleNamespace(roots=[root], host_budget=budget, shm_dir=shm, lease_ttl=ttl)


def _save(path: Path, mb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}": torch.randn(MB // 4, generator=g) for i in range(mb)}
    torch.save(sd, path)
    return sd


def _arena_bytes(manifest: Manifest, key: str) -> bytes:
    placement = next(p for p in manifest.placements if p.key == key)
    arena = next(a for a in manifest.arenas if a.id == placement.arena)
    with open(arena.path, "rb") as f:
        f.seek(placement.offset)
        return f.read(placement.nbytes)


def test_storages_land_in_anonymous_shared_memory_passed_read_only(tmp_path: Path) -> None:
    sd = _save(tmp_path / "m.pt", 2)
    cache = Cache(_settings(tmp_path), None)
    manifest = cache.load(str(tmp_path / "m.pt"))
    assert list((tmp_path / "shm").iterdir()) == []  # no file a dead daemon could leave behind
    for arena in manifest.arenas:
        assert _MEMFD.fullmatch(os.readlink(arena.path))
        fd = cache.arena_fd(manifest.lease, arena.id)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY  # clients cannot write the cache
            assert os.fstat(fd).st_size == arena.nbytes
        finally:
            os.close(fd)
    layout = manifest.layout
    for entry in layout.tensors:
        assert _arena_bytes(manifest, entry.storage_keys[0]) == sd[entry.name].numpy().tobytes()


def test_second_load_is_a_hit_and_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "m.pt", 2)
    cache = Cache(_settings(tmp_path), None)
    first = cache.load(str(tmp_path / "m.pt"))
    calls: list[int] = []
    real = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: calls.append(a[3]) or real(*a))
    second = cache.load(str(tmp_path / "m.pt"))
    assert calls == [] and second.arenas == first.arenas and second.lease != first.lease
    (info,) = cache.checkpoints()
    assert (info.hits, info.misses, info.leases) == (1, 1, 2)


def test_concurrent_loads_read_the_disk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "m.pt", 8)
    cache = Cache(_settings(tmp_path), None)
    sent: list[int] = []
    real = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: sent.append(real(*a)) or sent[-1])
    start = threading.Barrier(6)
    results: list[Manifest] = []

    def load() -> None:
        start.wait()
        results.append(cache.load(str(tmp_path / "m.pt")))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len({tuple(a.id for a in r.arenas) for r in results}) == 1
    assert sum(sent) == 8 * MB  # every storage byte once


def test_selective_load_reads_only_what_it_needs_then_tops_up(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", 4)
    cache = Cache(_settings(tmp_path), None)
    one = cache.load(str(tmp_path / "m.pt"), tensor_name="layer2")
    assert [p.nbytes for p in one.placements] == [MB]
    assert cache.checkpoints()[0].resident_bytes["cpu"] < 2 * MB
    everything = cache.load(str(tmp_path / "m.pt"))
    assert len(everything.placements) == 4 and cache.checkpoints()[0].resident_bytes["cpu"] < 5 * MB


def test_a_replaced_file_is_a_new_checkpoint(tmp_path: Path, live: Callable[[], dict[str, int]]) -> None:
    path = tmp_path / "m.pt"
    _save(path, 1, seed=1)
    cache = Cache(_settings(tmp_path), None)
    old = cache.load(str(path))
    new_sd = _save(path, 1, seed=2)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    new = cache.load(str(path))
    assert new.checkpoint != old.checkpoint
    assert _arena_bytes(new, "0") == new_sd["layer0"].numpy().tobytes()
    assert _alive(old.arenas[0])  # leased: kept for the client that maps it
    cache.release(old.lease)
    assert not _alive(old.arenas[0]) and len(live()) == 1
    assert [c.id for c in cache.checkpoints()] == [new.checkpoint]


def test_lru_eviction_under_the_budget_spares_leased_checkpoints(tmp_path: Path) -> None:
    for name in "abc":
        _save(tmp_path / f"{name}.pt", 4)
    cache = Cache(_settings(tmp_path, budget=9 * MB), None)
    a = cache.load(str(tmp_path / "a.pt"))
    b = cache.load(str(tmp_path / "b.pt"))
    cache.release(b.lease)
    cache.load(str(tmp_path / "c.pt"))  # must evict b (unleased), never a (leased)
    paths = {Path(c.path).name for c in cache.checkpoints()}
    assert paths == {"a.pt", "c.pt"} and cache.stats()["evictions"] == 1
    assert _alive(a.arenas[0])


def test_over_budget_is_a_clear_error_and_nothing_changes(tmp_path: Path, live: Callable[[], dict[str, int]]) -> None:
    _save(tmp_path / "a.pt", 4)
    _save(tmp_path / "big.pt", 8)
    cache = Cache(_settings(tmp_path, budget=10 * MB), None)
    cache.load(str(tmp_path / "a.pt"))
    with pytest.raises(ckptd.OverBudgetError, match="host-budget"):
        cache.load(str(tmp_path / "big.pt"))
    assert cache.stats()["resident_bytes"] == {"cpu": cache.checkpoints()[0].resident_bytes["cpu"]}
    assert len(live()) == 1


def test_expired_leases_are_reaped(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path, ttl=30.0), None)
    now = [0.0]
    cache.leases._clock = lambda: now[0]
    lease = cache.load(str(tmp_path / "m.pt")).lease
    now[0] = 29.0
    assert cache.reap() == 0 and cache.renew(lease) == 30.0
    now[0] = 60.0
    assert cache.reap() == 1
    with pytest.raises(ckptd.LeaseLostError):
        cache.renew(lease)
    assert cache.checkpoints()[0].leases == 0


def test_evict_refuses_leased_and_frees_unleased(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path), None)
    manifest = cache.load(str(tmp_path / "m.pt"))
    with pytest.raises(ckptd.CheckpointBusyError):
        cache.evict(manifest.checkpoint)
    cache.release(manifest.lease)
    resident = cache.checkpoints()[0].resident_bytes
    evicted = cache.evict(str(tmp_path / "m.pt"))
    assert evicted.id == manifest.checkpoint
    # what was freed, not what is still resident (nothing)
    assert evicted.freed_bytes == resident == {"cpu": sum(arena.nbytes for arena in manifest.arenas)}
    assert evicted.resident_bytes == {"cpu": 0} and evicted.storages_resident == 0
    assert cache.checkpoints() == [] and not _alive(manifest.arenas[0])
    with pytest.raises(ckptd.CheckpointNotFoundError):
        cache.evict(manifest.checkpoint)


def test_paths_outside_the_roots_are_refused_before_opening(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    _save(outside / "m.pt", 1)
    (root / "link.pt").symlink_to(outside / "m.pt")
    cache = Cache(_settings(root), None)
    for path in (outside / "m.pt", root / "link.pt", root / ".." / "outside" / "m.pt"):
        with pytest.raises(ckptd.PathNotAllowedError, match="outside the daemon's roots"):
            cache.load(str(path))
    with pytest.raises(ckptd.CheckpointNotFoundError):
        cache.load(str(root / "missing.pt"))
    (root / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ckptd.CheckpointError, match="bad.pt"):
        cache.load(str(root / "bad.pt"))
    assert cache.checkpoints() == []


def test_close_frees_every_arena(tmp_path: Path, live: Callable[[], dict[str, int]]) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path), None)
    cache.load(str(tmp_path / "m.pt"))
    assert len(live()) == 1
    cache.close()
    assert live() == {}


def test_a_file_truncated_under_the_daemon_leaves_nothing_behind(tmp_path: Path, live: Callable[[], dict[str, int]]) -> None:
    path = tmp_path / "m.pt"
    _save(path, 4)
    cache = Cache(_settings(tmp_path), None)
    layout_first = cache.load(str(path), tensor_name="layer0")  # layout now cached, identity recorded
    cache.release(layout_first.lease)
    with open(path, "r+b") as f:  # same inode, shorter: the identity check catches it
        f.truncate(os.path.getsize(path) - 2 * MB)
    with pytest.raises(ckptd.CheckpointError):
        cache.load(str(path))
    assert len(live()) <= 1


def test_end_session_releases_only_that_sessions_leases(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path), None)
    mine = cache.load(str(tmp_path / "m.pt"), session="s1")
    cache.load(str(tmp_path / "m.pt"), session="s1")
    other = cache.load(str(tmp_path / "m.pt"), session="s2")
    cache.load(str(tmp_path / "m.pt"))  # no session: lives by renewal alone
    assert cache.end_session("s1") == 2
    assert cache.checkpoints()[0].leases == 2
    with pytest.raises(ckptd.LeaseLostError):
        cache.renew(mine.lease)
    assert cache.renew(other.lease) == 30.0
    assert cache.end_session("s1") == 0  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"map_location": "foo"}, ckptd.DeviceError),
        ({"map_location": "cuda:-1"}, ckptd.DeviceError),
        ({"map_location": {"cpu": "cuda:x"}}, ckptd.DeviceError),
        ({"map_location": 5}, ckptd.UsageError),
        ({"tensor_name": "layer0", "select": ["layer1"]}, ckptd.UsageError),
    ],
    ids=["foo", "cuda:-1", "dict-value", "not-json", "tensor_name+select"],
)
def test_bad_arguments_are_refused_before_any_lease_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict, error: type
) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path), None)
    opened: list[str] = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    with pytest.raises(error):
        cache.load(str(tmp_path / "m.pt"), **kwargs)
    assert opened == [] and cache.leases.total() == 0 and cache.checkpoints() == []


@pytest.mark.parametrize("path", ["/m/a\x00.pt", "/a" * 3000])
def test_unnameable_paths_are_usage_errors(tmp_path: Path, path: str) -> None:
    cache = Cache(_settings(tmp_path), None)
    for call in (cache.load, cache.prefetch, cache.evict):
        with pytest.raises(ckptd.UsageError):
            call(path)


def test_sessions_release_leases_only_with_their_last_connection(tmp_path: Path) -> None:
    _save(tmp_path / "m.pt", 1)
    cache = Cache(_settings(tmp_path), None)
    cache.begin_session("S")
    cache.begin_session("S")
    cache.load(str(tmp_path / "m.pt"), session="S")
    assert cache.end_session("S") == 0 and cache.stats()["leases"] == 1
    assert cache.stats()["sessions"] == 1
    assert cache.end_session("S") == 1 and cache.stats()["leases"] == 0


def test_memory_clients_with_lapsed_leases_may_map_stays_counted(tmp_path: Path) -> None:
    """A hung client's lease expires and its checkpoint is evicted, but unlinking frees
    nothing while it maps the pages: they count against the budget until it lets go."""
    _save(tmp_path / "a.pt", 4)
    _save(tmp_path / "b.pt", 4, seed=1)
    clock = [0.0]
    cache = Cache(_settings(tmp_path, budget=6 * MB, ttl=10.0), None)
    cache.leases._clock = lambda: clock[0]  # noqa: SLF001  (time travel)
    lease = cache.load(str(tmp_path / "a.pt")).lease
    clock[0] += 11
    assert cache.reap() == 1
    info = cache.evict(str(tmp_path / "a.pt"))
    assert cache.stats()["unreclaimed_bytes"] == info.freed_bytes["cpu"] >= 4 * MB
    with pytest.raises(ckptd.OverBudgetError, match="lapsed"):
        cache.load(str(tmp_path / "b.pt"))  # 4 MiB more would pass 6 MiB with the hung client's 4
    cache.release(lease)  # the client woke up and let go
    assert cache.stats()["unreclaimed_bytes"] == 0
    assert cache.load(str(tmp_path / "b.pt")).arenas


def test_a_model_directory_is_its_checkpoint_and_stays_inside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    sd = _save(root / "model" / "pytorch_model.bin", 1)
    cache = Cache(_settings(root), None)
    manifest = cache.load(str(root / "model"))
    assert manifest.path == os.path.realpath(root / "model" / "pytorch_model.bin")
    assert [t.name for t in manifest.layout.tensors] == list(sd)
    cache.release(manifest.lease)
    (root / "escape").mkdir()
    _save(outside / "pytorch_model.bin", 1)
    (root / "escape" / "pytorch_model.bin").symlink_to(outside / "pytorch_model.bin")
    with pytest.raises(ckptd.PathNotAllowedError, match="outside the daemon's roots"):
        cache.load(str(root / "escape"))
    (root / "empty").mkdir()
    with pytest.raises(ckptd.CheckpointError, match="not a regular file"):
        cache.load(str(root / "empty"))


# --- an entry's life while it is being read (issue 12: 1, 2, 5) ---------------------------


class _ReadGate:
    """Holds the cache's first storage read until :meth:`open` (a first load caught mid-read);
    ``during`` runs inside that read, before the bytes are read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, during: Callable[[], None] | None = None) -> None:
        self.reading = threading.Event()
        self._go = threading.Event()
        self.calls = 0
        real = cache_module.read_storages

        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                self.reading.set()
                assert self._go.wait(10), "the test never let the read go on"
            if during is not None:
                during()
            return real(*args, **kwargs)

        monkeypatch.setattr(cache_module, "read_storages", held)

    def open(self) -> None:
        self._go.set()


def _in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``work`` in a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # noqa: BLE001  (the test inspects it)
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _assert_no_leak(cache: Cache, live: Callable[[], dict[str, int]]) -> None:
    """Every byte of shared memory alive is an arena stats, ls and the budget know about."""
    listed = sum(c.resident_bytes["cpu"] for c in cache.checkpoints())
    assert sum(live().values()) == cache.stats()["resident_bytes"]["cpu"] == listed


def _placed_bytes(manifest: Manifest) -> dict[str, bytes]:
    return {p.key: _arena_bytes(manifest, p.key) for p in manifest.placements}


def _expected_bytes(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {str(i): sd[f"layer{i}"].numpy().tobytes() for i in range(len(sd))}


def _other_version(tmp_path: Path, mb: int, seed: int) -> tuple[dict[str, torch.Tensor], bytes]:
    """Another checkpoint of the same size as ``m.pt`` (torch.save names the archive after the file)."""
    (tmp_path / "next").mkdir(exist_ok=True)
    sd = _save(tmp_path / "next" / "m.pt", mb, seed)
    return sd, (tmp_path / "next" / "m.pt").read_bytes()


def _next_ctime_tick(tmp_path: Path, after_ns: int) -> None:
    """Wait until a file changed now gets a ctime later than ``after_ns`` (ctimes move in clock
    ticks: a change within the tick of the last one would look like no change)."""
    probe = tmp_path / "ctime-probe"
    while True:
        probe.write_bytes(b"x")
        if probe.stat().st_ctime_ns > after_ns:
            return


def test_evicting_a_checkpoint_during_its_first_load_is_refused_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: Callable[[], dict[str, int]]
) -> None:
    sd = _save(tmp_path / "m.pt", 4)
    cache = Cache(_settings(tmp_path), None)
    gate = _ReadGate(monkeypatch)
    thread, out = _in_thread(lambda: cache.load(str(tmp_path / "m.pt")))
    assert gate.reading.wait(10)
    with pytest.raises(ckptd.CheckpointBusyError, match="load is reading it"):
        cache.evict(str(tmp_path / "m.pt"))
    gate.open()
    thread.join()
    (manifest,) = out
    assert _placed_bytes(manifest) == _expected_bytes(sd)
    _assert_no_leak(cache, live)
    assert sum(live().values()) >= 4 * MB
    cache.release(manifest.lease)
    cache.evict(str(tmp_path / "m.pt"))
    assert sum(live().values()) == 0 and cache.stats()["resident_bytes"]["cpu"] == 0


def test_a_load_waiting_on_an_entry_its_first_load_dropped_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: Callable[[], dict[str, int]]
) -> None:
    """The first load fails and drops its entry while a second waits for that entry's lock:
    the second must not fill the dropped entry (an arena nothing would ever free)."""
    sd = _save(tmp_path / "m.pt", 2)
    cache = Cache(_settings(tmp_path), None)
    second_has_entry = threading.Event()
    real_entry_for, real_read = cache._entry_for, cache_module.read_storages
    calls = {"entry": 0, "read": 0}

    def entry_for(path: str) -> Any:
        entry = real_entry_for(path)
        calls["entry"] += 1
        if calls["entry"] == 2:
            second_has_entry.set()
        return entry

    def read(*args: Any, **kwargs: Any) -> Any:
        calls["read"] += 1
        if calls["read"] == 1:
            assert second_has_entry.wait(10)
            raise ckptd.CheckpointError("m.pt", "injected read failure")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(cache, "_entry_for", entry_for)
    monkeypatch.setattr(cache_module, "read_storages", read)
    loads = [_in_thread(lambda: cache.load(str(tmp_path / "m.pt"))) for _ in range(2)]
    for thread, _ in loads:
        thread.join()
    # Either thread may take the entry's lock first: that one gets the injected failure.
    outcomes = [out[0] for _, out in loads]
    assert sum(isinstance(o, ckptd.CheckpointError) for o in outcomes) == 1, outcomes
    (manifest,) = [o for o in outcomes if not isinstance(o, BaseException)]
    assert _placed_bytes(manifest) == _expected_bytes(sd)
    _assert_no_leak(cache, live)
    cache.release(manifest.lease)
    cache.evict(manifest.checkpoint)
    assert sum(live().values()) == 0


def test_replacing_the_file_during_its_first_load_leaks_nothing_and_serves_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: Callable[[], dict[str, int]]
) -> None:
    path = tmp_path / "m.pt"
    _save(path, 4, seed=1)
    cache = Cache(_settings(tmp_path), None)
    gate = _ReadGate(monkeypatch)
    thread, out = _in_thread(lambda: cache.load(str(path)))
    assert gate.reading.wait(10)
    new_sd = _save(tmp_path / "new.pt", 4, seed=2)
    os.replace(tmp_path / "new.pt", path)
    second = cache.load(str(path))  # retires the entry being loaded
    assert _placed_bytes(second) == _expected_bytes(new_sd)
    gate.open()
    thread.join()
    (first,) = out
    assert _placed_bytes(first) == _expected_bytes(new_sd)  # the read of the old file was thrown away
    _assert_no_leak(cache, live)
    for manifest in (first, second):
        cache.release(manifest.lease)
    assert len(cache.checkpoints()) == 1
    cache.evict(str(path))
    assert sum(live().values()) == 0 and cache.stats()["resident_bytes"]["cpu"] == 0


def test_an_in_place_rewrite_that_restores_the_mtime_is_not_served_stale(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    _save(path, 2, seed=1)
    before = os.stat(path)
    cache = Cache(_settings(tmp_path), None)
    cache.release(cache.load(str(path)).lease)
    new_sd, new_bytes = _other_version(tmp_path, 2, seed=2)
    assert len(new_bytes) == before.st_size
    _next_ctime_tick(tmp_path, before.st_ctime_ns)
    with open(path, "r+b") as f:  # same inode, same size
        f.write(new_bytes)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the mtime put back
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    manifest = cache.load(str(path))
    assert _placed_bytes(manifest) == _expected_bytes(new_sd)


def _overwriter(path: Path, contents: list[bytes], tmp_path: Path) -> Callable[[], None]:
    """Inside a read: rewrite ``path`` in place (mtime restored) with the next of ``contents``."""
    turn = [0]

    def overwrite() -> None:
        if turn[0] >= len(contents):
            return
        st = os.stat(path)
        _next_ctime_tick(tmp_path, st.st_ctime_ns)
        with open(path, "r+b") as f:
            f.write(contents[turn[0]][: len(contents[turn[0]]) // 2])  # a writer halfway through
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        turn[0] += 1

    return overwrite


def test_a_read_torn_by_an_overwrite_is_neither_cached_nor_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: Callable[[], dict[str, int]]) -> None:
    path = tmp_path / "m.pt"
    _save(path, 4, seed=1)
    new_sd, new_bytes = _other_version(tmp_path, 4, seed=2)
    assert len(new_bytes) == path.stat().st_size
    cache = Cache(_settings(tmp_path), None)
    cache.release(cache.load(str(path), tensor_name="layer0").lease)  # layout and identity known
    cache.evict(str(path))
    half = _overwriter(path, [new_bytes], tmp_path)

    def finish_writing() -> None:  # the second read sees the writer done
        path.write_bytes(new_bytes)

    cache_calls = [half, finish_writing]
    monkeypatch.setattr(cache_module, "read_storages", _calling_first(cache_calls, cache_module.read_storages))
    manifest = cache.load(str(path))
    assert _placed_bytes(manifest) == _expected_bytes(new_sd)
    assert len(cache.checkpoints()) == 1
    _assert_no_leak(cache, live)


def test_a_file_that_keeps_changing_under_every_read_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: Callable[[], dict[str, int]]) -> None:
    path = tmp_path / "m.pt"
    _save(path, 2, seed=1)
    others = [_other_version(tmp_path, 2, seed)[1] for seed in (2, 3, 4)]
    cache = Cache(_settings(tmp_path), None)
    monkeypatch.setattr(cache_module, "read_storages", _calling_first([_overwriter(path, others, tmp_path)] * 3,
                                                                      cache_module.read_storages))
    with pytest.raises(ckptd.CheckpointError, match="changed on disk") as exc:
        cache.load(str(path), tensor_name="layer0")
    assert "m.pt" in str(exc.value)
    assert cache.checkpoints() == [] and sum(live().values()) == 0


def _calling_first(befores: list[Callable[[], None]], real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, calling the next of ``befores`` before each call (none once they run out)."""
    queue = list(befores)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if queue:
            queue.pop(0)()
        return real(*args, **kwargs)

    return wrapped


def test_an_identity_is_taken_only_once_the_tick_of_the_files_last_change_is_over(tmp_path: Path) -> None:
    """Else a write later in that tick would keep the ctime, and a torn read would pass the check."""
    path = tmp_path / "fresh.pt"
    path.write_bytes(b"written just now")
    st = cache_module._settled_stat(str(path))
    assert st.st_ctime_ns < time.clock_gettime_ns(cache_module._CLOCK_REALTIME_COARSE)


_LSEEK, _PREAD64 = 8, 17  # x86-64 system call numbers (StalledWrite runs there only)


def test_a_write_in_progress_when_a_load_begins_is_waited_for_not_read_torn(tmp_path: Path) -> None:
    """A ``write()`` that began before the load (its ctime change already made) and is
    stopped midway, as a preempted writer is: the load waits for it to finish and returns
    the new file whole; it never reads the half-written bytes, which no check could spot."""
    _save(tmp_path / "m.pt", 2, seed=1)
    new, data = _other_version(tmp_path, 2, seed=2)
    fd = os.open(tmp_path / "m.pt", os.O_WRONLY)
    try:
        try:
            writer = StalledWrite(fd, data, 0, stall_at=len(data) // 2 // 4096 * 4096)
        except StallUnavailable as exc:
            pytest.skip(f"cannot stop a write midway here: {exc}")
        released = False
        try:
            writer.wait_stalled()
            cache = Cache(_settings(tmp_path), None)
            load, out = _in_thread(lambda: cache.load(str(tmp_path / "m.pt")))
            wait_for(lambda: not load.is_alive() or blocked_in_syscall(load, {_LSEEK, _PREAD64}),
                     "the load to finish or to wait on the write")
            writer.release()
            released = True
            load.join()
        finally:
            if not released:
                writer.release()
    finally:
        os.close(fd)
    (manifest,) = out
    assert isinstance(manifest, Manifest), manifest
    assert writer.written == len(data)
    assert _placed_bytes(manifest) == _expected_bytes(new)
    cache.release(manifest.lease)
    cache.close()
