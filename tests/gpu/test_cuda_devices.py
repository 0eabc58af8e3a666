"""The CUDA backend and the daemon's GPU tier on a real GPU (marked ``gpu``: skipped without CUDA).

CUDA IPC handles cannot be opened by the process that exported them, so every opening
happens in another process, as it does between the daemon and its workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd_testlib import Daemon, daemon_in

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    pytest.importorskip("cupy")  # the CUDA backend is the gpu extra


def test_uuids_match_torchs() -> None:
    from ckptd.gpu import CudaDevices

    devices = CudaDevices()
    for info in devices.visible():
        assert info.uuid == f"GPU-{torch.cuda.get_device_properties(info.index).uuid}"


def test_buffer_roundtrip_and_peer() -> None:
    from ckptd.gpu import CudaDevices

    devices = CudaDevices()
    first = devices.allocate(devices.uuid_of(0), 1 << 20)
    data = os.urandom(1 << 20)
    first.write(0, memoryview(data))
    out = memoryview(bytearray(1 << 20))
    first.read(0, out)
    assert bytes(out) == data
    if len(devices.visible()) > 1:
        second = devices.allocate(devices.uuid_of(1), 1 << 20)
        second.copy_from(0, first, 0, 1 << 20)
        second.read(0, out)
        assert bytes(out) == data
        second.free()
    first.free()


OPENER = textwrap.dedent(
    """
    import json, sys, torch
    from ckptd.gpu import CudaDevices
    handle = json.loads(sys.stdin.read())
    storage, mapping = CudaDevices().open(handle)
    tensor = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    print(json.dumps({"device": str(tensor.device), "sum": int(tensor.long().sum())}))
    """
)


def test_ipc_handle_opens_in_another_process(tmp_path: Path) -> None:
    from ckptd.gpu import CudaDevices

    devices = CudaDevices()
    buffer = devices.allocate(devices.uuid_of(0), 4096)
    buffer.write(0, memoryview(bytes([3]) * 4096))
    script = tmp_path / "opener.py"
    script.write_text(OPENER)
    out = subprocess.run([sys.executable, str(script)], input=json.dumps(buffer.export()), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"device": "cuda:0", "sum": 3 * 4096}
    buffer.free()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("cudadaemon"), "--devices", "cuda")


WORKER = textwrap.dedent(
    """
    import json, sys, torch, ckptd
    url, path = sys.argv[1:3]
    free_before = torch.cuda.mem_get_info(0)[0]
    with ckptd.Client(url) as client:
        state = client.load(path, map_location="cuda:0")
        expected = torch.load(path, map_location="cuda:0")
        ok = all(state[k].device == expected[k].device and torch.equal(state[k], expected[k]) for k in expected)
        print(json.dumps({"ok": ok, "device": str(state["w"].device)}), flush=True)
    """
)


def test_daemon_serves_gpu_tensors_over_ipc(daemon: Daemon, tmp_path: Path) -> None:
    path = daemon.root / "gpu.pt"
    torch.save({"w": torch.randn(256, 256), "b": torch.arange(10)}, path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for _ in range(2):  # the first reads the file, the second attaches to the resident arena
        out = subprocess.run([sys.executable, str(script), daemon.url, str(path)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"ok": True, "device": "cuda:0"}
    with ckptd.Client(daemon.url) as client:
        (entry,) = [c for c in client.checkpoints() if c["path"] == str(path)]
        assert entry["hits"] >= 1 and any(k.startswith("GPU-") for k in entry["resident_bytes"])
        assert client.stats()["gpu_sharing"].startswith("cuda-ipc")


@pytest.fixture(scope="module")
def vmm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("vmmdaemon"), "--devices", "cuda", "--gpu-sharing", "vmm")


WRITER = textwrap.dedent(
    """
    import sys, torch, ckptd
    state = ckptd.Client(sys.argv[1]).load(sys.argv[2], map_location="cuda:0")
    state["w"].zero_()
    torch.cuda.synchronize()  # the write faults on a read-only mapping
    """
)


def test_vmm_mappings_are_read_only_for_workers(vmm_daemon: Daemon, tmp_path: Path) -> None:
    path = vmm_daemon.root / "vmm.pt"
    torch.save({"w": torch.randn(512, 512), "b": torch.arange(10)}, path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = subprocess.run([sys.executable, str(script), vmm_daemon.url, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": True, "device": "cuda:0"}
    with ckptd.Client(vmm_daemon.url) as client:
        assert client.stats()["gpu_sharing"].startswith("cuda-vmm")
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    crashed = subprocess.run([sys.executable, str(writer), vmm_daemon.url, str(path)], capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0  # the writer's own context faulted
    again = subprocess.run([sys.executable, str(script), vmm_daemon.url, str(path)], capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout) == {"ok": True, "device": "cuda:0"}  # the cache is intact


def test_host_memory_is_really_pinned_as_asked_and_freed() -> None:
    """Issue 13, item 6: tier memory is cudaHostAlloc'd per request (not cupy's pool) and counted."""
    import gc

    import cupy

    from ckptd.gpu import CudaDevices

    devices = CudaDevices()
    nbytes = 9_000_007
    host = devices.host_buffer(nbytes)
    attributes = cupy.cuda.runtime.pointerGetAttributes(ckptd.gpu._devices._address(host))
    assert attributes.type == cupy.cuda.runtime.memoryTypeHost
    assert devices.pinned.bytes == nbytes
    del host
    gc.collect()
    assert devices.pinned.bytes == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_peer_copy_is_complete_before_export() -> None:
    """Issue 13, item 4: a peer copy returns only when the bytes are there."""
    from ckptd.gpu import CudaDevices

    for vmm in (False, True):
        devices = CudaDevices(vmm=vmm)
        data = os.urandom(64 << 20)
        first = devices.allocate(devices.uuid_of(0), len(data))
        first.write(0, memoryview(data))
        second = devices.allocate(devices.uuid_of(1), len(data))
        second.copy_from(0, first, 0, len(data))
        out = memoryview(bytearray(len(data)))
        second.read(0, out)
        assert bytes(out) == data
        first.free()
        second.free()


PROBE = textwrap.dedent(
    """
    import json, sys, torch, ckptd
    url, path = sys.argv[1:3]
    with ckptd.Client(url) as client:
        state = client.load(path, map_location="cuda:0")
        devices = client._devices
        print(json.dumps({"staging_pool": devices.has_staging, "pinned": devices.pinned.bytes,
                          "device": str(state["w"].device)}))
    """
)


def test_worker_first_gpu_load_makes_no_staging_pool_and_pins_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """Issue 13, item 7: a worker learns identity and opens handles; it stages nothing."""
    path = daemon.root / "probe.pt"
    torch.save({"w": torch.randn(256, 256)}, path)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script), daemon.url, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"staging_pool": False, "pinned": 0, "device": "cuda:0"}
