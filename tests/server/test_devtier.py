"""The cache's GPU tier on simulated devices: placement by UUID, peer copies, the host tier.

Every test reads back the bytes a client would see through the exported handles and
compares them with torch.load's tensors; byte counters tell a disk read from a peer copy
or a promotion from the host tier.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.engine import Manifest
from ckptd.gpu import SimulatedDevices
from ckptd.server._cache import Cache
from ckptd.server._devtier import DeviceTier
from ckptd.server._metrics import Metrics
from ckptd_testlib import saved_as

KB = 1 << 10


class Reads(Metrics):
    """The daemon's metrics, also counting the bytes the cache read from checkpoint files."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def read(self, nbytes: int) -> None:
        super().read(nbytes)
        self.bytes += nbytes


@pytest.fixture
def gpus(tmp_path: Path) -> SimulatedDevices:
    (tmp_path / "gpu").mkdir()
    return SimulatedDevices(2, tmp_path / "gpu")


def _cache(root: Path, gpus: SimulatedDevices, *, gpu_budget: int = 1 << 30, tier_budget: int = 1 << 30) -> tuple[Cache, Reads]:
    shm = root / "shm"
    shm.mkdir(exist_ok=True)
    settings = types.SimpleNamespace(roots=[root], host_budget=1 << 30, shm_dir=shm, lease_ttl=30.0)
    budgets = {d.uuid: gpu_budget for d in gpus.visible()}
    reads = Reads()
    return Cache(settings, reads, DeviceTier(gpus, budgets, tier_budget)), reads


