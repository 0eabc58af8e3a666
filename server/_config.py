"""The daemon's settings: built once (flags > ``CKPTD_*`` environment > defaults), then passed.

:class:`Settings` is the one place a setting is written: its field (type, default,
checks) and its description there make the ``ckptd serve`` flag (:func:`add_arguments`),
the ``CKPTD_<FIELD>`` variable and the README's settings table (:func:`settings_table`);
``tests/server/test_config.py`` checks that all of them agree.

A ``CKPTD_*`` variable that names no field is an error (the client's own variables,
``CKPTD_URL``, ``CKPTD_TOKEN`` ... of ``ckptd.settings``, are left alone), so a misspelt
variable never goes unnoticed. The variables Kubernetes injects for a Service named
``ckptd`` (``CKPTD_SERVICE_HOST``, ``CKPTD_SERVICE_PORT[_NAME]``,
``CKPTD_PORT_8750_TCP[_PROTO|_PORT|_ADDR]``, and ``CKPTD_PORT=tcp://10.0.0.1:8750``) are
not settings and are ignored. Sizes mean what Kubernetes and pydantic's ``ByteSize``
mean: ``16G``/``16GB`` are 16·10^9 bytes, ``16Gi``/``16GiB`` 16·2^30; budgets also take a
share of RAM, ``75%``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import stat
import typing
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ckptd.engine import UsageError, client_variables, default_socket

logger = logging.getLogger(__name__)

ENV_PREFIX = "CKPTD_"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, one of them the terminating NUL
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# Docker-links-style variables Kubernetes sets for a Service named ``ckptd`` (unless the
# pod says enableServiceLinks: false); ``CKPTD_PORT`` itself is a setting, but its
# service-link value is a URL (``tcp://10.0.0.1:8750``), never a port number.
SERVICE_LINK = re.compile(r"^CKPTD_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$")
_SERVICE_LINK_URL = re.compile(r"^(tcp|udp|sctp)://", re.IGNORECASE)

# What ByteSize reads, whole (ByteSize alone would take "1.2.3G" as 1 byte); Kubernetes'
# "Gi" is ByteSize's "GiB".
_SIZE = re.compile(r"^\s*(\d*\.?\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_BYTE_SIZE = TypeAdapter(ByteSize)


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
    """A byte count as pydantic's ``ByteSize`` reads it (``"16GiB"``/``"16Gi"``: 2^30,
    ``"16G"``/``"16GB"``: 10^9), or ``"75%"`` of ``total``.

    >>> parse_size("16GiB"), parse_size("16Gi"), parse_size("16G"), parse_size("1.5k"), parse_size(42)
    (17179869184, 17179869184, 16000000000, 1500, 42)
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
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 1073741824, 500MB, 16GiB, 16Gi, 75%)")
    unit = match.group(2) + ("B" if match.group(2).lower().endswith("i") else "")
    try:
        return int(_BYTE_SIZE.validate_python(match.group(1) + unit))
    except ValidationError:
        raise ValueError(f"{value!r} is not a size (examples: 1073741824, 500MB, 16GiB, 16Gi, 75%)") from None


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


def _default_host_tier_budget() -> int:
    return host_memory() // 4


def _default_socket() -> Path:
    return Path(default_socket(os.environ))


