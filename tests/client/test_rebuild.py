"""The plain rebuild (ckptd.engine._rebuild): objects built from the scan's record equal torch.load's.

Every corpus case that takes the plain rebuild equals torch.load in type, key order,
``_metadata``, identity and storage sharing (``assert_same``); the cases that are not plain
(and hand-made pickles that do something beside building their root) provably take torch's
own unpickler, and still equal torch.load.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
import ckptd.engine._load
from ckptd.engine._rebuild import plain_opcodes, rebuild_plain
from ckptd_testlib import (
    CORPUS, NOT_PLAIN_CASES, PLAIN_CASES, LocationRecorder, assert_conform, assert_same, load_both, rewrite_zip,
)

PLAIN, NOT_PLAIN = PLAIN_CASES, NOT_PLAIN_CASES  # which corpus cases the plain rebuild makes


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per ckptd.load, whether the plain rebuild made the object."""
    record: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        built = rebuild_plain(*args, **kwargs)
        record.append(built is not None)
        return built

    monkeypatch.setattr(ckptd.engine._load, "rebuild_plain", spy)
    return record


def test_corpus_is_classified() -> None:
    assert PLAIN | NOT_PLAIN == set(CORPUS) and not PLAIN & NOT_PLAIN


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("variant", ["zip", "zip_nocrc", "zip_big", "legacy"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus(saved: Any, taken: list[bool], name: str, variant: str, weights_only: bool) -> None:
    entry = CORPUS[name]
    if variant not in entry.variants or (weights_only and not entry.weights_only_ok):
        pytest.skip("not a case torch.load loads")
    t, c = load_both(saved(name, variant), weights_only=weights_only)
    assert t.exc is None
    assert_conform(t, c)
    # the legacy format keeps torch's unpickler (its storage views and caches differ)
    assert taken == [name in PLAIN and variant != "legacy"]


@pytest.mark.parametrize(
    "map_location", ["cpu", {"cpu": "cpu"}, torch.device("cpu"), "recorder"], ids=["str", "dict", "device", "recorder"]
)
@pytest.mark.parametrize("name", ["views_and_ties", "parameters", "zero_dim_and_empty", "module_state_dict"])
def test_map_locations(saved: Any, taken: list[bool], name: str, map_location: Any) -> None:
    factory = LocationRecorder if map_location == "recorder" else (lambda: map_location)
    t, c, trec, crec = load_both(saved(name, "zip"), map_location_factory=factory)
    assert_conform(t, c)
    if map_location == "recorder":  # storages are asked for in torch's order, once per key
        assert [call[:3] for call in crec.calls] == [call[:3] for call in trec.calls]
    assert taken == [True]


def test_ties_views_and_empty_storages(tmp_path: Path, taken: list[bool]) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    tied = torch.randn(3, 3)
    empty = torch.zeros(0)
    obj = {"base": base, "row": base[1], "t": base.t(), "tied": tied, "again": tied, "e1": empty, "e2": empty, "e3": torch.ones(0)}
    path = tmp_path / "ties.pt"
    torch.save(obj, path)
    expected, got = torch.load(path), ckptd.load(path)
    assert taken == [True]
    assert_same(expected, got)
    assert got["tied"] is got["again"] and got["e1"] is got["e2"]
    assert got["row"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    assert (got["row"].storage_offset(), got["t"].stride()) == (6, (1, 6))
    assert got["e3"].untyped_storage().data_ptr() == 0


def test_parameters_requires_grad_and_metadata(tmp_path: Path, taken: list[bool]) -> None:
    sd = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    obj = {
        "sd": sd,
        "p": torch.nn.Parameter(torch.randn(2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "g": torch.ones(2, requires_grad=True),
        "cycle": [],
    }
    obj["cycle"].append(obj["cycle"])
    path = tmp_path / "params.pt"
    torch.save(obj, path)
    expected, got = torch.load(path), ckptd.load(path)
    assert taken == [True]
    assert_same(expected, got)
    assert type(got["sd"]) is collections.OrderedDict and got["sd"]._metadata == sd._metadata
    assert type(got["p"]) is torch.nn.Parameter and got["p"].requires_grad
    assert type(got["frozen"]) is torch.nn.Parameter and not got["frozen"].requires_grad
    assert type(got["g"]) is torch.Tensor and got["g"].requires_grad
    assert got["cycle"][0] is got["cycle"]
    # what _rebuild_tensor_v2 leaves on every tensor
    assert got["g"]._backward_hooks == expected["g"]._backward_hooks == collections.OrderedDict()


# --- what is not plain falls back -------------------------------------------------------


def _insert_after_proto(raw: bytes, extra: bytes) -> bytes:
    """The zip checkpoint ``raw`` with ``extra`` opcodes at the start of its data.pkl."""

    def transform(name: str, data: bytes) -> bytes:
        if name != "data.pkl":
            return data
        assert data[:2] == b"\x80\x02"
        return data[:2] + extra + data[2:]

    return rewrite_zip(raw, transform)


def _saved(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


_JUNK = {
    # an OrderedDict built on the side: left on the stack, never part of the result
    "side-call": b"ccollections\nOrderedDict\n)R",
    # a storage loaded on the side: torch's persistent_load still runs for it
    "side-storage": b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x03tQ",
}


@pytest.mark.parametrize("junk", list(_JUNK))
def test_work_beside_the_root_falls_back(tmp_path: Path, taken: list[bool], junk: str) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(_insert_after_proto(_saved({"w": torch.arange(3.0)}), _JUNK[junk]))
    trec, crec = LocationRecorder(), LocationRecorder()
    expected = torch.load(path, map_location=trec)
    assert_same(expected, ckptd.load(path, map_location=crec))
    assert taken == [False]
    assert len(crec.calls) == len(trec.calls)


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_foreign_global_beside_the_root_is_torchs_to_judge(tmp_path: Path, taken: list[bool], weights_only: bool) -> None:
    path = tmp_path / "foreign.pt"
    path.write_bytes(_insert_after_proto(_saved({"w": torch.ones(2)}), b"cos\nsystem\n"))
    assert not plain_opcodes(ckptd.inspect(path).pickle)
    t, c = load_both(path, weights_only=weights_only)
    assert (t.exc is not None) == weights_only  # the restricted unpickler refuses os.system
    assert_conform(t, c, same_message=False)
    if weights_only:
        assert "GLOBAL os.system" in str(c.exc)
    assert taken == [False]


def _nested(depth: int) -> Any:
    obj: Any = torch.ones(1)
    for _ in range(depth):
        obj = [obj]
    return obj


@pytest.mark.parametrize(
    "case",
    ["protocol4", "protocol3", "conj", "deep", "function_mode", "bytes", "pickle_args"],
)
def test_not_plain_falls_back(tmp_path: Path, taken: list[bool], case: str) -> None:
    obj: Any = {"w": torch.arange(4.0)}
    kwargs: dict[str, Any] = {}
    load_kwargs: dict[str, Any] = {}
    if case == "protocol4":
        kwargs["pickle_protocol"] = 4  # torch warns about it; so must ckptd
    elif case == "protocol3":
        kwargs["pickle_protocol"] = 3
    elif case == "conj":
        obj["c"] = torch.randn(2, dtype=torch.complex64).conj()  # saved with metadata
    elif case == "deep":
        obj["deep"] = _nested(300)
    elif case == "bytes":
        obj["b"] = b"\x00\x01"  # protocol 2 writes bytes through _codecs.encode
    elif case == "pickle_args":
        load_kwargs = {"weights_only": False, "encoding": "latin1"}
    path = tmp_path / f"{case}.pt"
    torch.save(obj, path, **kwargs)
    if case == "function_mode":
        with torch.device("cpu"):
            t, c = load_both(path)
    else:
        t, c = load_both(path, **load_kwargs)
    # (protocol 4 is refused by torch's restricted unpickler, after a warning; 3 only warned about)
    assert (t.exc is None) == (case != "protocol4")
    assert_conform(t, c, same_message=False)
    assert taken == [False]


def test_custom_pickle_module_falls_back(tmp_path: Path, taken: list[bool]) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)

    class Module:
        Unpickler = pickle.Unpickler
        load = staticmethod(pickle.load)

    t, c = load_both(path, pickle_module=Module, weights_only=False)
    assert_conform(t, c)
    assert taken == [False]


def test_opcode_check() -> None:
    assert plain_opcodes(pickle.dumps({"a": [1, -2, 2**70, 1.5, "s", None, True, (1, 2, 3, 4)]}, protocol=2))
    assert not plain_opcodes(pickle.dumps({"a": 1}, protocol=4))  # FRAME, SHORT_BINUNICODE, MEMOIZE
    assert not plain_opcodes(pickle.dumps({"a": 1}, protocol=0))  # text opcodes
    assert not plain_opcodes(pickle.dumps({1, 2}, protocol=2))  # builtins.set
    assert not plain_opcodes(b"\x80\x02K\x01")  # no STOP
    assert not plain_opcodes(b"\x80\x02X\xff\xff\x00\x00ab.")  # a string past the end
    assert not plain_opcodes(b"\x80\x02K\x01K\x020.")  # POP: torch's restricted unpickler refuses it


# --- through the daemon -------------------------------------------------------------------


def test_through_the_daemon(tmp_path_factory: pytest.TempPathFactory, taken: list[bool]) -> None:
    """A worker rebuilds a selective load from the manifest's pickle with the plain rebuild too
    (a whole load comes as a compact table: tests/server/test_table_attach.py): same object, shared arena."""
    from ckptd_testlib import daemon_in

    for daemon in daemon_in(tmp_path_factory.mktemp("plain-daemon")):
        base = torch.arange(12.0).reshape(3, 4)
        sd = torch.nn.Sequential(torch.nn.Linear(2, 3)).state_dict()
        obj = {"sd": sd, "base": base, "row": base[1], "tied": base, "p": torch.nn.Parameter(torch.ones(2))}
        path = daemon.root / "plain.pt"
        torch.save(obj, path)
        names = ["sd.0.weight", "base", "row", "tied", "p"]
        with ckptd.Client(daemon.url) as client:
            got = client.load(path, select=names)
            expected = torch.load(path)
            assert_same({"sd.0.weight": expected["sd"]["0.weight"], **{k: expected[k] for k in names[1:]}}, got)
            assert taken == [True]
            assert got["tied"] is got["base"]
            again = client.load(path, select=names)  # warm: the same arena, mapped once
            assert again["base"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
            assert taken == [True, True]
            client.load(path)  # whole: from the table, not the pickle
            assert taken == [True, True]
