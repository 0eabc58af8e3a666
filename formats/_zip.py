"""torch.save's zip format and TorchScript archives: where every record's bytes lie.

torch reads these archives with miniz, not with Python's :mod:`zipfile`, and the two
disagree at the edges: miniz takes the *first* of two records with one name, accepts a
zip64 locator that names disk 1, inflates deflated records, and never checks CRCs (torch
can save with CRC computation turned off). So the directory is parsed here, with miniz's
rules. Each record's data starts after its *own* local header, whose extra field may
differ from the directory's (torch pads it to align storages to 64 bytes).
"""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass

import torch

from ._errors import CheckpointError
from ._layout import Format, Layout, StorageRecord, validate
from ._pickle_scan import ScanResult, scan
from ._source import Source

LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL_MAGIC = b"PK\x01\x02"
_END_MAGIC = b"PK\x05\x06"
_END64_LOCATOR_MAGIC = b"PK\x06\x07"
_END64_MAGIC = b"PK\x06\x06"

_LOCAL = struct.Struct("<4s22xHH")
# magic, flags, method, time, sizes, name/extra/comment lengths, disk, external attributes, offset
_CENTRAL = struct.Struct("<4s4xHHH6xIIHHHH2xII")
_END = struct.Struct("<4sHHHHIIH")
_END64_LOCATOR = struct.Struct("<4sIQI")
_END64 = struct.Struct("<4sQHHIIQQQQ")

_STORED, _DEFLATED = 0, 8
_ENCRYPTED_FLAGS = 0x0001 | 0x0020 | 0x0040  # encrypted, patch data, strong encryption: refused when read
_MASKED = 0x2000  # an encrypted directory: miniz refuses the archive
_DOS_DIRECTORY = 0x10
_U32_MAX = 0xFFFFFFFF
_MAX_COMMENT = 0xFFFF
# data.pkl of a huge model is a few MB; anything far beyond is not a checkpoint we should
# hold in memory to scan.
_MAX_PICKLE_BYTES = 1 << 30
_INFLATE_CHUNK = 1 << 20
_MAX_RATIO = 1032  # deflate's best: no honest record inflates further


@dataclass(frozen=True)
class ZipRecord:
    """One member of the archive, as its first central-directory entry describes it."""

    name: str
    header_offset: int
    method: int
    compressed_size: int
    size: int
    flags: int = 0
    directory: bool = False  # miniz reads nothing for a directory: torch gets unwritten memory


class Directory:
    """The archive's records, looked up by name as miniz (torch) does.

    miniz finds a name by binary search over the directory heap-sorted by ASCII-lowercased
    name: lookups ignore case, and of several records that share a name it returns the
    one its search meets (the first, as the directory is usually written). Names that
    are all distinct (ignoring case) are looked up through a dict instead.
    """

    def __init__(self, records: list[ZipRecord]) -> None:
        self.records = records
        self._keys = [r.name.encode("utf-8", "surrogateescape").lower() for r in records]
        unique = dict(zip(self._keys, records))
        self._unique: dict[bytes, ZipRecord] | None = unique if len(unique) == len(records) else None
        self._sorted = None if self._unique is not None else _miniz_heapsort(self._keys)

    def find(self, name: str) -> ZipRecord | None:
        """The record torch would read for ``name`` (case ignored), or ``None``."""
        key = name.encode("utf-8", "surrogateescape").lower()
        if self._unique is not None:
            return self._unique.get(key)
        assert self._sorted is not None
        low, high = 0, len(self._sorted) - 1
        while low <= high:
            middle = low + ((high - low) >> 1)
            found = self._keys[self._sorted[middle]]
            if found == key:
                return self.records[self._sorted[middle]]
            if found < key:
                low = middle + 1
            else:
                high = middle - 1
        return None

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def names(self) -> list[str]:
        """Every name, in directory order (duplicates included)."""
        return [r.name for r in self.records]


