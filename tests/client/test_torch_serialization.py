"""ckptd.load against torch.serialization's own load-path behaviour (torch 2.13).

Load endianness settings, checkpoints inside longer streams, the file-like protocol, zip
sniffing and zip edge cases miniz accepts, and the ``torch.serialization`` settings that
change what torch.load returns (``skip_data``, safe globals, fake tensor modes, mmap flags).
Every case is built here and compared with torch.load.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.serialization import LoadEndianness

import ckptd
from ckptd.engine import check_daemon_load, make_request
from ckptd_testlib import NonSeekable, assert_same, to_big_endian

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _sample() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 3, generator=gen)
    return {
        "w": base,
        "view": base[1:, 1],
        "i16": torch.arange(-5, 5, dtype=torch.int16),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(5, generator=gen).half(),
        "c64": torch.randn(3, dtype=torch.complex64, generator=gen),
        "u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.ones(0),
        "step": 4,
    }


def _saved(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@contextlib.contextmanager
def _endianness(setting: LoadEndianness | None) -> Iterator[None]:
    previous = torch.serialization.get_default_load_endianness()
    torch.serialization.set_default_load_endianness(setting)
    try:
        yield
    finally:
        torch.serialization.set_default_load_endianness(previous)


def _outcome(fn: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - compared by the caller
        return None, exc


def _assert_agree(torch_fn: Any, ckptd_fn: Any) -> Any:
    """Both succeed with equal results, or ckptd raises an instance of torch's error type."""
    expected, texc = _outcome(torch_fn)
    actual, cexc = _outcome(ckptd_fn)
    if texc is not None:
        assert cexc is not None, f"torch raised {texc!r}, ckptd returned"
        assert isinstance(cexc, type(texc)) or isinstance(cexc, ckptd.CkptdError), (texc, cexc)
        return None
    if cexc is not None:
        raise AssertionError(f"torch succeeded, ckptd raised {cexc!r}") from cexc
    assert_same(expected, actual)
    return actual


# ---------------------------------------------------------------------------------------
# 1. load endianness
# ---------------------------------------------------------------------------------------

def _without_byteorder(data: bytes) -> bytes:
    """The archive without its ``byteorder`` record (torch 2.13's writer adds one even when
    ``_disable_byteorder_record=True``; files from older writers have none)."""
    zin = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/byteorder"):
                zout.writestr(info.filename, zin.read(info))
    return out.getvalue()


_FILES = {
    "little+record": lambda raw: raw,
    "big+record": lambda raw: to_big_endian(raw),
    "little, no record": lambda raw: _without_byteorder(_saved(_sample(), _disable_byteorder_record=True)),
    "big, no record": lambda raw: _without_byteorder(to_big_endian(raw, record=False)),
}


@pytest.mark.parametrize("setting", [None, LoadEndianness.NATIVE, LoadEndianness.LITTLE, LoadEndianness.BIG])
@pytest.mark.parametrize("kind", list(_FILES))
def test_load_endianness_setting_as_torch(tmp_path: Path, kind: str, setting: LoadEndianness | None) -> None:
    data = _FILES[kind](_saved(_sample()))
    if "no record" in kind:
        assert b"byteorder" not in data
    path = tmp_path / "f.pt"
    path.write_bytes(data)
    with _endianness(setting):
        expected = torch.load(path, weights_only=True)
        assert_same(expected, ckptd.load(path))
        assert_same(expected, ckptd.load(io.BytesIO(data)))
        assert_same(expected, ckptd.load(path, mmap=True))
        assert_same(expected["i64"], ckptd.load(path, tensor_name="i64"))
    # the setting matters exactly where the file has no record: little unless it says BIG
    read_as_big = "no record" in kind and setting is LoadEndianness.BIG
    if kind.startswith("big") != read_as_big and "no record" in kind:
        assert not torch.equal(expected["i64"], _sample()["i64"])
    else:
        assert_same(_sample(), expected)


def test_a_record_wins_over_a_forced_setting(tmp_path: Path) -> None:
    """torch 2.13 does not raise where the record disagrees with the setting: the record decides."""
    path = tmp_path / "big.pt"
    path.write_bytes(to_big_endian(_saved(_sample())))
    with _endianness(LoadEndianness.LITTLE):
        expected = torch.load(path)
        assert_same(_sample(), expected)
        assert_same(expected, ckptd.load(path))


