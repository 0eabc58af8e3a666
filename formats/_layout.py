"""What a format reader finds in a checkpoint, before any storage byte is read.

A reader turns a file into a :class:`Layout`: where each storage's bytes lie, what each
named tensor is made of, and the pickle the object is rebuilt from. Everything here is
plain data, checked whole by :func:`validate` before anything is allocated.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import CheckpointError


class Format(str, enum.Enum):
    """The container formats ckptd reads."""

    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCHSCRIPT = "torchscript"
    SAFETENSORS = "safetensors"
    SHARDED = "sharded"


@dataclass(frozen=True)
class StorageRecord:
    """One storage: ``nbytes`` bytes at absolute ``offset`` in the file.

    ``key`` is the storage's name in the pickle (or the tensor name for safetensors),
    ``location`` its saved location tag (``'cpu'``, ``'cuda:1'``, ...). A deflated zip
    record (torch writes none, but reads them) has ``compressed_size`` bytes at
    ``offset`` that inflate to ``inflated_size`` bytes, the storage's being the first
    ``nbytes``.
    """

    key: str
    dtype: torch.dtype
    numel: int
    location: str
    offset: int
    nbytes: int
    compressed_size: int | None = None
    inflated_size: int = 0

    @property
    def span(self) -> int:
        """How many bytes of the file hold this storage (compressed or not)."""
        return self.nbytes if self.compressed_size is None else self.compressed_size


@dataclass(frozen=True)
class TensorEntry:
    """A named tensor found by the structure scan.

    ``path`` holds the keys (str or int) that lead from the loaded object to the tensor;
    ``name`` is them joined with dots. ``storage_keys`` are every storage the value needs
    (one for a plain tensor, more for quantized or subclass tensors).
    """

    name: str
    path: tuple[str | int, ...]
    storage_keys: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None
    storage_offset: int
    location: str
    kind: str = "tensor"

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's own elements (not of the whole storage it views)."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * _element_size(self.dtype)


@dataclass(frozen=True)
class Layout:
    """Everything known about one checkpoint file without reading its storages.

    ``byteorder`` is the storages' byte order: the file's ``byteorder`` record, or where
    it has none (``byteorder_recorded`` false) torch's default load endianness when read.
    ``end`` is where torch.load leaves a stream it read the file from (relative to the
    stream's position when the load began), ``None`` where that is not known.
    ``header`` (legacy files) holds the magic number, protocol and system-info pickles,
    which torch.load unpickles (and so can refuse) before the object itself.
    """

    name: str
    format: Format
    size: int
    storages: Mapping[str, StorageRecord]
    tensors: tuple[TensorEntry, ...]
    pickle: bytes | None = None
    byteorder: str = "little"
    records: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    prefix: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    byteorder_recorded: bool = True
    end: int | None = None
    # The pickle scan's record (a ScanResult), kept for the plain rebuild; not part of the
    # layout's identity and never sent over the wire.
    scanned: Any = field(default=None, compare=False, repr=False)
    header: bytes | None = None  # legacy: the pickles torch.load unpickles before the object

    @property
    def nbytes(self) -> int:
        """Total bytes of all storages."""
        return sum(record.nbytes for record in self.storages.values())

    def tensor_map(self) -> dict[str, TensorEntry]:
        """Named tensors by name (first occurrence wins for names reachable twice)."""
        found: dict[str, TensorEntry] = {}
        for entry in self.tensors:
            found.setdefault(entry.name, entry)
        return found


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def validate(layout: Layout) -> None:
    """Check a layout whole: every storage inside the file, sizes consistent, no overlaps
    in safetensors files (its library refuses them; torch reads overlapping zip records).

    Raises :class:`CheckpointError` naming the first problem found.

    >>> validate(Layout("x.pt", Format.TORCH_ZIP, 0, {}, ()))
    """
    spans = []
    for record in layout.storages.values():
        if record.nbytes != record.numel * _element_size(record.dtype):
            raise CheckpointError(
                layout.name,
                f"storage {record.key!r} holds {record.nbytes} bytes but its table entry says "
                f"{record.numel} elements of {record.dtype}",
            )
        if record.offset < 0 or record.offset + record.span > layout.size:
            raise CheckpointError(
                layout.name,
                f"storage {record.key!r} ({record.span} bytes at offset {record.offset}) lies "
                f"outside the file ({layout.size} bytes): the file is truncated or corrupt",
            )
        if record.span and layout.format is Format.SAFETENSORS:  # torch reads overlapping zip records
            spans.append((record.offset, record.offset + record.span, record.key))
    spans.sort()
    for (_, end, key), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(
                layout.name, f"storages {key!r} and {other!r} overlap in the file: corrupt or hostile"
            )
    for entry in layout.tensors:
        missing = [key for key in entry.storage_keys if key not in layout.storages]
        if missing:
            raise CheckpointError(
                layout.name, f"tensor {entry.name!r} refers to missing storage {missing[0]!r}"
            )