def _state(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(16 * KB // 4, generator=g) for i in range(n)} | {"b": torch.arange(7)}


Two = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@pytest.fixture
def two(tmp_path: Path) -> Two:
    """Two checkpoints of the same size, saved as a.pt and b.pt."""
    a, b = _state(1), _state(2)
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    return a, b


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in state.values())


def _on_gpu(manifest: Manifest, gpus: SimulatedDevices) -> dict[str, tuple[str, bytes]]:
    """key -> (GPU UUID, bytes) as a client opening the manifest's handles sees them."""
    arenas = {a.id: a for a in manifest.arenas}
    found = {}
    for p in manifest.placements:
        arena = arenas[p.arena]
        if arena.device == "cpu":
            continue
        storage, _ = gpus.open(arena.handle)
        found[p.key] = (arena.device, bytes(storage[p.offset : p.offset + p.nbytes].tolist()))
    return found


def _expect(manifest: Manifest, state: dict[str, torch.Tensor], gpus: SimulatedDevices, uuid: str) -> None:
    seen = _on_gpu(manifest, gpus)
    by_key = {e.storage_keys[0]: e.name for e in manifest.layout.tensors}
    assert set(seen) == set(by_key)
    for key, (device, data) in seen.items():
        assert device == uuid
        assert data == bytes(state[by_key[key]].untyped_storage().tolist())


def test_cuda_target_lands_on_that_gpu(tmp_path: Path, gpus: SimulatedDevices) -> None:
    state = _state()
    torch.save(state, tmp_path / "m.pt")
    cache, reads = _cache(tmp_path, gpus)
    manifest = cache.load(str(tmp_path / "m.pt"), map_location="cuda:1", devices=gpus.table())
    _expect(manifest, state, gpus, gpus.uuid_of(1))
    assert all(a.device != "cpu" for a in manifest.arenas)  # nothing staged in host memory for the client
    assert reads.bytes == _nbytes(state) and gpus.moved["h2d"] == _nbytes(state)
    info = cache.checkpoints()[0]
    assert info.resident_bytes["cpu"] == 0 and info.resident_bytes[gpus.uuid_of(1)] >= _nbytes(state)
    assert cache.stats()["gpu_sharing"].startswith("simulated")
    assert (info.misses, info.hits) == (1, 0)
    again = cache.load(str(tmp_path / "m.pt"), map_location="cuda:1", devices=gpus.table())
    assert again.arenas == manifest.arenas and reads.bytes == _nbytes(state)  # resident: a hit, nothing read
    assert (cache.checkpoints()[0].misses, cache.checkpoints()[0].hits) == (1, 1)


def test_client_ordinals_are_translated_by_uuid(tmp_path: Path, gpus: SimulatedDevices) -> None:
    state = _state()
    torch.save(state, tmp_path / "m.pt")
    cache, _ = _cache(tmp_path, gpus)
    client_sees_gpu1_only = {"cuda:0": gpus.uuid_of(1)}  # CUDA_VISIBLE_DEVICES=1 in the client
    manifest = cache.load(str(tmp_path / "m.pt"), map_location="cuda:0", devices=client_sees_gpu1_only)
    _expect(manifest, state, gpus, gpus.uuid_of(1))
    with pytest.raises(ckptd.DeviceError, match=r"CUDA device 1 but torch.cuda.device_count\(\) is 1"):
        cache.load(str(tmp_path / "m.pt"), map_location="cuda:1", devices=client_sees_gpu1_only)
    with pytest.raises(ckptd.DeviceError, match="not visible"):
        cache.load(str(tmp_path / "m.pt"), map_location="cuda:0", devices={"cuda:0": "GPU-not-here"})


def test_saved_on_cuda1_remapped_to_cuda0(tmp_path: Path, gpus: SimulatedDevices) -> None:
    state = _state()
    with saved_as("cuda:1"):  # this machine has no GPU to save from
        torch.save(state, tmp_path / "m.pt")
    cache, _ = _cache(tmp_path, gpus)
    manifest = cache.load(str(tmp_path / "m.pt"), map_location={"cuda:1": "cuda:0"}, devices=gpus.table())
    _expect(manifest, state, gpus, gpus.uuid_of(0))
    saved_place = cache.load(str(tmp_path / "m.pt"), map_location=None, devices=gpus.table())
    _expect(saved_place, state, gpus, gpus.uuid_of(1))


def test_cpu_targets_and_clients_without_gpus_stay_in_host_memory(tmp_path: Path, gpus: SimulatedDevices) -> None:
    torch.save(_state(), tmp_path / "m.pt")
    cache, _ = _cache(tmp_path, gpus)
    assert all(a.device == "cpu" for a in cache.load(str(tmp_path / "m.pt"), map_location="cpu", devices=gpus.table()).arenas)
    # no table: the client places (and raises torch's errors where it has no CUDA)
    assert all(a.device == "cpu" for a in cache.load(str(tmp_path / "m.pt"), map_location="cuda:0").arenas)
    assert gpus.moved["h2d"] == 0


def test_second_gpu_gets_a_peer_copy_not_a_disk_read(tmp_path: Path, gpus: SimulatedDevices) -> None:
    state = _state()
    torch.save(state, tmp_path / "m.pt")
    cache, reads = _cache(tmp_path, gpus)
    cache.load(str(tmp_path / "m.pt"), map_location="cuda:0", devices=gpus.table())
    read_once = reads.bytes
    manifest = cache.load(str(tmp_path / "m.pt"), map_location="cuda:1", devices=gpus.table())
    _expect(manifest, state, gpus, gpus.uuid_of(1))
    assert reads.bytes == read_once and gpus.moved["peer"] == _nbytes(state)


def test_host_resident_storages_are_copied_up_not_reread(tmp_path: Path, gpus: SimulatedDevices) -> None:
    state = _state()
    torch.save(state, tmp_path / "m.pt")
    cache, reads = _cache(tmp_path, gpus)
    cache.load(str(tmp_path / "m.pt"), map_location="cpu", devices=gpus.table())
    manifest = cache.load(str(tmp_path / "m.pt"), map_location="cuda:0", devices=gpus.table())
    _expect(manifest, state, gpus, gpus.uuid_of(0))
    assert reads.bytes == _nbytes(state)  # the file was read once, for the host copy


def test_gpu_budget_moves_unleased_arenas_to_the_host_tier_and_back(tmp_path: Path, gpus: SimulatedDevices, two: Two) -> None:
    a, b = two
    cache, reads = _cache(tmp_path, gpus, gpu_budget=_nbytes(a) + 1024)
    first = cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table())
    cache.release(first.lease)
    second = cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table())  # a moves out
    _expect(second, b, gpus, gpus.uuid_of(0))
    assert gpus.moved["d2h"] >= _nbytes(a) and cache.stats()["host_tier_bytes"] >= _nbytes(a)
    assert cache.stats()["gpu_evictions"] == 1
    exposition = reads.render().decode()
    assert "ckptd_gpu_evictions_total 1.0" in exposition
    assert f'ckptd_resident_bytes{{device="host-tier"}} {float(cache.stats()["host_tier_bytes"])}' in exposition
    cache.release(second.lease)
    read_before, h2d_before = reads.bytes, gpus.moved["h2d"]
    again = cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table())  # promoted back
    _expect(again, a, gpus, gpus.uuid_of(0))
    assert reads.bytes == read_before  # from the host tier, not the file
    assert gpus.moved["h2d"] - h2d_before == _nbytes(a)


