"""``ckptd.Client``: load checkpoints from the daemon's shared cache.

The daemon reads each checkpoint once into shared-memory arenas; a client asks for a
manifest (where every storage lies, the pickle to rebuild from, a lease), maps the
arenas copy-on-write (each arena once per process), and rebuilds the object with the
same code as the embedded engine. Leases are renewed in the background and released
when the client closes, when the last tensor of a load is garbage-collected, or at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import httpx
import torch

from ckptd.formats import FileLike, Format, ShardedIndex, checkpoint_in_directory, is_sharded_index
from ckptd.gpu import Devices, local_devices, map_arena, map_fd

from ckptd.engine import (
    ArenaInfo,
    DaemonError,
    DaemonNotRunningError,
    Kind,
    Manifest,
    MapLocation,
    Progress,
    Select,
    StorageSet,
    UsageError,
    TABLE_MEDIA,
    adopt_tensors,
    check_daemon_load,
    error_from,
    keys_of,
    load_shards,
    make_request,
    rebuild,
    rebuild_from_table,
    restore,
    settings,
    table_applies,
    table_bytes,
    target_for,
    target_tag,
    wanted_entries,
    with_current_device,
)

from ._connection import Connection, transport_for
from ._remote import FetchStats, RangeReader, Transport, choose_transport, fetch_views
from ._wire import transport_errors

logger = logging.getLogger(__name__)


class Client(Connection):
    """A connection to a ckptd daemon that loads from its cache; a context manager.

    ``url`` is ``unix:///absolute/path.sock`` or ``http://host:port``; ``url``, ``token``
    and ``timeout`` default to ``ckptd.settings`` (``$CKPTD_URL``, else the default
    socket; ``$CKPTD_TOKEN``; ``$CKPTD_TIMEOUT``, 600 s).
    ``devices`` are this process's GPUs (default: found on first use: CUDA through cupy,
    or simulated ones under ``CKPTD_SIMULATED_GPUS``); the daemon learns their UUIDs, so
    ``cuda:0`` means this process's ``cuda:0`` whatever ``CUDA_VISIBLE_DEVICES`` says, and
    GPU storages arrive as the daemon's own GPU memory, opened once per process.

    ``transport`` (default ``ckptd.settings``' ``transport``, ``$CKPTD_TRANSPORT``, else
    ``auto``) is how storages arrive: ``shm`` maps the daemon's shared memory; ``http``
    streams their bytes from the daemon's resident copy (checksummed range requests) into
    this process's own memory, for workers on another host or without the daemon's
    ``/dev/shm``; ``auto`` streams for a TCP URL on another host, maps otherwise, and
    switches to streaming (once, logged) when a mapping fails. :attr:`transport_used`
    says which path the last load took.

    >>> with Client("unix:///tmp/ckptd-doc/none.sock") as client:  # doctest: +SKIP
    ...     state = client.load("/models/llama.pt", map_location="cpu")
    """

    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout: float | None = None,
        devices: Devices | None = None, transport: str | None = None,
    ) -> None:
        super().__init__(url, token=token, timeout=timeout)
        self._requested = Transport.parse(transport if transport is not None else settings.current().transport)
        self._transport = choose_transport(self.url, self._requested)
        self.transport_used: str | None = None  # "shm" or "http": the path the last load took
        self.loads_by_transport: Counter[str] = Counter()
        self.last_fetch: FetchStats | None = None  # what the last streamed load moved
        self._session = _SessionWatch(self.url, self._headers)
        self._mappings: dict[str, weakref.ref[Any]] = {}
        self._lock = threading.Lock()
        self._leases = _LeaseKeeper(self)
        self._devices = devices
        self._devices_known = devices is not None

    # --- loading --------------------------------------------------------------------

    def load(
        self,
        f: FileLike,
        map_location: MapLocation = None,
        pickle_module: ModuleType | None = None,
        *,
        weights_only: bool | None = None,
        mmap: bool | None = None,
        tensor_name: str | None = None,
        prefix: str | None = None,
        select: Select = None,
        progress: Progress | None = None,
        **pickle_load_args: Any,
    ) -> Any:
        """:func:`ckptd.load` through the daemon: same arguments, same result, shared memory.

        ``f`` must be a path the daemon can open (it resolves it against its roots).
        ``mmap`` is accepted for torch.load compatibility: the arenas are mapped anyway.
        The daemon reads the storages, so ``progress`` is called once, with the bytes of the
        storages this load returns (what an embedded load reports chunk by chunk), when they
        are in place.
        A callable ``map_location`` is applied here, once per storage, to the shared CPU storage.
        A bare ``"cuda"`` is this thread's current GPU, resolved here on each call.
        """
        map_location = self._current_device_resolved(map_location)
        request = make_request(map_location, pickle_module, weights_only, mmap, None, pickle_load_args)
        check_daemon_load(request)
        if tensor_name is not None and select is not None:  # refused before the daemon grants any lease
            raise UsageError("pass either tensor_name= or select=, not both")
        f = checkpoint_in_directory(f)  # a Hugging Face model directory loads like its file
        if isinstance(f, (str, os.PathLike)) and is_sharded_index(os.fspath(f)):
            return self._load_sharded(os.fspath(f), map_location, pickle_module, weights_only, tensor_name, prefix,
                                      select, progress, pickle_load_args)
        # a plain checkpoint loaded whole comes as a compact table: no pickle, no per-tensor JSON
        table = tensor_name is None and select is None and table_applies(request.pickle_module, request.pickle_load_args,
                                                                         request.map_location)

        def ask() -> Manifest:
            return self._manifest(f, map_location, tensor_name, prefix, select, table=table)

        manifest = ask()
        layout = manifest.layout
        if layout.format is Format.TORCHSCRIPT:
            self._release(manifest.lease)
            raise UsageError(f"{manifest.path} is a TorchScript archive: load it with Client.jit_load")
        try:
            check_daemon_load(request, layout)
        except UsageError:
            self._release(manifest.lease)
            raise

        def build(manifest: Manifest) -> Any:
            if manifest.table is not None:
                arenas, on_gpu = self._arenas(manifest)
                result = rebuild_from_table(manifest.table, arenas, on_gpu, request.map_location)
                if progress is not None:
                    progress(table_bytes(manifest.table, request.map_location))
                return result
            layout = manifest.layout
            wanted = wanted_entries(layout, tensor_name, prefix, select)
            keys = frozenset(layout.storages if wanted is None else keys_of(wanted))
            views, placed = self._views(manifest, request.map_location)
            storages = StorageSet(layout, request.map_location, keys, views=views, placed=placed)
            result = rebuild(layout, storages, request, tensor_name is not None, wanted)
            if progress is not None:
                progress(_returned_bytes(manifest, keys, request.map_location))
            return result

        return self._hold(manifest, build, ask)

    def _load_sharded(
        self, path: str, map_location: MapLocation, pickle_module: ModuleType | None, weights_only: bool | None,
        tensor_name: str | None, prefix: str | None, select: Select, progress: Progress | None,
        pickle_load_args: dict[str, Any],
    ) -> Any:
        """A Hugging Face sharded checkpoint: each shard through the daemon (cached on its own),
        merged into one state dict in the index's order."""

        def load_shard(shard: str, wanted: list[str]) -> Any:
            return self.load(shard, map_location, pickle_module, weights_only=weights_only, select=wanted,
                             progress=progress, **pickle_load_args)

        return load_shards(path, tensor_name, prefix, select, load_shard, self._index(path))

    def _index(self, path: str) -> ShardedIndex | None:
        """The index as the daemon reads it when this process cannot read the file (another
        host or container): ``None`` where it can (it is read here, as embedded)."""
        if os.access(path, os.R_OK):
            return None
        body = self._request("POST", "/v1/index", json={"path": os.path.abspath(path)})
        try:
            return ShardedIndex(str(body["name"]), str(body["directory"]), dict(body["weight_map"]),
                                tuple(body["shards"]), dict(body["metadata"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DaemonError(f"malformed index from the daemon ({exc!r})") from exc

    def jit_load(self, f: FileLike, map_location: MapLocation = None, _extra_files: dict[str, Any] | None = None) -> Any:
        """:func:`ckptd.jit_load` through the daemon: parameters and buffers in the shared arenas."""
        manifest = self._manifest(f, None, None, None, None, gpus=False)

        def build(manifest: Manifest) -> Any:
            views, _ = self._views(manifest)
            module = torch.jit.load(manifest.path, map_location=map_location, _extra_files=_extra_files)
            adopt_tensors(module, manifest.layout, lambda device, keys: {k: _place(views[k], device) for k in keys})
            return module

        return self._hold(manifest, build, lambda: self._manifest(f, None, None, None, None, gpus=False))

    def _manifest(
        self, f: FileLike, map_location: MapLocation, tensor_name: str | None, prefix: str | None, select: Select,
        *, gpus: bool = True, table: bool = False,
    ) -> Manifest:
        if not isinstance(f, (str, os.PathLike)):
            raise UsageError("the daemon loads checkpoints by path; pass a path, or load this one embedded with ckptd.load")
        body = {
            "path": os.path.abspath(os.fspath(f)),
            "map_location": _json_map_location(map_location),
            "tensor_name": tensor_name,
            "prefix": prefix,
            "select": list(select) if select is not None and not isinstance(select, str) else select,
            "devices": self._device_table() if gpus and self._transport is not Transport.HTTP else None,
        }
        if table and self._transport is not Transport.HTTP:  # a streamed load reads the placements
            body["table"] = True
        if self._session.claim():  # no session yet: this load opens it, in the same request
            kind, payload = self._session.open_with_load(body, self._http.timeout.read)
            return _manifest_from(TABLE_MEDIA if kind == b"T" else "application/json", payload)
        # The session is open before the lease is granted: a death mid-load releases it.
        body["session"] = self._session.ensure()
        response = self._answer("POST", "/v1/load", json=body)
        return _manifest_from(response.headers.get("content-type", ""), response.content)

    def _local_devices(self) -> Devices | None:
        """This process's GPUs: identity (ordinal ↔ UUID) and handle opening only."""
        if not self._devices_known:
            self._devices = local_devices(os.environ)
            self._devices_known = True
        return self._devices

    def _device_table(self) -> dict[str, str] | None:
        """This process's ``cuda:N`` → GPU UUID (``None`` without GPUs)."""
        devices = self._local_devices()
        return devices.table() if devices else None

    def _current_device_resolved(self, map_location: MapLocation) -> MapLocation:
        """A bare ``"cuda"`` made ``cuda:N`` for the calling thread's current GPU, as torch
        resolves it (the daemon cannot know a client thread's current device)."""
        devices = self._local_devices()
        return map_location if devices is None else with_current_device(map_location, devices.current)

    def _views(
        self, manifest: Manifest, map_location: MapLocation = None
    ) -> tuple[dict[str, torch.UntypedStorage], frozenset[str]]:
        """Each storage of the manifest as a view of its arena (each arena mapped or opened
        once per process, or streamed here over HTTP), and the keys already on their GPU."""
        if self._transport is Transport.HTTP:
            return self._streamed(manifest, map_location), frozenset()
        arenas, on_gpu = self._arenas(manifest)
        views = {p.key: arenas[p.arena][p.offset : p.offset + p.nbytes] for p in manifest.placements}
        return views, frozenset(p.key for p in manifest.placements if p.arena in on_gpu)

    def _arenas(self, manifest: Manifest) -> tuple[dict[str, torch.UntypedStorage], frozenset[str]]:
        """Every arena of the manifest, mapped or opened (once per process), and the ids of
        those on a GPU."""
        try:
            arenas = {info.id: self._map(info, manifest.lease) for info in manifest.arenas}
        except DaemonNotRunningError:  # the daemon died (it is not out of reach): after a restart this client maps again
            raise
        except OSError as exc:  # the daemon's memory is out of reach: another host, PID namespace (container) or user
            if self._requested is Transport.SHM:
                raise DaemonError(
                    f"cannot map the daemon's shared memory ({exc}); this process cannot reach the daemon's memory "
                    "(another host, container or user): use transport='http' (CKPTD_TRANSPORT=http) or 'auto' to "
                    "stream over HTTP"
                ) from exc
            raise _CannotMap(str(exc)) from exc
        self._used(Transport.SHM, manifest)
        return arenas, frozenset(info.id for info in manifest.arenas if info.device != "cpu")

    def _streamed(self, manifest: Manifest, map_location: MapLocation) -> dict[str, torch.UntypedStorage]:
        """The manifest's storages streamed from the daemon's resident copy into this
        process (those ``map_location`` sends to ``meta`` are not fetched: torch reads none)."""
        storages = manifest.layout.storages
        targets = {loc: target_for(map_location, loc) for loc in {storages[p.key].location for p in manifest.placements}}
        wanted = [p for p in manifest.placements if targets[storages[p.key].location].kind is not Kind.META]
        if any(info.device != "cpu" for info in manifest.arenas if info.id in {p.arena for p in wanted}):
            raise DaemonError("the daemon sent GPU arenas to a client that streams over HTTP; it sends host arenas only")
        reader = RangeReader(self.url, self._headers, self._http.timeout.read or 600.0)
        try:  # connections for this load only: the daemon closes idle ones
            views, self.last_fetch = fetch_views(reader, manifest.lease, wanted)
        finally:
            reader.close()
        self._used(Transport.HTTP, manifest)
        return views

    def _used(self, transport: Transport, manifest: Manifest) -> None:
        self.transport_used = transport.value
        self.loads_by_transport[transport.value] += 1
        if transport is Transport.HTTP and self.last_fetch is not None:
            fetched = self.last_fetch
            logger.info("%s: %d bytes streamed over HTTP from %s (%d ranges, %d fetched again)",
                        manifest.path, fetched.nbytes, self.url, fetched.ranges, fetched.retries)
        else:
            logger.info("%s: mapped from the daemon's shared memory (%s)", manifest.path, self.url)

    def _switch_to_http(self, reason: str) -> None:
        logger.info("cannot map the daemon's shared memory (%s): loads from %s stream over HTTP from now on",
                    reason, self.url)
        self._transport = Transport.HTTP

    def _map(self, info: ArenaInfo, lease: str) -> torch.UntypedStorage:
        with self._lock:
            ref = self._mappings.get(info.id)
            mapping = ref() if ref else None
            if mapping is None:
                storage, mapping = self._open(info, lease)
                self._mappings[info.id] = weakref.ref(mapping)
                weakref.finalize(mapping, self._leases.arena_gone, info.id)
                return storage
        return mapping.storage()  # every opened arena rebuilds a storage on itself

    def _open(self, info: ArenaInfo, lease: str) -> tuple[torch.UntypedStorage, Any]:
        if info.device == "cpu":
            if not (info.handle or {}).get("fd"):
                return map_arena(info.path, info.nbytes)  # an arena named in a filesystem
            fd = self._host_arena_fd(info, lease)
            try:
                return map_fd(fd, info.nbytes)
            finally:
                os.close(fd)
        if info.handle is None or self._devices is None:
            raise DaemonError(f"the daemon sent GPU arena {info.id} on {info.device}, but this process has no GPUs to open it")
        if not info.handle.get("fd"):
            return self._devices.open(info.handle)
        fd = receive_fd(self.url, lease, info.id)  # read-only mappings come from a descriptor
        try:
            return self._devices.open(info.handle, fd)
        finally:
            os.close(fd)

    def _host_arena_fd(self, info: ArenaInfo, lease: str) -> int:
        """A host-memory arena's descriptor: from the descriptor socket (lease-checked), or
        over TCP through the daemon's ``/proc`` entry (:func:`open_proc_arena`).

        :class:`OSError` (``auto`` then streams) where this process sees the daemon's socket
        but not the descriptor socket beside it: a container given the socket file alone.
        """
        parsed = urlparse(self.url)
        if parsed.scheme != "unix":
            return open_proc_arena(info.path, str((info.handle or {}).get("name")))
        beside = parsed.path + ".fd"
        if os.path.exists(parsed.path) and not os.path.exists(beside):
            raise FileNotFoundError(f"no descriptor socket {beside} beside the daemon's socket here (only the socket "
                                    "file shared with this container?)")
        return receive_fd(self.url, lease, info.id)

    def _hold(self, manifest: Manifest, build: Callable[[Manifest], Any], again: Callable[[], Manifest]) -> Any:
        """Map the arenas and build the result, then keep its lease until they are unmapped
        (released at once if anything fails; at once after a streamed load, whose bytes
        are this process's own). A first mapping that fails (``auto``) switches this client
        to streaming and loads again under a fresh manifest (``again``)."""
        try:
            result = build(manifest)
        except _CannotMap as exc:
            self._release(manifest.lease)
            self._switch_to_http(str(exc))
            return self._hold(again(), build, again)
        except BaseException:
            self._release(manifest.lease)
            raise
        if self._transport is Transport.HTTP:
            self._release(manifest.lease)
            return result
        self._leases.set_interval(manifest.lease_ttl)
        self._leases.hold(manifest.lease, {info.id for info in manifest.arenas}, self._alive_arenas())
        return result

    def _alive_arenas(self) -> set[str]:
        with self._lock:
            return {arena_id for arena_id, ref in self._mappings.items() if ref() is not None}

    def renew(self, lease: str) -> None:
        """Renew one lease now (the background keeper does this on its own)."""
        self._request("POST", f"/v1/leases/{lease}/renew")

    def _release(self, lease: str) -> None:
        try:
            self._request("DELETE", f"/v1/leases/{lease}")
        except DaemonError as exc:
            logger.debug("releasing lease %s failed: %s", lease, exc)

    def close(self) -> None:
        """Release every lease and close the connection (tensors stay valid: they are mapped)."""
        self._leases.stop()
        self._session.close()
        super().close()


class _CannotMap(Exception):
    """Internal: this process cannot map the daemon's shared memory (``auto`` then streams)."""


class _LeaseKeeper:
    """Renews held leases in the background; releases each once its arenas are all unmapped."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._held: dict[str, set[str]] = {}  # lease -> arena ids still mapped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = 10.0
        atexit.register(self.stop)

    def hold(self, lease: str, arenas: set[str], alive: set[str]) -> None:
        """Keep ``lease`` while any of ``arenas`` is mapped here."""
        live = arenas & alive
        if not live:
            self._client._release(lease)
            return
        with self._lock:
            self._held[lease] = live
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptd-leases", daemon=True)
                self._thread.start()

    def arena_gone(self, arena_id: str) -> None:
        """A mapping was garbage-collected: release the leases that no longer map anything."""
        with self._lock:
            for arenas in self._held.values():
                arenas.discard(arena_id)
            done = [lease for lease, arenas in self._held.items() if not arenas]
            for lease in done:
                del self._held[lease]
        for lease in done:
            self._client._release(lease)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                leases = list(self._held)
            for lease in leases:
                self._renew(lease)

    def _renew(self, lease: str) -> None:
        try:
            self._client.renew(lease)
        except DaemonError as exc:
            logger.warning("lease %s could not be renewed: %s", lease, exc)

    def set_interval(self, ttl: float) -> None:
        """Renew three times per TTL."""
        self._interval = max(0.05, ttl / 3)

    def stop(self) -> None:
        """Stop renewing and release every held lease (close, exit)."""
        self._stop.set()
        with self._lock:
            leases, self._held = list(self._held), {}
        for lease in leases:
            self._client._release(lease)


class _SessionWatch:
    """Keeps ``GET /v1/sessions/{id}`` open while this process lives.

    :meth:`ensure` opens it before every load that finds it closed (the first load, the
    first after a daemon restart) and returns once the daemon has begun the session, so
    every lease this client is granted belongs to a session the daemon watches: when the
    process dies, even by SIGKILL and even in the middle of its first load, the kernel
    closes the connection and the daemon releases the session's leases at once instead
    of at their TTL. A connection that ends (the daemon stopped or restarted, taking its
    leases with it) is opened again, under the same id, by the next load.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.id = secrets.token_urlsafe(16)
        self._url, self._headers = url, headers
        self._changed = threading.Condition()
        self._watching = False  # a thread is connecting or connected
        self._connected = False  # the daemon has begun the session on that connection
        self._closed = False
        self._thread: threading.Thread | None = None
        self._http: httpx.Client | None = None
        self._socket: socket.socket | None = None
        atexit.register(self.close)

    def ensure(self, timeout: float = 10.0) -> str:
        """Open the session connection unless it is open; returns the session id loads carry.

        Returns once the daemon has begun the session, or the attempt failed (the load that
        follows says why), or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        tried = False
        with self._changed:
            while not (self._closed or self._connected):
                if not self._watching:
                    if tried:
                        break  # this attempt failed
                    self._start_locked()
                    tried = True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
        return self.id

    def claim(self) -> bool:
        """Whether the caller is to open the session with its own load (none is open or
        being opened); if so it must call :meth:`open_with_load`."""
        with self._changed:
            if self._closed or self._connected or self._watching:
                return False
            self._watching = True
            return True

    def open_with_load(self, body: dict[str, Any], timeout: float | None) -> tuple[bytes, bytes]:
        """The claimed load, ``POST /v1/sessions/{id}/load``: the daemon begins the session,
        then makes the lease; the answer starts with the manifest (returned: its kind and
        bytes) and then stays open as the session's connection, read on a thread."""
        http: httpx.Client | None = None
        response: httpx.Response | None = None
        try:
            with transport_errors(self._url):
                transport, base = transport_for(self._url)
                # heartbeats every few seconds: the load's read timeout also bounds a silent daemon
                http = httpx.Client(transport=transport, base_url=base, headers=self._headers,
                                    timeout=httpx.Timeout(10.0, read=timeout))
                response = http.send(http.build_request("POST", f"/v1/sessions/{self.id}/load", json=body), stream=True)
                if response.status_code != 200:
                    response.read()
                    raise error_from(response.status_code, _json_or_none(response))
                chunks = response.iter_raw()
                frame = _read_frame(chunks)
        except BaseException:
            if response is not None:
                response.close()
            if http is not None:
                http.close()
            with self._changed:
                self._watching = False
                self._changed.notify_all()
            raise
        stream = response.extensions.get("network_stream")
        with self._changed:
            self._http, self._connected = http, True
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            self._changed.notify_all()
            self._thread = threading.Thread(target=self._follow, args=(http, response, chunks), name="ckptd-session",
                                            daemon=True)
            self._thread.start()
        return frame

    def _follow(self, http: httpx.Client, response: httpx.Response, chunks: Iterator[bytes]) -> None:
        """Read a claimed load's answer on until the session ends (the daemon went away, or :meth:`close`)."""
        try:
            for _ in chunks:
                pass
        except (httpx.HTTPError, OSError, RuntimeError) as exc:  # closed under us, or the daemon went away
            logger.debug("session %s ended: %s", self.id, exc)
        finally:
            with self._changed:
                self._watching = self._connected = False
                self._socket = self._http = None
                self._changed.notify_all()
            with contextlib.suppress(RuntimeError, httpx.HTTPError, OSError):
                response.close()
            http.close()

    def _start_locked(self) -> None:
        self._watching = True
        self._thread = threading.Thread(target=self._watch, name="ckptd-session", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        """One connection: until the daemon has begun the session, then until it ends."""
        http: httpx.Client | None = None
        try:
            transport, base = transport_for(self._url)
            http = httpx.Client(transport=transport, base_url=base, headers=self._headers,
                                timeout=httpx.Timeout(10.0, read=None))
            with self._changed:
                if self._closed:
                    return
                self._http = http
            with transport_errors(self._url), http.stream("GET", f"/v1/sessions/{self.id}") as response:
                if response.status_code != 200:
                    logger.warning("session %s refused: HTTP %d", self.id, response.status_code)
                    return
                stream = response.extensions.get("network_stream")
                chunks = response.iter_raw()
                next(chunks, None)  # the first heartbeat: the daemon has begun the session
                with self._changed:
                    self._socket = stream.get_extra_info("socket") if stream is not None else None
                    self._connected = True
                    self._changed.notify_all()
                for _ in chunks:
                    pass
        except (DaemonError, RuntimeError) as exc:  # closed under us, or the daemon went away
            logger.debug("session %s watch ended: %s", self.id, exc)
        finally:
            with self._changed:
                self._watching = self._connected = False
                self._socket = self._http = None
                self._changed.notify_all()
            if http is not None:
                http.close()

    def close(self) -> None:
        """Stop watching (leases then live by renewal alone, or are released by the caller)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread, http, sock = self._thread, self._http, self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the watching thread's read at once
        if http is not None:
            with contextlib.suppress(RuntimeError):
                http.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)


def _returned_bytes(manifest: Manifest, keys: frozenset[str], map_location: MapLocation) -> int:
    """The bytes of the storages ``keys`` a load returns (``meta`` targets have none): what
    it reports to ``progress``, as many as an embedded load reports reading."""
    storages = manifest.layout.storages
    return sum(p.nbytes for p in manifest.placements
               if p.key in keys and target_for(map_location, storages[p.key].location).kind is not Kind.META)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def open_proc_arena(path: str, name: str) -> int:
    """A read-only descriptor of the daemon's host arena ``name``, opened through the
    daemon's descriptor ``path`` (``/proc/PID/fd/N``): how a client on the daemon's host
    that talks TCP reaches the arena.

    :class:`OSError` where this process cannot: another host or PID namespace (the path
    is missing, or names another process's file), or not allowed to look into the
    daemon's descriptors (another user). The client then streams over HTTP (``auto``).
    The link is checked before opening (never open a pipe or socket of some other
    process) and the opened file after (the descriptor number may be reused meanwhile).

    >>> open_proc_arena("/proc/self/exe", "ckptd-0123")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /proc/self/exe is not the daemon's arena ckptd-0123 (another host or PID namespace?)
    """
    prefix = f"/memfd:{name} "  # as /proc shows it: '/memfd:NAME (deleted)'
    missing = FileNotFoundError(f"{path} is not the daemon's arena {name} (another host or PID namespace?)")
    if not os.readlink(path).startswith(prefix):  # OSError: no such process here, or not allowed
        raise missing
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
        os.close(fd)
        raise missing
    return fd


def receive_fd(url: str, lease: str, arena: str) -> int:
    """The descriptor of arena ``arena`` (host memory, or a read-only GPU mapping) from the
    daemon's descriptor socket (``<socket>.fd``).

    Only a Unix socket carries descriptors: over TCP, read-only GPU mappings are refused.
    """
    parsed = urlparse(url)
    if parsed.scheme != "unix":
        raise DaemonError(f"read-only GPU mappings need the daemon's Unix socket; {url} cannot pass descriptors")
    path = parsed.path + ".fd"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"lease": lease, "arena": arena}).encode() + b"\n")
            message, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        except OSError as exc:
            raise DaemonNotRunningError(f"no descriptor socket answers at {path}: {exc}") from exc
    try:
        body = json.loads(message or b"{}")
    except ValueError:
        body = None
    if not fds:
        raise error_from(0, body)
    if len(fds) > 1:  # never more than asked for
        for extra in fds[1:]:
            os.close(extra)
    return fds[0]


def _manifest_from(media: str, payload: bytes) -> Manifest:
    """A load's answer as a manifest: the table answer, or JSON."""
    if media == TABLE_MEDIA:
        return Manifest.from_bytes(payload)
    try:
        return Manifest.from_json(json.loads(payload))
    except ValueError as exc:
        raise DaemonError(f"the daemon's answer to a load is not JSON ({exc})") from exc


def _read_frame(chunks: Iterator[bytes]) -> tuple[bytes, bytes]:
    """The manifest at the head of a session's answer: its kind (one byte) and its bytes
    (8 bytes of length before them); what follows (heartbeats) is left to the session."""
    got = bytearray()
    for chunk in chunks:
        got += chunk
        if len(got) >= 9 and len(got) >= 9 + int.from_bytes(got[1:9], "big"):
            return bytes(got[:1]), bytes(got[9 : 9 + int.from_bytes(got[1:9], "big")])
    raise DaemonError("the daemon ended the session's answer before its manifest; load again")


def _place(view: torch.UntypedStorage, device: torch.device) -> torch.UntypedStorage:
    return view if device.type == "cpu" else restore(view, str(device))


def _json_map_location(map_location: MapLocation) -> str | dict[str, str] | None:
    """The form of ``map_location`` that travels; a callable stays here (applied by the client)."""
    if map_location is None:
        return None
    if isinstance(map_location, Mapping):
        return {str(k): str(v) for k, v in map_location.items()}
    # A callable is applied here to the CPU storage, as torch.load does: ask for host memory.
    return target_tag(map_location, "cpu") or "cpu"


_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def shared_client(url: str) -> Client:
    """One :class:`Client` per URL per process, for ``ckptd.load(..., server=url)``."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = Client(url)
        return client

