"""The daemon process: the sockets it binds, uvicorn serving the app, the lease reaper.

The Unix socket is the daemon's own: its directory is created owner-only when missing,
a stale socket file (nothing answers) is replaced, a live one makes :meth:`Server.serve`
refuse to start, and it is ``chmod 0600`` before ``listen`` so no other user can connect.
TCP is off unless a port is set, and refused without a token unless
``allow_insecure_tcp``. Every connection must deliver each request whole within
``request_timeout`` and TCP connections are capped (``max_tcp_connections``; see
:mod:`ckptd.server._http`), so idle or dribbling peers cannot hold descriptors local
workers need. SIGTERM and SIGINT shut the daemon down cleanly: session streams end, the
requests in flight finish, every arena is freed and the socket removed.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import resource
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ckptd.engine import DaemonError, UsageError
from ckptd.gpu import CudaDevices, Devices, SimulatedDevices

from ._app import create_app, end_sessions
from ._cache import Cache
from ._config import Settings
from ._devtier import DeviceTier, default_gpu_budget
from ._fdchannel import FdServer, fd_socket_path
from ._http import guarded_protocol
from ._metrics import Metrics

logger = logging.getLogger(__name__)

OnReady = Callable[[list[str]], None]
BACKLOG = 2048
GRACEFUL_SHUTDOWN_S = 10
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; a longer head is a 400


def device_tier(settings: Settings) -> DeviceTier | None:
    """The GPU tier ``settings.devices`` asks for (``None``: host memory only).

    ``auto`` uses CUDA through cupy when cupy is installed and sees a GPU; ``cuda``
    insists (a :class:`DeviceError` says what is missing). Budgets are per GPU by the
    daemon's ordinal (``cuda:0=40GiB``); where not given, what leaves room for the CUDA
    contexts of the daemon and its workers (:func:`default_gpu_budget`).
    """
    devices = _open_devices(settings)
    if devices is None:
        return None
    visible = {f"cuda:{d.index}": d for d in devices.visible()}
    unknown = sorted(set(settings.gpu_budget) - set(visible))
    if unknown:
        raise UsageError(f"gpu_budget names {unknown}, but the daemon's GPUs are {sorted(visible) or 'none'}")
    budgets = {d.uuid: settings.gpu_budget.get(name, default_gpu_budget(d.total_memory)) for name, d in visible.items()}
    logger.info("GPUs: %s (%s)", ", ".join(f"{n}={d.uuid}" for n, d in visible.items()) or "none", devices.sharing)
    return DeviceTier(devices, budgets, settings.host_tier_budget)


def _open_devices(settings: Settings) -> Devices | None:
    if settings.devices == "none":
        return None
    vmm = settings.gpu_sharing == "vmm"
    if settings.devices == "simulated":
        return SimulatedDevices(settings.simulated_gpus, settings.shm_dir, read_only=vmm)
    if settings.devices == "cuda":
        return CudaDevices(gds=settings.gds, vmm=vmm)
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        devices = CudaDevices(gds=settings.gds, vmm=vmm)
    except Exception as exc:  # noqa: BLE001  (auto: any failure to reach CUDA means no GPU tier)
        logger.warning("no GPU tier: %s", exc)
        return None
    return devices if devices.visible() else None


class Server:
    """One daemon: ``Server(settings).serve()`` blocks until SIGTERM/SIGINT (or :meth:`stop`).

    ``on_ready(urls)`` is called once every socket listens, with ``unix:///path`` first
    and ``http://host:port`` (the bound port) when TCP is on.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> server = Server(Settings(roots=[root], shm_dir=root, socket="/tmp/ckdoc/d.sock"))
    >>> server.app.title, server.urls
    ('ckptd', [])
    """

    def __init__(self, settings: Settings, *, on_ready: OnReady | None = None) -> None:
        _read_token(settings)
        self.settings = settings
        self.on_ready = on_ready
        self.metrics = Metrics()
        self.cache = Cache(settings, self.metrics, device_tier(settings))
        self.app = create_app(self.cache, settings, self.metrics)
        self.urls: list[str] = []
        self._uvicorn: _Uvicorn | None = None
        self._stop_reaper = threading.Event()
        self._socket_inode: int | None = None
        self._fds: FdServer | None = None

    def serve(self) -> None:
        """Bind, serve until told to stop, then free the cache and remove the socket."""
        _raise_descriptor_limit()
        sockets = self._bind()
        reaper = threading.Thread(target=self._reap, name="ckptd-reaper", daemon=True)
        try:
            self._uvicorn = _Uvicorn(self._uvicorn_config(), self._ready, lambda: end_sessions(self.app))
            reaper.start()
            with _signals_survive_uvicorn():
                self._uvicorn.run(sockets=sockets)
        finally:
            self._shutdown(sockets, reaper)

    def stop(self) -> None:
        """Ask a serving daemon to shut down (from another thread; signals do the same)."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    # --- sockets ----------------------------------------------------------------------

    def _bind(self) -> list[socket.socket]:
        sockets = [self._bind_unix()]
        self.urls = [f"unix://{self.settings.socket}"]
        if self.settings.port is not None:
            try:
                tcp = bind_tcp(self.settings.host, self.settings.port)
            except BaseException:
                self._close_sockets(sockets)
                raise
            sockets.append(tcp)
            self.urls.append(_tcp_url(tcp))
            self.app.state.tcp = self.urls[-1]
        return sockets

    def _bind_unix(self) -> socket.socket:
        sock = bind_unix(self.settings.socket)
        self._socket_inode = os.stat(self.settings.socket).st_ino
        try:  # arenas' descriptors travel beside HTTP
            self._fds = FdServer(fd_socket_path(self.settings.socket), self.cache.arena_fd)
        except BaseException:
            self._close_sockets([sock])
            raise
        return sock

    def _close_sockets(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            sock.close()
        if self._fds is not None:
            self._fds.close()
            self._fds = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Unlink our socket file, unless another daemon has replaced it since."""
        path = self.settings.socket
        try:
            if self._socket_inode is not None and os.stat(path).st_ino == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        self._socket_inode = None

    # --- running ----------------------------------------------------------------------

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            log_level=self.settings.log_level,
            log_config=None,  # uvicorn's records go to ckptd's handler: one format (configure_logging)
            lifespan="off",
            backlog=BACKLOG,
            http=guarded_protocol(self.settings.request_timeout, self.settings.max_tcp_connections),
            timeout_keep_alive=self.settings.keep_alive_timeout,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )

    def _ready(self) -> None:
        logger.info("ckptd serving on %s", ", ".join(self.urls))
        if self.on_ready is not None:
            self.on_ready(list(self.urls))

    def _reap(self) -> None:
        interval = self.settings.lease_ttl / 4
        while not self._stop_reaper.wait(interval):
            try:
                expired = self.cache.reap()
            except Exception:  # the reaper must outlive one bad pass
                logger.exception("reaping leases failed")
                continue
            if expired:
                logger.info("%d lease(s) expired", expired)

    def _shutdown(self, sockets: list[socket.socket], reaper: threading.Thread) -> None:
        logger.info("ckptd shutting down")
        self._stop_reaper.set()
        if reaper.is_alive():
            reaper.join()
        try:
            self.cache.close()
        finally:
            self._close_sockets(sockets)


def _raise_descriptor_limit() -> None:
    """Let the daemon open as many descriptors as its hard limit allows: it holds one per
    host arena (the memory file clients receive), besides its connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logger.debug("descriptor limit raised from %d to %d", soft, hard)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling us when its sockets accept connections."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[], None], stopping: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = ready
        self._on_stopping = stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()  # session streams end first, so only real requests are waited for
        await super().shutdown(sockets=sockets)


@contextmanager
def _signals_survive_uvicorn() -> Iterator[None]:
    """Let a clean shutdown return normally after SIGTERM/SIGINT.

    uvicorn re-raises the signal that stopped it once it has finished, through the
    handler that was installed before it; with the default ones the process would die
    (SIGTERM) or raise KeyboardInterrupt (SIGINT) before the cache is freed. While it
    runs, that earlier handler is one that does nothing; the originals come back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    originals = {sig: signal.signal(sig, _ignore) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


def _ignore(sig: int, frame: FrameType | None) -> None:
    logger.debug("signal %d after shutdown began", sig)


# ---------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, owner-only (mode 0600).

    The directory is created (0700) when missing. An existing socket that something
    answers on is a :class:`DaemonError`; a stale one is removed; any other file there is
    a :class:`UsageError` (never deleted).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp")) / "d.sock"
    >>> sock = bind_unix(path)
    >>> oct(path.stat().st_mode & 0o777)
    '0o600'
    >>> sock.close(); path.unlink(); path.parent.rmdir()
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secure_socket_dir(path.parent)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)  # before listen: until then, connecting is refused
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def secure_socket_dir(folder: Path) -> None:
    """Make sure no other user can unlink or replace a socket in ``folder``.

    A directory another user owns (root aside) is refused: its owner could swap the socket
    for their own. One that others may write to is refused too, unless it is sticky (like
    ``/tmp``, where only a file's owner may unlink it); when it is ours, its mode is fixed
    instead (group and other write bits cleared) and a warning says so.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp")); folder.chmod(0o777)
    >>> secure_socket_dir(folder)
    >>> oct(folder.stat().st_mode & 0o777)
    '0o755'
    >>> folder.rmdir()
    """
    st = os.stat(folder)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise UsageError(
            f"{folder} belongs to another user (uid {st.st_uid}), who could replace the daemon's socket; "
            "choose a --socket in a directory of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IWGRP | stat.S_IWOTH) or mode & stat.S_ISVTX:
        return
    if st.st_uid != me:
        raise UsageError(
            f"{folder} is writable by other users (mode {mode:o}), who could unlink or replace the daemon's socket; "
            "choose a --socket in a directory of your own"
        )
    fixed = mode & ~(stat.S_IWGRP | stat.S_IWOTH)
    os.chmod(folder, fixed)
    logger.warning("%s was writable by other users (mode %o); its mode is now %o", folder, mode, fixed)


def _clear_stale(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket; choose another --socket")
    if _answers(path):
        raise DaemonError(f"a daemon already serves on unix://{path}; stop it first or choose another --socket")
    logger.info("removing stale socket %s", path)
    os.unlink(path)


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    >>> sock = bind_tcp("127.0.0.1", 0)
    >>> sock.getsockname()[1] > 0, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    (True, True)
    >>> sock.close()
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    # No Nagle: a response's headers and body go out as separate writes, and Nagle holds the
    # second until the peer's delayed ACK (~40 ms per request). create_server leaves proto 0,
    # so asyncio does not set TCP_NODELAY on accepted connections; Linux copies it from here.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _tcp_url(sock: socket.socket) -> str:
    address: Any = sock.getsockname()
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_token(settings: Settings) -> None:
    """Read the token now, so a bad file fails at start (:class:`Settings` refuses TCP
    without a token unless allowed); warn when TCP runs without one."""
    token = settings.token
    if settings.port is not None and token is None:
        logger.warning("TCP on port %d without a token: anyone who can reach it can use the daemon", settings.port)