def test_leased_gpu_arenas_are_never_moved(tmp_path: Path, gpus: SimulatedDevices, two: Two) -> None:
    a, b = two
    cache, _ = _cache(tmp_path, gpus, gpu_budget=_nbytes(a) + 1024)
    held = cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table())
    with pytest.raises(ckptd.OverBudgetError, match=f"GPU {gpus.uuid_of(0)}") as info:
        cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table())
    assert isinstance(info.value, MemoryError)
    _expect(held, a, gpus, gpus.uuid_of(0))  # untouched
    assert gpus.moved["d2h"] == 0
    # the other GPU still has room
    _expect(cache.load(str(tmp_path / "b.pt"), map_location="cuda:1", devices=gpus.table()), b, gpus, gpus.uuid_of(1))


def test_full_host_tier_frees_instead(tmp_path: Path, gpus: SimulatedDevices, two: Two) -> None:
    a, b = two
    cache, reads = _cache(tmp_path, gpus, gpu_budget=_nbytes(a) + 1024, tier_budget=0)
    cache.release(cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table()).lease)
    cache.release(cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table()).lease)
    assert cache.stats()["host_tier_bytes"] == 0 and gpus.moved["d2h"] == 0
    before = reads.bytes
    _expect(cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table()), a, gpus, gpus.uuid_of(0))
    assert reads.bytes - before == _nbytes(a)  # read again from the file


def test_evict_and_close_free_gpu_memory(tmp_path: Path, gpus: SimulatedDevices) -> None:
    torch.save(_state(), tmp_path / "m.pt")
    cache, _ = _cache(tmp_path, gpus)
    manifest = cache.load(str(tmp_path / "m.pt"), map_location="cuda:0", devices=gpus.table())
    assert gpus.allocated[gpus.uuid_of(0)] > 0
    cache.release(manifest.lease)
    cache.evict(str(tmp_path / "m.pt"))
    assert gpus.allocated[gpus.uuid_of(0)] == 0
    cache.load(str(tmp_path / "m.pt"), map_location="cuda:1", devices=gpus.table())
    cache.close()
    assert set(gpus.allocated.values()) == {0}
    assert not list((tmp_path / "gpu").iterdir())


def test_big_endian_file_reaches_the_gpu_swapped(tmp_path: Path, gpus: SimulatedDevices) -> None:
    from ckptd_testlib import save_bytes

    state = {"w": torch.arange(1000, dtype=torch.float32), "i": torch.arange(9, dtype=torch.int64)}
    (tmp_path / "be.pt").write_bytes(save_bytes(state, "zip_big"))
    cache, _ = _cache(tmp_path, gpus)
    manifest = cache.load(str(tmp_path / "be.pt"), map_location="cuda:0", devices=gpus.table())
    _expect(manifest, state, gpus, gpus.uuid_of(0))


def test_concurrent_loads_never_overrun_a_gpu_budget(tmp_path: Path, gpus: SimulatedDevices) -> None:
    import threading

    states = [_state(i) for i in range(4)]
    for i, state in enumerate(states):
        torch.save(state, tmp_path / f"c{i}.pt")
    budget = _nbytes(states[0]) + 1024  # room for one checkpoint at a time
    cache, _ = _cache(tmp_path, gpus, gpu_budget=budget)
    peak, outcomes = [0], []
    real_allocate = gpus.allocate

    def allocate(uuid: str, nbytes: int):
        buffer = real_allocate(uuid, nbytes)
        peak[0] = max(peak[0], gpus.allocated[uuid])
        return buffer

    gpus.allocate = allocate  # type: ignore[method-assign]

    def load(i: int) -> None:
        try:
            cache.load(str(tmp_path / f"c{i}.pt"), map_location="cuda:0", devices=gpus.table())  # the lease is kept
            outcomes.append("ok")
        except ckptd.OverBudgetError:
            outcomes.append("over")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "over", "over", "over"]  # leased: nothing could be moved out
    assert peak[0] <= budget


# --- issue 13: concurrent cold fills, out of device memory, real pinned bytes ---


