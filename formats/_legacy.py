"""torch.save's legacy format (``_use_new_zipfile_serialization=False``).

The file is a run of pickles: the magic number, the protocol version, system info, the
object itself, then the list of storage keys, followed by each storage in that order
as an 8-byte element count and the raw bytes. Scanning the pickles (nothing executed)
gives every storage's dtype, so the offsets of all storages follow without reading them.
"""

from __future__ import annotations

import struct

from ._errors import CheckpointError, UnsupportedFormatError
from ._layout import Format, Layout, StorageRecord, validate
from ._pickle_scan import ScanResult, scan
from ._source import Source

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_FIRST_READ = 1 << 20


def is_legacy_tar(source: Source) -> bool:
    """PyTorch < 0.4 wrote tar archives (``ustar`` at byte 257)."""
    return source.size > 262 and source.read(257, 5) == b"ustar"


def read_legacy_layout(source: Source) -> Layout:
    """Read a legacy (non-zip) torch.save file into a :class:`Layout`.

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    >>> from ckptd.formats import open_source
    >>> read_legacy_layout(open_source(buf.getvalue())).storages["0"].nbytes  # doctest: +SKIP
    8
    """
    if is_legacy_tar(source):
        raise UnsupportedFormatError(
            source.name,
            "legacy tar checkpoint (PyTorch < 0.4); load it once with torch.load and re-save it with torch.save",
        )
    head, pickles = _scan_pickles(source)
    _magic, protocol, _sys_info, main, keys = pickles
    if protocol.root != PROTOCOL_VERSION:
        raise CheckpointError(source.name, f"invalid legacy protocol version {protocol.root!r}")
    storages, end = _storage_records(source, main, keys, head)
    layout = Layout(
        name=source.name,
        format=Format.TORCH_LEGACY,
        size=source.size,
        storages=storages,
        tensors=tuple(main.tensors),
        pickle=bytes(head[pickles[2].end : main.end]),
        end=end,
        header=bytes(head[: pickles[2].end]),
    )
    validate(layout)
    return layout


def _scan_pickles(source: Source) -> tuple[bytes, list[ScanResult]]:
    """Scan the five leading pickles, reading more of the file until they fit."""
    length = min(source.size, _FIRST_READ)
    while True:
        head = source.read(0, length)
        try:
            return head, _scan_five(head, source.name)
        except CheckpointError:
            if length >= source.size:
                raise
            length = min(source.size, length * 4)


def _scan_five(head: bytes, name: str) -> list[ScanResult]:
    results: list[ScanResult] = []
    start = 0
    for _ in range(5):
        result = scan(head, name, start=start)
        if not results and result.root != MAGIC_NUMBER:
            raise CheckpointError(name, "invalid magic number: not a torch checkpoint, or corrupt")
        results.append(result)
        start = result.end
    return results


def _storage_records(
    source: Source, main: ScanResult, keys: ScanResult, head: bytes
) -> tuple[dict[str, StorageRecord], int]:
    """Every storage's record, and where the checkpoint ends (just past the last storage)."""
    if type(keys.root) is not list or not all(isinstance(k, (str, int)) for k in keys.root):
        raise CheckpointError(source.name, "the storage key list is malformed")
    roots = {ref.key: ref for ref in main.storages.values()}
    grown = _grown_bytes(main)
    offset = keys.end
    records: dict[str, StorageRecord] = {}
    for key in map(str, keys.root):
        ref = roots.get(key)
        if ref is None:
            raise CheckpointError(source.name, f"storage {key!r} is listed but never used: corrupt")
        (numel,) = struct.unpack("<q", _read_exact(source, head, offset, 8))
        # torch checks the byte count, computed in 64 bits that wrap (numel * itemsize), against
        # the storage as the pickle left it: its first id's size, grown by any tensor set on it
        # (a file that fills only the first id's size loads here; the tensor that overruns it
        # then fails in the rebuild as torch's set_ does, with its RuntimeError)
        needed = max(ref.numel * ref.dtype.itemsize, grown.get(key, 0))
        if (numel * ref.dtype.itemsize) % (1 << 64) not in (needed, ref.numel * ref.dtype.itemsize):
            raise CheckpointError(source.name, f"storage {key!r} holds {numel} elements, its table says {ref.numel}")
        offset += 8
        if (numel * ref.dtype.itemsize) % (1 << 64) != needed:
            needed = ref.numel * ref.dtype.itemsize
        numel = needed // ref.dtype.itemsize
        nbytes = numel * ref.dtype.itemsize
        records[key] = StorageRecord(key, ref.dtype, numel, ref.location, offset, nbytes)
        offset += nbytes
    missing = set(roots) - set(records)
    if missing:
        raise CheckpointError(source.name, f"storage {sorted(missing)[0]!r} has no data: truncated or corrupt")
    return records, offset


def _grown_bytes(main: ScanResult) -> dict[str, int]:
    """How many bytes each storage reaches once the pickle's tensors are set on it.

    torch makes a legacy storage as big as its first id says, and ``Tensor.set_`` grows it
    (it is resizable) for a tensor that reaches further; the file's data must then fill the
    grown size. Views of part of a storage never grow it.
    """
    views = {ref.key for ref in main.storages.values() if ref.view is not None}
    grown: dict[str, int] = {}
    for entry in main.tensors:
        if len(entry.storage_keys) != 1 or entry.stride is None or entry.storage_keys[0] in views:
            continue
        if any(size == 0 for size in entry.shape):
            continue  # no elements: set_ asks for no storage
        extent = entry.storage_offset + 1 + sum((size - 1) * stride for size, stride in zip(entry.shape, entry.stride))
        key = entry.storage_keys[0]
        grown[key] = max(grown.get(key, 0), extent * entry.dtype.itemsize)
    return grown


def _read_exact(source: Source, head: bytes, offset: int, n: int) -> bytes:
    if offset + n <= len(head):
        return head[offset : offset + n]
    return source.read(offset, n)
