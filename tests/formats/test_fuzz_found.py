"""Divergences from torch.load the fuzzer found in the pickle scan, each rebuilt by hand.

Each case is a pickle torch.load reads (its weights-only unpickler is lenient there) and
ckptd's scan once refused: a PROTO opcode in the middle of a pickle naming a protocol this
Python does not know; a storage id whose "storage type" is a tensor rebuilt earlier in the
pickle (a mutated memo index), whose ``dtype`` torch takes as the storage's. Both are
built for the zip and the legacy format and compared with torch.load (value, sharing,
warnings, or the error).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from pathlib import Path

import pytest
import torch

import ckptd
from ckptd_testlib import assert_conform, load_both, rewrite_zip

# --- a tiny pickle writer: just the opcodes torch.save's pickles use ----------------------


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(
    storage_type: bytes, key: str, numel: int, *, legacy: bool, memo: int | None = None, location: bytes = _text("cpu"),
    size: int | None = None,
) -> bytes:
    """``_rebuild_tensor_v2`` of a 1-d tensor of ``size`` (default ``numel``) elements over storage
    ``key`` whose id says ``numel``; ``storage_type`` and ``location`` are raw opcodes."""
    view = b"N" if legacy else b""  # legacy ids carry view metadata (None)
    pid = b"(" + _text("storage") + storage_type + _text(key) + location + b"J" + struct.pack("<i", numel) + view + b"tQ"
    shape = b"J" + struct.pack("<i", numel if size is None else size) + b"\x85" + b"K\x01\x85"
    args = b"(" + pid + b"K\x00" + shape + b"\x89" + _global("collections", "OrderedDict") + b")Rt"
    put = b"" if memo is None else b"q" + bytes([memo])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R" + put


def _dict(*items: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(items) + b"u."


# --- the two formats around a hand-written pickle ----------------------------------------


def _zip_with(tmp_path: Path, tensors: dict[str, torch.Tensor], pickle_bytes: bytes) -> Path:
    """A torch.save zip of ``tensors`` (storages '0', '1', ... in that order) with its pickle replaced."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    raw = rewrite_zip(buf.getvalue(), lambda name, data: pickle_bytes if name == "data.pkl" else data)
    path = tmp_path / "mutant.pt"
    path.write_bytes(raw)
    return path


def _legacy_spans(raw: bytes) -> list[tuple[int, int]]:
    """Where each of a legacy file's five pickles starts and ends."""
    stream, spans = io.BytesIO(raw), []
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    return spans


