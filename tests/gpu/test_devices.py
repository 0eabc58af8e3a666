"""The device layer's GPU backends: simulated devices (always) behave as the CUDA backend must."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptd.formats import open_source
from ckptd.gpu import Copy, DeviceError, SimulatedDevices, StagingPool, fill_device, local_devices


@pytest.fixture
def gpus(tmp_path: Path) -> SimulatedDevices:
    return SimulatedDevices(3, tmp_path, memory=1 << 20)


def test_visible_devices_follow_cuda_visible_devices(tmp_path: Path) -> None:
    everyone = SimulatedDevices(3, tmp_path)
    narrowed = SimulatedDevices.from_env({"CKPTD_SIMULATED_GPUS": "3", "CUDA_VISIBLE_DEVICES": "2,0"}, tmp_path)
    assert [d.index for d in narrowed.visible()] == [0, 1]
    # this process's cuda:0 is physical GPU 2: the UUID says so, whatever the ordinal
    assert narrowed.uuid_of(0) == everyone.uuid_of(2) and narrowed.uuid_of(1) == everyone.uuid_of(0)
    assert narrowed.table() == {"cuda:0": everyone.uuid_of(2), "cuda:1": everyone.uuid_of(0)}
    with pytest.raises(DeviceError, match="not visible"):
        narrowed.by_uuid(everyone.uuid_of(1))


def test_missing_ordinal_gives_torchs_message(gpus: SimulatedDevices) -> None:
    with pytest.raises(DeviceError, match=r"on CUDA device 3 but torch.cuda.device_count\(\) is 3") as info:
        gpus.uuid_of(3)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DeviceError, match="distinct GPUs"):
        SimulatedDevices(2, "/tmp", visible=[0, 0])


def test_write_read_peer_and_counters(gpus: SimulatedDevices) -> None:
    a = gpus.allocate(gpus.uuid_of(0), 64)
    b = gpus.allocate(gpus.uuid_of(1), 64)
    a.write(8, memoryview(b"checkpoint"))
    b.copy_from(0, a, 8, 10)
    out = memoryview(bytearray(10))
    b.read(0, out)
    assert bytes(out) == b"checkpoint"
    assert gpus.moved == {"h2d": 10, "d2h": 10, "peer": 10}
    assert gpus.allocated[gpus.uuid_of(0)] == 64
    with pytest.raises(DeviceError, match="outside"):
        a.write(60, memoryview(b"too long"))
    a.free()
    a.free()  # idempotent
    assert gpus.allocated[gpus.uuid_of(0)] == 0
    with pytest.raises(DeviceError, match="freed"):
        a.read(0, out)
    b.free()


def test_budget_of_the_device_is_enforced(gpus: SimulatedDevices) -> None:
    held = gpus.allocate(gpus.uuid_of(0), 1 << 20)
    with pytest.raises(DeviceError, match="out of memory"):
        gpus.allocate(gpus.uuid_of(0), 1)
    held.free()


def test_export_open_is_copy_on_write_and_survives_free(gpus: SimulatedDevices) -> None:
    buffer = gpus.allocate(gpus.uuid_of(1), 16)
    buffer.write(0, memoryview(bytes(range(16))))
    handle = buffer.export()
    assert handle["kind"] == "simulated" and handle["uuid"] == gpus.uuid_of(1)
    storage, mapping = gpus.open(handle)
    tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
    assert tensor.tolist() == list(range(16))
    tensor[0] = 99  # a client's write stays in the client
    out = memoryview(bytearray(1))
    buffer.read(0, out)
    assert out[0] == 0
    path = Path(handle["path"])
    buffer.free()
    assert not path.exists()
    assert tensor[1].item() == 1  # the opened mapping outlives the daemon's buffer
    assert mapping is not None


def test_open_needs_the_gpu_visible(tmp_path: Path, gpus: SimulatedDevices) -> None:
    buffer = gpus.allocate(gpus.uuid_of(2), 8)
    only_first = SimulatedDevices(3, tmp_path, visible=[0])
    with pytest.raises(DeviceError, match="not visible"):
        only_first.open(buffer.export())
    with pytest.raises(DeviceError, match="cannot open a 'cuda-ipc' handle"):
        gpus.open({"kind": "cuda-ipc"})
    buffer.free()


def test_fill_device_streams_a_file_in_chunks(gpus: SimulatedDevices, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    buffer = gpus.allocate(gpus.uuid_of(0), 200_000)
    copies = [Copy(1000, 0, 100_000), Copy(150_000, 100_032, 99_000)]
    with open_source(str(path)) as source:
        fill_device(source, buffer, copies, staging=gpus.staging, threads=4, chunk_bytes=8192)
    out = memoryview(bytearray(200_000))
    buffer.read(0, out)
    assert bytes(out[:100_000]) == data[1000:101_000]
    assert bytes(out[100_032:199_032]) == data[150_000:249_000]
    assert gpus.moved["h2d"] == 199_000
    buffer.free()


def test_local_devices_from_the_environment(tmp_path: Path) -> None:
    found = local_devices({"CKPTD_SIMULATED_GPUS": "2", "CUDA_VISIBLE_DEVICES": "1"}, tmp_path)
    assert isinstance(found, SimulatedDevices) and len(found.visible()) == 1
    if not torch.cuda.is_available():
        assert local_devices({}, tmp_path) is None


def test_staging_buffers_are_made_once_and_reused(gpus: SimulatedDevices, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1 << 20))
    made: list[int] = []
    pool = StagingPool(lambda n: made.append(n) or memoryview(bytearray(n)), count=2, nbytes=64 << 10)
    buffer = gpus.allocate(gpus.uuid_of(0), 1 << 20)
    for _ in range(3):  # three loads, eight threads asked for: two buffers, made once
        with open_source(str(path)) as source:
            fill_device(source, buffer, [Copy(0, 0, 1 << 20)], staging=pool, threads=8)
    assert made == [64 << 10, 64 << 10]
    out = memoryview(bytearray(1 << 20))
    buffer.read(0, out)
    assert bytes(out) == path.read_bytes()
    assert {id(pool.take()), id(pool.take())} and pool.count == 2  # both back in the pool
    buffer.free()


def test_read_only_buffers_travel_as_descriptors(tmp_path: Path) -> None:
    gpus = SimulatedDevices(1, tmp_path, read_only=True)
    buffer = gpus.allocate(gpus.uuid_of(0), 32)
    buffer.write(0, memoryview(bytes(range(32))))
    handle = buffer.export()
    assert handle["fd"] is True and "path" not in handle  # no name to open: only a passed descriptor
    with pytest.raises(DeviceError, match="file descriptor"):
        gpus.open(handle)
    fd = buffer.share_fd()
    try:
        storage, mapping = gpus.open(handle, fd)
    finally:
        os.close(fd)
    assert bytes(storage.tolist()) == bytes(range(32))
    assert gpus.sharing.startswith("simulated read-only") and mapping is not None
    buffer.free()
    with pytest.raises(DeviceError, match="freed"):
        buffer.share_fd()
    plain = SimulatedDevices(1, tmp_path).allocate(SimulatedDevices(1, tmp_path).uuid_of(0), 8)
    with pytest.raises(DeviceError, match="shared by handle"):
        plain.share_fd()
    plain.free()
