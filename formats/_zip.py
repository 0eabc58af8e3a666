"""torch.save's zip format and TorchScript archives: where every record's bytes lie.

The central directory (stdlib :mod:`zipfile`, which handles zip64 and any bytes
prepended to the archive) lists the records; each record's data starts after its *own*
local header, whose extra field may differ from the directory's (torch pads it to align
storages to 64 bytes). Pickles and storages are stored uncompressed, as torch writes them. CRCs
are not checked: torch can save with CRC computation turned off.
"""

from __future__ import annotations

import io
import struct
import zipfile

from ._errors import CheckpointError
from ._layout import Format, Layout, StorageRecord, validate
from ._pickle_scan import ScanResult, scan
from ._source import Source

_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_MAGIC = b"PK\x03\x04"

# data.pkl of a huge model is a few MB; anything far beyond is not a checkpoint we should
# hold in memory to scan.
_MAX_PICKLE_BYTES = 1 << 30


class _SourceFile(io.RawIOBase):
    """A read-only file view of a :class:`Source`, for :mod:`zipfile`'s directory parsing."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._source.size - self._pos))
        self._source.readinto(memoryview(buffer)[:n], self._pos)
        self._pos += n
        return n


def is_zip(source: Source) -> bool:
    """Whether the source ends with a zip directory (so prefixed archives count too)."""
    return source.size >= 22 and zipfile.is_zipfile(_SourceFile(source))


def read_records(source: Source) -> dict[str, tuple[int, int]]:
    """Map each uncompressed record's name to ``(data_offset, size)`` in the file."""
    try:
        with zipfile.ZipFile(_SourceFile(source)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise CheckpointError(source.name, f"corrupt zip directory ({exc})") from exc
    records: dict[str, tuple[int, int]] = {}
    for info in infos:
        # TorchScript deflates its code records; those are torch.jit.load's to read. Only
        # stored records (pickles, storages) are listed; a compressed one is "missing".
        if info.compress_type == zipfile.ZIP_STORED:
            records[info.filename] = (_data_offset(source, info), info.file_size)
    return records


def _data_offset(source: Source, info: zipfile.ZipInfo) -> int:
    header = source.read(info.header_offset, _LOCAL_HEADER.size)
    magic, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if magic != _LOCAL_MAGIC:
        raise CheckpointError(source.name, f"record {info.filename!r} has no local header: corrupt zip")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def archive_prefix(records: dict[str, tuple[int, int]], name: str) -> str:
    """The top directory every record lives under (torch names it after the file)."""
    for record in records:
        prefix, sep, _ = record.partition("/")
        if sep:
            return prefix
    raise CheckpointError(name, "zip archive holds no torch records (no data.pkl)")


def read_record(source: Source, records: dict[str, tuple[int, int]], name: str) -> bytes:
    """The bytes of one record."""
    offset, size = records[name]
    if size > _MAX_PICKLE_BYTES:
        raise CheckpointError(source.name, f"record {name!r} is implausibly large ({size} bytes)")
    return source.read(offset, size)


def read_zip_layout(source: Source, *, pickle_name: str = "data.pkl") -> Layout:
    """Read a torch.save zip (or TorchScript archive) into a :class:`Layout`.

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf)
    >>> from ckptd.formats import open_source
    >>> read_zip_layout(open_source(buf.getvalue())).tensors[0].name
    'w'
    """
    records = read_records(source)
    prefix = archive_prefix(records, source.name)
    is_script = f"{prefix}/constants.pkl" in records
    pickle_record = f"{prefix}/{pickle_name}"
    if pickle_record not in records:
        raise CheckpointError(source.name, f"zip archive has no {pickle_name} record: not a torch checkpoint")
    pickle_bytes = read_record(source, records, pickle_record)
    result = scan(pickle_bytes, source.name)
    layout = Layout(
        name=source.name,
        format=Format.TORCHSCRIPT if is_script else Format.TORCH_ZIP,
        size=source.size,
        storages=_storage_records(source.name, result, records, prefix),
        tensors=tuple(result.tensors),
        pickle=pickle_bytes,
        byteorder=_byteorder(source, records, prefix),
        records=records,
        prefix=prefix,
    )
    validate(layout)
    return layout


def _storage_records(
    name: str, result: ScanResult, records: dict[str, tuple[int, int]], prefix: str
) -> dict[str, StorageRecord]:
    storages: dict[str, StorageRecord] = {}
    for ref in result.storages.values():
        record = f"{prefix}/data/{ref.key}"
        if record not in records:
            raise CheckpointError(name, f"storage {ref.key!r} has no record {record!r}: truncated or corrupt")
        offset, size = records[record]
        nbytes = ref.numel * ref.dtype.itemsize
        if size < nbytes:
            raise CheckpointError(
                name, f"storage {ref.key!r} needs {nbytes} bytes but its record holds {size}: corrupt"
            )
        storages[ref.key] = StorageRecord(ref.key, ref.dtype, ref.numel, ref.location, offset, nbytes)
    return storages


def _byteorder(source: Source, records: dict[str, tuple[int, int]], prefix: str) -> str:
    record = f"{prefix}/byteorder"
    if record not in records:
        return "little"  # torch's default load endianness for files without the record
    order = read_record(source, records, record)
    if order not in (b"little", b"big"):
        raise CheckpointError(source.name, f"unknown byteorder record {order[:16]!r}")
    return order.decode()