def _miniz_heapsort(keys: list[bytes]) -> list[int]:
    """Indices of ``keys`` in the order miniz's heap sort leaves them (equal keys included)."""
    order = list(range(len(keys)))
    size = len(order)
    if size <= 1:
        return order

    def sift(root: int, end: int) -> None:
        while True:
            child = (root << 1) + 1
            if child >= end:
                return
            if child + 1 < end and keys[order[child]] < keys[order[child + 1]]:
                child += 1
            if not keys[order[root]] < keys[order[child]]:
                return
            order[root], order[child] = order[child], order[root]
            root = child

    for start in range((size - 2) >> 1, -1, -1):
        sift(start, size)
    for end in range(size - 1, 0, -1):
        order[end], order[0] = order[0], order[end]
        sift(0, end)
    return order


def is_zip(source: Source) -> bool:
    """Whether the source starts with a zip local header (torch's own test, ``_is_zipfile``).

    >>> from ckptd.formats import open_source
    >>> is_zip(open_source(b"PK\\x03\\x04...")), is_zip(open_source(b"\\x80\\x02..."))
    (True, False)
    """
    return source.size >= len(LOCAL_MAGIC) and source.read(0, len(LOCAL_MAGIC)) == LOCAL_MAGIC


def has_zip_directory(source: Source) -> bool:
    """Whether the source ends with a zip directory (an archive behind some other bytes)."""
    return _find_end(source) is not None


def _find_end(source: Source) -> int | None:
    """Where the end-of-directory record starts: the last signature with room for the record."""
    if source.size < _END.size:
        return None
    start = max(0, source.size - _END.size - _MAX_COMMENT)
    tail = source.read(start, source.size - start)
    position = tail.rfind(_END_MAGIC, 0, len(tail) - _END.size + len(_END_MAGIC))
    return None if position < 0 else start + position


def read_directory(source: Source) -> Directory:
    """Every record of the archive, found by name as torch finds them.

    Offsets are relative to the archive's start; an archive behind other bytes (not one
    torch.load reads) is found from the end and its offsets shifted.
    """
    end = _find_end(source)
    if end is None:
        raise CheckpointError(source.name, "corrupt zip archive: no end of central directory record")
    _, disk, cd_disk, count_here, count, cd_size, cd_offset, _ = _END.unpack(source.read(end, _END.size))
    prefixed = not is_zip(source)
    end64 = _read_end64(source, end, prefixed)
    if end64 is not None:
        disk, cd_disk, count_here, count, cd_size, cd_offset = end64
    if count != count_here or (disk | cd_disk and (disk, cd_disk) != (1, 1)):
        raise CheckpointError(source.name, "zip archive spans several disks: not supported (nor by torch)")
    # an archive starting at byte 0 is read as torch does; one behind other bytes is shifted
    shift = 0
    if prefixed:
        shift = end - cd_size - cd_offset - (_END64_LOCATOR.size + _END64.size if end64 is not None else 0)
    cd_offset += shift
    if cd_size < count * _CENTRAL.size or cd_offset < 0 or cd_offset + cd_size > source.size:
        raise CheckpointError(source.name, "corrupt zip archive: the central directory lies outside the file")
    directory = source.read(cd_offset, cd_size)
    records: list[ZipRecord] = []
    position = 0
    for _ in range(count):
        record, position = _central_entry(source, directory, position, disk, shift)
        records.append(record)
    return Directory(records)


def _read_end64(source: Source, end: int, prefixed: bool) -> tuple[int, int, int, int, int, int] | None:
    """The zip64 end record's fields, when a locator points at one (miniz ignores its disk field).

    Behind other bytes, the locator's offset is off by their length: the record is taken
    from just before the locator instead.
    """
    if end < _END64_LOCATOR.size + _END64.size:
        return None
    magic, _disk, offset, disks = _END64_LOCATOR.unpack(source.read(end - _END64_LOCATOR.size, _END64_LOCATOR.size))
    if magic != _END64_LOCATOR_MAGIC:
        return None
    if prefixed:
        offset = end - _END64_LOCATOR.size - _END64.size
    if offset > source.size - _END64.size:
        raise CheckpointError(source.name, "corrupt zip archive: the zip64 locator points outside the file")
    fields = _END64.unpack(source.read(offset, _END64.size))
    if fields[0] != _END64_MAGIC:
        return None
    _, record_size, _, _, disk, cd_disk, count_here, count, cd_size, cd_offset = fields
    if record_size < _END64.size - 12:
        raise CheckpointError(source.name, "corrupt zip archive: zip64 end record too short")
    if disks != 1:
        raise CheckpointError(source.name, "zip archive spans several disks: not supported (nor by torch)")
    return disk, cd_disk, count_here, count, cd_size, cd_offset


