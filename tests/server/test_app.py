"""The HTTP layer, against a fake cache that records its calls: routes, auth, limits, errors."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package for its TestClient; httpx works the same.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

import ckptd
from ckptd.engine import (
    AuthenticationError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    DaemonError,
    DaemonNotRunningError,
    DeviceError,
    LeaseLostError,
    NotSeekableError,
    OverBudgetError,
    PathNotAllowedError,
    TensorNotFoundError,
    UnpicklingError,
    UnsupportedFormatError,
    UsageError,
)
from ckptd.engine import error_from
from ckptd.server import Settings, create_app, load_settings
from ckptd.server._metrics import Metrics

TOKEN = "s3cret-token"
LIMIT = 4096


@dataclass
class Json:
    """Stands in for a Manifest or CheckpointInfo: anything with to_json()."""

    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.body)


class FakeCache:
    """Records every call; ``fail[method] = exc`` makes that method raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.fail: dict[str, BaseException] = {}

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((method, args, kwargs))
        if method in self.fail:
            raise self.fail[method]

    def load(self, path: str, **kwargs: Any) -> Json:
        self._record("load", path, **kwargs)
        return Json({"checkpoint": "ck1", "path": path, "lease": "L1", "lease_ttl": 30.0})

    def prefetch(self, path: str) -> Json:
        self._record("prefetch", path)
        return Json({"id": "ck1", "path": path, "leases": 0})

    def checkpoints(self) -> list[Json]:
        self._record("checkpoints")
        return [Json({"id": "ck1", "path": "/m/a.pt"}), Json({"id": "ck2", "path": "/m/b.pt"})]

    def evict(self, ident: str) -> Json:
        self._record("evict", ident)
        return Json({"id": "ck1", "path": "/m/a.pt"})

    def renew(self, lease: str) -> float:
        self._record("renew", lease)
        return 29.5

    def release(self, lease: str) -> None:
        self._record("release", lease)

    def begin_session(self, session: str) -> None:
        self._record("begin_session", session)

    def end_session(self, session: str) -> int:
        self._record("end_session", session)
        return 0

    def stats(self) -> dict[str, object]:
        self._record("stats")
        return {"checkpoints": 2, "resident_bytes": {"cpu": 10}, "leases": 1}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("CKPTD_"):
            monkeypatch.delenv(key)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    yield folder / "ckptd.sock"
    folder.rmdir()


def _settings(tmp_path: Path, socket_path: Path, **flags: Any) -> Settings:
    return load_settings(roots=[tmp_path], shm_dir=tmp_path, socket=socket_path, max_body_bytes=LIMIT, **flags)


@pytest.fixture
def cache() -> FakeCache:
    return FakeCache()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(tmp_path: Path, socket_path: Path, cache: FakeCache, metrics: Metrics) -> Iterator[TestClient]:
    app = create_app(cache, _settings(tmp_path, socket_path), metrics)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def secured(tmp_path: Path, socket_path: Path, cache: FakeCache, metrics: Metrics) -> Iterator[TestClient]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    settings = _settings(tmp_path, socket_path, token_file=token_file, port=0)
    with TestClient(create_app(cache, settings, metrics)) as test_client:
        yield test_client


