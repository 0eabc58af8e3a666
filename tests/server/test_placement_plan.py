"""The daemon consumes the placement plan (ckptd.engine._plan): its manifests give the plan's
offsets, and CUDA targets go to the client's GPUs by UUID, with torch.load's error text."""

from __future__ import annotations

import io
import types
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd.engine import Kind, Plan, plan_storages, target_for
from ckptd.formats import Layout, open_source, read_layout
from ckptd.gpu import SimulatedDevices
from ckptd.server._cache import Cache
from ckptd_testlib import saved_as


def _saved(tag: str) -> bytes:
    buf = io.BytesIO()
    with saved_as(tag):
        torch.save({"a": torch.randn(5), "b": torch.arange(7), "empty": torch.zeros(0)}, buf)
    return buf.getvalue()


def _layout(raw: bytes) -> Layout:
    return read_layout(open_source(raw))


def test_the_daemon_s_manifest_gives_the_plan_s_offsets(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(_saved("cpu"))
    shm = tmp_path / "shm"
    shm.mkdir()
    cache = Cache(types.SimpleNamespace(roots=[tmp_path], host_budget=1 << 26, shm_dir=shm, lease_ttl=30.0), None)
    manifest = cache.load(str(path))
    plan = plan_storages(manifest.layout, manifest.layout.storages, "cpu")
    assert {p.key: p.offset for p in manifest.placements} == {
        s.key: s.offset for s in plan.storages.values() if s.arena is not None
    }
    cache.close()


def test_the_daemon_s_plan_places_cuda_targets_by_the_client_s_uuid(tmp_path: Path) -> None:
    gpus = SimulatedDevices(2, tmp_path / "gpu")
    table = gpus.table()
    layout = _layout(_saved("cuda:1"))
    plan: Plan = plan_storages(layout, layout.storages, {"cuda:1": "cuda:0"}, gpus=table)
    assert {s.target.gpu for s in plan.storages.values()} == {table["cuda:0"]}
    assert plan.arenas == ()  # the GPU tier lays its arenas out itself
    host = plan_storages(layout, layout.storages, {"cuda:1": "meta"}, gpus=table)
    assert {s.target.kind for s in host.storages.values()} == {Kind.HOST}  # held in host memory; the client places
    with pytest.raises(ckptd.DeviceError) as missing:
        plan_storages(layout, layout.storages, "cuda:2", gpus=table)
    with pytest.raises(ckptd.DeviceError) as by_devices:
        gpus.uuid_of(2)
    assert str(missing.value) == str(by_devices.value)  # one text: torch.load's
    assert str(missing.value).startswith("Attempting to deserialize object on CUDA device 2 but torch.cuda.device_count() is 2.")
    with pytest.raises(ckptd.UsageError, match="current device"):
        target_for("cuda", "cpu", table)