def test_daemon_refuses_a_setting_it_cannot_honour() -> None:
    layout = ckptd.inspect(_FILES["big, no record"](_saved(_sample())))
    assert not layout.byteorder_recorded and layout.byteorder == "little"
    request = make_request(None, None, None, None, None, {})
    check_daemon_load(request, layout)  # the daemon's order is this process's: fine
    with _endianness(LoadEndianness.BIG):
        with pytest.raises(ckptd.UsageError, match="no byteorder record"):
            check_daemon_load(request, layout)
    with torch.serialization.skip_data():
        with pytest.raises(ckptd.UsageError, match="skip_data"):
            check_daemon_load(make_request(None, None, None, None, None, {}))


# ---------------------------------------------------------------------------------------
# 2. checkpoints inside longer streams
# ---------------------------------------------------------------------------------------


def _stream_of(legacy: bool) -> bytes:
    """pickle, checkpoint, pickle, checkpoint, pickle: one after another, as a user writes them.

    torch reads a zip through its end-of-directory record, the last one in the stream, so
    only one zip checkpoint can be followed by more data; legacy ones can be chained.
    """
    f = io.BytesIO()
    pickle.dump({"first": 1}, f)
    torch.save(_sample(), f, _use_new_zipfile_serialization=not legacy)
    pickle.dump("between", f)
    if legacy:
        torch.save([torch.arange(3, dtype=torch.int16), {"x": torch.ones(2, 2)}], f, _use_new_zipfile_serialization=False)
        pickle.dump(3, f)
    return f.getvalue()


def _read_back(f: Any, loader: Any, legacy: bool) -> list[Any]:
    out: list[Any] = [pickle.load(f), loader(f), f.tell()]
    if legacy:  # torch leaves a zip's stream inside the archive, after the last storage it read
        out += [pickle.load(f), loader(f), f.tell(), pickle.load(f)]
    return out


