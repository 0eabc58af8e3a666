"""The descriptor socket: file descriptors of the arenas clients map.

Host-memory arenas are anonymous memory files (``memfd``) and read-only GPU mappings are
exported as descriptors: neither has a name another process could open, which is what
lets the kernel free them with their last user. HTTP cannot carry file descriptors; a
Unix socket can (``SCM_RIGHTS``). Beside the main socket the daemon listens on
``<socket>.fd`` (owner-only). A client sends one JSON line,
``{"lease": ..., "arena": ...}``; the daemon checks that the lease is live and holds the
checkpoint that arena belongs to, and answers ``{"ok": true}`` with the arena's
descriptor attached, or an error body of the HTTP API's shape
(``{"error": {"type": ..., "message": ...}}``) and no descriptor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ckptd.engine import CkptdError, UsageError, error_body

logger = logging.getLogger(__name__)

MAX_REQUEST = 4096
REQUEST_TIMEOUT_S = 5.0
ACCEPT_RETRY_S = 0.1  # after a failed accept (out of descriptors): every host arena is reached through here

Lookup = Callable[[str, str], int]  # (lease, arena id) -> a new descriptor of the arena, or a CkptdError


def fd_socket_path(socket_path: Path) -> Path:
    """Where the descriptor socket of the daemon listening at ``socket_path`` lives."""
    return socket_path.with_name(socket_path.name + ".fd")


class FdServer:
    """Answers descriptor requests on its own thread until :meth:`close`."""

    def __init__(self, path: Path, lookup: Lookup) -> None:
        if len(os.fsencode(path)) > 107:
            raise UsageError(f"{path}: the descriptor socket path must stay under 108 bytes; use a shorter --socket")
        self.path = path
        self._lookup = lookup
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the main socket's bind already proved no daemon runs here
        old = os.umask(0o177)
        try:
            self._sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        self._sock.listen(64)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ckptd-fd", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self._accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                # Out of descriptors (EMFILE) or memory: the client waits in the backlog meanwhile.
                logger.warning("descriptor socket: accept failed (%s); retrying", exc)
                self._closed.wait(ACCEPT_RETRY_S)
                continue
            # One thread per request: a client that connects and says nothing stalls only itself.
            threading.Thread(target=self._answer_and_close, args=(conn,), name="ckptd-fd-request", daemon=True).start()

    def _accept(self) -> socket.socket:
        return self._sock.accept()[0]

    def _answer_and_close(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._answer(conn)
            except OSError as exc:
                logger.debug("descriptor request failed: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        request = _read_line(conn)
        try:
            body = json.loads(request)
            lease, arena = str(body["lease"]), str(body["arena"])
            fd = self._lookup(lease, arena)
        except CkptdError as exc:
            conn.sendall(json.dumps(error_body(exc)).encode() + b"\n")
            return
        except (ValueError, KeyError, TypeError) as exc:
            conn.sendall(json.dumps(error_body(UsageError(f"bad descriptor request: {exc}"))).encode() + b"\n")
            return
        try:
            socket.send_fds(conn, [b'{"ok": true}\n'], [fd])
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop answering and remove the socket file."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST - len(data))
        if not chunk:
            break
        data += chunk
    return data