def _error(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return response.status_code, body["error"]["type"]


# --- routes -----------------------------------------------------------------------------


def test_load_passes_every_argument(client: TestClient, cache: FakeCache) -> None:
    body = {
        "path": "/m/a.pt",
        "map_location": {"cuda:1": "cuda:0"},
        "prefix": "model",
        "select": ["a", "b"],
        "devices": {"cuda:0": "GPU-5e1a0000-0000-4000-8000-000000000001"},
        "session": "S1",
    }
    response = client.post("/v1/load", json=body)
    assert response.status_code == 200
    assert response.json() == {"checkpoint": "ck1", "path": "/m/a.pt", "lease": "L1", "lease_ttl": 30.0}
    assert cache.calls == [
        ("load", ("/m/a.pt",), {"map_location": {"cuda:1": "cuda:0"}, "tensor_name": None, "prefix": "model", "select": ["a", "b"],
                                "devices": {"cuda:0": "GPU-5e1a0000-0000-4000-8000-000000000001"}, "session": "S1"})
    ]


def test_load_defaults(client: TestClient, cache: FakeCache) -> None:
    assert client.post("/v1/load", json={"path": "/m/a.pt", "map_location": "cpu", "select": "layers.0."}).status_code == 200
    assert cache.calls[0][2] == {"map_location": "cpu", "tensor_name": None, "prefix": None, "select": "layers.0.", "devices": None, "session": None}


def test_prefetch(client: TestClient, cache: FakeCache) -> None:
    response = client.post("/v1/prefetch", json={"path": "/m/a.pt"})
    assert response.status_code == 200 and response.json()["path"] == "/m/a.pt"
    assert cache.calls == [("prefetch", ("/m/a.pt",), {})]


def test_renew(client: TestClient, cache: FakeCache) -> None:
    response = client.post("/v1/leases/L1/renew")
    assert response.status_code == 200
    assert response.json() == {"lease": "L1", "expires_in": 29.5}
    assert cache.calls == [("renew", ("L1",), {})]


def test_release(client: TestClient, cache: FakeCache) -> None:
    response = client.delete("/v1/leases/L1")
    assert response.status_code == 204 and response.content == b""
    assert cache.calls == [("release", ("L1",), {})]


def test_checkpoints(client: TestClient) -> None:
    response = client.get("/v1/checkpoints")
    assert response.status_code == 200
    assert [info["id"] for info in response.json()] == ["ck1", "ck2"]


def test_evict_by_path_in_the_query(client: TestClient, cache: FakeCache) -> None:
    response = client.delete("/v1/checkpoints", params={"ident": "/m/dir/a b.pt"})
    assert response.status_code == 200 and response.json()["id"] == "ck1"
    assert cache.calls == [("evict", ("/m/dir/a b.pt",), {})]


def test_stats(client: TestClient, socket_path: Path) -> None:
    body = client.get("/v1/stats").json()
    assert body["checkpoints"] == 2 and body["leases"] == 1
    assert body["version"] == ckptd.__version__
    assert body["uptime_s"] >= 0
    assert body["socket"] == str(socket_path)
    assert body["tcp"] is None


def test_stats_reports_tcp(secured: TestClient) -> None:
    body = secured.get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["tcp"] == "http://127.0.0.1:0"


def test_healthz(client: TestClient, cache: FakeCache) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert cache.calls == []


def test_metrics_exposition(client: TestClient, metrics: Metrics) -> None:
    metrics.read(4096)
    metrics.hit()
    metrics.miss()
    metrics.evicted()
    metrics.observe_load(0.02)
    metrics.set_resident("cpu", 1234)
    metrics.set_leases(3)
    metrics.set_budget("cpu", 1 << 30)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        "ckptd_bytes_read_total 4096.0",
        "ckptd_cache_hits_total 1.0",
        "ckptd_cache_misses_total 1.0",
        "ckptd_evictions_total 1.0",
        "ckptd_load_seconds_count 1.0",
        'ckptd_resident_bytes{device="cpu"} 1234.0',
        "ckptd_active_leases 3.0",
        'ckptd_budget_bytes{device="cpu"} 1.073741824e+09',
    ):
        assert line in text.splitlines(), line


def test_metrics_registry_is_private() -> None:
    a, b = Metrics(), Metrics()  # a second registry would collide if they shared the global one
    a.hit()
    assert b"ckptd_cache_hits_total 0.0" in b.render()


def test_openapi_lists_the_v1_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/load"]) == {"post"}
    assert set(paths["/v1/prefetch"]) == {"post"}
    assert set(paths["/v1/leases/{lease}/renew"]) == {"post"}
    assert set(paths["/v1/leases/{lease}"]) == {"delete"}
    assert set(paths["/v1/checkpoints"]) == {"get", "delete"}
    assert set(paths["/v1/stats"]) == {"get"}
    assert {"/healthz", "/metrics"} <= set(paths)
    load_body = schema["components"]["schemas"]["LoadRequest"]
    assert load_body["additionalProperties"] is False
    assert set(load_body["properties"]) == {"path", "map_location", "tensor_name", "prefix", "select", "devices", "session", "table"}
    assert client.get("/docs").status_code == 200


# --- auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": f"Bearer {TOKEN}x"}],
)
def test_auth_refuses(secured: TestClient, cache: FakeCache, headers: dict[str, str]) -> None:
    response = secured.post("/v1/load", json={"path": "/m/a.pt"}, headers=headers)
    assert _error(response) == (401, "AuthenticationError")
    assert response.headers["www-authenticate"] == "Bearer"
    assert cache.calls == []
    assert isinstance(error_from(response.status_code, response.json()), AuthenticationError)


@pytest.mark.parametrize(
    ("method", "url"),
    [("GET", "/v1/checkpoints"), ("GET", "/v1/stats"), ("GET", "/metrics"), ("GET", "/docs/../v1/stats"),
     ("DELETE", "/v1/leases/L1"), ("POST", "/v1/leases/L1/renew"), ("GET", "/v1/nope"), ("GET", "/openapi.jsonx")],
)
def test_every_route_but_healthz_and_the_docs_needs_the_token(secured: TestClient, method: str, url: str) -> None:
    assert secured.request(method, url).status_code == 401


