"""Hostile and broken HTTP against a real daemon: slow or idle connections are closed in
bounded time, too many TCP connections cannot lock local workers out, and every bad
request is answered quickly with a 4xx and ckptd's error body, never a 500.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import torch

import ckptd
from ckptd_testlib import Daemon, daemon_in, wait_for

TOKEN = "abuse-token"
REQUEST_TIMEOUT = 1.0
MAX_TCP = 8
# How late past its deadline the daemon may close a connection: its timers fire within
# milliseconds, but a loaded 2-core CI machine can hold a process off the CPU for seconds.
# A connection that is never closed still fails (the test's socket gives up at 30 s).
SLACK = 10.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("abuse")
    token = base / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    yield from daemon_in(
        base, "--port", "0", "--token-file", str(token), "--request-timeout", str(REQUEST_TIMEOUT),
        "--keep-alive-timeout", "0.5", "--max-tcp-connections", str(MAX_TCP),
    )


@pytest.fixture(scope="module")
def checkpoint(daemon: Daemon) -> Path:
    path = daemon.root / "m.pt"
    torch.save({"w": torch.arange(100, dtype=torch.float32), "b": torch.ones(3)}, path)
    return path


def _address(daemon: Daemon) -> tuple[str, int]:
    assert daemon.tcp is not None
    parsed = urlparse(daemon.tcp)
    assert parsed.hostname is not None and parsed.port is not None
    return parsed.hostname, parsed.port


def _connect(daemon: Daemon) -> socket.socket:
    sock = socket.create_connection(_address(daemon), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _status_and_body(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _assert_error_shape(body: Any) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return str(body["error"]["type"])


# --------------------------------------------------------------------- slow and idle peers


def test_silent_tcp_connection_is_closed(daemon: Daemon) -> None:
    with _connect(daemon) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed without a word: it never asked anything
        elapsed = time.monotonic() - started
    assert REQUEST_TIMEOUT * 0.8 < elapsed < REQUEST_TIMEOUT + SLACK, elapsed


def test_dribbled_headers_are_closed_with_408(daemon: Daemon) -> None:
    """A byte every 0.1 s keeps uvicorn's own timers quiet; the request deadline still ends it."""
    with _connect(daemon) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the daemon closes mid-dribble
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > REQUEST_TIMEOUT + SLACK:
                    break
        raw = _read_all(sock)
        elapsed = time.monotonic() - started
    assert elapsed < REQUEST_TIMEOUT + SLACK, elapsed
    status, body = _status_and_body(raw)
    assert status == 408 and _assert_error_shape(body) == "UsageError"


def test_slow_body_is_closed(daemon: Daemon) -> None:
    with _connect(daemon) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /v1/load HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"path\": "
        )  # fmt: skip
        _read_all(sock)
        elapsed = time.monotonic() - started
    assert elapsed < REQUEST_TIMEOUT + SLACK, elapsed


def test_idle_keep_alive_connection_is_closed(daemon: Daemon) -> None:
    with _connect(daemon) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        _read_all(sock)
        assert time.monotonic() - started < REQUEST_TIMEOUT + SLACK


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that lets a request take 60 s to arrive: idle connections stay for the test."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    yield from daemon_in(tmp_path, "--port", "0", "--token-file", str(token), "--request-timeout", "60",
                         "--max-tcp-connections", str(MAX_TCP))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_tcp_connections_over_the_limit_cannot_lock_out_local_workers(patient: Daemon) -> None:
    """With few descriptors left, a hundred idle TCP connections would take the last ones and
    the daemon could no longer accept on its Unix socket; over the limit they are closed
    as they come, so local workers still load."""
    path = patient.root / "m.pt"
    torch.save({"w": torch.arange(100, dtype=torch.float32)}, path)
    pid = patient.proc.pid
    in_use = _fds(pid)
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + MAX_TCP + 40, old[1]))
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                idle.append(socket.create_connection(_address(patient), timeout=5))
        with ckptd.Client(patient.url, token=TOKEN, timeout=15) as worker:
            assert torch.equal(worker.load(path)["w"], torch.arange(100, dtype=torch.float32))
        # once the burst is shed, the daemon holds the TCP connections of the limit, no more
        wait_for(lambda: _fds(pid) <= in_use + MAX_TCP + 4, "the extra TCP connections to be closed", timeout=20)
    finally:
        for sock in idle:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    ok = wait_for(lambda: _healthz_over_tcp(patient), "TCP to serve again")  # once they are gone
    assert ok == {"status": "ok"}


