"""The wire, the client's side: the one place where a transport failure becomes a ckptd error.

Whatever goes wrong below HTTP (nothing listens, the connection drops, the daemon is too
slow, a malformed URL) is converted by :func:`transport_errors`, as httpx converts the
errors of its own transports, so no ``httpx`` or socket exception ever reaches a ckptd
caller. The table from error type to HTTP status that both ends read (and
:func:`error_from`) is the engine's (``ckptd.engine``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import httpcore
import httpx
from httpcore._backends.sync import SyncStream  # what httpcore's own backend returns

from ckptd import engine as errors

@contextlib.contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """Inside, every failure to reach or hear the daemon at ``url`` is raised as a ckptd error.

    Nothing listening (or the connection refused or closed before an answer):
    :class:`DaemonNotRunningError`, saying how to start one; no answer in time:
    :class:`DaemonTimeoutError`; a URL httpx cannot use: :class:`UsageError`; any other
    transport failure: :class:`DaemonError`. ckptd's own errors pass through.

    >>> with transport_errors("unix:///run/ckptd.sock"):
    ...     raise httpx.ConnectError("refused")
    Traceback (most recent call last):
    ...
    ckptd.DaemonNotRunningError: no ckptd daemon answers at unix:///run/ckptd.sock; start one with `ckptd serve --socket /run/ckptd.sock --root /path/to/checkpoints`
    """
    try:
        yield
    except errors.CkptdError:
        raise
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, FileNotFoundError,
            ConnectionRefusedError) as exc:  # fmt: skip
        raise errors.DaemonNotRunningError(not_running(url)) from exc
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise errors.DaemonTimeoutError(f"the daemon at {url} did not answer in time ({type(exc).__name__})") from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise errors.UsageError(f"{url}: {exc}") from exc
    except (httpx.HTTPError, httpx.StreamError, OSError) as exc:
        raise errors.DaemonError(f"lost the connection to the daemon at {url}: {exc or type(exc).__name__}") from exc


def not_running(url: str) -> str:
    """What to say when nothing answers at ``url``: the ``ckptd serve`` command that would.

    >>> not_running("http://10.0.0.5:8750")
    'no ckptd daemon answers at http://10.0.0.5:8750; start one with `ckptd serve --host 10.0.0.5 --port 8750 --token-file TOKEN --root /path/to/checkpoints`'
    """
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        start = f"ckptd serve --socket {parsed.path} --root /path/to/checkpoints"
    else:
        start = f"ckptd serve --host {parsed.hostname} --port {parsed.port} --token-file TOKEN --root /path/to/checkpoints"
    return f"no ckptd daemon answers at {url}; start one with `{start}`"


def unix_transport(path: str) -> httpx.HTTPTransport:
    """httpx's transport over the Unix socket at ``path``, closing the socket of a failed connect.

    httpcore (1.0) leaves a socket whose connect failed to the garbage collector: every
    attempt to reach a daemon that is not there held a descriptor until a collection and
    then warned (ResourceWarning). Here the same transport runs on a backend that closes it.

    >>> transport = unix_transport("/nowhere/ckptd.sock")
    >>> with httpx.Client(transport=transport, base_url="http://ckptd") as http:
    ...     http.get("/healthz")
    Traceback (most recent call last):
    ...
    httpx.ConnectError: [Errno 2] No such file or directory
    """
    transport = httpx.HTTPTransport(uds=path, verify=False)
    # httpx takes no network backend: its connection pool is given ours (the pool's one use of it)
    transport._pool._network_backend = _ClosingUnixBackend()  # type: ignore[attr-defined]
    return transport


class _ClosingUnixBackend(httpcore.SyncBackend):
    """httpcore's synchronous backend, except that a Unix socket that fails to connect is closed."""

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as exc:  # the errors httpcore's own backend raises, from the same causes
            sock.close()
            raise httpcore.ConnectTimeout(exc) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(exc) from exc
        return SyncStream(sock)
