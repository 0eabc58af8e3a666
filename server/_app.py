"""The daemon's HTTP API (FastAPI), versioned under ``/v1``; OpenAPI at ``/openapi.json``, ``/docs``.

=====================================  ===============================================
route                                  answer
=====================================  ===============================================
``POST /v1/load``                      the manifest (arenas, placements, layout, lease); with
                                       ``table``, a plain checkpoint's compact table instead
``POST /v1/sessions/{session}/load``   a worker's first load and its session in one request:
                                       the manifest, framed, then the session's heartbeats
``POST /v1/prefetch``                  the checkpoint's info (resident, no lease)
``POST /v1/index``                     a sharded checkpoint's index (``*.index.json``), checked
``POST /v1/leases/{lease}/renew``      ``{"lease", "expires_in"}``
``DELETE /v1/leases/{lease}``          204 (idempotent)
``GET /v1/leases/{lease}/arenas/{id}``  the bytes of a leased host arena (``Range: bytes=a-b``
                                       gives 206), their CRC-32 in ``X-Ckptd-CRC32``: how
                                       workers that cannot map shared memory load
``GET /v1/sessions/{session}``         a heartbeat line every 5 s (the first at once: the session
                                       has begun); when the session's last connection drops, its
                                       leases are released; the stream ends when the daemon stops
``GET /v1/checkpoints``                every cached checkpoint's info
``DELETE /v1/checkpoints?ident=``      the evicted checkpoint's info (id or path)
``GET /v1/stats``                      cache totals, version, uptime, endpoints
``GET /healthz``                       ``{"status": "ok"}``, never authenticated
``GET /metrics``                       Prometheus text exposition
``GET /openapi.json``, ``GET /docs``   the schema, and Swagger UI served from the installed
                                       ``fastapi-offline`` assets (no CDN), never authenticated
=====================================  ===============================================

Every answer is documented in the schema by the models of :mod:`ckptd.server._schema`,
every error by its one error model, and the bearer scheme by ``bearerAuth``.

**Auth.** When the daemon has a token, every request over TCP to a route but ``/healthz``
and the documentation (``/metrics`` too, unless ``public_metrics`` is set) needs
``Authorization: Bearer <token>``; anything else is 401 ``AuthenticationError``.
Requests over the Unix socket need no token: the socket is owner-only (0600), so the
kernel has already checked that the peer runs as the daemon's uid, and workers beside
the daemon (compose, a Kubernetes node) need no secret. **Errors** have one shape,
``{"error": {"type": "<ckptd exception>", "message": "..."}}``, with the status of
``ckptd.engine``'s error table (``status_for``): a malformed body is 422 ``UsageError``, a body over
``max_body_bytes`` 413 ``UsageError``.

The cache's calls block on disk, so the routes are plain ``def``: FastAPI runs them in
its thread pool. Nothing here touches CUDA.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import importlib.resources
import importlib.util
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ckptd import engine
from ckptd.engine import (
    CHECKSUM_HEADER,
    SESSION_MEDIA,
    TABLE_MEDIA,
    AuthenticationError,
    CkptdError,
    DaemonError,
    Manifest,
    UsageError,
    error_body,
    status_for,
)

from ._config import Settings
from ._metrics import Metrics
from ._schema import (
    BEARER_SCHEME,
    CheckpointInfoModel,
    HealthModel,
    LeaseRenewal,
    ManifestModel,
    ShardedIndexModel,
    StatsModel,
    error_responses,
)
from ._tables import Tables

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DOCS_ASSETS = "/docs/static"  # Swagger UI's files, from the fastapi-offline package
DOCS_PATHS = frozenset({"/openapi.json", "/docs"})  # the schema is not secret
OPEN_PATHS = frozenset({"/healthz"}) | DOCS_PATHS
SESSION_HEARTBEAT_S = 5.0
MAX_PATH = 4096  # Linux's PATH_MAX: nothing longer can be opened, so nothing longer is resolved
MAX_NAME = 4096  # tensor names, prefixes, select entries
MAX_TAG = 64  # a location tag ("cuda:7", "cpu")
MAX_ID = 64  # lease and session ids (ckptd makes 22-character ones)
# what ckptd makes its lease, session and arena ids of (secrets.token_urlsafe / token_hex)
ID_PATTERN = r"^[A-Za-z0-9_-]+$"
STREAM_PIECE_BYTES = 1 << 20  # an arena's bytes go out in pieces of this size


# ---------------------------------------------------------------------------------------
# What the app needs from the cache
# ---------------------------------------------------------------------------------------


class JsonReady(Protocol):
    """A result the cache returns (a Manifest, a CheckpointInfo)."""

    def to_json(self) -> dict[str, Any]: ...


class HostBytes(Protocol):
    """A host arena as the cache lends it (:class:`ckptd.gpu.Arena`)."""

    @property
    def nbytes(self) -> int: ...
    def host_bytes(self, offset: int, nbytes: int) -> memoryview: ...


class CacheService(Protocol):
    """The part of :class:`ckptd.server._cache.Cache` the HTTP layer calls."""

    def load(
        self,
        path: str,
        *,
        map_location: str | dict[str, str] | None = None,
        tensor_name: str | None = None,
        prefix: str | None = None,
        select: str | list[str] | None = None,
        devices: dict[str, str] | None = None,
        session: str | None = None,
    ) -> JsonReady: ...
    def prefetch(self, path: str) -> JsonReady: ...
    def sharded_index(self, path: str) -> Any: ...
    def checkpoints(self) -> list[Any]: ...
    def evict(self, ident: str) -> JsonReady: ...
    def renew(self, lease: str) -> float: ...
    def release(self, lease: str) -> None: ...
    def host_arena(self, lease: str, arena: str) -> HostBytes: ...
    def begin_session(self, session: str) -> None: ...
    def end_session(self, session: str) -> int: ...
    def stats(self) -> dict[str, object]: ...


# ---------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------


def check_path(value: str) -> str:
    """A path as the daemon accepts it: no NUL byte, at most :data:`MAX_PATH` bytes encoded.

    Checked before anything resolves it: resolving costs a system call per component.

    >>> check_path("/m/a.pt")
    '/m/a.pt'
    >>> check_path("/m/a\\x00.pt")
    Traceback (most recent call last):
    ...
    ValueError: a path cannot contain a NUL byte
    """
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL byte")
    if len(value) > MAX_PATH or len(value.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise ValueError(f"a path is at most {MAX_PATH} bytes (PATH_MAX)")
    return value


# Lengths are checked by pydantic's core before any validator runs, so a megabyte-long path
# costs microseconds; the NUL check then reads at most MAX_PATH characters.
CheckedPath = Annotated[str, Field(max_length=MAX_PATH), AfterValidator(check_path)]
Name = Annotated[str, Field(max_length=MAX_NAME)]
Tag = Annotated[str, Field(min_length=1, max_length=MAX_TAG)]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN)]
IdPath = Annotated[str, PathParam(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN)]


class LoadRequest(BaseModel):
    """``POST /v1/load``: what to load, and how (``ckptd.load``'s selective arguments)."""

    model_config = ConfigDict(extra="forbid")

    path: CheckedPath
    map_location: Tag | Annotated[dict[Tag, Tag], Field(max_length=1024)] | None = None
    tensor_name: Name | None = None
    prefix: Name | None = None
    select: Name | list[Name] | None = None
    devices: Annotated[dict[Tag, Annotated[str, Field(max_length=256)]], Field(max_length=1024)] | None = Field(
        default=None, description="the client's GPUs, cuda:N -> UUID, so cuda:N means the client's GPU"
    )
    session: Id | None = Field(
        default=None, description="the client's session (GET /v1/sessions/{id}): leases end with it"
    )
    table: bool = Field(
        default=False,
        description="the client rebuilds plain checkpoints from a compact table: send one where the "
        "checkpoint is plain and neither tensor_name nor select is given",
    )

    @model_validator(mode="after")
    def _one_selection(self) -> LoadRequest:
        # refused here, before any lease: the client would refuse the manifest anyway
        if self.tensor_name is not None and self.select is not None:
            raise ValueError("pass either tensor_name or select, not both")
        return self


class PrefetchRequest(BaseModel):
    """``POST /v1/prefetch``: a checkpoint to make resident with no lease."""

    model_config = ConfigDict(extra="forbid")

    path: CheckedPath


# ---------------------------------------------------------------------------------------
# Error responses
# ---------------------------------------------------------------------------------------


def error_response(exc: CkptdError, status: int | None = None) -> JSONResponse:
    """The JSON error response for ``exc`` (its wire status unless ``status`` is given).

    >>> error_response(AuthenticationError("no token")).status_code
    401
    """
    status = status_for(exc) if status is None else status
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's complaints as one line: ``body.path: Field required; ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CkptdError)
    async def ckptd_error(request: Request, exc: CkptdError) -> JSONResponse:
        status = status_for(exc)
        log = logger.error if status >= 500 else logger.info
        log("%s %s -> %d %s: %s", request.method, request.url.path, status, type(exc).__name__, exc)
        return error_response(exc, status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(UsageError(describe_validation(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 204 or exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        error = UsageError(str(exc.detail)) if exc.status_code < 500 else DaemonError(str(exc.detail))
        return error_response(error, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(DaemonError(f"internal error ({type(exc).__name__}); see the daemon's log"), 500)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, end)`` one ``Range: bytes=...`` header asks of ``size`` bytes (``None``: no
    header, the whole); anything unsatisfiable is a :class:`UsageError` (answered 416).

    >>> parse_range("bytes=10-19", 100), parse_range("bytes=90-", 100), parse_range("bytes=-5", 100)
    ((10, 20), (90, 100), (95, 100))
    >>> parse_range("bytes=0-999", 100), parse_range(None, 100)
    ((0, 100), None)
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    try:
        if unit.strip().lower() != "bytes" or not dash or "," in spec:
            raise ValueError
        if not first.strip():  # a suffix: the last N bytes
            count = int(last)
            if count <= 0:
                raise ValueError
            start, end = max(0, size - count), size
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last.strip() else size
            if int(first) < 0 or (last.strip() and int(last) < start):
                raise ValueError
    except ValueError:
        raise UsageError(f"unsupported Range {header!r}: expected one range, bytes=START-END") from None
    if start >= size:
        raise UsageError(f"Range {header!r} starts past the arena's {size} bytes")
    return start, end


def _range_error(exc: UsageError, size: int) -> JSONResponse:
    response = error_response(exc, 416)
    response.headers["Content-Range"] = f"bytes */{size}"
    return response


# ---------------------------------------------------------------------------------------
# Middleware: bearer token, body size
# ---------------------------------------------------------------------------------------


class TokenAuth:
    """ASGI middleware: every HTTP request over TCP but :data:`OPEN_PATHS` must carry the bearer token.

    A connection over a Unix socket is let through: uvicorn gives it no TCP port in
    ``scope["server"]`` (``(path, None)``, or ``None`` in older uvicorn releases).
    """

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self._token = token.encode()
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]) or _over_unix(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await error_response(AuthenticationError("missing or wrong token (send Authorization: Bearer <token>)"))(
            scope, receive, send
        )

    def _is_open(self, path: str) -> bool:
        return path in self._open or path.startswith(DOCS_ASSETS + "/")

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, presented = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._token)


def _over_unix(scope: Scope) -> bool:
    """Whether the request came over a Unix socket (no local TCP port).

    >>> _over_unix({"server": ("/run/ckptd/ckptd.sock", None)}), _over_unix({"server": ("127.0.0.1", 8750)})
    (True, False)
    """
    server = scope.get("server")
    return server is None or server[1] is None


class BodyLimit:
    """ASGI middleware: refuse (413) request bodies over ``limit`` bytes, declared or streamed.

    The body is read whole before the app runs (it is at most ``limit`` bytes), so a
    chunked upload over the limit is refused without the app seeing any of it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await error_response(UsageError("invalid Content-Length"), 400)(scope, receive, send)
            return
        if declared is not None and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected: the app finds out when it reads
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = UsageError(f"request body over {self.limit} bytes (the daemon's max_body_bytes)")
        await error_response(error, 413)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


def create_app(cache: CacheService, settings: Settings, metrics: Metrics) -> FastAPI:
    """The daemon's FastAPI app around ``cache``; no global state.

    ``app.state.tcp`` is the TCP URL ``/v1/stats`` reports (the server sets the bound one).

    >>> import tempfile, types
    >>> root = tempfile.mkdtemp()
    >>> settings = Settings(roots=[root], shm_dir=root, socket="/tmp/ckdoc/d.sock")
    >>> app = create_app(types.SimpleNamespace(), settings, Metrics())
    >>> sorted(r.path for r in app.routes if r.path.startswith("/v1/"))[:3]
    ['/v1/checkpoints', '/v1/checkpoints', '/v1/index']
    """
    app = FastAPI(
        title="ckptd",
        version=engine.__version__,
        description=DESCRIPTION,
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN: blank offline
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.started = time.monotonic()
    app.state.tcp = settings.tcp_url
    app.state.stopping = asyncio.Event()  # set by end_sessions: session streams end, so shutdown waits for none
    _install_error_handlers(app)
    _add_load_routes(app, cache)
    _add_admin_routes(app, cache, settings)
    _add_probe_routes(app, metrics)
    _add_docs(app, settings)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    token = settings.token
    if token is not None:
        open_paths = OPEN_PATHS | {"/metrics"} if settings.public_metrics else OPEN_PATHS
        app.add_middleware(TokenAuth, token=token, open_paths=open_paths)  # outermost: refuse before reading any body
    return app


DESCRIPTION = """PyTorch checkpoints loaded once, kept resident in shared memory, served under leases.

**Auth.** Over TCP, every route but `/healthz` (and `/metrics` when the daemon runs with
`--public-metrics`) needs `Authorization: Bearer <token>` (*Authorize* above). Over the
daemon's Unix socket no token is needed: the socket is owner-only.

**Errors** have one shape, `{"error": {"type": "<ckptd exception>", "message": "..."}}`;
the Python client raises the named exception.
"""

# Errors a route can answer with, besides 401 (a missing token over TCP) and 500.
LOAD_ERRORS = (403, 404, 413, 415, 422, 507)
TEXT = {"text/plain": {"schema": {"type": "string"}}}
HEARTBEATS = {"description": "a newline every few seconds while the session lives", "content": TEXT}
SESSION_LOAD = {
    "description": f"{SESSION_MEDIA}: one byte (J: the manifest as JSON, T: the answer {TABLE_MEDIA} carries), 8 bytes "
    "(big-endian) of length N, N bytes of it; then a newline every few seconds while the session lives",
    "content": {SESSION_MEDIA: {"schema": {"type": "string", "format": "binary"}}},
}
PROMETHEUS = {"description": "Prometheus text exposition", "content": TEXT}
BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
ARENA_BYTES = {"description": "the whole arena; X-Ckptd-CRC32 is the CRC-32 of the bytes sent", "content": BYTES}
TABLE_ANSWER = {
    "description": "the manifest; when the request asked for a table and the checkpoint is plain, "
    f"{TABLE_MEDIA}: 4 bytes (big-endian) of length N, N bytes of the manifest's JSON, then the compact table",
    "content": {TABLE_MEDIA: {"schema": {"type": "string", "format": "binary"}}},
}
ARENA_RANGE = {"description": "the range asked for (Range: bytes=A-B); X-Ckptd-CRC32 as above", "content": BYTES}


async def heartbeats(stopping: asyncio.Event, first: bytes) -> AsyncIterator[bytes]:
    """``first`` at once, then a newline every few seconds until the daemon stops."""
    yield first
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), SESSION_HEARTBEAT_S)
        if not stopping.is_set():
            yield b"\n"


class _SessionStream(StreamingResponse):
    """A session's stream whose end (sent, failed, cancelled: the peer went away) always
    ends the session, also when the stream never got to start."""

    def __init__(self, content: AsyncIterator[bytes], ended: Callable[[], object], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ended()


def end_sessions(app: FastAPI) -> None:
    """End every session stream now (the daemon is stopping; call it in the app's event loop).

    A session connection is a response that never ends by itself: without this, a clean
    shutdown would wait out its grace period and then cancel each one.
    """
    app.state.stopping.set()


class RangeChecksums:
    """CRC-32s of arena ranges already sent, so the workers that load one checkpoint after
    another (asking for the same ranges) cost the daemon no checksum pass. Arena ids are
    never reused, so an entry cannot go stale; the least recently used are forgotten.

    >>> sums = RangeChecksums(limit=1)
    >>> sums.crc32("a", 0, memoryview(b"abc")) == zlib.crc32(b"abc") == sums.crc32("a", 0, memoryview(b"zzz"))
    True
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self._limit = limit
        self._sums: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._lock = threading.Lock()

    def crc32(self, arena: str, start: int, data: memoryview) -> int:
        """The CRC-32 of ``data``, the bytes of ``arena`` from ``start``."""
        key = (arena, start, len(data))
        with self._lock:
            known = self._sums.get(key)
            if known is not None:
                self._sums.move_to_end(key)
                return known
        crc = zlib.crc32(data)  # outside the lock: zlib releases the GIL on big buffers
        with self._lock:
            self._sums[key] = crc
            while len(self._sums) > self._limit:
                self._sums.popitem(last=False)
        return crc


def _add_load_routes(app: FastAPI, cache: CacheService) -> None:
    checksums = RangeChecksums()
    tables = Tables()

    @app.post(
        "/v1/load", tags=["load"], summary="Load a checkpoint: its manifest, under a new lease",
        response_model=ManifestModel, responses={200: TABLE_ANSWER, **error_responses(401, *LOAD_ERRORS, 500)},
    )  # fmt: skip
    def load(request: LoadRequest) -> Response:
        media, body = answer(request, request.session)
        return Response(body, media_type=media)

    def answer(request: LoadRequest, session: str | None) -> tuple[str, bytes]:
        """A load's manifest under a new lease of ``session``: the table answer where one
        was asked for and the checkpoint is plain, else JSON."""
        manifest = cache.load(
            request.path,
            map_location=request.map_location,
            tensor_name=request.tensor_name,
            prefix=request.prefix,
            select=request.select,
            devices=request.devices,
            session=session,
        )
        if request.table and request.tensor_name is None and request.select is None and isinstance(manifest, Manifest):
            manifest = tables.attach(manifest)
            if manifest.table is not None:
                return TABLE_MEDIA, manifest.to_bytes()
        return "application/json", json.dumps(manifest.to_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @app.post(
        "/v1/sessions/{session}/load", tags=["load"],
        summary="Open a session with a load: the manifest, then the session's heartbeats (one request)",
        response_class=Response, responses={200: SESSION_LOAD, **error_responses(401, *LOAD_ERRORS, 500)},
    )  # fmt: skip
    async def load_in_session(
        session: IdPath, request: LoadRequest
    ) -> Response:
        """A worker's first load and its session in one request: the session begins before
        the lease is made, the answer starts with the manifest and then stays open as
        ``GET /v1/sessions/{session}`` does; when it drops (the client died, even by SIGKILL),
        the session's leases are released. ``session`` in the body must be absent or the same."""
        if request.session not in (None, session):
            raise UsageError("the body's session differs from the one in the path: send one, or the same")
        cache.begin_session(session)
        try:
            media, body = await run_in_threadpool(answer, request, session)
        except BaseException:
            cache.end_session(session)
            raise
        frame = (b"T" if media == TABLE_MEDIA else b"J") + len(body).to_bytes(8, "big") + body
        return _SessionStream(heartbeats(app.state.stopping, frame), lambda: cache.end_session(session),
                              media_type=SESSION_MEDIA)

    @app.post(
        "/v1/index", tags=["load"], summary="A sharded checkpoint's index, for clients that cannot read it",
        response_model=ShardedIndexModel, responses=error_responses(401, *LOAD_ERRORS, 500),
    )  # fmt: skip
    def sharded_index(request: PrefetchRequest) -> JSONResponse:
        index = cache.sharded_index(request.path)
        return JSONResponse({"name": index.name, "directory": index.directory, "weight_map": dict(index.weight_map),
                             "shards": list(index.shards), "metadata": dict(index.metadata)})

    @app.get(
        "/v1/sessions/{session}", tags=["load"], summary="Hold a session open; its leases end when it closes",
        response_class=Response, responses={200: HEARTBEATS, **error_responses(401, 422, 500)},
    )  # fmt: skip
    async def watch_session(session: IdPath) -> StreamingResponse:
        """A line every few seconds for as long as the client keeps the connection; when it
        drops (the client died, even by SIGKILL), the session's leases are released."""

        async def heartbeat() -> AsyncIterator[bytes]:
            cache.begin_session(session)
            try:
                async for beat in heartbeats(app.state.stopping, b"\n"):
                    yield beat
            finally:  # the daemon stops (the stream ends), or the peer disconnected (cancelled)
                cache.end_session(session)

        return StreamingResponse(heartbeat(), media_type="text/plain")

    @app.post(
        "/v1/leases/{lease}/renew", tags=["load"], summary="Extend a lease",
        response_model=LeaseRenewal, responses=error_responses(401, 410, 422, 500),
    )  # fmt: skip
    def renew(lease: IdPath) -> dict[str, Any]:
        return {"lease": lease, "expires_in": cache.renew(lease)}

    @app.get(
        "/v1/leases/{lease}/arenas/{arena}", tags=["load"],
        summary="Bytes of a host arena the lease holds (Range requests; CRC-32 of the bytes sent)",
        response_class=Response, responses={200: ARENA_BYTES, 206: ARENA_RANGE, **error_responses(401, 404, 410, 416, 422, 500)},
    )  # fmt: skip
    def arena_bytes(
        lease: IdPath, arena: IdPath,
        range_header: Annotated[str | None, Header(alias="Range", max_length=MAX_NAME)] = None,
    ) -> Response:
        """For workers that cannot map the daemon's shared memory: they stream the storages'
        bytes (the manifest's placements) from here, checking each range's ``X-Ckptd-CRC32``."""
        found = cache.host_arena(lease, arena)
        try:
            span = parse_range(range_header, found.nbytes)
        except UsageError as exc:
            return _range_error(exc, found.nbytes)
        start, end = span if span is not None else (0, found.nbytes)
        data = found.host_bytes(start, end - start)
        headers = {"Accept-Ranges": "bytes", CHECKSUM_HEADER: f"{checksums.crc32(arena, start, data):08x}",
                   "Content-Length": str(end - start)}
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{found.nbytes}"
        pieces = (data[at : at + STREAM_PIECE_BYTES] for at in range(0, end - start, STREAM_PIECE_BYTES))
        # found (the arena) stays referenced by this closure while the bytes go out
        return StreamingResponse(_keeping(found, pieces), status_code=206 if span is not None else 200,
                                 media_type="application/octet-stream", headers=headers)

    @app.delete(
        "/v1/leases/{lease}", tags=["load"], status_code=204, summary="Release a lease (idempotent)",
        response_class=Response, responses=error_responses(401, 422, 500),
    )  # fmt: skip
    def release(lease: IdPath) -> Response:
        cache.release(lease)
        return Response(status_code=204)


async def _keeping(owner: object, pieces: Iterator[memoryview]) -> AsyncIterator[memoryview]:
    """``pieces`` (slices of memory: no blocking work, so no thread hop each), while holding
    ``owner`` (the memory they view) alive."""
    for piece in pieces:
        yield piece
    del owner


def _add_admin_routes(app: FastAPI, cache: CacheService, settings: Settings) -> None:
    @app.post(
        "/v1/prefetch", tags=["cache"], summary="Make a checkpoint resident (no lease)",
        response_model=CheckpointInfoModel, responses=error_responses(401, *LOAD_ERRORS, 500),
    )  # fmt: skip
    def prefetch(request: PrefetchRequest) -> JSONResponse:
        return JSONResponse(cache.prefetch(request.path).to_json())

    @app.get(
        "/v1/checkpoints", tags=["cache"], summary="Every cached checkpoint",
        response_model=list[CheckpointInfoModel], responses=error_responses(401, 500),
    )  # fmt: skip
    def checkpoints() -> JSONResponse:
        return JSONResponse([info.to_json() for info in cache.checkpoints()])

    @app.delete(
        "/v1/checkpoints", tags=["cache"], summary="Evict a checkpoint by id or path; says what it freed",
        response_model=CheckpointInfoModel, responses=error_responses(401, 404, 409, 422, 500),
    )  # fmt: skip
    def evict(ident: Annotated[str, Query(max_length=MAX_PATH), AfterValidator(check_path)]) -> JSONResponse:
        return JSONResponse(cache.evict(ident).to_json())

    @app.get(
        "/v1/stats", tags=["cache"], summary="Cache totals and daemon facts",
        response_model=StatsModel, responses=error_responses(401, 500),
    )  # fmt: skip
    def stats(request: Request) -> JSONResponse:
        body = dict(cache.stats())
        body.update(
            version=engine.__version__,
            uptime_s=round(time.monotonic() - request.app.state.started, 3),
            socket=str(settings.socket),
            tcp=request.app.state.tcp,
        )
        return JSONResponse(body)


def _add_probe_routes(app: FastAPI, metrics: Metrics) -> None:
    @app.get(
        "/healthz", tags=["probes"], summary="Liveness (never needs the token)",
        response_model=HealthModel, responses=error_responses(500),
    )  # fmt: skip
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/metrics", tags=["probes"], summary="Prometheus metrics (needs the token unless --public-metrics)",
        response_class=Response, responses={200: PROMETHEUS, **error_responses(401, 500)},
    )  # fmt: skip
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)


def _add_docs(app: FastAPI, settings: Settings) -> None:
    """``/docs``: Swagger UI from the assets the fastapi-offline package ships (works offline),
    its *Authorize* button set up for the bearer scheme; the schema declares that scheme."""
    _add_bearer_scheme(app, settings)
    if importlib.util.find_spec("fastapi_offline") is None:  # a partial install: the API still works
        logger.warning("no /docs: the fastapi-offline package is missing (pip install 'ckptd[server]')")
        return
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ckptd API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )


def _add_bearer_scheme(app: FastAPI, settings: Settings) -> None:
    """The schema declares the bearer scheme, required by every operation but the open ones."""
    build = app.openapi
    public = {"/healthz", "/metrics"} if settings.public_metrics else {"/healthz"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "the daemon's token (--token-file); needed over TCP only",
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["security"] = [] if path in public else [{BEARER_SCHEME: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