def _healthz_over_tcp(daemon: Daemon) -> Any:
    try:
        return httpx.get(f"{daemon.tcp}/healthz", timeout=5).json()
    except httpx.HTTPError:
        return None


# --------------------------------------------------------------------- bad requests


def _post_load(http: httpx.Client, body: Any) -> httpx.Response:
    return http.post("/v1/load", json=body)


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=daemon.sock)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(transport=transport, base_url="http://ckptd", headers=headers, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"path": "/m/a\x00.pt"}, 422, "UsageError"),
        ({"path": "/a" * 499_000}, 422, "UsageError"),  # ~1 MB, half a million components
        ({"path": "{root}/m.pt", "map_location": "foo"}, 422, "DeviceError"),
        ({"path": "{root}/m.pt", "map_location": "cuda:-1"}, 422, "DeviceError"),
        ({"path": "{root}/m.pt", "map_location": {"cpu": "gpu"}}, 422, "DeviceError"),
        ({"path": "{root}/m.pt", "tensor_name": "w", "select": ["b"]}, 422, "UsageError"),
        ({"path": "{root}/m.pt", "tensor_name": "nope"}, 404, "TensorNotFoundError"),
        ({"path": "/etc/passwd"}, 403, "PathNotAllowedError"),
        ({"path": "{root}/missing.pt"}, 404, "CheckpointNotFoundError"),
        ({"path": "{root}"}, 422, "CheckpointError"),
        ({"path": 7}, 422, "UsageError"),
        ([1, 2], 422, "UsageError"),
    ],
    ids=["nul", "megabyte", "foo", "cuda:-1", "dict-gpu", "tensor_name+select", "no-tensor", "outside", "missing",
         "directory", "not-a-string", "not-an-object"],
)
def test_bad_loads_are_4xx_quickly_and_hold_nothing(
    daemon: Daemon, checkpoint: Path, http: httpx.Client, body: Any, status: int, error: str
) -> None:
    if isinstance(body, dict) and isinstance(body.get("path"), str):
        body = {**body, "path": body["path"].replace("{root}", str(daemon.root))}
    cpu = _cpu_seconds(daemon.proc.pid)
    response = _post_load(http, body)
    cpu = _cpu_seconds(daemon.proc.pid) - cpu
    assert response.status_code == status, response.text[:500]
    assert _assert_error_shape(response.json()) == error
    assert cpu < 1.0, cpu  # the megabyte path cost ~45 s of daemon CPU before (CPU: the wall clock is the load's)
    stats = http.get("/v1/stats").json()
    assert stats["leases"] == 0, stats


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status"),
    [
        ("POST", "/v1/load", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/v1/load", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/v1/load", {"content": b"x" * (2 << 20)}, 413),
        ("POST", "/v1/prefetch", {"json": {"path": "/m\x00"}}, 422),
        ("DELETE", "/v1/checkpoints", {"params": {"ident": "/m\x00"}}, 422),
        ("DELETE", "/v1/checkpoints", {"params": {"ident": "never-cached"}}, 404),
        ("POST", "/v1/leases/nope/renew", {}, 410),
        ("GET", "/v1/sessions/" + "s" * 100, {}, 422),
        ("GET", "/v1/sessions/%00", {}, 422),  # ids are what ckptd makes: URL-safe characters only
        ("POST", "/v1/sessions/a%20b/load", {"json": {"path": "/m.pt"}}, 422),
        ("POST", "/v1/leases/a.b/renew", {}, 422),
        ("GET", "/v1/nope", {}, 404),
        ("PUT", "/v1/load", {}, 405),
    ],
    ids=["bad-json", "bad-utf8", "too-big", "prefetch-nul", "evict-nul", "evict-unknown", "renew-unknown",
         "long-session", "nul-session", "space-session", "dot-lease", "no-route", "wrong-method"],
)
def test_bad_requests_keep_the_error_shape(http: httpx.Client, method: str, url: str, kwargs: dict, status: int) -> None:
    response = http.request(method, url, **kwargs)
    assert response.status_code == status, response.text[:500]
    _assert_error_shape(response.json())


