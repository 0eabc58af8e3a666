"""The daemon's log: one format, with timestamps, for ckptd's records and uvicorn's.

``text`` (the default) is a line a person reads::

    2026-11-30 11:03:41,512 INFO    ckptd.server._server: ckptd serving on unix:///run/ckptd/ckptd.sock

``json`` is one object per line for a log pipeline (python-json-logger)::

    {"time": "2026-11-30T11:03:41", "level": "INFO", "logger": "uvicorn.access", "message": "..."}

uvicorn is given no logging configuration of its own (``log_config=None``): its loggers
propagate to the one handler installed here, so both speak the same format.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def log_formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter for ``log_format``.

    >>> record = logging.LogRecord("ckptd", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    >>> log_formatter("json").format(record)  # doctest: +ELLIPSIS
    '{"time": "...", "level": "INFO", "logger": "ckptd", "message": "hello you"}'
    >>> log_formatter("text").format(record)  # doctest: +ELLIPSIS
    '... INFO    ckptd: hello you'
    """
    if log_format == "json":
        return JsonFormatter(
            JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}, json_ensure_ascii=False
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every record at ``level`` or above (ckptd's and uvicorn's) to stderr in one format.

    ``trace`` is uvicorn's level below debug; for ckptd it means debug.
    """
    numeric = logging.DEBUG if level == "trace" else logging.getLevelName(level.upper())
    handler = logging.StreamHandler(sys.stderr)  # stdout is the CLI's (the ready line)
    handler.setFormatter(log_formatter(log_format))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
