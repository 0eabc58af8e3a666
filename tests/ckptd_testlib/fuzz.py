"""Mutated checkpoints, loaded by torch.load and by ckptd.load, and the verdict on each.

* :func:`seeds` -- small real checkpoints (zip, big-endian zip, deflated zip, legacy) to mutate.
* :func:`apply` -- applies a list of mutation ops (``(kind, position, value)``) to bytes;
  hypothesis draws the ops in the test, :func:`random_ops` in the long-running script.
* :func:`check` -- loads a mutant both ways and raises :class:`AssertionError` when ckptd
  raises an error that is neither its own nor torch's type for the same input, or differs
  from torch.load where torch.load succeeds. Returns how the two ended.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import resource
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .checkpoints import to_big_endian
from .compare import assert_same

__all__ = ["KINDS", "FUZZ_SEEDS", "seeds", "apply", "random_ops", "check", "bounded_memory"]

KINDS = ("flip", "set8", "set32", "set64", "truncate", "insert", "delete", "tail")

Op = tuple[str, int, int]


def _objects() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(4, 5, generator=gen)
    return {
        "w": base,
        "t": base.t(),
        "row": base[2],
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "u8": torch.arange(9, dtype=torch.uint8),
        "half": torch.randn(3, generator=gen).half(),
        "nested": {"b": torch.ones(2, dtype=torch.bool), "l": [torch.zeros(1), 3, "x"]},
        "empty": torch.ones(0),
        "step": 7,
    }


def _saved(**kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_objects(), buf, **kwargs)
    return buf.getvalue()


def _deflated(raw: bytes) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return out.getvalue()


FUZZ_SEEDS: dict[str, Callable[[], bytes]] = {
    "zip": lambda: _saved(),
    "zip-big-endian": lambda: to_big_endian(_saved()),
    "zip-deflated": lambda: _deflated(_saved()),
    "legacy": lambda: _saved(_use_new_zipfile_serialization=False),
}


@functools.cache
def seeds() -> dict[str, bytes]:
    """Every seed checkpoint's bytes (built once per process)."""
    return {name: make() for name, make in FUZZ_SEEDS.items()}


def apply(data: bytes, ops: list[Op]) -> bytes:
    """``data`` with each op applied in turn; positions wrap around the current length.

    >>> apply(b"abcd", [("set8", 1, ord("X")), ("truncate", 3, 0)])
    b'aXc'
    """
    out = bytearray(data)
    for kind, position, value in ops:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= 1 << (value % 8)
        elif kind == "set8":
            out[at] = value & 0xFF
        elif kind in ("set32", "set64"):
            fmt, mask = ("<I", 0xFFFFFFFF) if kind == "set32" else ("<Q", (1 << 64) - 1)
            # interesting numbers more often than uniform ones: 0, max, small, around sizes
            pick = (0, mask, 1, value & 0xFF, value & 0xFFFF, mask - 1)[value % 6] if value % 3 else value & mask
            out[at : at + struct.calcsize(fmt)] = struct.pack(fmt, pick)
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value & 0xFF]) * (1 + value % 16)
        elif kind == "delete":
            del out[at : at + 1 + value % 16]
        elif kind == "tail":  # the zip directory and end records live in the last bytes
            out[len(out) - 1 - position % min(len(out), 256)] ^= 1 << (value % 8)
        else:
            raise ValueError(kind)
    return bytes(out)


def random_ops(rng: random.Random) -> list[Op]:
    """1 to 4 ops drawn uniformly (the script's counterpart of the test's hypothesis strategy)."""
    return [(rng.choice(KINDS), rng.getrandbits(32), rng.getrandbits(64)) for _ in range(rng.randint(1, 4))]


@contextlib.contextmanager
def bounded_memory(extra: int = 8 << 30) -> Iterator[None]:
    """Cap this process's address space a little above its current size while mutants load.

    A mutated size field can make torch.load allocate a huge storage before it notices the
    file is short; under the cap that allocation fails at once instead of taking the
    machine's memory.
    """
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(hard, vm + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - judged by the caller
            return None, exc


# Where torch "succeeds" by handing out memory it never wrote: a storage record shorter than
# the storage (torch wraps the record's buffer in a bigger storage), a storage the key list
# never lists (legacy: allocated, never read), a record marked as a directory (miniz reads
# nothing) or one that does not inflate to its size (miniz sets no error). Its result is
# garbage; ckptd refuses the file with one of these messages.
_TORCH_UNDEFINED = (
    ("needs", "but its record holds"),
    ("has no data",),
    ("marked as a directory",),
    ("does not inflate",),
    ("inflates to",),
)


def check(mutant: bytes) -> str:
    """Load ``mutant`` with torch.load and ckptd.load (weights_only, CPU) and judge ckptd.

    Returns ``"both-ok"``, ``"both-failed"``, ``"only-torch-failed"`` (ckptd is more lenient:
    allowed) or ``"torch-undefined"`` (torch read past a buffer; ckptd refused).
    """
    import ckptd

    expected, texc = _run(lambda: torch.load(io.BytesIO(mutant), weights_only=True))
    actual, cexc = _run(lambda: ckptd.load(mutant))
    if cexc is not None and not isinstance(cexc, ckptd.CkptdError):
        # under bounded_memory, running out of address space is the cap's doing, not ckptd's
        capped = isinstance(cexc, MemoryError) or "can't start new thread" in str(cexc)
        if (texc is None or not isinstance(cexc, type(texc))) and not (texc is not None and capped):
            raise AssertionError(f"ckptd raised a foreign {type(cexc).__name__}: {cexc!r} (torch: {texc!r})") from cexc
    if texc is not None:
        return "both-failed" if cexc is not None else "only-torch-failed"
    if cexc is not None:
        if isinstance(cexc, ckptd.CheckpointError) and any(
            all(part in str(cexc) for part in parts) for parts in _TORCH_UNDEFINED
        ):
            return "torch-undefined"
        raise AssertionError(f"torch.load succeeded but ckptd.load raised {cexc!r}") from cexc
    assert_same(expected, actual)
    return "both-ok"