@pytest.mark.parametrize("url", ["/openapi.json", "/docs", "/docs/static/swagger-ui.css"])
def test_the_schema_and_docs_need_no_token(secured: TestClient, url: str) -> None:
    """A browser opens /docs (no header to send); the schema is not secret."""
    assert secured.get(url).status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_auth_accepts_the_token(secured: TestClient, cache: FakeCache, scheme: str) -> None:
    response = secured.post("/v1/load", json={"path": "/m/a.pt"}, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200
    assert [call[0] for call in cache.calls] == ["load"]


def test_healthz_needs_no_token(secured: TestClient) -> None:
    assert secured.get("/healthz").json() == {"status": "ok"}


def test_metrics_with_token(secured: TestClient) -> None:
    response = secured.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and "ckptd_active_leases" in response.text


def test_public_metrics_opens_only_metrics(tmp_path: Path, socket_path: Path, cache: FakeCache, metrics: Metrics) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    settings = _settings(tmp_path, socket_path, token_file=token_file, port=0, public_metrics=True)
    with TestClient(create_app(cache, settings, metrics)) as app:
        assert app.get("/metrics").status_code == 200
        assert app.get("/v1/stats").status_code == 401
        assert app.post("/v1/load", json={"path": "/m/a.pt"}).status_code == 401


def test_auth_comes_before_the_body_limit(secured: TestClient) -> None:
    response = secured.post("/v1/load", content=b"x" * (LIMIT + 1), headers={"Content-Type": "application/json"})
    assert response.status_code == 401


# --- body limit -------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid load body of exactly ``size`` bytes."""
    head = b'{"path": "/m/a.pt", "prefix": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


def test_body_at_the_limit_is_accepted(client: TestClient) -> None:
    response = client.post("/v1/load", content=_padded(LIMIT), headers={"Content-Type": "application/json"})
    assert response.status_code == 200


def test_declared_body_over_the_limit_is_413(client: TestClient, cache: FakeCache) -> None:
    response = client.post("/v1/load", content=_padded(LIMIT + 1), headers={"Content-Type": "application/json"})
    assert _error(response) == (413, "UsageError")
    assert str(LIMIT) in response.json()["error"]["message"]
    assert cache.calls == []


def test_streamed_body_over_the_limit_is_413(client: TestClient, cache: FakeCache) -> None:
    body = _padded(LIMIT * 3)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.post("/v1/load", content=chunks(), headers={"Content-Type": "application/json"})
    assert _error(response) == (413, "UsageError")
    assert cache.calls == []


def test_streamed_body_under_the_limit_is_served(client: TestClient) -> None:
    body = _padded(LIMIT // 2)
    response = client.post("/v1/load", content=iter([body[:100], body[100:]]), headers={"Content-Type": "application/json"})
    assert response.status_code == 200


def test_bad_content_length_is_400(client: TestClient) -> None:
    # httpx computes Content-Length itself, so drive the ASGI app with a hand-made scope.
    import asyncio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/load", "raw_path": b"/v1/load", "root_path": "", "query_string": b"",
        "headers": [(b"content-length", b"ten"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 400


# --- request validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"path": "/m/a.pt", "weights_only": True},
        {"path": 5},
        {"path": "/m/a.pt", "select": 5},
        {"path": "/m/a.pt", "map_location": {"cuda:1": 0}},
        {"path": "/m/a.pt", "tensor_name": ["a"]},
    ],
)
def test_bad_load_body_is_422_usage_error(client: TestClient, cache: FakeCache, body: dict[str, Any]) -> None:
    response = client.post("/v1/load", json=body)
    assert _error(response) == (422, "UsageError")
    assert cache.calls == []


def test_unknown_field_is_named(client: TestClient) -> None:
    message = client.post("/v1/prefetch", json={"path": "/m/a.pt", "lease": "x"}).json()["error"]["message"]
    assert "lease" in message and "Extra inputs" in message


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/v1/load", content=b"{not json", headers={"Content-Type": "application/json"})
    assert _error(response) == (422, "UsageError")


def test_evict_needs_ident(client: TestClient) -> None:
    response = client.delete("/v1/checkpoints")
    assert _error(response) == (422, "UsageError")
    assert "ident" in response.json()["error"]["message"]


def test_unknown_route_and_method_keep_the_error_shape(client: TestClient) -> None:
    assert _error(client.get("/v1/nope")) == (404, "UsageError")
    assert _error(client.get("/v1/load")) == (405, "UsageError")


# --- error mapping ----------------------------------------------------------------------


def _make(cls: type[CkptdError]) -> CkptdError:
    if issubclass(cls, CheckpointError):
        return cls("/m/a.pt", "something is wrong")
    return cls("something is wrong")


@pytest.mark.parametrize(
    ("exc_type", "status"),
    [
        (AuthenticationError, 401),
        (PathNotAllowedError, 403),
        (CheckpointNotFoundError, 404),
        (TensorNotFoundError, 404),
        (CheckpointBusyError, 409),
        (LeaseLostError, 410),
        (UnsupportedFormatError, 415),
        (CheckpointError, 422),
        (UsageError, 422),
        (UnpicklingError, 422),
        (DeviceError, 422),
        (OverBudgetError, 507),
        (NotSeekableError, 500),
        (DaemonError, 500),
        (DaemonNotRunningError, 500),
    ],
)
def test_ckptd_errors_map_to_status_and_type(
    client: TestClient, cache: FakeCache, exc_type: type[CkptdError], status: int
) -> None:
    cache.fail["load"] = _make(exc_type)
    response = client.post("/v1/load", json={"path": "/m/a.pt"})
    assert _error(response) == (status, exc_type.__name__)
    assert "something is wrong" in response.json()["error"]["message"]
    if status != 500:
        assert type(error_from(response.status_code, response.json())) is exc_type


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "fail", "exc"),
    [
        ("POST", "/v1/leases/L9/renew", {}, "renew", LeaseLostError("lease L9 is gone")),
        ("DELETE", "/v1/checkpoints", {"params": {"ident": "ck1"}}, "evict", CheckpointBusyError("2 leases")),
        ("POST", "/v1/prefetch", {"json": {"path": "/etc/x"}}, "prefetch", PathNotAllowedError("outside roots")),
        ("GET", "/v1/checkpoints", {}, "checkpoints", DaemonError("broken")),
    ],
)
def test_errors_from_every_route(
    client: TestClient, cache: FakeCache, method: str, url: str, kwargs: dict[str, Any], fail: str, exc: CkptdError
) -> None:
    cache.fail[fail] = exc
    response = client.request(method, url, **kwargs)
    assert _error(response)[1] == type(exc).__name__
    assert response.json()["error"]["message"] == str(exc)


def test_unexpected_exception_is_500_daemon_error(client: TestClient, cache: FakeCache) -> None:
    cache.fail["stats"] = ZeroDivisionError("boom")
    response = client.get("/v1/stats")
    assert _error(response) == (500, "DaemonError")
    assert "boom" not in response.json()["error"]["message"]  # internals stay in the log


# --- hostile input: refused before the cache sees it -------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"path": "/m/a\x00.pt"},
        {"path": "/m/a.pt", "tensor_name": "w", "select": ["w"]},
        {"path": "/m/a.pt", "map_location": ""},
        {"path": "/m/a.pt", "map_location": "x" * 65},
        {"path": "/m/a.pt", "session": "s" * 65},
    ],
    ids=["nul", "tensor_name+select", "empty-tag", "long-tag", "long-session"],
)
def test_hostile_load_body_is_422_before_the_cache(client: TestClient, cache: FakeCache, body: dict[str, Any]) -> None:
    response = client.post("/v1/load", json=body)
    assert _error(response) == (422, "UsageError")
    assert cache.calls == []