def _central_entry(source: Source, directory: bytes, position: int, disk: int, shift: int) -> tuple[ZipRecord, int]:
    if position + _CENTRAL.size > len(directory):
        raise CheckpointError(source.name, "corrupt zip archive: central directory truncated")
    magic, flags, method, time, compressed, size, name_len, extra_len, comment_len, entry_disk, attributes, offset = (
        _CENTRAL.unpack_from(directory, position)
    )
    if magic != _CENTRAL_MAGIC:
        raise CheckpointError(source.name, f"corrupt zip archive: bad central directory entry at {position}")
    name_at = position + _CENTRAL.size
    following = name_at + name_len + extra_len + comment_len
    if following > len(directory):
        raise CheckpointError(source.name, "corrupt zip archive: central directory entry overruns the directory")
    name = directory[name_at : name_at + name_len].decode("utf-8", "surrogateescape")
    bounded = compressed != _U32_MAX  # miniz bounds a record here only by a 32-bit compressed size
    if _U32_MAX in (compressed, size, offset):
        size, compressed, offset = _zip64_extra(directory[name_at + name_len : name_at + name_len + extra_len], size, compressed, offset)
    # miniz's check reads method and time as one 32-bit word: a stored record with a time is not checked
    elif (method == _STORED and not time and size != compressed) or (size and not compressed):
        raise CheckpointError(source.name, f"corrupt zip archive: record {name!r} has inconsistent sizes")
    if entry_disk == 0xFFFF or (entry_disk != disk and entry_disk != 1):
        raise CheckpointError(source.name, "zip archive spans several disks: not supported (nor by torch)")
    if flags & _MASKED:
        raise CheckpointError(source.name, f"record {name!r} is encrypted: not a torch checkpoint")
    offset += shift
    if bounded and offset + _LOCAL.size + compressed > source.size:  # others are checked when read (data_offset)
        raise CheckpointError(source.name, f"record {name!r} lies outside the file: truncated or corrupt")
    is_directory = name.endswith("/") or bool(attributes & _DOS_DIRECTORY)
    return ZipRecord(name, offset, method, compressed, size, flags, is_directory), following