def _legacy_with(tmp_path: Path, tensors: dict[str, torch.Tensor], make_pickle) -> Path:
    """A legacy torch.save of ``tensors`` whose main pickle is ``make_pickle(keys)`` (keys in storage order)."""
    buf = io.BytesIO()
    torch.save(tensors, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    spans = _legacy_spans(raw)
    keys = pickle.loads(raw[spans[4][0] : spans[4][1]])
    (start, end) = spans[3]
    path = tmp_path / "mutant-legacy.pt"
    path.write_bytes(raw[:start] + make_pickle(keys) + raw[end:])
    return path


def _assert_as_torch(path: Path, *, loads: bool) -> None:
    """Equal to torch.load where it loads; where it fails, a ckptd error (the fuzz contract)."""
    for form in ("str", "bytes"):
        t, c = load_both(path, form, weights_only=True)
        assert (t.exc is None) is loads, t.exc  # the case is what it claims
        if loads:
            assert_conform(t, c)
        else:
            assert isinstance(c.exc, ckptd.CheckpointError), c.exc


# --- a PROTO opcode in the middle ---------------------------------------------------------

_FLOAT = _global("torch", "FloatStorage")


@pytest.mark.parametrize("protocol", [2, 5, 9, 255])
def test_proto_in_the_middle_of_a_zip_pickle(tmp_path: Path, protocol: int) -> None:
    proto = b"\x80" + bytes([protocol])
    # a key whose UTF-8 holds the bytes 0x80 0x09: inside a string they are no opcode
    data = _dict(_text("a"), proto, _tensor(_FLOAT, "0", 3, legacy=False), _text("\u0200\t"), b"K\x07")
    path = _zip_with(tmp_path, {"a": torch.arange(3.0)}, data)
    _assert_as_torch(path, loads=True)


@pytest.mark.parametrize("protocol", [6, 200])
def test_proto_in_the_middle_of_a_legacy_pickle(tmp_path: Path, protocol: int) -> None:
    def make(keys: list[str]) -> bytes:
        proto = b"\x80" + bytes([protocol])
        return _dict(_text("a"), _tensor(_FLOAT, keys[0], 3, legacy=True), proto, _text("b"), b"K\x01")

    path = _legacy_with(tmp_path, {"a": torch.arange(3.0)}, make)
    _assert_as_torch(path, loads=True)


def test_unknown_protocol_as_the_first_opcode_still_loads(tmp_path: Path) -> None:
    data = b"\x80\x0a" + _dict(_text("a"), _tensor(_FLOAT, "0", 3, legacy=False))[2:]
    path = _zip_with(tmp_path, {"a": torch.arange(3.0)}, data)
    _assert_as_torch(path, loads=True)


# --- a tensor as a storage type ---------------------------------------------------------


def test_storage_type_is_a_tensor_in_a_zip(tmp_path: Path) -> None:
    """torch takes ``tensor.dtype`` (half here) for storage '1', which was saved as float."""
    half = _global("torch", "HalfStorage")
    data = _dict(
        _text("a"), _tensor(half, "0", 3, legacy=False, memo=1),
        _text("b"), _tensor(b"h\x01", "1", 8, legacy=False),
    )
    path = _zip_with(tmp_path, {"a": torch.arange(3.0).half(), "b": torch.arange(4.0)}, data)
    _assert_as_torch(path, loads=True)
    assert torch.load(path, weights_only=True)["b"].dtype == torch.float16


def test_storage_type_is_a_tensor_in_a_legacy_file(tmp_path: Path) -> None:
    def make(keys: list[str]) -> bytes:
        return _dict(
            _text("a"), _tensor(_FLOAT, keys[0], 4, legacy=True, memo=1),
            _text("b"), _tensor(b"h\x01", keys[1], 4, legacy=True),
        )

    # equal sizes: torch writes the keys sorted, whichever storage comes first fits
    path = _legacy_with(tmp_path, {"a": torch.arange(4.0), "b": torch.arange(4.0) + 10}, make)
    _assert_as_torch(path, loads=True)


def test_a_storage_named_again_is_not_checked_further_than_torch_checks_it(tmp_path: Path) -> None:
    """torch hands out the storage a key's first id made; of a later id it uses only the type's dtype."""
    data = _dict(
        _text("a"), _tensor(_FLOAT, "0", 3, legacy=False),
        _text("b"), _tensor(_FLOAT, "0", 3, legacy=False, location=b"K\x01"),  # a location that is no string
    )
    path = _zip_with(tmp_path, {"a": torch.arange(3.0)}, data)
    _assert_as_torch(path, loads=True)


@pytest.mark.parametrize("storage_type", [_text("x"), b"K\x01", _global("torch._utils", "_rebuild_tensor_v2")])
def test_storage_type_without_a_dtype_fails_as_torch(tmp_path: Path, storage_type: bytes) -> None:
    data = _dict(_text("a"), _tensor(storage_type, "0", 3, legacy=False))
    path = _zip_with(tmp_path, {"a": torch.arange(3.0)}, data)
    _assert_as_torch(path, loads=False)


# --- the zip directory ------------------------------------------------------------------


def test_stored_pickle_record_with_a_smaller_compressed_size_reads_whole(tmp_path: Path) -> None:
    """miniz reads a stored record's uncompressed size; its compressed size only bounds the archive.

    miniz refuses a stored record whose two sizes differ only when its method and time, read as
    one 32-bit word, are zero: with a modification time the file loads (the fuzzer's case).
    """
    buf = io.BytesIO()
    torch.save({"a": torch.arange(3.0), "b": [1, 2, "x"]}, buf)
    raw = bytearray(buf.getvalue())
    entry = raw.index(b"PK\x01\x02")  # the central directory's first entry
    assert raw[entry + 46 : entry + 46 + 16] == b"archive/data.pkl"
    (size,) = struct.unpack_from("<I", raw, entry + 24)
    struct.pack_into("<I", raw, entry + 20, size - 100)  # the compressed size, 100 bytes short
    struct.pack_into("<H", raw, entry + 12, 0x6000)  # a modification time (12:00)
    path = tmp_path / "short-compressed-size.pt"
    path.write_bytes(raw)
    _assert_as_torch(path, loads=True)


def test_unread_record_whose_compressed_size_is_the_zip64_marker_does_not_fail_the_file(tmp_path: Path) -> None:
    """miniz checks a record's bounds in the directory only by a 32-bit compressed size; one that
    says 0xFFFFFFFF (and has no zip64 field) fails only if it is read, and torch never reads it."""
    buf = io.BytesIO()
    torch.save({"a": torch.arange(3.0)}, buf)
    raw = bytearray(buf.getvalue())
    name = b"archive/.format_version"
    entry = raw.index(name, raw.index(b"PK\x01\x02")) - 46  # its central directory entry
    assert raw[entry : entry + 4] == b"PK\x01\x02"
    raw[entry + 46 : entry + 46 + len(name)] = b"archive/.format_vXrsion"  # a record torch never looks up
    struct.pack_into("<I", raw, entry + 20, 0xFFFFFFFF)  # its compressed size: the zip64 marker
    path = tmp_path / "marker.pt"
    path.write_bytes(raw)
    _assert_as_torch(path, loads=True)


def test_legacy_storage_grown_by_a_tensor_set_on_it(tmp_path: Path) -> None:
    """A legacy storage is as big as its first id says, then ``set_`` grows it for a tensor that
    reaches further; the file's data fills the grown size and torch.load succeeds."""

    def make(keys: list[str]) -> bytes:
        return _dict(
            _text("a"), _tensor(_FLOAT, keys[0], 3, legacy=True, size=4),  # the id says 3, the tensor needs 4
            _text("b"), _tensor(_FLOAT, keys[1], 4, legacy=True),
        )

    path = _legacy_with(tmp_path, {"a": torch.arange(4.0), "b": torch.arange(4.0) + 10}, make)
    _assert_as_torch(path, loads=True)
    assert torch.load(path, weights_only=True)["a"].untyped_storage().nbytes() == 16
