"""The ``ckptd`` command line: ``ckptd inspect FILE`` and ``ckptd load FILE``.

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
from typing import Any, TextIO

import torch

import ckptd
from ckptd.formats import Layout, TensorEntry

# Checkpoints larger than this get a progress bar while their storages are read.
PROGRESS_THRESHOLD = 256 * 1024 * 1024
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_HEADERS = ("NAME", "DTYPE", "SHAPE", "BYTES", "LOCATION")

Progress = Callable[[int], None]


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

    >>> import io
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

    >>> import io
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

    >>> load_summary("x.pt", 2_000_000_000, 1.0, {})["gb_per_s"]
    2.0
    """
    return {
        "file": file,
        "bytes": nbytes,
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9 if seconds > 0 else 0.0,
        "tensors": _count_tensors(obj),
    }


def _count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(value) for value in obj)
    return 0


def cmd_load(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd load FILE ...``: load with ckptd.load and report time, bytes and GB/s."""
    layout = ckptd.inspect(args.file)
    nbytes = bytes_to_read(layout, args.select)
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


def _render_load(summary: dict[str, Any]) -> str:
    return (
        f"loaded {summary['file']}: {summary['tensors']} tensor{'' if summary['tensors'] == 1 else 's'}, "
        f"{summary['bytes']} bytes ({human_bytes(summary['bytes'])}) "
        f"in {summary['seconds']:.3f} s ({summary['gb_per_s']:.2f} GB/s)"
    )


# ---------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptd`` argument parser with its subcommands.

    >>> build_parser().parse_args(["inspect", "m.pt", "--json"]).json
    True
    """
    parser = argparse.ArgumentParser(prog="ckptd", description="Inspect and load PyTorch checkpoints.")
    parser.add_argument("--version", action="version", version=f"ckptd {ckptd.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_inspect(commands)
    _add_load(commands)
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
    sub.set_defaults(handler=cmd_load)


def _error_message(exc: BaseException, file: str | None) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ckptd.CkptdError) and exc.filename is None and file:
        return f"{file}: {exc.strerror or exc}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the ``ckptd`` command line and return its exit status.

    >>> main(["inspect", "/no/such/file.pt"])  # prints "ckptd: error: ..." to stderr
    1
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args, sys.stdout))
    except (ckptd.CkptdError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        print(f"ckptd: error: {_error_message(exc, args.file)}", file=sys.stderr)
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