@pytest.mark.parametrize(
    "raw",
    [b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
     b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 10)],  # a head that never ends
    ids=["garbage", "bad-header", "huge-head"],
)
def test_malformed_http_is_400_with_the_error_body(daemon: Daemon, raw: bytes) -> None:
    with _connect(daemon) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        status, body = _status_and_body(_read_all(sock))
    assert status == 400 and _assert_error_shape(body) == "UsageError"


# Request targets (the path and query of the request line) as a hostile client writes them,
# and what the daemon answers: the router's own validation (exact status), or the HTTP
# layer refusing the request line (any 4xx).
_TARGETS = {
    "megabyte-target": (b"GET /" + b"a/" * 500_000, None),
    "100k-target": (b"GET /" + b"a" * 100_000, 404),
    "megabyte-query": (b"DELETE /v1/checkpoints?ident=" + b"/a" * 500_000, None),
    "long-ident": (b"DELETE /v1/checkpoints?ident=" + b"/a" * 5_000, 422),
    "many-idents": (b"DELETE /v1/checkpoints?" + b"ident=/a&" * 5_000, 404),
    "nul-ident": (b"DELETE /v1/checkpoints?ident=/m%00", 422),
    "not-utf8-ident": (b"DELETE /v1/checkpoints?ident=%ff%fe", 404),
    "raw-not-utf8": (b"GET /v1/\xff\xfe", None),
    "control-byte": (b"GET /v1/\x01stats", None),
    "dot-dot": (b"GET /v1/../../etc/passwd", 404),
    "absolute-form": (b"GET http://elsewhere/v1/stats", 404),
    "asterisk-form": (b"OPTIONS *", 404),
    "many-slashes": (b"GET " + b"/" * 20_000 + b"v1/stats", 404),
    "long-lease-and-arena": (b"GET /v1/leases/" + b"x" * 5_000 + b"/arenas/" + b"y" * 5_000, 422),
    "nul-lease": (b"POST /v1/leases/%00/renew", 422),  # not an id ckptd makes
}


@pytest.mark.parametrize("name", sorted(_TARGETS))
def test_hostile_request_targets_are_4xx_quickly(daemon: Daemon, name: str) -> None:
    line, expected = _TARGETS[name]
    headers = f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    cpu = _cpu_seconds(daemon.proc.pid)
    with _connect(daemon) as sock:
        with contextlib.suppress(OSError):  # the daemon may answer and close before it has read it all
            sock.sendall(line + b" HTTP/1.1\r\n" + headers.encode())
        status, body = _status_and_body(_read_all(sock))
    cpu = _cpu_seconds(daemon.proc.pid) - cpu
    if expected is None:
        assert 400 <= status < 500, status
    else:
        assert status == expected, status
    _assert_error_shape(body)
    assert cpu < 1.0, cpu
    assert _healthz_over_tcp(daemon) == {"status": "ok"}


def test_unauthenticated_tcp_is_401_with_the_error_body(daemon: Daemon) -> None:
    response = httpx.post(f"{daemon.tcp}/v1/load", json={"path": "/m/a.pt"}, timeout=10)
    assert response.status_code == 401 and _assert_error_shape(response.json()) == "AuthenticationError"
