"""A connection to a ckptd daemon and its administration calls, without torch.

:class:`Connection` speaks HTTP to the daemon (over its Unix socket or TCP) and turns
every answer into JSON or a ckptd error; ``ckptd ls/stats/health/prefetch/evict`` use it
as it is, so they start in a fraction of a second. :class:`ckptd.Client` builds loading
on top of it.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import httpx

from ckptd.engine import UsageError, error_from, settings
from ckptd.formats import checkpoint_in_directory, is_sharded_index, read_sharded_index

from ._wire import transport_errors, unix_transport


class Connection:
    """HTTP to the daemon at ``url``; a context manager.

    ``url`` is ``unix:///absolute/path.sock`` or ``http://host:port``; ``url``, ``token``
    and ``timeout`` default to ``ckptd.settings`` (``$CKPTD_URL``, else the default
    socket; ``$CKPTD_TOKEN``; ``$CKPTD_TIMEOUT``).

    >>> with Connection("unix:///run/ckptd.sock") as daemon:  # connects on the first call
    ...     daemon.url
    'unix:///run/ckptd.sock'
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float | None = None) -> None:
        current = settings.current()
        self.url = url or current.url or current.default_url
        token = token if token is not None else current.token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport, base = transport_for(self.url)
        self._http = httpx.Client(transport=transport, base_url=base, headers=self._headers,
                                  timeout=current.timeout if timeout is None else timeout)  # fmt: skip

    # --- cache administration -------------------------------------------------------

    def prefetch(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Make a checkpoint resident in the daemon with no client attached (every shard of
        a ``*.index.json``, summed into one answer; a model directory's checkpoint)."""
        path = checkpoint_in_directory(path)
        if is_sharded_index(os.fspath(path)):
            shards = read_sharded_index(os.fspath(path)).shards
            return _summed(os.path.abspath(os.fspath(path)), [self.prefetch(shard) for shard in shards])
        return dict(self._request("POST", "/v1/prefetch", json={"path": os.path.abspath(os.fspath(path))}))

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint the daemon holds (path, identity, bytes per device, leases, hits, last use)."""
        return list(self._request("GET", "/v1/checkpoints"))

    def evict(self, ident: str) -> dict[str, Any]:
        """Evict a checkpoint by id or path (refused while leases hold it)."""
        if os.path.exists(ident):
            ident = os.path.abspath(ident)
        return dict(self._request("DELETE", "/v1/checkpoints", params={"ident": ident}))

    def stats(self) -> dict[str, Any]:
        """The daemon's totals: resident bytes and budgets per device, leases, hits, misses, evictions."""
        return dict(self._request("GET", "/v1/stats"))

    def health(self) -> dict[str, Any]:
        """The daemon's ``/healthz`` answer (``{"status": "ok"}``); raises :class:`DaemonNotRunningError` if none answers."""
        return dict(self._request("GET", "/healthz"))

    def close(self) -> None:
        """Close the connection."""
        self._http.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- transport --------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        """The daemon's JSON answer (None for 204); any failure raised as a ckptd error."""
        response = self._answer(method, url, **kwargs)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    def _answer(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The daemon's answer, read whole; an error status or any failure raised as a ckptd error."""
        with transport_errors(self.url):
            response = self._http.request(method, url, **kwargs)
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_from(response.status_code, body)
        return response


def _summed(path: str, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One checkpoint info for the shards of a sharded checkpoint."""
    resident: dict[str, int] = {}
    for info in infos:
        for device, nbytes in info.get("resident_bytes", {}).items():
            resident[device] = resident.get(device, 0) + nbytes
    return {
        "id": ",".join(str(info.get("id")) for info in infos),
        "path": path,
        "resident_bytes": resident,
        "storages_resident": sum(info.get("storages_resident", 0) for info in infos),
        "storages_total": sum(info.get("storages_total", 0) for info in infos),
        "shards": infos,
    }


def transport_for(url: str) -> tuple[httpx.HTTPTransport, str]:
    """The httpx transport and base URL for a daemon URL.

    >>> transport_for("http://127.0.0.1:8750/")[1]
    'http://127.0.0.1:8750'
    """
    # Without TLS (a Unix socket, plain http) no certificate store is loaded: that costs
    # tens of milliseconds, and a worker's first attach is timed in milliseconds.
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        if not parsed.path.startswith("/"):
            raise UsageError(f"{url}: a unix URL needs an absolute socket path (unix:///run/ckptd.sock)")
        return unix_transport(parsed.path), "http://ckptd"
    if parsed.scheme in ("http", "https") and parsed.netloc:
        return httpx.HTTPTransport(verify=parsed.scheme == "https"), url.rstrip("/")
    raise UsageError(f"{url}: expected unix:///path/to.sock or http://host:port")
