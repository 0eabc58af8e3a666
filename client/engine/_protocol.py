"""What both ends of the daemon's protocol agree on, with no transport: which ckptd error
answers with which HTTP status, the JSON body carrying it, the exception a client raises
back from it, and the header naming a streamed range's checksum.

The daemon answers a failed request with the status below and a body
``{"error": {"type": "<ExceptionName>", "message": "..."}}``; the client raises the same
exception type from it (:func:`error_from`). Sending and receiving (httpx, sockets) is the
front's (``ckptd._wire``); this module is only the table both ends read.
"""

from __future__ import annotations

from typing import Any

from . import _exceptions as errors

# The CRC-32 (zlib's, 8 hex digits) of the bytes of a range the daemon sends from an arena.
CHECKSUM_HEADER = "X-Ckptd-CRC32"
# The media type of a load's answer that carries a compact table (Manifest.to_bytes).
TABLE_MEDIA = "application/vnd.ckptd.manifest-table"
# The media type of ``POST /v1/sessions/{id}/load``: the framed manifest, then heartbeats.
SESSION_MEDIA = "application/vnd.ckptd.session"

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
