"""Client settings: read once from ``CKPTD_*`` variables, then set in code, globally or for a block.

``ckptd.settings`` holds what a client process is configured with (kvikio-style):

=================  =========================  ===============================================
setting            variable                   meaning (default)
=================  =========================  ===============================================
``url``            ``CKPTD_URL``              the daemon ``ckptd.load`` goes through (none:
                                              load in this process)
``token``          ``CKPTD_TOKEN``            bearer token sent to the daemon (none)
``reader_threads`` ``CKPTD_READER_THREADS``   threads reading one checkpoint (none: the device
                                              layer's default, 2 to 8 by CPU count)
``chunk_bytes``    ``CKPTD_CHUNK_BYTES``      bytes per read, ``16MiB`` or ``16M`` (none: 16 MiB)
``timeout``        ``CKPTD_TIMEOUT``          seconds to wait for the daemon's answer (600)
``transport``      ``CKPTD_TRANSPORT``        how a daemon's storages arrive: ``shm`` (map its
                                              shared memory), ``http`` (stream them), ``auto``
                                              (none: stream from another host, else map)
=================  =========================  ===============================================

The variables are read once, on first use; ``ckptd.settings.set(...)`` changes the
process-wide values, ``with ckptd.settings(...):`` changes them for the code inside (this
thread or task only). Sizes mean what Kubernetes and pydantic's ``ByteSize`` mean:
``16G`` and ``16GB`` are 16·10^9 bytes, ``16Gi`` and ``16GiB`` 16·2^30.

>>> import ckptd
>>> with ckptd.settings(reader_threads=2, chunk_bytes="4MiB"):
...     ckptd.settings.reader_threads, ckptd.settings.chunk_bytes
(2, 4194304)
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ._exceptions import UsageError

ENV_PREFIX = "CKPTD_"
TRANSPORTS = ("auto", "shm", "http")  # ckptd._remote.Transport's values
DEFAULT_TIMEOUT = 600.0

# pydantic's ByteSize units (decimal kb..eb and bare k..e, binary kib..eib), plus Kubernetes'
# Ki..Ei. The daemon parses with ByteSize itself; the client must not need pydantic (a
# server extra), and tests/client/test_settings.py checks that both agree.
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}
_UNITS = {
    "": 1, "b": 1,
    **{p + "b": n for p, n in _DECIMAL.items()}, **_DECIMAL,
    **{p + "ib": 2 ** (10 * (i + 1)) for i, p in enumerate(_DECIMAL)},
    **{p + "i": 2 ** (10 * (i + 1)) for i, p in enumerate(_DECIMAL)},
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d*\.?\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """A byte count from ``123``, ``"16GiB"``/``"16Gi"`` (2^30) or ``"16G"``/``"16GB"`` (10^9).

    >>> parse_size("16GiB"), parse_size("16Gi"), parse_size("16G"), parse_size("1.5k"), parse_size(42)
    (17179869184, 17179869184, 16000000000, 1500, 42)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value}: a size cannot be negative")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size (examples: 1073741824, 500MB, 16GiB, 16Gi, 16G)")
    return int(float(match.group(1)) * _UNITS[unit])


