"""Loading over HTTP: storages streamed from the daemon's resident copy into this process.

A client that cannot map the daemon's shared memory (another host, or a container
without the daemon's IPC namespace and ``/dev/shm``) still loads from the daemon's cache:
it asks for the same manifest, then fetches each arena's byte ranges
(``GET /v1/leases/{lease}/arenas/{arena}`` with a ``Range`` header) on several
connections at once, straight into one arena of its own (:class:`RangeReader`). Every range carries a CRC-32
of its bytes (:data:`CHECKSUM_HEADER`, zlib's); a range whose bytes do not match is
fetched again, then refused. The storages are then placed exactly as mapped ones are
(``map_location`` applied by the client, GPU targets copied up), so the result is
torch.load's.

Which path a load takes is the client's choice (:func:`choose_transport`): ``shm`` maps
the daemon's memory, ``http`` streams it; ``auto`` streams when the URL names another
host and maps otherwise, switching to the stream when a mapping fails.
"""

from __future__ import annotations

import enum
import http.client
import ipaddress
import json
import logging
import socket
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch

from ckptd.engine import CHECKSUM_HEADER, DaemonError, DaemonNotRunningError, Placement, UsageError, error_from
from ckptd.gpu import cpu_arena, pack

logger = logging.getLogger(__name__)

DEFAULT_RANGE_BYTES = 8 << 20
DEFAULT_CONNECTIONS = 4
ATTEMPTS = 3  # per range: a corrupted or dropped range is fetched again, twice


class Transport(str, enum.Enum):
    """How a client gets the daemon's storages: ``auto`` picks one of the other two."""

    AUTO = "auto"
    SHM = "shm"  # map the daemon's shared memory (same host, same /dev/shm)
    HTTP = "http"  # stream the bytes over the daemon's HTTP API

    @classmethod
    def parse(cls, value: str | Transport | None) -> Transport:
        """``None`` → ``auto``; anything else must name a transport.

        >>> Transport.parse("HTTP"), Transport.parse(None)
        (<Transport.HTTP: 'http'>, <Transport.AUTO: 'auto'>)
        """
        if value is None:
            return cls.AUTO
        try:
            return cls(str(value.value if isinstance(value, Transport) else value).lower())
        except ValueError:
            raise UsageError(f"transport {value!r}: expected one of auto, shm, http") from None


def choose_transport(url: str, requested: Transport) -> Transport:
    """The transport a client starts with: ``requested`` unless ``auto``; then ``http``
    for a TCP URL on another host, ``shm`` otherwise (a failed mapping switches later).

    >>> choose_transport("http://127.0.0.1:8750", Transport.AUTO)
    <Transport.SHM: 'shm'>
    >>> choose_transport("http://10.255.0.7:8750", Transport.AUTO)
    <Transport.HTTP: 'http'>
    >>> choose_transport("unix:///tmp/ckptd.sock", Transport.HTTP)
    <Transport.HTTP: 'http'>
    """
    if requested is not Transport.AUTO:
        return requested
    parsed = urlparse(url)
    if parsed.scheme == "unix" or is_local_host(parsed.hostname or ""):
        return Transport.SHM
    return Transport.HTTP


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine: a loopback name or address, or one of this host's own.

    >>> is_local_host("localhost"), is_local_host("::1"), is_local_host("192.0.2.1")
    (True, True, False)
    """
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or host in _own_addresses()
    except ValueError:
        pass  # a name: resolve it (a name we cannot resolve is not ours)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a in _own_addresses() for a in addresses)


def _own_addresses() -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return set()


@dataclass(frozen=True)
class Range:
    """``nbytes`` of daemon arena ``arena`` from ``source`` go to ``target`` in the local arena."""

    arena: str
    source: int
    target: int
    nbytes: int


@dataclass
class FetchStats:
    """What one streamed load moved: bytes, ranges, ranges fetched again after a bad checksum."""

    nbytes: int = 0
    ranges: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, retries: int) -> None:
        """Count one range that arrived whole after ``retries`` extra attempts."""
        with self._lock:
            self.nbytes += nbytes
            self.ranges += 1
            self.retries += retries


def plan_ranges(placements: Sequence[Placement], offsets: Sequence[int], range_bytes: int) -> list[Range]:
    """Each placement's bytes as ranges of at most ``range_bytes``, to land at ``offsets``.

    >>> plan_ranges([Placement("0", "a", 128, 10)], [0], 4)
    [Range(arena='a', source=128, target=0, nbytes=4), Range(arena='a', source=132, target=4, nbytes=4), Range(arena='a', source=136, target=8, nbytes=2)]
    """
    ranges = []
    for placement, offset in zip(placements, offsets):
        for start in range(0, placement.nbytes, range_bytes):
            n = min(range_bytes, placement.nbytes - start)
            ranges.append(Range(placement.arena, placement.offset + start, offset + start, n))
    return ranges


class RangeReader:
    """Connections to the daemon that read byte ranges straight into memory, one per thread.

    Ranges go through the standard library's :mod:`http.client`, whose responses read
    *into* a buffer (``readinto``): the kernel copies each range into the arena with no
    intermediate chunks, several times faster than a client that hands out bytes objects.
    ``url`` is the daemon's (``unix://``, ``http://`` or ``https://``); ``headers`` go with
    every request (the token).
    """

    def __init__(self, url: str, headers: Mapping[str, str], timeout: float = 600.0) -> None:
        self._url = urlparse(url)
        if self._url.scheme not in ("unix", "http", "https"):
            raise UsageError(f"{url}: expected unix:///path/to.sock or http://host:port")
        self._headers = dict(headers)
        self._timeout = timeout
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self, path: str, headers: Mapping[str, str]) -> http.client.HTTPResponse:
        """``GET path`` on this thread's connection (opened on first use, again after a failure)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
            with self._lock:
                self._opened.append(connection)
        try:
            connection.request("GET", path, headers={**self._headers, **headers})
            return connection.getresponse()
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        """Close this thread's connection (after a failed or abandoned response)."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Close every connection opened."""
        with self._lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()

    def _connect(self) -> http.client.HTTPConnection:
        url = self._url
        if url.scheme == "unix":
            return _UnixConnection(url.path, self._timeout)
        if url.scheme == "https":
            return http.client.HTTPSConnection(url.hostname or "", url.port, timeout=self._timeout)
        return http.client.HTTPConnection(url.hostname or "", url.port, timeout=self._timeout)


