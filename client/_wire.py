"""The wire, both ways: one table from exception type to HTTP status, and the one place
where a transport failure becomes a ckptd error.

The daemon answers a failed request with the status below and a body
``{"error": {"type": "<ExceptionName>", "message": "..."}}``; the client raises the same
exception type from it (:func:`error_from`). Whatever goes wrong below HTTP (nothing
listens, the connection drops, the daemon is too slow, a malformed URL) is converted by
:func:`transport_errors`, as httpx converts the errors of its own transports, so no
``httpx`` or socket exception ever reaches a ckptd caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx

from . import _exceptions as errors

# The CRC-32 (zlib's, 8 hex digits) of the bytes of a range the daemon sends from an arena.
CHECKSUM_HEADER = "X-Ckptd-CRC32"

STATUS: dict[type[errors.CkptdError], int] = {
    errors.AuthenticationError: 401,
    errors.PathNotAllowedError: 403,
    errors.CheckpointNotFoundError: 404,
    errors.TensorNotFoundError: 404,
    errors.CheckpointBusyError: 409,
    errors.LeaseLostError: 410,
    errors.UnsupportedFormatError: 415,
    errors.CheckpointError: 422,
    errors.UsageError: 422,
    errors.UnpicklingError: 422,
    errors.DeviceError: 422,
    errors.OverBudgetError: 507,
}

_BY_NAME = {cls.__name__: cls for cls in STATUS}


def status_for(exc: errors.CkptdError) -> int:
    """The HTTP status for an error (the most specific class listed wins; 500 otherwise).

    >>> status_for(errors.OverBudgetError("too big"))
    507
    """
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_body(exc: errors.CkptdError) -> dict[str, Any]:
    """The JSON body describing ``exc``.

    >>> error_body(errors.LeaseLostError("gone"))
    {'error': {'type': 'LeaseLostError', 'message': 'gone'}}
    """
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def error_from(status: int, body: Any) -> errors.CkptdError:
    """The exception a client raises for a failed response (every ckptd error takes one message).

    >>> error_from(410, {"error": {"type": "LeaseLostError", "message": "gone"}})
    LeaseLostError('gone')
    >>> error_from(404, {"error": {"type": "CheckpointNotFoundError", "message": "/m/a.pt: no such file"}})
    CheckpointNotFoundError('/m/a.pt: no such file')
    """
    detail = body.get("error") if isinstance(body, dict) else None
    name = detail.get("type") if isinstance(detail, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else f"daemon answered HTTP {status}"
    cls = _BY_NAME.get(str(name))
    if cls is None:
        return errors.DaemonError(f"daemon answered HTTP {status}: {message}")
    return cls(str(message))


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
    except httpx.TimeoutException as exc:
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