def default_socket(environ: Mapping[str, str]) -> str:
    """The daemon's default Unix socket: ``$XDG_RUNTIME_DIR/ckptd.sock``, else ``/tmp/ckptd-<uid>/ckptd.sock``.

    >>> default_socket({"XDG_RUNTIME_DIR": "/run/user/1000"})
    '/run/user/1000/ckptd.sock'
    """
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ckptd.sock")
    return f"/tmp/ckptd-{os.getuid()}/ckptd.sock"


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """One set of client settings (immutable; see :mod:`ckptd.engine._settings` for each field).

    ``default_url`` is where :class:`ckptd.Client` connects when neither its ``url`` nor
    ``url`` here says: the default socket (``$XDG_RUNTIME_DIR`` when it was read).

    >>> ClientSettings.from_env({"CKPTD_URL": "unix:///run/ckptd.sock", "CKPTD_CHUNK_BYTES": "8Mi"}).chunk_bytes
    8388608
    """

    url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)  # a secret: never in logs
    reader_threads: int | None = None
    chunk_bytes: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    transport: str | None = None
    default_url: str = dataclasses.field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reader_threads is not None and (isinstance(self.reader_threads, bool) or self.reader_threads < 1):
            raise UsageError(f"reader_threads: {self.reader_threads!r} is not a thread count (1 or more)")
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise UsageError(f"chunk_bytes: {self.chunk_bytes!r} must be at least 1 byte")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"timeout: {self.timeout!r} is not a positive number of seconds")
        if self.transport is not None and self.transport.lower() not in TRANSPORTS:
            raise UsageError(f"transport {self.transport!r}: expected one of {', '.join(TRANSPORTS)}")

    @staticmethod
    def variables() -> dict[str, str]:
        """Each setting's environment variable.

        >>> ClientSettings.variables()["chunk_bytes"]
        'CKPTD_CHUNK_BYTES'
        """
        return {f.name: ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ClientSettings) if f.name != "default_url"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClientSettings:
        """The settings ``environ``'s ``CKPTD_*`` variables give (unset or empty: the default)."""
        given = {name: environ[var] for name, var in cls.variables().items() if environ.get(var)}
        return cls.of(given, default_url=f"unix://{default_socket(environ)}")

    @classmethod
    def of(cls, values: Mapping[str, Any], *, default_url: str) -> ClientSettings:
        """Settings from names and values as a user writes them (sizes and numbers may be text)."""
        unknown = sorted(set(values) - set(cls.variables()))
        if unknown:
            raise UsageError(f"unknown client setting(s) {', '.join(unknown)}; the settings are {', '.join(cls.variables())}")
        converted = {name: _convert(name, value) for name, value in values.items()}
        return cls(**converted, default_url=default_url)

    def replace(self, **changes: Any) -> ClientSettings:
        """These settings with ``changes`` applied."""
        return ClientSettings.of({**self._values(), **changes}, default_url=self.default_url)

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.variables()}


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if name == "chunk_bytes":
            return parse_size(value)
        if name == "reader_threads":
            return int(value)
        if name == "timeout":
            return float(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: {exc}") from exc
    return str(value)


class Settings:
    """The process's client settings: ``ckptd.settings``.

    Read an attribute for the value in effect (``ckptd.settings.timeout``); ``set(...)``
    changes it for the whole process, ``with ckptd.settings(...):`` for the block (in this
    thread or task), ``current()`` returns every value as one :class:`ClientSettings`.

    >>> import ckptd
    >>> ckptd.settings.set(timeout=30)
    >>> ckptd.settings.timeout
    30.0
    >>> ckptd.settings.set(timeout=600)
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._environ = environ
        self._global: ClientSettings | None = None
        self._lock = threading.Lock()
        self._local: contextvars.ContextVar[ClientSettings | None] = contextvars.ContextVar("ckptd_settings", default=None)

    def current(self) -> ClientSettings:
        """The settings in effect here: the innermost ``with`` block's, else the process's."""
        local = self._local.get()
        return local if local is not None else self._process()

    def _process(self) -> ClientSettings:
        with self._lock:
            if self._global is None:  # read once, on first use: a worker sets its variables before that
                self._global = ClientSettings.from_env(self._environ)
            return self._global

    def set(self, **changes: Any) -> None:
        """Change settings for the whole process (a ``with`` block in effect keeps its own)."""
        process = self._process()
        with self._lock:
            self._global = process.replace(**changes)

    @contextmanager
    def __call__(self, **changes: Any) -> Iterator[ClientSettings]:
        """``with ckptd.settings(timeout=5):`` -- the changes hold inside the block only."""
        token = self._local.set(self.current().replace(**changes))
        try:
            yield self.current()
        finally:
            self._local.reset(token)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in ClientSettings.variables():
            raise AttributeError(f"ckptd.settings has no setting {name!r} (settings: {', '.join(ClientSettings.variables())})")
        return getattr(self.current(), name)

    def __repr__(self) -> str:
        return f"ckptd.settings({self.current()!r})"


settings = Settings()


def client_variables() -> frozenset[str]:
    """The ``CKPTD_*`` variables a client reads (``ckptd.settings``): the daemon leaves them alone.

    >>> "CKPTD_URL" in client_variables()
    True
    """
    return frozenset(ClientSettings.variables().values())
