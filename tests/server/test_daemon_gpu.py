"""The daemon with simulated GPUs: placement by UUID across processes, IPC lifecycle, leases.

A real ``ckptd serve --devices simulated`` subprocess and client processes that see the
simulated GPUs through ``CUDA_VISIBLE_DEVICES`` as real ones would: ``cuda:0`` in a
client started with ``CUDA_VISIBLE_DEVICES=1`` must land on the daemon's GPU 1.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.gpu import SimulatedDevices
from ckptd_testlib import Daemon, cached_entry, daemon_in, report_of, saved_as, wait_for

WORKER = textwrap.dedent(
    """
    import json, sys, torch, ckptd
    url, path, out = sys.argv[1:4]
    with ckptd.Client(url) as client:
        state = client.load(path, map_location="cuda:0")
        sums = {k: float(v.double().sum()) for k, v in state.items()}
        with open(out + ".tmp", "w") as f:
            json.dump({"sums": sums, "checkpoints": client.checkpoints()}, f)
        import os; os.replace(out + ".tmp", out)
        sys.stdin.readline()
    """
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("gpudaemon"), "--devices", "simulated", "--simulated-gpus", "2")


@pytest.fixture
def gpus(daemon: Daemon) -> SimulatedDevices:
    return SimulatedDevices(2, daemon.shm)  # this process sees both GPUs


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16)}


def _gpu_files(daemon: Daemon) -> list[Path]:
    return sorted(daemon.shm.glob("ckptd-gpu*"))


def _worker(tmp: Path, daemon: Daemon, path: Path, visible: str) -> tuple[subprocess.Popen, Path]:
    script = tmp / "gpu_worker.py"
    script.write_text(WORKER)
    out = tmp / f"worker-{visible}.json"
    env = {**os.environ, "CKPTD_SIMULATED_GPUS": "2", "CUDA_VISIBLE_DEVICES": visible}
    proc = subprocess.Popen([sys.executable, str(script), daemon.url, str(path), str(out)], stdin=subprocess.PIPE, text=True, env=env)
    return proc, out


def test_worker_cuda0_is_the_gpu_it_sees(daemon: Daemon, gpus: SimulatedDevices, tmp_path: Path) -> None:
    state = _state(1)
    path = daemon.root / "visible.pt"
    torch.save(state, path)
    proc, out = _worker(tmp_path, daemon, path, visible="1")
    try:
        report = report_of(proc, out)
    finally:
        proc.communicate("\n", timeout=30)
    assert report["sums"] == {k: float(v.double().sum()) for k, v in state.items()}
    (entry,) = [c for c in report["checkpoints"] if c["path"] == str(path)]
    assert entry["resident_bytes"].get(gpus.uuid_of(1), 0) > 0  # physical GPU 1
    assert gpus.uuid_of(0) not in entry["resident_bytes"] and entry["resident_bytes"]["cpu"] == 0


def test_remap_and_share_one_gpu_arena_then_release(daemon: Daemon, gpus: SimulatedDevices, tmp_path: Path) -> None:
    state = _state(2)
    path = daemon.root / "on_cuda1.pt"
    with saved_as("cuda:1"):
        torch.save(state, path)
    before = set(_gpu_files(daemon))
    with ckptd.Client(daemon.url, devices=gpus) as client:
        mine = client.load(path, map_location={"cuda:1": "cuda:0"})
        for name, tensor in state.items():
            assert torch.equal(mine[name], tensor) and mine[name].dtype == tensor.dtype
        new = set(_gpu_files(daemon)) - before
        assert len(new) == 1  # one arena on one GPU for the whole checkpoint
        assert cached_entry(client, path)["resident_bytes"][gpus.uuid_of(0)] > 0
        proc, out = _worker(tmp_path, daemon, path, visible="0")  # another process, same GPU: same arena
        try:
            report_of(proc, out)
            assert set(_gpu_files(daemon)) - before == new
            assert cached_entry(client, path)["leases"] == 2
        finally:
            proc.communicate("\n", timeout=30)
        wait_for(lambda: cached_entry(client, path)["leases"] == 1, "the worker's lease released at its close", timeout=15.0)
        del mine
        gc.collect()  # the last tensor gone: the handle closes and the lease goes
        wait_for(lambda: cached_entry(client, path)["leases"] == 0, "the lease released when the tensors died", timeout=15.0)
        client.evict(str(path))
    assert set(_gpu_files(daemon)) == before  # the GPU memory is freed


def test_killed_worker_loses_its_gpu_lease(daemon: Daemon, gpus: SimulatedDevices, tmp_path: Path) -> None:
    path = daemon.root / "killed.pt"
    torch.save(_state(3), path)
    proc, out = _worker(tmp_path, daemon, path, visible="0,1")
    report_of(proc, out)
    with ckptd.Client(daemon.url) as client:
        assert cached_entry(client, path)["leases"] == 1
        wait_for(lambda: client.stats()["sessions"] >= 1, "the worker's session connection", timeout=15.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()
        wait_for(lambda: cached_entry(client, path)["leases"] == 0, "the killed worker's lease to end", timeout=15.0)
        client.evict(str(path))
        assert client.stats()["gpu_sharing"].startswith("simulated")


# --- read-only GPU mappings (CUDA VMM, simulated): descriptors over the descriptor socket ---

WRITER = textwrap.dedent(
    """
    import sys, torch, ckptd
    url, path = sys.argv[1:3]
    client = ckptd.Client(url)
    state = client.load(path, map_location="cuda:0")
    print(float(state["w"].double().sum()), flush=True)
    state["w"].zero_()  # a read-only mapping: this faults, in this process only
    print("wrote", flush=True)
    """
)


@pytest.fixture(scope="module")
def ro_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("rodaemon"), "--devices", "simulated", "--simulated-gpus", "2",
                         "--gpu-sharing", "vmm")


def test_read_only_mapping_from_a_passed_descriptor(ro_daemon: Daemon, tmp_path: Path) -> None:
    state = _state(4)
    path = ro_daemon.root / "ro.pt"
    torch.save(state, path)
    gpus = SimulatedDevices(2, ro_daemon.shm)
    with ckptd.Client(ro_daemon.url, devices=gpus) as client:
        mine = client.load(path, map_location="cuda:1")
        for name, tensor in state.items():
            assert torch.equal(mine[name], tensor)
        assert client.stats()["gpu_sharing"].startswith("simulated read-only")
        assert Path(ro_daemon.sock + ".fd").stat().st_mode & 0o777 == 0o600

        script = tmp_path / "writer.py"
        script.write_text(WRITER)
        env = {**os.environ, "CKPTD_SIMULATED_GPUS": "2", "CUDA_VISIBLE_DEVICES": "1"}
        no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731  (the crash is the point)
        writer = subprocess.run([sys.executable, str(script), ro_daemon.url, str(path)], capture_output=True, text=True,
                                env=env, timeout=120, preexec_fn=no_core)
        assert writer.returncode == -signal.SIGSEGV, (writer.returncode, writer.stderr[-2000:])
        assert writer.stdout.split() == [str(float(state["w"].double().sum()))]  # it read, then died writing
        assert torch.equal(mine["w"], state["w"])  # nobody else saw a thing
        again = client.load(path, map_location="cuda:1")
        assert torch.equal(again["w"], state["w"])


def test_descriptor_socket_checks_the_lease(ro_daemon: Daemon) -> None:
    from ckptd._client import receive_fd

    path = ro_daemon.root / "guarded.pt"
    torch.save(_state(5), path)
    gpus = SimulatedDevices(2, ro_daemon.shm)
    with ckptd.Client(ro_daemon.url, devices=gpus) as client:
        manifest = client._manifest(path, "cuda:0", None, None, None)
        (arena,) = manifest.arenas
        fd = receive_fd(ro_daemon.url, manifest.lease, arena.id)
        os.close(fd)
        with pytest.raises(ckptd.LeaseLostError):
            receive_fd(ro_daemon.url, "no-such-lease", arena.id)
        with pytest.raises(ckptd.UsageError, match="not part of the checkpoint"):
            receive_fd(ro_daemon.url, manifest.lease, "gpu-0000")
        with pytest.raises(ckptd.DaemonError, match="Unix socket"):
            receive_fd("http://127.0.0.1:9", manifest.lease, arena.id)
        client.renew(manifest.lease)
        client._release(manifest.lease)
        with pytest.raises(ckptd.LeaseLostError):
            receive_fd(ro_daemon.url, manifest.lease, arena.id)


# --- a worker's GPU load: identity and handle opening only (issue 13, item 7) ---

PROBE = textwrap.dedent(
    """
    import json, sys, torch, ckptd
    url, path, out = sys.argv[1:4]
    with ckptd.Client(url) as client:
        state = client.load(path, map_location="cuda:0")
        devices = client._devices
        made = vars(devices).get("_staging") or vars(devices).get("staging")  # the staging pool, if any was made
        report = {
            "sums": {k: float(v.double().sum()) for k, v in state.items()},
            "staging_pool": made is not None,
            "pinned": getattr(getattr(devices, "pinned", None), "bytes", None),
            "cupy": "cupy" in sys.modules,
        }
        with open(out, "w") as f:
            json.dump(report, f)
    """
)


def test_worker_first_gpu_load_makes_no_staging_pool_and_pins_nothing(daemon: Daemon, tmp_path: Path) -> None:
    state = _state(7)
    path = daemon.root / "probe.pt"
    torch.save(state, path)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "probe.json"
    env = {**os.environ, "CKPTD_SIMULATED_GPUS": "2", "CUDA_VISIBLE_DEVICES": "1"}
    done = subprocess.run([sys.executable, str(script), daemon.url, str(path), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["sums"] == {k: float(v.double().sum()) for k, v in state.items()}
    assert report == {**report, "staging_pool": False, "pinned": 0, "cupy": False}


# --- a bare "cuda" is the calling thread's current GPU (issue 13, item 5) ---


def test_bare_cuda_goes_to_the_calling_threads_current_gpu(daemon: Daemon, gpus: SimulatedDevices) -> None:
    paths = []
    for i in range(2):
        paths.append(daemon.root / f"current{i}.pt")
        torch.save(_state(20 + i), paths[-1])
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []
    with ckptd.Client(daemon.url, devices=gpus) as client:

        def load_on(index: int) -> None:
            try:
                with gpus.device(index):
                    results[index] = client.load(paths[index], map_location="cuda")
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(exc)

        threads = [threading.Thread(target=load_on, args=(i,)) for i in (1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        for index in range(2):
            resident = cached_entry(client, paths[index])["resident_bytes"]
            other = gpus.uuid_of(1 - index)
            assert resident.get(gpus.uuid_of(index), 0) > 0 and resident.get(other, 0) == 0, (index, resident)
            assert all(torch.equal(results[index][k], v) for k, v in _state(20 + index).items())


def test_daemon_refuses_to_guess_a_bare_cuda(daemon: Daemon, gpus: SimulatedDevices) -> None:
    path = daemon.root / "bare.pt"
    torch.save(_state(30), path)
    with ckptd.Client(daemon.url, devices=gpus) as client:
        body = {"path": str(path), "map_location": "cuda", "devices": gpus.table(), "session": None}
        with pytest.raises(ckptd.UsageError, match="current device"):
            client._request("POST", "/v1/load", json=body)