@pytest.mark.parametrize("form", ["bytesio", "file"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_objects_one_after_another(tmp_path: Path, legacy: bool, form: str) -> None:
    data = _stream_of(legacy)
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    results = []
    for loader in (torch.load, ckptd.load):
        with contextlib.ExitStack() as stack:
            f = io.BytesIO(data) if form == "bytesio" else stack.enter_context(open(path, "rb"))
            results.append(_read_back(f, loader, legacy))
    expected, actual = results
    assert_same(expected, actual)  # equal objects, and the stream left at the same positions


def test_zip_stream_position_is_torchs(tmp_path: Path) -> None:
    """torch leaves a zip stream after the last storage it read (or the pickle when none)."""
    for obj in ({"x": 1}, {"a": torch.arange(5.0), "b": torch.ones(0)}, [torch.ones(3), torch.zeros(2)]):
        data = b"head" + _saved(obj) + b"tail"
        positions = []
        for loader in (torch.load, ckptd.load):
            f = io.BytesIO(data)
            f.seek(4)
            loader(f)
            positions.append(f.tell())
        assert positions[0] == positions[1]


def test_legacy_checkpoint_past_2_gib_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    offset = (2 << 30) + 12345
    with open(path, "wb") as f:
        f.seek(offset)
        torch.save(_sample(), f, _use_new_zipfile_serialization=False)
        pickle.dump("after", f)
    results = []
    for loader in (torch.load, ckptd.load):
        with open(path, "rb") as f:
            f.seek(offset)
            results.append([loader(f), f.tell(), pickle.load(f)])
    assert_same(results[0], results[1])
    assert results[1][1] > offset


# ---------------------------------------------------------------------------------------
# 3. the file-like protocol
# ---------------------------------------------------------------------------------------


class _Recording:
    """A file-like object (not io.*) that records which of its methods are called."""

    def __init__(self, data: bytes, *, readinto: bool = True) -> None:
        self._buf = io.BytesIO(data)
        self.calls: list[str] = []
        self.read_bytes = 0
        if readinto:
            self.readinto = self._readinto

    def read(self, n: int = -1) -> bytes:
        self.calls.append("read")
        out = self._buf.read(n)
        self.read_bytes += len(out)
        return out

    def readline(self) -> bytes:  # torch's unpickler asks for it
        self.calls.append("readline")
        return self._buf.readline()

    def _readinto(self, b: Any) -> int:
        self.calls.append("readinto")
        return self._buf.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.calls.append("seek")
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        self.calls.append("tell")
        return self._buf.tell()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_file_like_read_with_readinto(legacy: bool) -> None:
    data = _saved(_sample(), _use_new_zipfile_serialization=not legacy)
    torch_f, ckptd_f = _Recording(data), _Recording(data)
    assert_same(torch.load(torch_f), ckptd.load(ckptd_f))
    assert "readinto" in ckptd_f.calls
    assert ckptd_f.read_bytes < 64  # no bulk copies through read()
    assert torch_f.tell() == ckptd_f.tell()


def test_file_like_without_readinto_still_reads() -> None:
    data = _saved(_sample())
    f = _Recording(data, readinto=False)
    assert_same(torch.load(io.BytesIO(data)), ckptd.load(f))
    assert "read" in f.calls


class _NoSeek:
    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


@pytest.mark.parametrize(
    "make", [NonSeekable, _NoSeek, lambda data: 12345, lambda data: object()], ids=["pipe", "no-seek", "int", "object"]
)
def test_unseekable_inputs_raise_torchs_type_and_message(make: Any) -> None:
    data = _saved(_sample())
    with pytest.raises(Exception) as texc:
        torch.load(make(data))
    with pytest.raises(ckptd.CkptdError) as cexc:
        ckptd.load(make(data))
    assert isinstance(cexc.value, type(texc.value)), (type(cexc.value).__mro__, texc.value)
    assert str(cexc.value) == str(texc.value)
    # every except clause written for torch's error catches ckptd's
    expected_type = AttributeError if isinstance(texc.value, AttributeError) else io.UnsupportedOperation
    assert isinstance(cexc.value, expected_type)
    assert isinstance(cexc.value, (ckptd.NotSeekableError, ckptd.NotFileLikeError))


# ---------------------------------------------------------------------------------------
# 4. sniffing and 6. zip edge cases miniz accepts
# ---------------------------------------------------------------------------------------


def test_legacy_uint8_checkpoint_holding_an_end_of_directory_record(tmp_path: Path) -> None:
    payload = b"PK\x05\x06" + bytes(18)
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    data = _saved(tensor, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(io.BytesIO(data))  # what fooled a zipfile-based sniff
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    assert_same(torch.load(path), ckptd.load(path))
    assert ckptd.inspect(path).format is ckptd.formats.Format.TORCH_LEGACY


def _rezip(raw: bytes, deflate: Any) -> bytes:
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if deflate(info.filename) else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info), compress_type=method)
    return out.getvalue()


@pytest.mark.parametrize("which", ["storages", "everything"])
def test_deflated_records_load_as_torch(tmp_path: Path, which: str) -> None:
    obj = {"w": torch.arange(4096.0).reshape(64, 64), "z": torch.zeros(1000, dtype=torch.int64), "e": torch.ones(0)}
    data = _rezip(_saved(obj), lambda name: which == "everything" or "/data/" in name)
    path = tmp_path / "deflated.pt"
    path.write_bytes(data)
    expected = torch.load(path)
    assert_same(obj, expected)
    for form in (path, data, io.BytesIO(data)):
        assert_same(expected, ckptd.load(form))
    assert_same(expected["z"], ckptd.load(path, tensor_name="z"))
    layout = ckptd.inspect(path)
    assert all(r.compressed_size is not None for r in layout.storages.values() if r.nbytes)


def test_deflated_big_endian_storages(tmp_path: Path) -> None:
    data = _rezip(to_big_endian(_saved(_sample())), lambda name: "/data/" in name)
    assert_same(torch.load(io.BytesIO(data)), ckptd.load(data))


def test_duplicated_member_names_first_wins(tmp_path: Path) -> None:
    buf = io.BytesIO(_saved({"a": torch.arange(4.0)}))
    with zipfile.ZipFile(buf, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("archive/data/0", struct.pack("<4f", 9, 9, 9, 9))
    data = buf.getvalue()
    expected = torch.load(io.BytesIO(data))
    assert_same({"a": torch.arange(4.0)}, expected)
    assert_same(expected, ckptd.load(data))


def _locator_names_disk_1(data: bytes) -> bytes:
    at = data.rfind(b"PK\x06\x07")
    assert at > 0
    return data[: at + 4] + struct.pack("<I", 1) + data[at + 8 :]


def test_zip64_locator_naming_disk_1(tmp_path: Path) -> None:
    data = _locator_names_disk_1(_saved(_sample()))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(data))  # Python's reader refuses it; miniz does not
    path = tmp_path / "disk1.pt"
    path.write_bytes(data)
    assert_same(torch.load(path), ckptd.load(path))


@pytest.mark.parametrize(
    "second",
    [{"b": torch.ones(3, dtype=torch.int64), "c": torch.zeros(2)}, {"b": torch.zeros(2)}],
    ids=["other-layout", "same-layout"],
)
def test_two_archives_back_to_back_as_in_torch(second: dict[str, torch.Tensor]) -> None:
    """miniz finds the *last* end-of-directory record and takes its offsets as they are."""
    data = _saved({"a": torch.arange(5.0)}) + _saved(second)
    _assert_agree(lambda: torch.load(io.BytesIO(data)), lambda: ckptd.load(data))
    start = len(_saved({"a": torch.arange(5.0)}))
    f = io.BytesIO(data)
    f.seek(start)  # from the second one's start, both read the second
    assert_same(second, torch.load(f))
    f.seek(start)
    assert_same(second, ckptd.load(f))


# ---------------------------------------------------------------------------------------
# 7. torch.serialization settings on the load path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_skip_data_leaves_storages_unread(tmp_path: Path, legacy: bool) -> None:
    obj = {"w": torch.full((3, 4), 7.0), "i": torch.arange(5)}
    path = tmp_path / "f.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    with torch.serialization.skip_data():
        expected = torch.load(path)
        for mmap in ((False, True) if not legacy else (False,)):
            got = ckptd.load(path, mmap=mmap)
            for key in obj:
                assert got[key].shape == expected[key].shape and got[key].dtype == expected[key].dtype
                assert got[key].stride() == expected[key].stride()
                assert not torch.equal(got[key], obj[key])  # not read: ckptd's arenas start zeroed
    assert_same(torch.load(path), ckptd.load(path))  # and after the context, read again


class _Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def test_safe_globals_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"p": _Point(3), "t": torch.ones(2)}, path)
    for loader in (torch.load, ckptd.load):
        with pytest.raises(pickle.UnpicklingError):
            loader(path)
    with torch.serialization.safe_globals([_Point]):
        expected = torch.load(path)
        assert_same(expected["t"], ckptd.load(path)["t"])
        assert ckptd.load(path)["p"] == expected["p"]
    torch.serialization.add_safe_globals([_Point])
    try:
        assert ckptd.load(path)["p"] == torch.load(path)["p"]
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    finally:
        torch.serialization.clear_safe_globals()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [f"{__name__}._Point"]