def _zip64_extra(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """The zip64 extra field's values for the fields that hold 0xFFFFFFFF, in the spec's order."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4 : at + 4 + length]
        if tag == 1:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            fields = [size, compressed, offset]
            for i, field in enumerate(fields):
                if field == _U32_MAX and values:
                    fields[i] = values.pop(0)
            return fields[0], fields[1], fields[2]
        at += 4 + length
    return size, compressed, offset


def data_offset(source: Source, record: ZipRecord) -> int:
    """Where a record's (stored or compressed) bytes start: after its own local header."""
    if record.flags & _ENCRYPTED_FLAGS:
        raise CheckpointError(source.name, f"record {record.name!r} is encrypted: not a torch checkpoint")
    if record.directory and record.size:
        raise CheckpointError(source.name, f"record {record.name!r} is marked as a directory: corrupt")
    magic, name_len, extra_len = _LOCAL.unpack(source.read(record.header_offset, _LOCAL.size))
    if magic != LOCAL_MAGIC:
        raise CheckpointError(source.name, f"record {record.name!r} has no local header: corrupt zip")
    start = record.header_offset + _LOCAL.size + name_len + extra_len
    if start + record.compressed_size > source.size:
        raise CheckpointError(source.name, f"record {record.name!r} lies outside the file: truncated or corrupt")
    return start


def archive_prefix(directory: Directory, name: str) -> str:
    """The top directory every record lives under (torch names it after the file)."""
    for record in directory.names():
        prefix, sep, _ = record.partition("/")
        if sep:
            return prefix
    raise CheckpointError(name, "zip archive holds no torch records (no data.pkl)")


def read_record(source: Source, record: ZipRecord) -> bytes:
    """The (inflated) bytes of one small record: a pickle, the byte order, a version."""
    if record.size > _MAX_PICKLE_BYTES:
        raise CheckpointError(source.name, f"record {record.name!r} is implausibly large ({record.size} bytes)")
    out = bytearray(record.size)
    inflate_into(source, record.method, data_offset(source, record), record.compressed_size, memoryview(out), record.name)
    return bytes(out)


def inflate_into(
    source: Source, method: int, offset: int, compressed: int, out: memoryview, name: str, size: int | None = None
) -> None:
    """Fill ``out`` with the first bytes of a record of ``size`` bytes (default ``len(out)``):
    copied if stored, inflated if deflated."""
    if method == _STORED:
        # miniz reads a stored record's uncompressed size, whatever its compressed size says
        source.readinto(out, offset)
        return
    if method != _DEFLATED:
        raise CheckpointError(source.name, f"record {name!r} uses compression method {method}: not supported (nor by torch)")
    # miniz (torch) takes the first len(out) bytes the stream gives and looks no further:
    # neither a missing end of stream nor more data after them is an error.
    size = len(out) if size is None else size
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    done = 0  # bytes inflated; those past len(out) are only counted
    try:
        for start in range(offset, offset + compressed, _INFLATE_CHUNK):
            chunk = source.read(start, min(_INFLATE_CHUNK, offset + compressed - start))
            while chunk and done < size and not inflater.eof:
                piece = inflater.decompress(chunk, min(size - done, _INFLATE_CHUNK))
                if done < len(out):
                    out[done : min(len(out), done + len(piece))] = piece[: len(out) - done]
                done += len(piece)
                chunk = inflater.unconsumed_tail
            if done == size or inflater.eof:
                break
    except zlib.error as exc:
        raise CheckpointError(source.name, f"record {name!r} does not inflate ({exc}): corrupt") from exc
    if done != size:
        raise CheckpointError(source.name, f"record {name!r} inflates to {done} bytes, not {size}: corrupt")


def inflate_storage(source: Source, record: StorageRecord) -> bytearray:
    """The bytes of a storage kept in a deflated record (``record.compressed_size`` is set).

    >>> import io, torch, zipfile
    >>> buf = io.BytesIO(); torch.save(torch.arange(4.0), buf)
    >>> old, out = zipfile.ZipFile(buf), io.BytesIO()
    >>> with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as new:
    ...     for info in old.infolist(): new.writestr(info.filename, old.read(info))
    >>> from ckptd.formats import open_source, read_layout
    >>> src = open_source(out.getvalue()); record = read_layout(src).storages["0"]
    >>> record.compressed_size < record.nbytes, bytes(inflate_storage(src, record)[:4])
    (True, b'\\x00\\x00\\x00\\x00')
    """
    assert record.compressed_size is not None
    out = bytearray(record.nbytes)
    inflate_into(source, _DEFLATED, record.offset, record.compressed_size, memoryview(out), record.key, record.inflated_size)
    return out


def read_zip_layout(source: Source, *, pickle_name: str = "data.pkl") -> Layout:
    """Read a torch.save zip (or TorchScript archive) into a :class:`Layout`.

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf)
    >>> from ckptd.formats import open_source
    >>> read_zip_layout(open_source(buf.getvalue())).tensors[0].name
    'w'
    """
    directory = read_directory(source)
    for record_name in directory.names():  # torch.load lists every name as str: it fails on these
        try:
            # miniz hands torch each name as a C string: what follows a NUL byte is never decoded
            record_name.partition("\x00")[0].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CheckpointError(source.name, f"record name {record_name!r} is not UTF-8: corrupt") from exc
    prefix = archive_prefix(directory, source.name)
    is_script = f"{prefix}/constants.pkl" in directory.names()  # torch.load's test is exact
    _read_as_torch_does(source, directory, prefix)
    pickle_record = directory.find(f"{prefix}/{pickle_name}")
    if pickle_record is None:
        raise CheckpointError(source.name, f"zip archive has no {pickle_name} record: not a torch checkpoint")
    pickle_bytes = read_record(source, pickle_record)
    result = scan(pickle_bytes, source.name)
    storages = _storage_records(source, result, directory, prefix)
    records = _readable_records(source, directory)
    byteorder, recorded = _byteorder(source, directory, prefix)
    layout = Layout(
        name=source.name,
        format=Format.TORCHSCRIPT if is_script else Format.TORCH_ZIP,
        size=source.size,
        storages=storages,
        tensors=tuple(result.tensors),
        pickle=pickle_bytes,
        byteorder=byteorder,
        byteorder_recorded=recorded,
        records=records,
        prefix=prefix,
        scanned=result,
        end=_end(storages, data_offset(source, pickle_record), pickle_record),
    )
    validate(layout)
    return layout


# The small records torch.load reads before the pickle (a broken one fails it there).
_READ_FIRST = (".data/serialization_id", ".format_version", ".storage_alignment")


def _read_as_torch_does(source: Source, directory: Directory, prefix: str) -> None:
    """Read the records torch.load reads before the pickle, so a broken one fails here too."""
    version = directory.find(f"{prefix}/.data/version") or directory.find(f"{prefix}/version")
    for record in (version, *(directory.find(f"{prefix}/{name}") for name in _READ_FIRST)):
        if record is not None:
            read_record(source, record)


def _readable_records(source: Source, directory: Directory) -> dict[str, tuple[int, int]]:
    """``(data_offset, size)`` of every record torch would find whose local header reads."""
    records: dict[str, tuple[int, int]] = {}
    for name in directory.names():
        record = directory.find(name)
        if record is None or name in records:
            continue
        try:
            records[name] = (data_offset(source, record), record.size)
        except CheckpointError:
            continue  # torch never reads it unless asked; neither does ckptd
    return records


def _end(storages: dict[str, StorageRecord], pickle_at: int, pickle_record: ZipRecord) -> int:
    """Where torch.load leaves a stream: after the last storage it read (in the pickle's order),
    else after the pickle itself."""
    for record in reversed(list(storages.values())):
        if record.nbytes:
            return record.offset + (record.compressed_size if record.compressed_size is not None else record.nbytes)
    return pickle_at + pickle_record.compressed_size


def _storage_records(source: Source, result: ScanResult, directory: Directory, prefix: str) -> dict[str, StorageRecord]:
    storages: dict[str, StorageRecord] = {}
    for ref in result.storages.values():
        record_name = f"{prefix}/data/{ref.key}"
        entry = directory.find(record_name)
        if entry is None:
            raise CheckpointError(source.name, f"storage {ref.key!r} has no record {record_name!r}: truncated or corrupt")
        nbytes = ref.numel * ref.dtype.itemsize
        if entry.size < nbytes:
            raise CheckpointError(
                source.name, f"storage {ref.key!r} needs {nbytes} bytes but its record holds {entry.size}: corrupt"
            )
        # miniz reads nothing of an empty record, not even its local header
        offset = data_offset(source, entry) if entry.compressed_size else entry.header_offset
        compressed = None if entry.method == _STORED or not nbytes else entry.compressed_size
        if compressed is not None and entry.method != _DEFLATED:
            raise CheckpointError(
                source.name, f"record {record_name!r} uses compression method {entry.method}: not supported (nor by torch)"
            )
        if compressed is not None and entry.size > _MAX_RATIO * compressed + _INFLATE_CHUNK:
            raise CheckpointError(source.name, f"record {record_name!r} claims to inflate {compressed} bytes to {entry.size}: corrupt")
        storages[ref.key] = StorageRecord(
            ref.key, ref.dtype, ref.numel, ref.location, offset, nbytes, compressed_size=compressed, inflated_size=entry.size
        )
    return storages


def _byteorder(source: Source, directory: Directory, prefix: str) -> tuple[str, bool]:
    """The storages' byte order and whether the file records it (else torch's load setting decides)."""
    record = directory.find(f"{prefix}/byteorder")
    if record is None:
        return default_load_byteorder(), False
    order = read_record(source, record)
    if order not in (b"little", b"big"):
        raise CheckpointError(source.name, f"unknown byteorder record {order[:16]!r}")
    return order.decode(), True


def default_load_byteorder() -> str:
    """The byte order torch.load assumes for files without a ``byteorder`` record.

    ``torch.serialization.set_default_load_endianness`` decides: little unless set to
    ``BIG``, or to ``NATIVE`` on a big-endian host.

    >>> default_load_byteorder()
    'little'
    """
    setting = torch.serialization.get_default_load_endianness()
    if setting is torch.serialization.LoadEndianness.BIG:
        return "big"
    if setting is torch.serialization.LoadEndianness.NATIVE:
        return sys.byteorder
    return "little"
