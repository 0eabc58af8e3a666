"""The ``ckptd`` command line: ``inspect``, ``load``, the daemon (``serve``) and its admin
commands (``ls``, ``stats``, ``prefetch``, ``evict``).

``ckptd serve`` prints ``ckptd: serving on unix:///path/to.sock`` (followed by
`` and http://host:port`` when TCP is on) to stdout once its sockets listen, then runs
until SIGTERM or SIGINT and exits 0 after a clean shutdown. The admin commands talk to a
running daemon (``--url``, default ``$CKPTD_URL`` or the default socket).

Importing this module, and the admin commands and ``--help``/``--version``, import neither
torch nor cupy (a probe's ``ckptd health`` answers in a fraction of a second); ``inspect``
and ``load`` import torch when they run. ``serve`` is the daemon's own command
(``ckptd.server.serve``, flags from its settings model): this module reaches the daemon
through one import, in :func:`_daemon`, and the daemon never imports this module.

This module is the only place in ckptd that prints. Expected failures (any
:class:`ckptd.CkptdError`, or the operating system refusing a file) print
``ckptd: error: <message>`` to stderr and exit 1; bad arguments exit 2, as argparse does.

>>> main(["--version"])  # doctest: +ELLIPSIS
ckptd ...
0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import ckptd

from ._connection import Connection

if TYPE_CHECKING:
    import torch

    from ckptd.formats import Layout, TensorEntry

# Checkpoints larger than this get a progress bar while their storages are read.
PROGRESS_THRESHOLD = 256 * 1024 * 1024
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_HEADERS = ("NAME", "DTYPE", "SHAPE", "BYTES", "LOCATION")

Progress = Callable[[int], None]
HEALTH_POLL_S = 0.1  # `ckptd health --wait`: how often to ask a daemon that is starting


# ---------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------


def human_bytes(nbytes: int) -> str:
    """A byte count in binary units, one decimal place above bytes.

    >>> human_bytes(22), human_bytes(1536 * 1024), human_bytes(3 * 1024**3)
    ('22 B', '1.5 MiB', '3.0 GiB')
    """
    value = float(nbytes)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"


def short_dtype(dtype: torch.dtype) -> str:
    """A dtype's name without the ``torch.`` module prefix.

    >>> import torch
    >>> short_dtype(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def format_shape(shape: Sequence[int]) -> str:
    """A shape as a bracketed list (``[]`` for a scalar).

    >>> format_shape((2, 3)), format_shape(())
    ('[2, 3]', '[]')
    """
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------


def layout_summary(layout: Layout) -> dict[str, Any]:
    """A layout as plain JSON-ready data (what ``ckptd inspect --json`` prints).

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"w": torch.zeros(2)}, buf)
    >>> summary = layout_summary(ckptd.inspect(buf.getvalue()))
    >>> summary["tensors"][0]["shape"], summary["storage_bytes"]
    ([2], 8)
    """
    return {
        "file": layout.name,
        "format": layout.format.value,
        "tensors": [_entry_summary(entry) for entry in layout.tensors],
        "tensor_count": len(layout.tensors),
        "storage_count": len(layout.storages),
        "storage_bytes": layout.nbytes,
        "file_size": layout.size,
    }


def _entry_summary(entry: TensorEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "dtype": short_dtype(entry.dtype),
        "shape": list(entry.shape),
        "nbytes": entry.nbytes,
        "location": entry.location,
    }


def render_table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Rows of cells as aligned lines, two spaces between columns.

    >>> render_table([("a", "1"), ("bb", "22")], [False, True])
    ['a    1', 'bb  22']
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(right))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_layout(layout: Layout) -> str:
    """The human-readable report ``ckptd inspect`` prints: format, tensor table, totals."""
    lines = [f"file:     {layout.name}", f"format:   {layout.format.value}", ""]
    rows = [_HEADERS] + [_entry_row(entry) for entry in layout.tensors]
    if layout.tensors:
        lines += render_table(rows, [False, False, False, True, False])
    else:
        lines.append("(no tensors)")
    lines += ["", *_totals(layout)]
    return "\n".join(lines)


def _entry_row(entry: TensorEntry) -> tuple[str, ...]:
    return (entry.name, short_dtype(entry.dtype), format_shape(entry.shape), human_bytes(entry.nbytes), entry.location)


