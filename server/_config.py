"""The daemon's settings: built once (flags > ``CKPTD_*`` environment > defaults), then passed.

Every field can be set by a ``ckptd serve`` flag or a ``CKPTD_<FIELD>`` variable:

===================  ======================  =============================================
field                variable                default
===================  ======================  =============================================
socket               CKPTD_SOCKET            ``$XDG_RUNTIME_DIR/ckptd.sock``, else
                                             ``/tmp/ckptd-<uid>/ckptd.sock``
roots                CKPTD_ROOTS             (required) directories, ``:``-separated
host, port           CKPTD_HOST, CKPTD_PORT  ``127.0.0.1``, no TCP
token_file           CKPTD_TOKEN_FILE        none (owner-only file holding the token)
allow_insecure_tcp   CKPTD_ALLOW_INSECURE_TCP  false: TCP needs a token
public_metrics       CKPTD_PUBLIC_METRICS    false: ``/metrics`` needs the token too
host_budget          CKPTD_HOST_BUDGET       50% of RAM; ``16GiB``, ``500MB``, ``75%``
devices              CKPTD_DEVICES           ``auto``: CUDA through cupy where there are GPUs;
                                             ``cuda``, ``simulated`` (tests), ``none``
simulated_gpus       CKPTD_SIMULATED_GPUS    0 (how many with ``devices=simulated``)
gds                  CKPTD_GDS               false: GPUDirect Storage reads through kvikio
gpu_sharing          CKPTD_GPU_SHARING       ``ipc``: legacy CUDA IPC handles; ``vmm``: read-only
                                             client mappings (CUDA virtual memory management)
gpu_budget           CKPTD_GPU_BUDGET        90% of each GPU; ``cuda:0=40GiB,cuda:1=40GiB`` or JSON
host_tier_budget     CKPTD_HOST_TIER_BUDGET  25% of RAM: host copies of evicted GPU arenas
shm_dir              CKPTD_SHM_DIR           ``/dev/shm``
lease_ttl            CKPTD_LEASE_TTL         30 seconds
max_body_bytes       CKPTD_MAX_BODY_BYTES    1 MiB
request_timeout      CKPTD_REQUEST_TIMEOUT   10 seconds for a request to arrive whole, counted
                                             from its connection's opening or last response
keep_alive_timeout   CKPTD_KEEP_ALIVE_TIMEOUT  5 seconds an idle connection stays open
max_tcp_connections  CKPTD_MAX_TCP_CONNECTIONS  64 (more are closed at once; the Unix socket has
                                             no limit, so local workers are never locked out)
log_level            CKPTD_LOG_LEVEL         ``info``
===================  ======================  =============================================

A ``CKPTD_*`` variable that names no field is an error (``CKPTD_URL`` and ``CKPTD_TOKEN``
belong to the client and are left alone), so a misspelt variable never goes unnoticed.
The variables Kubernetes injects for a Service named ``ckptd`` (``CKPTD_SERVICE_HOST``,
``CKPTD_SERVICE_PORT[_NAME]``, ``CKPTD_PORT_8750_TCP[_PROTO|_PORT|_ADDR]``, and
``CKPTD_PORT=tcp://10.0.0.1:8750``) are not settings and are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ckptd._client import default_socket
from ckptd._exceptions import UsageError

logger = logging.getLogger(__name__)

ENV_PREFIX = "CKPTD_"
CLIENT_VARIABLES = frozenset({"CKPTD_URL", "CKPTD_TOKEN"})
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, one of them the terminating NUL
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# Docker-links-style variables Kubernetes sets for a Service named ``ckptd`` (unless the
# pod says enableServiceLinks: false); ``CKPTD_PORT`` itself is a setting, but its
# service-link value is a URL (``tcp://10.0.0.1:8750``), never a port number.
SERVICE_LINK = re.compile(r"^CKPTD_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$")
_SERVICE_LINK_URL = re.compile(r"^(tcp|udp|sctp)://", re.IGNORECASE)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------


def host_memory() -> int:
    """Total RAM in bytes (``MemTotal`` of ``/proc/meminfo``, else ``sysconf``).

    >>> host_memory() > 0
    True
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(value: str | int, *, total: int | None = None) -> int:
    """A byte count from ``123``, ``"500MB"`` (10^6), ``"16GiB"``/``"16G"`` (2^30) or ``"75%"`` of ``total``.

    >>> parse_size("16GiB"), parse_size("500MB"), parse_size("1.5k"), parse_size(42)
    (17179869184, 500000000, 1536, 42)
    >>> parse_size("75%", total=1000)
    750
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return _non_negative(value)
    text = value.strip()
    if text.endswith("%"):
        return _percent(text, total)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size (examples: 1073741824, 500MB, 16GiB, 75%)")
    return _non_negative(int(float(match.group(1)) * _UNITS[unit]))


def _percent(text: str, total: int | None) -> int:
    if total is None:
        raise ValueError(f"{text!r}: a percentage is not accepted here; give bytes (e.g. 40GiB)")
    try:
        share = float(text[:-1])
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage") from None
    if not 0 < share <= 100:
        raise ValueError(f"{text!r}: a percentage must lie in (0, 100]")
    return int(total * share / 100)


def _non_negative(n: int) -> int:
    if n < 0:
        raise ValueError(f"{n}: a size cannot be negative")
    return n


def _default_host_budget() -> int:
    return host_memory() // 2


def _default_socket() -> Path:
    return Path(default_socket())


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """Everything the daemon is configured with; immutable.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> s = Settings(roots=[root], shm_dir=root, host_budget="1GiB", socket="/tmp/ckdoc/d.sock")
    >>> s.host_budget, s.port, s.lease_ttl
    (1073741824, None, 30.0)
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    socket: Path = Field(default_factory=_default_socket, validate_default=True)
    roots: Annotated[tuple[Path, ...], NoDecode]
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    token_file: Path | None = None
    allow_insecure_tcp: bool = False
    public_metrics: bool = False  # Prometheus annotation scraping sends no token
    host_budget: int = Field(default_factory=_default_host_budget)
    devices: Literal["auto", "cuda", "simulated", "none"] = "auto"
    simulated_gpus: int = Field(default=0, ge=0)
    gds: bool = False
    gpu_sharing: Literal["ipc", "vmm"] = "ipc"
    gpu_budget: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    host_tier_budget: int = Field(default_factory=lambda: host_memory() // 4)
    shm_dir: Path = Path("/dev/shm")
    lease_ttl: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    request_timeout: float = Field(default=10.0, gt=0)
    keep_alive_timeout: float = Field(default=5.0, gt=0)
    max_tcp_connections: int = Field(default=64, ge=1)
    log_level: str = "info"

    @field_validator("socket")
    @classmethod
    def _check_socket(cls, value: Path) -> Path:
        path = Path(os.path.abspath(os.path.expanduser(value)))
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ValueError(f"{path}: a Unix socket path must be under 108 bytes; choose a shorter one")
        return path

    @field_validator("port", mode="before")
    @classmethod
    def _ignore_service_link(cls, value: Any) -> Any:
        if isinstance(value, str) and _SERVICE_LINK_URL.match(value.strip()):
            logger.info("ignoring CKPTD_PORT=%s: Kubernetes' service link, not a port", value)
            return None
        return value

    @field_validator("roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return [part for part in os.fspath(value).split(os.pathsep) if part]
        return value

    @field_validator("roots")
    @classmethod
    def _check_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        if not value:
            raise ValueError("at least one root directory is required")
        return tuple(dict.fromkeys(_existing_dir(root) for root in value))

    @field_validator("shm_dir")
    @classmethod
    def _check_shm_dir(cls, value: Path) -> Path:
        return _existing_dir(value)

    @field_validator("host_budget", mode="before")
    @classmethod
    def _parse_host_budget(cls, value: Any) -> Any:
        return parse_size(value, total=host_memory()) if isinstance(value, str) else value

    @field_validator("host_tier_budget", mode="before")
    @classmethod
    def _parse_host_tier_budget(cls, value: Any) -> Any:
        return parse_size(value, total=host_memory()) if isinstance(value, str) else value

    @field_validator("gpu_budget", mode="before")
    @classmethod
    def _parse_gpu_budget(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _budget_pairs(value)
        if isinstance(value, Mapping):
            return {str(device): parse_size(size) for device, size in value.items()}
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level ({', '.join(LOG_LEVELS)})")
        return value.lower()

    @model_validator(mode="after")
    def _check_devices(self) -> Settings:
        if self.devices == "simulated" and not self.simulated_gpus:
            raise ValueError("devices=simulated needs simulated_gpus > 0 (--simulated-gpus N)")
        return self

    @model_validator(mode="after")
    def _check_tcp(self) -> Settings:
        if self.port is not None and self.token_file is None and not self.allow_insecure_tcp:
            raise ValueError(
                f"TCP (port {self.port}) without a token is refused: give --token-file, "
                "or --allow-insecure-tcp to accept unauthenticated requests from the network"
            )
        return self

    @cached_property
    def token(self) -> str | None:
        """The bearer token (read from ``token_file`` once), or None when there is none.

        The file must be readable by its owner only (``chmod 600``); else :class:`UsageError`.
        """
        return None if self.token_file is None else read_token(self.token_file)

    @property
    def tcp_url(self) -> str | None:
        """``http://host:port`` when TCP is on (as configured: port 0 means any free port)."""
        if self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _existing_dir(value: Path) -> Path:
    path = Path(os.path.expanduser(value)).resolve()
    if not path.is_dir():
        raise ValueError(f"{value}: no such directory")
    return path


def _budget_pairs(text: str) -> Any:
    """``cuda:0=40GiB,cuda:1=20GiB`` (or a JSON object) as a mapping of device to size."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected DEVICE=SIZE, e.g. cuda:0=40GiB")
        pairs[device.strip()] = size.strip()
    return pairs


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); the file must be owner-only.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "token"; _ = f.write_text("s3cret\\n"); f.chmod(0o600)
    >>> read_token(f)
    's3cret'
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the token file ({exc.strerror})") from exc
    with os.fdopen(fd, encoding="utf-8") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise UsageError(f"{path}: the token file must be readable by its owner only (chmod 600 {path})")
        token = f.read().strip()
    if not token:
        raise UsageError(f"{path}: the token file is empty")
    return token


# ---------------------------------------------------------------------------------------
# Building settings
# ---------------------------------------------------------------------------------------


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``CKPTD_*`` variables that name no setting (the client's ``CKPTD_URL``/``CKPTD_TOKEN``
    and Kubernetes' service links excepted).

    >>> unknown_variables({"CKPTD_ROOTS": "/m", "CKPTD_URL": "unix:///s", "CKPTD_ROOT": "/m", "PATH": "/bin"})
    ['CKPTD_ROOT']
    >>> unknown_variables({"CKPTD_SERVICE_HOST": "10.0.0.1", "CKPTD_PORT_8750_TCP_ADDR": "10.0.0.1"})
    []
    """
    environ = os.environ if environ is None else environ
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(
        key for key in environ
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in fields | CLIENT_VARIABLES
        and not SERVICE_LINK.match(key.upper())
    )  # fmt: skip


def load_settings(**flags: Any) -> Settings:
    """Settings from ``flags`` (None means not given), then ``CKPTD_*`` variables, then defaults.

    Any problem (a missing root, a bad size, an unknown ``CKPTD_*`` variable, TCP without a
    token) is a :class:`ckptd.UsageError` naming the setting.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> load_settings(roots=[root], shm_dir=root, lease_ttl=5, port=None).lease_ttl
    5.0
    >>> load_settings(roots=["/no/such/dir"])
    Traceback (most recent call last):
    ...
    ckptd._exceptions.UsageError: invalid settings: roots: /no/such/dir: no such directory
    """
    unknown = unknown_variables()
    if unknown:
        raise UsageError(f"unknown environment variable(s) {', '.join(unknown)}; the settings are {_variables()}")
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {_describe(exc)}") from None
    logger.debug("settings: %r", settings)
    return settings


def _variables() -> str:
    return ", ".join(ENV_PREFIX + name.upper() for name in Settings.model_fields)


def _describe(exc: ValidationError) -> str:
    """A validation error as ``field: problem; field: problem``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a setting"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