def test_concurrent_cold_placements_never_deadlock_on_a_small_staging_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from ckptd.formats import FileSource
    from ckptd.gpu import StagingPool

    (tmp_path / "gpu").mkdir()
    gpus = SimulatedDevices(2, tmp_path / "gpu")
    pool = StagingPool(gpus.host_buffer, count=2, nbytes=4 * KB)  # fewer buffers than the fills' reader threads
    gpus.staging = pool
    real_readinto = FileSource.readinto

    def slow_readinto(self: FileSource, buffer: memoryview, offset: int) -> None:
        time.sleep(0.002)  # a slow disk: every fill is still reading when the others start
        real_readinto(self, buffer, offset)

    monkeypatch.setattr(FileSource, "readinto", slow_readinto)
    states = [_state(40 + i) for i in range(4)]
    for i, state in enumerate(states):
        torch.save(state, tmp_path / f"cold{i}.pt")
    cache, _ = _cache(tmp_path, gpus)
    for round_ in range(3):
        manifests: dict[int, Manifest] = {}
        errors: list[BaseException] = []

        def place(i: int) -> None:
            try:
                manifests[i] = cache.load(str(tmp_path / f"cold{i}.pt"), map_location=f"cuda:{i % 2}", devices=gpus.table())
            except BaseException as exc:  # noqa: BLE001  (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=place, args=(i,), daemon=True) for i in range(len(states))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [t for t in threads if t.is_alive()]
        if hung:  # free the stuck readers so the process can exit, then fail
            for _ in range(64):
                pool.give(memoryview(bytearray(4 * KB)))
            pytest.fail(f"round {round_}: {len(hung)} concurrent cold placements deadlocked on the staging pool")
        assert not errors, errors
        for i, state in enumerate(states):
            _expect(manifests[i], state, gpus, gpus.uuid_of(i % 2))
            cache.release(manifests[i].lease)
            cache.evict(str(tmp_path / f"cold{i}.pt"))  # cold again next round


def test_gpu_out_of_memory_evicts_unleased_arenas_and_retries(tmp_path: Path, two: Two) -> None:
    a, b = two
    (tmp_path / "gpu").mkdir()
    # the budget (1 GiB) allows both, but the GPU itself holds about one checkpoint: what
    # CUDA contexts and other processes leave of a real GPU
    gpus = SimulatedDevices(1, tmp_path / "gpu", memory=_nbytes(a) + _nbytes(b) // 2)
    cache, _ = _cache(tmp_path, gpus)
    cache.release(cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table()).lease)
    second = cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table())  # a moves out
    _expect(second, b, gpus, gpus.uuid_of(0))
    assert cache.stats()["gpu_evictions"] == 1 and cache.stats()["host_tier_bytes"] >= _nbytes(a)


def test_gpu_out_of_memory_with_everything_leased_names_the_gpu(tmp_path: Path, two: Two) -> None:
    a, b = two
    (tmp_path / "gpu").mkdir()
    gpus = SimulatedDevices(1, tmp_path / "gpu", memory=_nbytes(a) + _nbytes(b) // 2)
    cache, _ = _cache(tmp_path, gpus)
    held = cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table())
    with pytest.raises(ckptd.OverBudgetError, match=f"GPU {gpus.uuid_of(0)} is out of memory") as info:
        cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table())
    assert isinstance(info.value, MemoryError) and isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    _expect(held, a, gpus, gpus.uuid_of(0))  # untouched


def test_pinned_bytes_are_counted_and_released_with_the_host_tier(tmp_path: Path, gpus: SimulatedDevices, two: Two) -> None:
    a, _ = two
    cache, metrics = _cache(tmp_path, gpus, gpu_budget=_nbytes(a) + 1024)
    cache.release(cache.load(str(tmp_path / "a.pt"), map_location="cuda:0", devices=gpus.table()).lease)
    staging = cache.stats()["pinned_bytes"]  # the staging pool, made by the first fill
    assert staging == gpus.staging.count * gpus.staging.nbytes
    cache.release(cache.load(str(tmp_path / "b.pt"), map_location="cuda:0", devices=gpus.table()).lease)  # a -> host tier
    tier = cache.stats()["host_tier_bytes"]
    assert tier > 0 and cache.stats()["pinned_bytes"] == staging + tier  # what was asked for, not a power of two
    (gauge,) = [line for line in metrics.render().decode().splitlines() if line.startswith("ckptd_pinned_bytes ")]
    assert float(gauge.split()[1]) == staging + tier
    cache.evict(str(tmp_path / "a.pt"))  # the host-tier copy goes, and its pinned memory with it
    assert cache.stats()["host_tier_bytes"] == 0 and cache.stats()["pinned_bytes"] == staging