def setting(description: str, *, default_text: str, flag: str | None = None, metavar: str | None = None,
            **field: Any) -> Any:  # fmt: skip
    """A :class:`Settings` field with what its flag and the README say: ``description``,
    ``default_text`` (the default as a user reads it), the flag when not ``--<field>``,
    and the flag's metavar (``SIZE`` for a value :func:`parse_size` reads)."""
    extra = {"default_text": default_text, "flag": flag, "metavar": metavar}
    return Field(description=description, json_schema_extra={k: v for k, v in extra.items() if v is not None}, **field)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """Everything the daemon is configured with; immutable. Each field is one setting: its
    description, flag and variable are written here only.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> s = Settings(roots=[root], shm_dir=root, host_budget="1GiB", socket="/tmp/ckdoc/d.sock")
    >>> s.host_budget, s.port, s.lease_ttl
    (1073741824, None, 30.0)
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    socket: Path = setting(
        "the daemon's Unix socket (owner-only)", metavar="PATH",
        default_text="`$XDG_RUNTIME_DIR/ckptd.sock`, else `/tmp/ckptd-<uid>/ckptd.sock`",
        default_factory=_default_socket, validate_default=True,
    )
    roots: Annotated[tuple[Path, ...], NoDecode] = setting(
        "directories the daemon may load from (repeat the flag; the variable is `:`-separated)",
        flag="--root", metavar="DIR", default_text="(required)",
    )
    host: str = setting("TCP host", metavar="H", default_text="`127.0.0.1`", default="127.0.0.1")
    port: int | None = setting("also listen on TCP at this port (needs a token)", metavar="P", default_text="no TCP",
                               default=None, ge=0, le=65535)  # fmt: skip
    token_file: Path | None = setting("owner-only file holding the bearer token", metavar="F", default_text="none",
                                      default=None)  # fmt: skip
    allow_insecure_tcp: bool = setting("allow TCP without a token", default_text="false", default=False)
    public_metrics: bool = setting(  # Prometheus annotation scraping sends no token
        "serve `/metrics` without the token (for Prometheus scraping by annotation)", default_text="false",
        default=False,
    )
    host_budget: int = setting("host memory for cached checkpoints: bytes, `16GiB`, `16G`, `500MB` or `75%`",
                               metavar="SIZE", default_text="50% of RAM", default_factory=_default_host_budget)  # fmt: skip
    devices: Literal["auto", "cuda", "simulated", "none"] = setting(
        "GPU backend: `auto` (CUDA through cupy where there are GPUs), `cuda`, `simulated` (tests), `none`",
        default_text="`auto`", default="auto",
    )
    simulated_gpus: int = setting("how many fake GPUs `--devices simulated` makes (tests)", metavar="N",
                                  default_text="0", default=0, ge=0)  # fmt: skip
    gds: bool = setting("read files straight into GPU memory with GPUDirect Storage (kvikio); falls back to staging",
                        default_text="false", default=False)  # fmt: skip
    gpu_sharing: Literal["ipc", "vmm"] = setting(
        "how workers map GPU arenas: `ipc` (legacy CUDA IPC handles, read-write) or `vmm` (read-only)",
        default_text="`ipc`", default="ipc",
    )
    gpu_budget: Annotated[dict[str, int], NoDecode] = setting(
        "per-GPU budget by the daemon's ordinals: `cuda:0=40GiB,cuda:1=40GiB` or JSON", metavar="SPEC",
        default_text="each GPU less max(10%, 4 GiB), left for CUDA contexts", default_factory=dict,
    )
    host_tier_budget: int = setting("host memory for GPU arenas evicted from their GPU", metavar="SIZE",
                                    default_text="25% of RAM", default_factory=_default_host_tier_budget)  # fmt: skip
    shm_dir: Path = setting("where simulated GPUs keep their memory (host arenas are anonymous memfds)", metavar="D",
                            default_text="`/dev/shm`", default=Path("/dev/shm"))
    lease_ttl: float = setting("seconds a lease lives unrenewed", metavar="S", default_text="30", default=30.0, gt=0)
    max_body_bytes: int = setting("largest request body the daemon reads", metavar="SIZE", default_text="1 MiB",
                                  default=1024 * 1024, gt=0)  # fmt: skip
    request_timeout: float = setting(
        "seconds a request may take to arrive whole; slower connections are closed (408 when part came)",
        metavar="S", default_text="10", default=10.0, gt=0,
    )
    keep_alive_timeout: float = setting("seconds an idle connection stays open", metavar="S", default_text="5",
                                        default=5.0, gt=0)  # fmt: skip
    max_tcp_connections: int = setting("TCP connections at once (the Unix socket is not limited)", metavar="N",
                                       default_text="64", default=64, ge=1)  # fmt: skip
    log_level: str = setting(f"log level: {', '.join(LOG_LEVELS)}", metavar="LEVEL", default_text="`info`",
                             default="info")  # fmt: skip
    log_format: Literal["text", "json"] = setting(
        "log format, for ckptd's records and uvicorn's alike: `text` (timestamped lines) or `json` (one object a line)",
        default_text="`text`", default="text",
    )

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

    @field_validator("host_budget", "host_tier_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> Any:
        return parse_size(value, total=host_memory()) if isinstance(value, str) else value

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

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
    """``CKPTD_*`` variables that name no setting (the client's, ``ckptd.settings``, and
    Kubernetes' service links excepted).

    >>> unknown_variables({"CKPTD_ROOTS": "/m", "CKPTD_URL": "unix:///s", "CKPTD_ROOT": "/m", "PATH": "/bin"})
    ['CKPTD_ROOT']
    >>> unknown_variables({"CKPTD_SERVICE_HOST": "10.0.0.1", "CKPTD_PORT_8750_TCP_ADDR": "10.0.0.1"})
    []
    """
    environ = os.environ if environ is None else environ
    known = set(variables().values()) | client_variables()
    return sorted(
        key for key in environ
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known and not SERVICE_LINK.match(key.upper())
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
    ckptd.UsageError: invalid settings: roots: /no/such/dir: no such directory
    """
    unknown = unknown_variables()
    if unknown:
        raise UsageError(
            f"unknown environment variable(s) {', '.join(unknown)}; the settings are {', '.join(variables().values())}"
        )
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {_describe(exc)}") from None
    logger.debug("settings: %r", settings)
    return settings


def variables() -> dict[str, str]:
    """Each setting's environment variable.

    >>> variables()["max_body_bytes"]
    'CKPTD_MAX_BODY_BYTES'
    """
    return {name: ENV_PREFIX + name.upper() for name in Settings.model_fields}


# ---------------------------------------------------------------------------------------
# Flags and the README's table, from the model
# ---------------------------------------------------------------------------------------


def flag_of(name: str) -> str:
    """The ``ckptd serve`` flag of setting ``name``.

    >>> flag_of("host_budget"), flag_of("roots")
    ('--host-budget', '--root')
    """
    return str(_extra(Settings.model_fields[name]).get("flag") or "--" + name.replace("_", "-"))


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting on ``parser`` (what ``ckptd serve`` takes); an absent flag is None.

    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> flags = parser.parse_args(["--root", "/m", "--root", "/n", "--port", "8750", "--gds"])
    >>> flags.roots, flags.port, flags.gds, flags.host_budget
    (['/m', '/n'], 8750, True, None)
    """
    for name, info in Settings.model_fields.items():
        extra = _extra(info)
        helptext = f"{info.description} (default: {extra['default_text']}; ${ENV_PREFIX}{name.upper()})"
        kwargs: dict[str, Any] = {"dest": name, "help": helptext.replace("`", "").replace("%", "%%")}
        kwargs.update(_argument_kind(name, info, extra))
        parser.add_argument(flag_of(name), **kwargs)


def _argument_kind(name: str, info: FieldInfo, extra: Mapping[str, Any]) -> dict[str, Any]:
    """How argparse reads one setting: a switch, a choice, a number, or text the model parses."""
    kind = info.annotation
    args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if kind is bool:
        return {"action": "store_true", "default": None}
    if typing.get_origin(kind) is Literal:
        return {"choices": args}
    metavar = extra.get("metavar")
    if name == "roots":
        return {"action": "append", "metavar": metavar}
    number = kind if kind in (int, float) else args[0] if len(args) == 1 and args[0] in (int, float) else None
    if number is not None and metavar != "SIZE":
        return {"type": number, "metavar": metavar}
    return {"metavar": metavar}


def flags_of(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (None: not given, so the environment decides)."""
    return {name: getattr(namespace, name, None) for name in Settings.model_fields}


def settings_table() -> list[str]:
    """The README's table of settings (Markdown lines): flag, variable, default, meaning.

    >>> print(settings_table()[4])
    | `--host H` | `CKPTD_HOST` | `127.0.0.1` | TCP host |
    """
    lines = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        extra = _extra(info)
        flag = flag_of(name) + (f" {extra['metavar']}" if extra.get("metavar") else "")
        lines.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | {extra['default_text']} | {info.description} |")
    return lines


def _describe(exc: ValidationError) -> str:
    """A validation error as ``field: problem; field: problem``, in ckptd's words.

    >>> try:
    ...     Settings(socket="/tmp/ckdoc/d.sock")
    ... except ValidationError as exc:
    ...     print(_describe(exc))
    roots: required (--root DIR, or CKPTD_ROOTS=dir1:dir2)
    """
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "not a setting"
        elif error["type"] == "missing":
            message = f"required ({_how_to_set(where)})"
        elif error["type"] in _PARSE_ERRORS:
            message = f"{error.get('input')!r} is not {_PARSE_ERRORS[error['type']]}"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


_HOW_TO_SET = {"roots": "--root DIR, or CKPTD_ROOTS=dir1:dir2"}


def _how_to_set(field: str) -> str:
    flag = "--" + field.replace("_", "-")
    return _HOW_TO_SET.get(field, f"{flag}, or {ENV_PREFIX}{field.upper()}")
_PARSE_ERRORS = {
    "int_parsing": "a whole number",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
}
