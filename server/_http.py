"""uvicorn's HTTP/1.1 protocol (h11) with the limits a daemon reachable over TCP needs.

uvicorn bounds neither the time a request may take to arrive (its keep-alive timer runs
only between requests, and the first byte of a request stops it) nor the number of
connections per listener: a peer that connects and says nothing, or dribbles its
headers a byte at a time, holds a connection and a descriptor for ever, without ever
reaching the token check. Here:

* every request must arrive whole (headers and body) within ``request_timeout`` of the
  connection becoming idle (opened, or its previous response sent); otherwise the
  connection is closed, with a 408 when part of a request came;
* TCP connections beyond ``max_tcp_connections`` are closed as they are accepted, so
  however many a remote peer opens, descriptors remain for local workers on the Unix
  socket, which is never limited (only its owner can connect);
* malformed requests are answered with ckptd's error body, as every other error.

The HTTP layer knows nothing of CUDA; this module knows nothing of the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ckptd.engine import CkptdError, UsageError, error_body

logger = logging.getLogger(__name__)

_TCP = (socket.AF_INET, socket.AF_INET6)


def raw_response(status: int, reason: str, error: CkptdError) -> bytes:
    """A complete ``Connection: close`` response carrying ckptd's error body for ``error``.

    >>> raw_response(408, "Request Timeout", UsageError("slow")).split(b"\\r\\n")[0]
    b'HTTP/1.1 408 Request Timeout'
    """
    body = json.dumps(error_body(error)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _TcpConnections:
    """How many TCP connections one server holds now (its protocol instances share one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0


def guarded_protocol(request_timeout: float, max_tcp_connections: int) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with these limits (one class per server).

    >>> cls = guarded_protocol(10.0, 64)
    >>> issubclass(cls, H11Protocol), cls.request_timeout
    (True, 10.0)
    """
    return type(
        "GuardedH11Protocol",
        (_GuardedH11Protocol,),
        {"request_timeout": request_timeout, "tcp": _TcpConnections(max_tcp_connections)},
    )


class _GuardedH11Protocol(H11Protocol):
    request_timeout: float
    tcp: _TcpConnections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False

    # --- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in _TCP:
            if self.tcp.open >= self.tcp.limit:
                self._refuse(transport)
                return
            self.tcp.open += 1
            self._counted = True
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.tcp.open -= 1
            if self.tcp.open < self.tcp.limit and self.tcp.refused:
                logger.info("TCP connections below the limit again (%d refused meanwhile)", self.tcp.refused)
                self.tcp.refused = 0
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Close a TCP connection over the limit at once: its descriptor is freed now."""
        if not self.tcp.refused:
            logger.warning("%d TCP connections open, the limit (max_tcp_connections): refusing more", self.tcp.open)
        self.tcp.refused += 1
        transport.abort()

    # --- the request deadline ----------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in: the app's time is not bounded here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # idle again: the next request has request_timeout to arrive

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        partial = bool(self.conn.trailing_data[0]) and self.conn.their_state is h11.IDLE
        logger.info("closing a connection whose request did not arrive within %.3g s", self.request_timeout)
        if partial:  # part of a request's head came: say why it is closed
            message = f"the request did not arrive within {self.request_timeout:g} s (the daemon's request_timeout)"
            self.transport.write(raw_response(408, "Request Timeout", UsageError(message)))
        self.transport.close()

    # --- malformed requests ------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(raw_response(400, "Bad Request", UsageError(f"malformed HTTP request: {msg}")))
        self.transport.close()