def test_megabyte_path_is_refused_in_milliseconds(tmp_path: Path, socket_path: Path, cache: FakeCache, metrics: Metrics) -> None:
    settings = load_settings(roots=[tmp_path], shm_dir=tmp_path, socket=socket_path, max_body_bytes=4 << 20)
    path = "/a" * (1 << 19)  # 1 MiB, half a million components
    with TestClient(create_app(cache, settings, metrics)) as app:
        app.post("/v1/prefetch", json={"path": "/warm"})  # the first request builds the route's models
        started = time.process_time()  # CPU time: the wall clock of a loaded CI machine is the scheduler's
        responses = [app.post(route, json={"path": path}) for route in ("/v1/load", "/v1/prefetch")]
        responses.append(app.delete("/v1/checkpoints", params={"ident": path[:10_000]}))  # a URL is shorter
        elapsed = time.process_time() - started
    assert [_error(r) for r in responses] == [(422, "UsageError")] * 3
    assert all("4096" in r.json()["error"]["message"] for r in responses)
    assert elapsed < 1.0, elapsed  # milliseconds each here; seconds of CPU per component walk before
    assert [call[0] for call in cache.calls] == ["prefetch"]


def test_nul_in_evict_ident_is_422(client: TestClient, cache: FakeCache) -> None:
    assert _error(client.delete("/v1/checkpoints", params={"ident": "/m/a\x00"})) == (422, "UsageError")
    assert cache.calls == []


@pytest.mark.parametrize(("method", "url"), [("POST", "/v1/leases/{}/renew"), ("DELETE", "/v1/leases/{}"), ("GET", "/v1/sessions/{}")])
def test_overlong_ids_are_422(client: TestClient, cache: FakeCache, method: str, url: str) -> None:
    assert _error(client.request(method, url.format("L" * 65))) == (422, "UsageError")
    assert cache.calls == []