def _totals(layout: Layout) -> list[str]:
    return [
        f"tensors:  {len(layout.tensors)}",
        f"storages: {len(layout.storages)}",
        f"storage bytes: {layout.nbytes} ({human_bytes(layout.nbytes)})",
        f"file size:     {layout.size} ({human_bytes(layout.size)})",
    ]


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd inspect FILE [--json]``: list a checkpoint's tensors without reading them."""
    layout = ckptd.inspect(args.file)
    if args.json:
        print(json.dumps(layout_summary(layout), indent=2), file=out)
    else:
        print(render_layout(layout), file=out)
    return 0


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------


def parse_map_location(text: str) -> str | dict[str, str]:
    """``--map-location``: a device string, or a JSON object of location tags.

    >>> parse_map_location("cpu"), parse_map_location('{"cuda:1": "cuda:0"}')
    ('cpu', {'cuda:1': 'cuda:0'})
    """
    if not text.lstrip().startswith("{"):
        return text
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise argparse.ArgumentTypeError('a JSON map_location must map tags to tags, e.g. {"cuda:1": "cuda:0"}')
    return mapping


def bytes_to_read(layout: Layout, select: Sequence[str] | None) -> int:
    """The bytes a load reads: every storage's, or the selected tensors' own bytes.

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"a": torch.zeros(2), "b": torch.zeros(3)}, buf)
    >>> layout = ckptd.inspect(buf.getvalue())
    >>> bytes_to_read(layout, None), bytes_to_read(layout, ["b"])
    (20, 12)
    """
    if select is None:
        return layout.nbytes
    entries = layout.tensor_map()
    return sum(entries[name].nbytes for name in dict.fromkeys(select) if name in entries)


def _want_progress(args: argparse.Namespace, nbytes: int) -> bool:
    if args.quiet or args.progress is False or args.mmap:
        return False  # with mmap no storage is read, so there is nothing to show
    if args.progress:
        return True
    return nbytes > PROGRESS_THRESHOLD and sys.stderr.isatty()


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Progress | None]:
    """A thread-safe ``progress(nbytes)`` callback driving a tqdm bar on stderr (or None).

    >>> with progress_bar(10, enabled=False) as progress:
    ...     progress is None
    True
    """
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    lock = threading.Lock()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reading", file=sys.stderr) as bar:

        def update(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        yield update


def load_summary(file: str, nbytes: int, seconds: float, obj: Any) -> dict[str, Any]:
    """What ``ckptd load`` reports: bytes, elapsed seconds, throughput, tensors loaded.

    ``nbytes`` is what was read; with nothing read (``--map-location meta``) there is no
    throughput to report (``gb_per_s`` is None).

    >>> load_summary("x.pt", 2_000_000_000, 1.0, {})["gb_per_s"]
    2.0
    >>> load_summary("x.pt", 0, 0.01, {})["gb_per_s"] is None
    True
    """
    return {
        "file": file,
        "bytes": nbytes,
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9 if seconds > 0 and nbytes > 0 else None,
        "tensors": _count_tensors(obj),
    }


def _count_tensors(obj: Any) -> int:
    import torch  # a load has imported it already

    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(value) for value in obj)
    return 0


