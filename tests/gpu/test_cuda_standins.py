"""The CUDA backend against stand-ins for cupy and the driver (``fake_cuda``), without a GPU.

Each test names the defect of a CUDA review it guards against (issue 13); the stand-ins
model the real behaviour that makes it a defect (see ``fake_cuda``'s docstring). What
only a real device can show is in ``test_cuda.py`` and ``test_cuda_devices.py`` (``gpu``).
"""

from __future__ import annotations

import gc
import os
import uuid

import pytest
import torch

import fake_cuda
from ckptd.gpu import CudaDevices, DeviceError

ZERO_INSIDE = bytes.fromhex("3f9a01c2") + b"\0" + bytes.fromhex("7be04d11a2c3d4e5f60718")  # a zero byte at offset 4
ZERO_FIRST = b"\0" + bytes.fromhex("d2c4a8e61f3b5079a8c6e4f20d1b39")  # a zero byte first
PLAIN = [bytes.fromhex("5a1e2b3c4d5e6f708192a3b4c5d6e7f8"), bytes(range(1, 17)), bytes(range(17, 33))]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_cuda.FakeCuda:
    """Three GPUs whose UUIDs have no zero byte (each test fails for its own defect alone)."""
    return fake_cuda.install(monkeypatch, PLAIN, memory=1 << 20)


def test_uuids_keep_all_16_bytes_zero_bytes_included(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_cuda.install(monkeypatch, [ZERO_INSIDE, ZERO_FIRST, PLAIN[0]])
    devices = CudaDevices()
    assert [d.uuid for d in devices.visible()] == [f"GPU-{uuid.UUID(bytes=raw)}" for raw in fake.gpus.uuids]
    assert devices.table()["cuda:1"] == "GPU-00d2c4a8-e61f-3b50-79a8-c6e4f20d1b39"  # not a PCI address


def test_making_the_backend_imports_no_cupy_and_pins_nothing(fake: fake_cuda.FakeCuda) -> None:
    devices = CudaDevices()  # what a worker makes on its first GPU load
    assert len(devices.table()) == 3
    assert not fake.cupy_imported and fake.gpus.host_allocs == []  # no cupy, no context, no staging pool
    assert "cuMemCreate" not in fake.driver.calls and sum(fake.gpus.used) == 0


def test_peer_copy_is_complete_when_copy_from_returns(fake: fake_cuda.FakeCuda) -> None:
    devices = CudaDevices()
    data = os.urandom(64 << 10)
    first = devices.allocate(devices.uuid_of(0), len(data))
    first.write(0, memoryview(data))
    second = devices.allocate(devices.uuid_of(2), len(data))
    second.copy_from(0, first, 0, len(data))
    # the caller exports the buffer next and another process may map it at once
    assert fake.gpus.bytes_at(second.ptr, len(data)) == data  # type: ignore[attr-defined]


def test_vmm_peer_copy_grants_the_peer_access_first(fake: fake_cuda.FakeCuda) -> None:
    devices = CudaDevices(vmm=True)
    assert devices.vmm
    data = os.urandom(8192)
    first = devices.allocate(devices.uuid_of(0), len(data))
    first.write(0, memoryview(data))
    second = devices.allocate(devices.uuid_of(1), len(data))
    second.copy_from(0, first, 0, len(data))  # without a grant, GPU 1 cannot reach GPU 0's VMM memory
    assert fake.gpus.bytes_at(second.ptr, len(data)) == data  # type: ignore[attr-defined]
    out = memoryview(bytearray(len(data)))
    second.read(0, out)
    assert bytes(out) == data


def test_host_tier_memory_is_pinned_as_asked_and_freed_with_its_last_view(fake: fake_cuda.FakeCuda) -> None:
    devices = CudaDevices()
    nbytes = 9 * 1000 * 1000 + 7  # cupy's pool would pin 16 MiB for this and keep them
    host = devices.host_buffer(nbytes)
    assert len(host) == nbytes and fake.gpus.host_allocs == [nbytes]
    assert devices.pinned.bytes == nbytes
    piece = host[100:200]  # a slice keeps the memory too
    del host
    gc.collect()
    assert fake.gpus.host_frees == 0 and devices.pinned.bytes == nbytes
    del piece
    gc.collect()
    assert fake.gpus.host_frees == 1 and devices.pinned.bytes == 0


def test_out_of_device_memory_is_torchs_out_of_memory_error(fake: fake_cuda.FakeCuda) -> None:
    devices = CudaDevices()
    with pytest.raises(DeviceError, match=devices.uuid_of(0)) as info:
        devices.allocate(devices.uuid_of(0), 2 << 20)
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)