class _UnixConnection(http.client.HTTPConnection):
    """:class:`http.client.HTTPConnection` over the daemon's Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)  # the Host header; the socket is the address
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch_views(
    reader: RangeReader,
    lease: str,
    placements: Iterable[Placement],
    *,
    connections: int | None = None,
    range_bytes: int | None = None,
) -> tuple[dict[str, torch.UntypedStorage], FetchStats]:
    """Stream ``placements`` from the daemon into one new arena of this process; each
    storage as a view of it, by key, and what was moved.

    Ranges are fetched on ``connections`` connections at once, each checked against its
    CRC-32; the arena's pages are written once, in place. ``connections`` and
    ``range_bytes`` default to :data:`DEFAULT_CONNECTIONS` and :data:`DEFAULT_RANGE_BYTES`.
    """
    wanted = [p for p in placements if p.nbytes]
    offsets, span = pack(p.nbytes for p in wanted)
    arena = cpu_arena(span, name="ckptd-remote")
    stats = FetchStats()
    try:
        host = arena.host
        assert host is not None
        ranges = plan_ranges(wanted, offsets, range_bytes or DEFAULT_RANGE_BYTES)
        connections = connections or DEFAULT_CONNECTIONS

        def fetch(r: Range) -> None:
            stats.add(r.nbytes, fetch_range(reader, lease, r, host[r.target : r.target + r.nbytes]))

        if connections <= 1 or len(ranges) <= 1:
            for r in ranges:
                fetch(r)
        else:
            with ThreadPoolExecutor(max_workers=min(connections, len(ranges)), thread_name_prefix="ckptd-http") as pool:
                list(pool.map(fetch, ranges))
        views = {p.key: arena.view(offset, p.nbytes) for p, offset in zip(wanted, offsets)}
    finally:
        arena.close()  # the views keep the mapping
    return views, stats


def fetch_range(reader: RangeReader, lease: str, r: Range, out: memoryview) -> int:
    """Fill ``out`` with range ``r``; returns how many extra attempts it took.

    A range that arrives short or whose CRC-32 does not match (or whose connection
    fails) is fetched again (:data:`ATTEMPTS` in all) before :class:`DaemonError`; the
    daemon's own refusals (a lost lease, a bad range) are raised at once as its error types.
    """
    problem = ""
    for attempt in range(ATTEMPTS):
        try:
            problem = _fetch_once(reader, lease, r, out)
        except (OSError, http.client.HTTPException) as exc:
            reader.drop()
            problem = f"transfer failed ({exc!r})"
            if isinstance(exc, ConnectionRefusedError | FileNotFoundError) and attempt == ATTEMPTS - 1:
                raise DaemonNotRunningError(f"the daemon stopped answering while streaming: {exc}") from exc
        if not problem:
            return attempt
        logger.warning("range %d+%d of arena %s: %s; fetching it again", r.source, r.nbytes, r.arena, problem)
    raise DaemonError(f"range {r.source}+{r.nbytes} of arena {r.arena}: {problem} ({ATTEMPTS} attempts)")


def _fetch_once(reader: RangeReader, lease: str, r: Range, out: memoryview) -> str:
    """One attempt at range ``r``: ``''`` when it arrived whole and intact, else what went wrong."""
    response = reader.get(f"/v1/leases/{lease}/arenas/{r.arena}", {"Range": f"bytes={r.source}-{r.source + r.nbytes - 1}"})
    if response.status != 206:
        raise error_from(response.status, _json(response.read()))
    try:
        expected = int(response.getheader(CHECKSUM_HEADER) or "", 16)
    except ValueError:
        reader.drop()
        raise DaemonError(f"the daemon sent range {r.source}+{r.nbytes} without a valid {CHECKSUM_HEADER}") from None
    if response.length != r.nbytes:
        reader.drop()
        return f"{response.length} bytes announced for {r.nbytes} asked"
    filled = 0
    while filled < r.nbytes:
        n = response.readinto(out[filled:])  # straight into the arena
        if not n:
            break
        filled += n
    if filled != r.nbytes:
        reader.drop()
        return f"{filled} of {r.nbytes} bytes arrived"
    crc = zlib.crc32(out)
    if crc != expected:
        return f"checksum mismatch (crc32 {crc:08x}, daemon said {expected:08x})"
    return ""


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