def test_fake_tensor_mode_is_refused_not_answered_differently(tmp_path: Path) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    path = tmp_path / "f.pt"
    torch.save({"w": torch.ones(2)}, path)
    with FakeTensorMode():
        fake = torch.load(path)
        assert type(fake["w"]).__name__ == "FakeTensor"
        with pytest.raises(ckptd.UsageError, match="FakeTensorMode"):
            ckptd.load(path)


@pytest.mark.skipif(torch.serialization.MAP_SHARED is None, reason="mmap flags are POSIX")
def test_mmap_flags_shared_maps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    torch.save({"w": torch.zeros(8)}, path)
    with torch.serialization.set_default_mmap_options(torch.serialization.MAP_SHARED):
        ours = ckptd.load(path, mmap=True)
        theirs = torch.load(path, mmap=True)
        ours["w"].add_(1)  # written through to the file, as torch's MAP_SHARED mapping is
        assert torch.equal(theirs["w"], torch.ones(8))
    assert torch.equal(torch.load(path)["w"], torch.ones(8))


def test_mmap_default_from_torch_config(tmp_path: Path) -> None:
    from torch.utils.serialization import config

    path = tmp_path / "f.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    previous = config.load.mmap
    config.load.mmap = True
    try:
        with pytest.raises(RuntimeError) as texc:
            torch.load(path)
        with pytest.raises(ckptd.UsageError) as cexc:
            ckptd.load(path)
        assert str(texc.value) == str(cexc.value)
    finally:
        config.load.mmap = previous


# ---------------------------------------------------------------------------------------
# what the fuzz test found (see tests/formats/test_fuzz.py)
# ---------------------------------------------------------------------------------------


def _with_pickle(data: bytes, transform: Any) -> bytes:
    """The archive with its data.pkl rewritten (Python's zipfile; stored records)."""
    zin = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            zout.writestr(info.filename, transform(body) if info.filename.endswith("/data.pkl") else body)
    return out.getvalue()


