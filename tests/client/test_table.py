"""The compact table (ckptd.engine._table): a plain checkpoint rebuilt from it equals torch.load.

Every corpus case the plain rebuild makes gets a table, and the object rebuilt from the
table (storages mapped from arenas, as a daemon client maps them) is torch.load's in type,
key order, ``_metadata``, identity and storage sharing; every other case gets none, so its
loads take the checkpoint's own pickle. The daemon end to end is in
tests/server/test_table_attach.py.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.engine._rebuild import _NotPlain
from ckptd.engine._storages import read_storages
from ckptd.engine._table import _Describer, describe_table, encode_table, rebuild_from_table, table_applies
from ckptd.formats import Call, Global, Layout, PersistentId, open_source, read_layout
from ckptd_testlib import CORPUS, NOT_PLAIN_CASES, PLAIN_CASES, assert_same


ZIP_VARIANTS = ("zip", "zip_nocrc", "zip_big")


def _layout(path: Path) -> Layout:
    with open_source(path) as source:
        return read_layout(source)


def _from_table(path: Path, map_location: Any = None) -> Any:
    """Build ``path``'s object from its table, each storage in an arena of its own (as the
    daemon's arenas hold them: read by ckptd's reader, mapped by the client)."""
    layout = _layout(path)
    spec = describe_table(layout)
    assert spec is not None
    with open_source(path) as source:
        storages = read_storages(source, layout, list(layout.storages), None)
    arenas = {key: view for key, view in storages.views.items()}
    table = encode_table(spec, {key: (key, 0) for key in arenas})
    return rebuild_from_table(table, arenas, frozenset(), map_location)


def test_corpus_is_classified() -> None:
    assert PLAIN_CASES | NOT_PLAIN_CASES == set(CORPUS)


@pytest.mark.parametrize("variant", ZIP_VARIANTS)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus(saved: Any, name: str, variant: str) -> None:
    if variant not in CORPUS[name].variants:
        pytest.skip("not saved this way")
    path = saved(name, variant)
    spec = describe_table(_layout(path))
    assert (spec is not None) == (name in PLAIN_CASES)
    if spec is None:
        return
    for weights_only in (True, False):
        assert_same(torch.load(path, weights_only=weights_only), _from_table(path))


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}])
@pytest.mark.parametrize("name", ["views_and_ties", "parameters", "zero_dim_and_empty", "module_state_dict"])
def test_map_locations(saved: Any, name: str, map_location: Any) -> None:
    path = saved(name, "zip")
    assert_same(torch.load(path, map_location=map_location), _from_table(path, map_location))


def test_ties_views_parameters_and_metadata(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    tied = torch.randn(3, 3)
    empty = torch.zeros(0)
    sd = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    param = torch.nn.Parameter(torch.randn(2))
    obj = {
        "base": base, "row": base[1], "t": base.t(), "tied": tied, "again": tied,
        "e1": empty, "e2": empty, "e3": torch.ones(0),
        "sd": sd, "p": param, "p_again": param, "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "g": torch.ones(2, requires_grad=True), "cycle": [], "tuple": (tied, 1, "x"),
    }
    obj["cycle"].append(obj["cycle"])
    path = tmp_path / "all.pt"
    torch.save(obj, path)
    expected, got = torch.load(path), _from_table(path)
    assert_same(expected, got)
    assert list(got) == list(expected)
    assert got["tied"] is got["again"] is got["tuple"][0] and got["e1"] is got["e2"] and got["p"] is got["p_again"]
    assert got["row"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    assert (got["row"].storage_offset(), got["t"].stride()) == (6, (1, 6))
    assert got["e3"].untyped_storage().data_ptr() == 0  # empty storages are never shared, as in torch
    assert type(got["sd"]) is collections.OrderedDict and got["sd"]._metadata == sd._metadata
    assert type(got["p"]) is torch.nn.Parameter and got["p"].requires_grad
    assert type(got["frozen"]) is torch.nn.Parameter and not got["frozen"].requires_grad
    assert type(got["g"]) is torch.Tensor and got["g"].requires_grad
    assert got["cycle"][0] is got["cycle"]
    for key in ("base", "row", "g", "p"):  # what _rebuild_tensor_v2 / _rebuild_parameter leave
        assert got[key]._backward_hooks == expected[key]._backward_hooks == collections.OrderedDict()
        assert not got[key]._is_view() and got[key].is_leaf


# --- what a table cannot say gets none ----------------------------------------------------


def _pid(key: str) -> PersistentId:
    return PersistentId(("storage", Global.named("torch", "FloatStorage"), key, "cpu", 2))


def _hooks() -> Call:
    return Call(Global.named("collections", "OrderedDict"), ())


def _tensor(key: str, hooks: Call) -> Call:
    return Call(Global.named("torch._utils", "_rebuild_tensor_v2"), (_pid(key), 0, (2,), (1,), False, hooks))


@pytest.fixture
def two_storages(tmp_path: Path) -> Layout:
    path = tmp_path / "two.pt"
    torch.save({"a": torch.ones(2), "b": torch.zeros(2)}, path)
    return _layout(path)


def test_backward_hooks_reached_twice_get_no_table(two_storages: Layout) -> None:
    shared = _hooks()
    for root in ({"a": _tensor("0", shared), "b": _tensor("1", shared)}, {"a": _tensor("0", shared), "h": shared}):
        with pytest.raises(_NotPlain):
            _Describer(two_storages).build(root, 0)
    _Describer(two_storages).build({"a": _tensor("0", _hooks()), "b": _tensor("1", _hooks())}, 0)  # the usual case


def test_a_parameters_inner_tensor_reached_elsewhere_gets_no_table(two_storages: Layout) -> None:
    inner = _tensor("0", _hooks())
    param = Call(Global.named("torch._utils", "_rebuild_parameter"), (inner, True, _hooks()))
    for root in ({"p": param, "t": inner}, {"t": inner, "p": param}):
        with pytest.raises(_NotPlain):
            _Describer(two_storages).build(root, 0)


def test_a_table_names_no_global_but_ordered_dict() -> None:
    evil = pickle.dumps((1, [], pickle.dumps(print)), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="OrderedDict only"):
        rebuild_from_table(evil, {}, frozenset(), "cpu")
    with pytest.raises(pickle.UnpicklingError, match="OrderedDict only"):
        rebuild_from_table(pickle.dumps(print), {}, frozenset(), "cpu")


def test_only_plain_requests_take_a_table() -> None:
    from torch import _weights_only_unpickler

    assert table_applies(_weights_only_unpickler, {"encoding": "utf-8"}, None)
    assert not table_applies(pickle, {"encoding": "latin1"}, None)
    assert not table_applies(io, {"encoding": "utf-8"}, None)
    assert not table_applies(pickle, {"encoding": "utf-8"}, lambda storage, location: storage)
    with torch.device("meta"):  # a function mode changes what torch's rebuild functions make
        assert not table_applies(pickle, {"encoding": "utf-8"}, None)
