"""Errors on the wire: one table from exception type to HTTP status, used by both ends.

The daemon answers a failed request with the status below and a body
``{"error": {"type": "<ExceptionName>", "message": "..."}}``; the client raises the same
exception type from it.
"""

from __future__ import annotations

from typing import Any

from . import _exceptions as errors

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
    """The JSON body describing ``exc``."""
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def error_from(status: int, body: Any) -> errors.CkptdError:
    """The exception a client raises for a failed response.

    >>> type(error_from(410, {"error": {"type": "LeaseLostError", "message": "gone"}})).__name__
    'LeaseLostError'
    """
    detail = body.get("error") if isinstance(body, dict) else None
    name = detail.get("type") if isinstance(detail, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else f"daemon answered HTTP {status}"
    cls = _BY_NAME.get(str(name))
    if cls is None:
        return errors.DaemonError(f"daemon answered HTTP {status}: {message}")
    if issubclass(cls, errors.CheckpointError):
        exc: errors.CheckpointError = cls.__new__(cls)  # type: ignore[call-overload]  # __init__ wants (name, problem)
        Exception.__init__(exc, message)
        exc.name, exc.problem = "", str(message)
        return exc
    return cls(message)