def test_a_storage_declared_twice_with_two_sizes_first_wins() -> None:
    base = torch.arange(4.0)
    data = _saved({"a": base, "b": base[:2]})

    def second_size_2(pkl: bytes) -> bytes:
        first = pkl.index(b"K\x04t")
        at = pkl.index(b"K\x04t", first + 1)
        return pkl[:at] + b"K\x02t" + pkl[at + 3 :]

    changed = _with_pickle(data, second_size_2)
    expected = torch.load(io.BytesIO(changed))
    assert_same({"a": base, "b": base[:2]}, expected)
    assert_same(expected, ckptd.load(changed))


def _rename(data: bytes, old: bytes, new: bytes) -> bytes:
    """Every occurrence of a record name (local header and directory) replaced, same length."""
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


def test_record_names_are_found_ignoring_case_as_miniz_does() -> None:
    data = _rename(_saved({"w": torch.arange(3.0)}), b"archive/data/0", b"archive/DATA/0")
    expected = torch.load(io.BytesIO(data))
    assert_same({"w": torch.arange(3.0)}, expected)
    assert_same(expected, ckptd.load(data))


def test_record_name_not_utf8_fails_as_in_torch() -> None:
    data = _rename(_saved({"w": torch.arange(3.0)}), b"archive/.format_version", b"archive/.format_ver\xffion")
    with pytest.raises(UnicodeDecodeError):
        torch.load(io.BytesIO(data))
    with pytest.raises(ckptd.CheckpointError, match="not UTF-8"):
        ckptd.load(data)


def test_record_name_bytes_after_a_nul_are_not_decoded_as_in_torch() -> None:
    """miniz gives torch each name as a C string, so bytes past a NUL are never decoded (found by the fuzzer)."""
    data = _rename(_saved({"w": torch.arange(3.0)}), b"archive/.format_version", b"archive/.format\x00\xff\xfersion")
    expected = torch.load(io.BytesIO(data))
    assert_same({"w": torch.arange(3.0)}, expected)
    assert_same(expected, ckptd.load(data))


def test_legacy_header_is_unpickled_as_torch_does() -> None:
    """torch.load unpickles a legacy file's system-info pickle too: weights_only refuses what it holds."""
    data = _saved({"w": torch.arange(3.0)}, _use_new_zipfile_serialization=False)
    f = io.BytesIO(data)
    pickle.load(f)
    pickle.load(f)
    start = f.tell()
    pickle.load(f)
    hostile = data[:start] + pickle.dumps(print, protocol=2) + data[f.tell() :]
    with pytest.raises(pickle.UnpicklingError) as texc:
        torch.load(io.BytesIO(hostile))
    with pytest.raises(ckptd.UnpicklingError) as cexc:
        ckptd.load(hostile)
    assert "GLOBAL print" in str(texc.value) and "GLOBAL print" in str(cexc.value)
    assert_same(torch.load(io.BytesIO(hostile), weights_only=False), ckptd.load(hostile, weights_only=False))


def test_legacy_tensor_overrunning_its_storage_fails_as_runtime_error() -> None:
    data = bytearray(_saved({"w": torch.arange(4.0)}, _use_new_zipfile_serialization=False))
    at = data.index(b"K\x04\x85")  # the tensor's size (4,) -> (5,)
    data[at + 1] = 5
    with pytest.raises(RuntimeError, match="wrong byte size"):
        torch.load(io.BytesIO(bytes(data)))
    with pytest.raises(ckptd.StorageMismatchError) as cexc:
        ckptd.load(bytes(data))
    assert isinstance(cexc.value, RuntimeError)


def test_unknown_pickle_protocol_number_ignored_as_by_torchs_weights_only_unpickler() -> None:
    data = bytearray(_saved({"w": torch.arange(3.0)}, _use_new_zipfile_serialization=False))
    assert data[:2] == b"\x80\x02"
    data[1] = 79
    with pytest.warns(UserWarning, match="protocol 79"):
        expected = torch.load(io.BytesIO(bytes(data)))
    with pytest.warns(UserWarning, match="protocol 79"):
        assert_same(expected, ckptd.load(bytes(data)))
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        torch.load(io.BytesIO(bytes(data)), weights_only=False)
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        ckptd.load(bytes(data), weights_only=False)
