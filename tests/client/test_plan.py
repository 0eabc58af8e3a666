"""The placement plan (ckptd.engine._plan) against torch.load's map_location semantics: each
storage's planned target is where torch.load puts it (str, torch.device, bytes, dict,
callable, meta), with torch's errors; the embedded reader puts each storage at the offset
the plan gives (the daemon's side: tests/server/test_placement_plan.py)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ckptd
from ckptd.engine import Kind, plan_storages, read_storages
from ckptd.formats import Layout, open_source, read_layout
from ckptd.gpu import align
from ckptd_testlib import saved_as


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, generator=g), "b": torch.arange(7), "empty": torch.zeros(0), "c": torch.randn(3, 2, generator=g)}


def _saved(tag: str = "cpu") -> bytes:
    buf = io.BytesIO()
    with saved_as(tag):
        torch.save(_state(), buf)
    return buf.getvalue()


def _layout(raw: bytes) -> Layout:
    return read_layout(open_source(raw))


def _to_meta(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
    return torch.UntypedStorage(storage.nbytes(), device="meta")


def _default(storage: torch.UntypedStorage, location: str) -> None:
    return None  # torch: the default placement of the saved tag


FORMS: dict[str, tuple[str, Any]] = {
    "none": ("cpu", None),
    "str": ("cpu", "cpu"),
    "str-meta": ("cpu", "meta"),
    "device": ("cpu", torch.device("cpu")),
    "device-meta": ("cpu", torch.device("meta")),
    "dict-remaps": ("cuda:1", {"cuda:1": "cpu"}),
    "dict-to-meta": ("cpu", {"cpu": "meta"}),
    "dict-unlisted-keeps-tag": ("cpu", {"cuda:0": "meta"}),
    "str-over-gpu-tag": ("cuda:1", "cpu"),
    "meta-over-gpu-tag": ("cuda:1", "meta"),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_storage_is_planned_where_torch_load_puts_it(form: str) -> None:
    saved, map_location = FORMS[form]
    raw = _saved(saved)
    layout = _layout(raw)
    plan = plan_storages(layout, layout.storages, map_location)
    expected = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    for entry in layout.tensors:
        (key,) = entry.storage_keys
        planned = plan.storages[key]
        assert planned.target.device == expected[entry.name].device, entry.name
        assert planned.target.kind is {"cpu": Kind.HOST, "meta": Kind.META}[expected[entry.name].device.type]
        read = planned.arena is not None
        assert read == (planned.nbytes > 0 and planned.target.kind is Kind.HOST)  # torch reads nothing for meta or empty
    assert ckptd.load(io.BytesIO(raw), map_location=map_location)["b"].device == expected["b"].device


@pytest.mark.parametrize("decide", [_to_meta, _default], ids=["to-meta", "returns-none"])
def test_a_callable_is_read_on_the_host_and_decides_after(decide: Callable[..., Any]) -> None:
    raw = _saved()
    layout = _layout(raw)
    plan = plan_storages(layout, layout.storages, decide)
    expected = torch.load(io.BytesIO(raw), map_location=decide, weights_only=True)
    actual = ckptd.load(io.BytesIO(raw), map_location=decide)
    for entry in layout.tensors:
        planned = plan.storages[entry.storage_keys[0]]
        assert planned.target.kind is Kind.CALLABLE and planned.target.tag is None
        assert planned.target.read_on(swap=False) == torch.device("cpu")  # torch hands the callable a CPU storage
        assert (planned.arena is not None) == (planned.nbytes > 0)
        assert actual[entry.name].device == expected[entry.name].device


@pytest.mark.parametrize("map_location", ["cuda:7", torch.device("cuda:7"), {"cpu": "cuda:7"}, "nosuch:0"])
def test_a_missing_device_fails_with_torch_s_error(map_location: Any) -> None:
    raw = _saved()
    with pytest.raises(Exception) as by_torch:
        torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    with pytest.raises(ckptd.DeviceError) as planned:
        plan_storages(_layout(raw), _layout(raw).storages, map_location)
    assert isinstance(planned.value, type(by_torch.value))
    assert str(planned.value) == str(by_torch.value)


def test_offsets_are_aligned_and_disjoint_and_the_reader_uses_them() -> None:
    raw = _saved()
    layout = _layout(raw)
    plan = plan_storages(layout, layout.storages, "cpu")
    assert len(plan.arenas) == 1
    spans = sorted((s.offset, s.offset + s.nbytes) for s in plan.in_arena(0))
    assert all(start == align(start) for start, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= plan.arenas[0].nbytes
    with open_source(raw) as source:
        storages = read_storages(source, layout, layout.storages, "cpu")
    base = storages.arenas[0].storage.data_ptr()
    for planned in storages.planned():
        assert storages.views[planned.key].data_ptr() - base == plan.storages[planned.key].offset