def cmd_load(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd load FILE ...``: load with ckptd.load and report time, bytes and GB/s
    (through the daemon at ``--url``, saying how the storages arrived: mapped or streamed)."""
    if args.url or args.transport:
        return _load_through_daemon(args, out)
    layout = ckptd.inspect(args.file)
    nbytes = 0 if _to_meta(args.map_location) else bytes_to_read(layout, args.select)
    with progress_bar(nbytes, _want_progress(args, nbytes)) as progress:
        start = time.perf_counter()
        obj = ckptd.load(
            args.file,
            map_location=args.map_location,
            weights_only=args.weights_only,
            mmap=args.mmap,
            select=args.select,
            progress=progress,
        )
        seconds = time.perf_counter() - start
    summary = load_summary(layout.name, nbytes, seconds, obj)
    print(json.dumps(summary) if args.json else _render_load(summary), file=out)
    return 0


def _load_through_daemon(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd load FILE --url URL``: the file is the daemon's to open (it may not exist here)."""
    token = read_token_file(args.token_file) if args.token_file else None
    with ckptd.Client(args.url, token=token, transport=args.transport) as client:
        start = time.perf_counter()
        obj = client.load(args.file, map_location=args.map_location, weights_only=args.weights_only,
                          mmap=args.mmap, select=args.select)
        seconds = time.perf_counter() - start
        summary = load_summary(args.file, storage_bytes(obj), seconds, obj)
        summary["transport"] = client.transport_used
    print(json.dumps(summary) if args.json else _render_load(summary), file=out)
    return 0


def storage_bytes(obj: Any) -> int:
    """The bytes of the distinct storages ``obj``'s tensors use.

    >>> import torch
    >>> w = torch.zeros(4)
    >>> storage_bytes({"a": w, "b": w[1:], "c": [torch.ones(2, dtype=torch.int8)]})
    18
    """
    import torch  # a load has imported it already

    seen: dict[tuple[str, int], int] = {}

    def walk(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[(str(storage.device), storage.data_ptr() or id(storage))] = storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)

    walk(obj)
    return sum(seen.values())


_TRANSPORT_WORDS = {"shm": "mapped from the daemon's shared memory", "http": "streamed from the daemon over HTTP"}


def _to_meta(map_location: str | dict[str, str] | None) -> bool:
    """Whether every storage lands on ``meta`` (no byte of the file is read)."""
    if isinstance(map_location, dict):
        return bool(map_location) and all(target == "meta" for target in map_location.values())
    return map_location == "meta"


def _render_load(summary: dict[str, Any]) -> str:
    """The line ``ckptd load`` prints.

    >>> _render_load({"file": "m.pt", "tensors": 2, "bytes": 0, "seconds": 0.004, "gb_per_s": None})
    'loaded m.pt: 2 tensors, no bytes read, in 0.004 s'
    """
    head = f"loaded {summary['file']}: {summary['tensors']} tensor{'' if summary['tensors'] == 1 else 's'}, "
    if summary["gb_per_s"] is None:
        line = f"{head}no bytes read, in {summary['seconds']:.3f} s"
    else:
        line = (
            f"{head}{summary['bytes']} bytes ({human_bytes(summary['bytes'])}) "
            f"in {summary['seconds']:.3f} s ({summary['gb_per_s']:.2f} GB/s)"
        )
    transport = summary.get("transport")
    return f"{line}, {_TRANSPORT_WORDS.get(transport, transport)}" if transport else line


# ---------------------------------------------------------------------------------------
# serve: the daemon's own command (ckptd.server.serve), reached through this one import
# ---------------------------------------------------------------------------------------


def _daemon() -> ModuleType:
    """``ckptd.server``, imported only when serving; without the ``server`` extra, a
    :class:`ckptd.UsageError` that says what to install."""
    try:
        import ckptd.server as daemon
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "ckptd":
            raise
        raise ckptd.UsageError(
            f"`ckptd serve` needs the daemon's dependencies, and {exc.name} is not installed: "
            "pip install 'ckptd[server]'"
        ) from exc
    return daemon


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd serve --socket PATH --root DIR ...``: run the daemon until SIGTERM/SIGINT."""
    return _daemon().serve(args, out)


# ---------------------------------------------------------------------------------------
# Daemon administration: ls, stats, prefetch, evict
# ---------------------------------------------------------------------------------------

_LS_HEADERS = ("ID", "PATH", "FORMAT", "RESIDENT", "LEASES", "HITS", "LAST USED")


def ago(seconds: float) -> str:
    """A duration as a short "time ago".

    >>> ago(4.2), ago(95), ago(7300), ago(3 * 86400)
    ('4s ago', '1m ago', '2h ago', '3d ago')
    """
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def resident_text(per_device: dict[str, int]) -> str:
    """Resident bytes per device, human-readable (the device named only when not just the CPU).

    >>> resident_text({"cpu": 1536 * 1024}), resident_text({"cpu": 0, "cuda:0": 2048})
    ('1.5 MiB', 'cpu 0 B, cuda:0 2.0 KiB')
    """
    if set(per_device) <= {"cpu"}:
        return human_bytes(per_device.get("cpu", 0))
    return ", ".join(f"{device} {human_bytes(n)}" for device, n in sorted(per_device.items()))


def render_checkpoints(infos: Sequence[dict[str, Any]], now: float) -> str:
    """The ``ckptd ls`` table.

    >>> info = {"id": "ab12", "path": "/m/a.pt", "format": "torch_zip", "resident_bytes": {"cpu": 2048},
    ...         "leases": 1, "hits": 3, "last_used": 100.0}
    >>> print(render_checkpoints([info], now=160.0))
    ID    PATH     FORMAT     RESIDENT  LEASES  HITS  LAST USED
    ab12  /m/a.pt  torch_zip   2.0 KiB       1     3  1m ago
    """
    if not infos:
        return "(no checkpoints cached)"
    rows = [_LS_HEADERS] + [_checkpoint_row(info, now) for info in infos]
    return "\n".join(render_table(rows, [False, False, False, True, True, True, False]))


def _checkpoint_row(info: dict[str, Any], now: float) -> tuple[str, ...]:
    return (
        str(info.get("id", "")),
        str(info.get("path", "")),
        str(info.get("format", "")),
        resident_text(dict(info.get("resident_bytes") or {})),
        str(info.get("leases", 0)),
        str(info.get("hits", 0)),
        ago(now - float(info.get("last_used", now))),
    )


def render_stats(stats: dict[str, Any]) -> str:
    """The ``ckptd stats`` report: one ``key: value`` line each, byte counts human-readable.

    >>> print(render_stats({"checkpoints": 2, "resident_bytes": {"cpu": 3 << 30}, "uptime_s": 12.5}))
    checkpoints:    2
    resident_bytes: 3.0 GiB
    uptime_s:       12.5
    """
    width = max((len(key) for key in stats), default=0) + 1
    return "\n".join(f"{key + ':':<{width}} {_stat_value(key, value)}" for key, value in stats.items())


def _stat_value(key: str, value: Any) -> str:
    if key.endswith("_bytes") and isinstance(value, dict):
        return resident_text(value) if value else "none"
    if key.endswith("_bytes") and isinstance(value, int):
        return human_bytes(value)
    if value is None:
        return "-"
    return str(value)


def render_info(verb: str, info: dict[str, Any]) -> str:
    """One line about a checkpoint ``ckptd prefetch`` acted on.

    >>> render_info("prefetched", {"id": "ab12", "path": "/m/a.pt", "resident_bytes": {"cpu": 1024},
    ...                            "storages_resident": 2, "storages_total": 2})
    'prefetched /m/a.pt (id ab12): 1.0 KiB resident, 2/2 storages'
    """
    return (
        f"{verb} {info.get('path')} (id {info.get('id')}): "
        f"{resident_text(dict(info.get('resident_bytes') or {}))} resident, "
        f"{info.get('storages_resident', 0)}/{info.get('storages_total', 0)} storages"
    )


def render_evicted(info: dict[str, Any]) -> str:
    """The line ``ckptd evict`` prints: what the eviction freed (not what is left: nothing).

    >>> render_evicted({"id": "ab12", "path": "/m/a.pt", "freed_bytes": {"cpu": 1024}, "storages_total": 2})
    'evicted /m/a.pt (id ab12): freed 1.0 KiB, 2 storages'
    """
    return (
        f"evicted {info.get('path')} (id {info.get('id')}): "
        f"freed {resident_text(dict(info.get('freed_bytes') or {}))}, {info.get('storages_total', 0)} storages"
    )


def read_token_file(path: str) -> str:
    """The token in ``path``, surrounding whitespace stripped (an empty file is a UsageError)."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ckptd.UsageError(f"{path}: the token file is empty")
    return token


def _client(args: argparse.Namespace) -> Connection:
    token = read_token_file(args.token_file) if args.token_file else None
    return Connection(args.url, token=token)


def _emit(args: argparse.Namespace, out: TextIO, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text, file=out)
    return 0


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd ls``: the checkpoints a running daemon holds."""
    with _client(args) as client:
        infos = client.checkpoints()
    return _emit(args, out, infos, render_checkpoints(infos, time.time()))


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd stats``: a running daemon's totals."""
    with _client(args) as client:
        stats = client.stats()
    return _emit(args, out, stats, render_stats(stats))


def cmd_health(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd health``: exit 0 when the daemon answers ``/healthz`` (container and pod probes);
    ``--wait S`` keeps asking for up to S seconds (a script that has just started the daemon)."""
    deadline = time.monotonic() + (args.wait or 0.0)
    with _client(args) as client:
        while True:
            try:
                health = client.health()
                break
            except ckptd.DaemonNotRunningError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(HEALTH_POLL_S)
    return _emit(args, out, health, f"ckptd at {client.url}: {health.get('status', '?')}")


def cmd_prefetch(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd prefetch PATH``: make a checkpoint resident in the daemon."""
    with _client(args) as client:
        info = client.prefetch(args.file)
    return _emit(args, out, info, render_info("prefetched", info))


def cmd_evict(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd evict ID|PATH``: drop a checkpoint no lease holds."""
    with _client(args) as client:
        info = client.evict(args.ident)
    return _emit(args, out, info, render_evicted(info))


# ---------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------


def build_parser(*, serve: bool = True) -> argparse.ArgumentParser:
    """The ``ckptd`` argument parser with its subcommands.

    ``serve=False`` leaves out the flags of ``serve`` (made from the daemon's settings
    model, which needs the ``server`` extra): what every other command parses with.

    >>> build_parser(serve=False).parse_args(["inspect", "m.pt", "--json"]).json
    True
    """
    parser = argparse.ArgumentParser(prog="ckptd", description="Inspect and load PyTorch checkpoints; run and administer the ckptd daemon.")
    parser.add_argument("--version", action="version", version=f"ckptd {ckptd.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_inspect(commands)
    _add_load(commands)
    _add_serve(commands, flags=serve)
    _add_admin(commands)
    return parser


def _add_inspect(commands: Any) -> None:
    sub = commands.add_parser("inspect", help="list a checkpoint's tensors without loading it")
    sub.add_argument("file", metavar="FILE", help="checkpoint: torch.save, safetensors or *.index.json")
    sub.add_argument("--json", action="store_true", help="print the listing as JSON")
    sub.set_defaults(handler=cmd_inspect)


def _add_load(commands: Any) -> None:
    sub = commands.add_parser("load", help="load a checkpoint and report time and throughput")
    sub.add_argument("file", metavar="FILE", help="checkpoint: torch.save, safetensors or *.index.json")
    sub.add_argument(
        "--map-location", type=parse_map_location, metavar="LOC",
        help="device ('cpu', 'cuda:0', 'meta') or JSON dict of tags, e.g. '{\"cuda:1\": \"cuda:0\"}'",
    )
    sub.add_argument("--weights-only", action=argparse.BooleanOptionalAction, default=None,
                     help="restricted unpickler (default: torch.load's default)")
    sub.add_argument("--mmap", action="store_true", default=None,
                     help="memory-map the file's storages (no progress bar: nothing is read)")
    sub.add_argument("--select", nargs="+", metavar="NAME", help="load only these named tensors")
    sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help=f"force the progress bar on/off (default: on for > {human_bytes(PROGRESS_THRESHOLD)} on a TTY)")
    sub.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_argument("--url", help="load through the daemon at this URL (unix:///path.sock or http://host:port); "
                     "the report says whether the storages were mapped or streamed")
    sub.add_argument("--token-file", metavar="F", help="file holding the daemon's token (default: $CKPTD_TOKEN)")
    sub.add_argument("--transport", choices=("auto", "shm", "http"),
                     help="through the daemon: map its shared memory, stream over HTTP, or pick (default auto, "
                     "$CKPTD_TRANSPORT)")
    sub.set_defaults(handler=cmd_load)


def _add_serve(commands: Any, *, flags: bool) -> None:
    sub = commands.add_parser("serve", help="run the daemon (flags override CKPTD_* variables)", add_help=flags)
    if flags:
        _daemon().add_arguments(sub)  # one flag per setting of the daemon's settings model
    sub.set_defaults(handler=cmd_serve)


def _add_admin(commands: Any) -> None:
    for name, handler, help_text in (
        ("ls", cmd_ls, "list the checkpoints a running daemon holds"),
        ("stats", cmd_stats, "a running daemon's totals"),
        ("health", cmd_health, "check that a daemon answers (exit 0) or not (exit 1): for probes"),
        ("prefetch", cmd_prefetch, "make a checkpoint resident in a running daemon"),
        ("evict", cmd_evict, "evict a checkpoint (by id or path) from a running daemon"),
    ):
        sub = commands.add_parser(name, help=help_text)
        if name == "prefetch":
            sub.add_argument("file", metavar="PATH", help="checkpoint path (under one of the daemon's roots)")
        if name == "evict":
            sub.add_argument("ident", metavar="ID|PATH", help="checkpoint id (see `ckptd ls`) or path")
        if name == "health":
            sub.add_argument("--wait", type=float, metavar="S", help="keep asking for up to S seconds (default: ask once)")
        sub.add_argument("--url", help="daemon URL: unix:///path.sock or http://host:port (default: $CKPTD_URL)")
        sub.add_argument("--token-file", metavar="F", help="file holding the daemon's token (default: $CKPTD_TOKEN)")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(handler=handler)


def _error_message(exc: BaseException, file: str | None) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ckptd.CkptdError) and exc.filename is None and file:
        return f"{file}: {exc.strerror or exc}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the ``ckptd`` command line and return its exit status.

    >>> main(["inspect", "/no/such/file.pt"])  # prints "ckptd: error: ..." to stderr
    1
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(serve=argv[:1] == ["serve"])  # no pydantic, no torch for the other commands
    except ckptd.UsageError as exc:  # `serve` without the server extra
        print(f"ckptd: error: {exc}", file=sys.stderr)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args, sys.stdout))
    except (ckptd.CkptdError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        print(f"ckptd: error: {_error_message(exc, getattr(args, 'file', None))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _broken_pipe() -> int:
    """Output piped into a reader that quit (``ckptd inspect big.pt | head``): exit quietly."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 1
