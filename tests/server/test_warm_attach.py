"""Warm attach, end to end against a real daemon: one request per load, a compact table.

A client that loads a plain checkpoint whole asks for a table: the daemon answers with the
table in place of the pickle and the per-storage and per-tensor JSON, and the client's
object equals torch.load's. Non-plain checkpoints, selective loads and callable
``map_location`` values get the JSON manifest and the checkpoint's pickle, as before.
A worker's first load opens its session in the same request; later loads are one request
each on the process's persistent connection.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import ckptd
import ckptd._client
from ckptd.engine import TABLE_MEDIA
from ckptd_testlib import CORPUS, PLAIN_CASES, Daemon, assert_same, cached_entry, daemon_in, save_bytes, wait_for



@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from daemon_in(tmp_path_factory.mktemp("tables"))


@pytest.fixture
def client(daemon: Daemon) -> Iterator[ckptd.Client]:
    with ckptd.Client(daemon.url) as c:
        yield c


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per load through the daemon: whether the object was rebuilt from a table."""
    used: list[bool] = []
    real_table = ckptd._client.rebuild_from_table
    real_rebuild = ckptd._client.rebuild

    def from_table(*args: Any, **kwargs: Any) -> Any:
        used.append(True)
        return real_table(*args, **kwargs)

    def from_pickle(*args: Any, **kwargs: Any) -> Any:
        used.append(False)
        return real_rebuild(*args, **kwargs)

    monkeypatch.setattr(ckptd._client, "rebuild_from_table", from_table)
    monkeypatch.setattr(ckptd._client, "rebuild", from_pickle)
    return used


def _saved(daemon: Daemon, name: str) -> Path:
    path = daemon.root / f"{name}.pt"
    if not path.exists():
        path.write_bytes(save_bytes(CORPUS[name].build(), "zip"))
    return path


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_through_the_daemon(daemon: Daemon, client: ckptd.Client, tables: list[bool], name: str) -> None:
    path = _saved(daemon, name)
    weights_only = CORPUS[name].weights_only_ok
    with warnings.catch_warnings():  # torch's own (TypedStorage...): conformance of warnings is tested elsewhere
        warnings.simplefilter("ignore", UserWarning)
        expected = torch.load(path, weights_only=weights_only)
        actual = client.load(path, weights_only=weights_only)
    assert_same(expected, actual)
    assert tables == [name in PLAIN_CASES]  # everything else falls back to the checkpoint's pickle


@pytest.mark.parametrize(
    "map_location", [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}], ids=["none", "cpu", "device", "dict"]
)
def test_map_locations_take_the_table(daemon: Daemon, client: ckptd.Client, tables: list[bool], map_location: Any) -> None:
    path = _saved(daemon, "views_and_ties")
    assert_same(torch.load(path, map_location=map_location), client.load(path, map_location=map_location))
    assert tables == [True]


def test_what_a_table_cannot_do_takes_the_pickle(daemon: Daemon, client: ckptd.Client, tables: list[bool]) -> None:
    path = _saved(daemon, "module_state_dict")
    calls: list[str] = []

    def recorder(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        calls.append(location)
        return storage

    expected = torch.load(path)
    assert_same(expected, client.load(path, map_location=recorder))  # torch calls it once per storage
    assert len(calls) == len(set(ckptd.inspect(path).storages))
    name = next(iter(expected))
    assert_same(expected[name], client.load(path, tensor_name=name))
    assert_same({name: expected[name]}, client.load(path, select=[name]))
    assert_same(torch.load(path, weights_only=False, encoding="latin1"),
                client.load(path, weights_only=False, encoding="latin1"))
    assert tables == [False, False, False, False]


@pytest.mark.parametrize("options", [{}, {"map_location": "meta"}, {"select": "select_first"}, {"tensor_name": "first"}],
                         ids=["whole", "meta", "select", "tensor_name"])
def test_progress_reports_what_an_embedded_load_reads(
    daemon: Daemon, client: ckptd.Client, tables: list[bool], options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load through the daemon reports the bytes of the storages it returns, as many as an
    embedded load of the same request reports reading (it was silently dropped before)."""
    monkeypatch.setattr(ckptd._client, "shared_client", lambda url: client)  # not the process's own, kept for later tests
    path = _saved(daemon, "views_and_ties")
    if "select" in options or "tensor_name" in options:
        first = next(iter(torch.load(path)))
        options = {"select": [first]} if "select" in options else {"tensor_name": first}
    embedded: list[int] = []
    through_daemon: list[int] = []
    ckptd.load(path, progress=embedded.append, **options)
    ckptd.load(path, progress=through_daemon.append, server=daemon.url, **options)
    assert len(through_daemon) == 1
    assert through_daemon == [sum(embedded)]
    assert sum(embedded) > 0 or options.get("map_location") == "meta"
    assert tables == [not ("select" in options or "tensor_name" in options)]


def test_the_answer_carries_no_per_tensor_json(daemon: Daemon) -> None:
    path = daemon.root / "many.pt"
    torch.save({f"layer.{i}.weight": torch.full((4,), float(i)) for i in range(2000)}, path)
    transport = httpx.HTTPTransport(uds=daemon.sock)
    with httpx.Client(transport=transport, base_url="http://ckptd", timeout=60) as http:
        plain = http.post("/v1/load", json={"path": str(path)})
        table = http.post("/v1/load", json={"path": str(path), "table": True})
        for answer in (plain, table):
            assert answer.status_code == 200
        assert plain.headers["content-type"] == "application/json"
        assert table.headers["content-type"] == TABLE_MEDIA
        size = int.from_bytes(table.content[:4], "big")
        head = json.loads(table.content[4 : 4 + size])
        assert head["layout"]["tensors"] == [] and head["layout"]["pickle"] is None and head["placements"] == []
        assert len(table.content) * 3 < len(plain.content)  # names once, numbers packed: not JSON per tensor
        for answer in (plain, table):
            lease = head["lease"] if answer is table else answer.json()["lease"]
            assert http.delete(f"/v1/leases/{lease}").status_code == 204


# --- one request per load -------------------------------------------------------------


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every HTTP request this process sends (method and path)."""
    sent: list[str] = []
    real = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}")
        return real(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", send)
    return sent


def test_a_first_load_opens_the_session_in_the_same_request(daemon: Daemon, requests: list[str]) -> None:
    path = _saved(daemon, "module_state_dict")
    expected = torch.load(path)
    with ckptd.Client(daemon.url) as client:
        first = client.load(path)  # held: its lease is released once it is garbage
        assert requests == [f"POST /v1/sessions/{client._session.id}/load"]  # session + lease + manifest
        assert_same(expected, first)
        del requests[:]
        second = client.load(path)
        assert requests == ["POST /v1/load"]  # the session is open: one request
        assert_same(expected, second)
        assert client.stats()["sessions"] == 1


def test_a_failed_first_load_leaves_no_session_and_the_next_one_opens_it(daemon: Daemon) -> None:
    with ckptd.Client(daemon.url) as client:
        with pytest.raises(ckptd.CheckpointNotFoundError):
            client.load(daemon.root / "missing.pt")
        wait_for(lambda: client.stats()["sessions"] == 0, "the failed load's session to end")
        path = _saved(daemon, "plain_dict")
        got = client.load(path)  # held: its lease lasts while it is mapped
        assert_same(torch.load(path), got)
        assert client.stats()["sessions"] == 1
        assert cached_entry(client, path)["leases"] >= 1
