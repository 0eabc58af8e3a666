"""read_layout on torch.save zip files and TorchScript archives, checked against torch.load.

Every storage offset is verified by reading ``nbytes`` at ``StorageRecord.offset`` with a
plain file read and comparing with the bytes of the storage torch.load gives back.
"""

from __future__ import annotations

import collections
import contextlib
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.formats import (
    CheckpointError,
    inflate_storage,
    CheckpointNotFoundError,
    Format,
    UnsupportedFormatError,
    open_source,
    read_layout,
    sniff,
)
from ckptd_testlib import (
    assert_layout_matches,
    assert_layout_storages,
    file_bytes,
    layout_of,
    tensor_storage_bytes,
)

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _rebuild(
    raw: bytes,
    *,
    top: str | None = None,
    force_zip64: bool = False,
    transform: Callable[[str, bytes], bytes] | None = None,
) -> bytes:
    """Rewrite a torch zip with Python's zipfile (stored records), optionally renaming the top dir."""
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            old_top, rest = info.filename.split("/", 1)
            data = zin.read(info)
            if transform is not None:
                data = transform(rest, data)
            with zout.open(f"{top or old_top}/{rest}", "w", force_zip64=force_zip64) as f:
                f.write(data)
    return out.getvalue()


def _full_zip64(records: list[tuple[str, bytes]]) -> bytes:
    """A stored zip where *every* size/offset field goes through zip64 (local, central, end records).

    Python's zipfile only writes zip64 central entries and end records past 4 GiB; this
    writer forces them all so the reader's zip64 path is exercised on a small file.
    """
    out = bytearray()
    central = bytearray()
    for name, data in records:
        encoded = name.encode()
        crc = zlib.crc32(data)
        offset = len(out)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
            len(encoded), len(local_extra),
        )
        out += encoded + local_extra + data
        central_extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
            len(encoded), len(central_extra), 0, 0, 0, 0, 0xFFFFFFFF,
        )
        central += encoded + central_extra
    cd_offset = len(out)
    out += central
    eocd64_offset = len(out)
    n = len(records)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64_offset, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


def _records_of(raw: bytes, top: str | None = None) -> list[tuple[str, bytes]]:
    zin = zipfile.ZipFile(io.BytesIO(raw))
    result = []
    for info in zin.infolist():
        old_top, rest = info.filename.split("/", 1)
        result.append((f"{top or old_top}/{rest}", zin.read(info)))
    return result


@contextlib.contextmanager
def _location_tags(tags: dict[int, str]) -> Iterator[None]:
    """Make torch.save tag the storages at the given data pointers with the given locations."""
    registry = torch.serialization._package_registry
    saved = list(registry)

    def tagger(storage: Any) -> str | None:
        return tags.get(storage.data_ptr())

    registry.insert(0, (0, tagger, lambda storage, location: None))
    try:
        yield
    finally:
        registry[:] = saved


def _sample() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    return {
        "w": base,
        "t": base.t(),  # shares base's storage, transposed strides
        "row": base[2],  # storage offset 12
        "col": base[:, 1],  # stride (6,)
        "nested": {"a": torch.arange(7, dtype=torch.int64), "list": [torch.ones(2, 2), torch.zeros(0)]},
        "scalar": torch.tensor(2.5),
        "half": torch.randn(3, generator=gen).half(),
    }


# ---------------------------------------------------------------------------------------
# plain torch.save zips
# ---------------------------------------------------------------------------------------


def test_offsets_names_strides_match_torch_load(tmp_path: Path) -> None:
    path = _save(_sample(), tmp_path / "sample.pt")
    layout = layout_of(path)
    assert layout.format is Format.TORCH_ZIP
    assert layout.name == str(path)
    assert layout.size == path.stat().st_size
    assert layout.byteorder == "little"
    assert layout.prefix == "sample"
    loaded = torch.load(path, weights_only=True)
    assert_layout_matches(path, layout, loaded)
    # four views of one tensor: one storage, not four
    entries = layout.tensor_map()
    assert len({entries[n].storage_keys for n in ("w", "t", "row", "col")}) == 1
    assert entries["t"].stride == (1, 6)
    assert entries["row"].storage_offset == 12
    # every storage the file holds appears once
    assert len(layout.storages) == len({e.storage_keys[0] for e in layout.tensors})


def test_every_storage_record_read_back_equals_torch_storage(tmp_path: Path) -> None:
    obj = {f"t{i}": torch.arange(i * 10, dtype=torch.float32) + i for i in range(1, 9)}
    path = _save(obj, tmp_path / "many.pt")
    layout = layout_of(path)
    loaded = torch.load(path, weights_only=True)
    assert len(layout.storages) == 8
    by_key = {layout.tensor_map()[name].storage_keys[0]: tensor for name, tensor in loaded.items()}
    for key, record in layout.storages.items():
        assert file_bytes(path, record.offset, record.nbytes) == tensor_storage_bytes(by_key[key])
    # distinct, non-overlapping spans
    spans = sorted((r.offset, r.offset + r.nbytes) for r in layout.storages.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


_DTYPE_TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "float64": lambda: torch.linspace(-2, 2, 5, dtype=torch.float64),
    "float32": lambda: torch.linspace(-2, 2, 6),
    "float16": lambda: torch.linspace(-2, 2, 7).half(),
    "bfloat16": lambda: torch.linspace(-2, 2, 8).bfloat16(),
    "int64": lambda: torch.arange(-3, 4, dtype=torch.int64),
    "int32": lambda: torch.arange(-4, 4, dtype=torch.int32),
    "int16": lambda: torch.arange(-5, 5, dtype=torch.int16),
    "int8": lambda: torch.arange(-6, 5, dtype=torch.int8),
    "uint8": lambda: torch.arange(0, 250, 17, dtype=torch.uint8),
    "bool": lambda: torch.tensor([True, False, True, True]),
    "complex64": lambda: torch.complex(torch.arange(3.0), -torch.arange(3.0)),
    "complex128": lambda: torch.complex(torch.arange(3.0), torch.ones(3)).to(torch.complex128),
    # dtypes torch.save writes with _rebuild_tensor_v3 (an UntypedStorage plus the dtype)
    "complex32": lambda: torch.arange(6, dtype=torch.float16).view(torch.complex32),
    "float8_e4m3fn": lambda: torch.linspace(-2, 2, 9).to(torch.float8_e4m3fn),
    "float8_e5m2": lambda: torch.linspace(-2, 2, 9).to(torch.float8_e5m2),
    "uint16": lambda: torch.arange(0, 6, dtype=torch.int32).to(torch.uint16),
    "uint32": lambda: torch.arange(0, 6, dtype=torch.int64).to(torch.uint32),
    "uint64": lambda: torch.arange(0, 6, dtype=torch.int64).to(torch.uint64),
}
_V3_DTYPES = {"complex32", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"}
# torch.load of a complex32 tensor warns that ComplexHalf is experimental (torch's warning, not ckptd's)
_COMPLEX_HALF_OK = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")


@_COMPLEX_HALF_OK
@pytest.mark.parametrize("dtype_name", sorted(_DTYPE_TENSORS))
def test_dtype_storage_bytes(tmp_path: Path, dtype_name: str) -> None:
    tensor = _DTYPE_TENSORS[dtype_name]()
    assert str(tensor.dtype) == f"torch.{dtype_name}"
    path = _save({"x": tensor, "pad": torch.ones(1)}, tmp_path / f"{dtype_name}.pt")
    layout = layout_of(path)
    record = layout.storages[layout.tensor_map()["x"].storage_keys[0]]
    # v3 storages are untyped (bytes); the others carry the tensor's dtype
    expected_dtype = torch.uint8 if dtype_name in _V3_DTYPES else tensor.dtype
    assert record.dtype == expected_dtype
    assert record.nbytes == tensor.numel() * tensor.element_size()
    loaded = torch.load(path, weights_only=True)
    assert loaded["x"].dtype == tensor.dtype
    assert_layout_storages(path, layout, loaded)


@_COMPLEX_HALF_OK
@pytest.mark.parametrize("dtype_name", sorted(_DTYPE_TENSORS))
def test_dtype_tensor_entry(tmp_path: Path, dtype_name: str) -> None:
    tensor = _DTYPE_TENSORS[dtype_name]().reshape(-1, 1)[1:]  # 2-d, with a storage offset
    path = _save({"x": tensor, "pad": torch.ones(1)}, tmp_path / f"{dtype_name}.pt")
    layout = layout_of(path)
    entry = layout.tensor_map()["x"]
    assert entry.dtype == tensor.dtype
    assert entry.shape == tuple(tensor.shape)
    assert entry.stride == tuple(tensor.stride())
    assert entry.storage_offset == 1
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


@_COMPLEX_HALF_OK
def test_all_dtypes_in_one_file(tmp_path: Path) -> None:
    obj = {name: make() for name, make in _DTYPE_TENSORS.items()}
    path = _save(obj, tmp_path / "all.pt")
    layout = layout_of(path)
    assert len(layout.storages) == len(obj)
    assert_layout_storages(path, layout, torch.load(path, weights_only=True))
    entries = layout.tensor_map()
    for name, tensor in obj.items():
        assert entries[name].dtype == tensor.dtype, name
        assert entries[name].shape == tuple(tensor.shape), name


def test_location_tags_match_what_torch_load_sees(tmp_path: Path) -> None:
    a, b, c = torch.arange(3.0), torch.arange(5.0), torch.arange(4, dtype=torch.int16)
    with _location_tags({a.data_ptr(): "cuda:1", b.data_ptr(): "cuda:0"}):
        path = _save({"a": a, "b": b, "c": c}, tmp_path / "tags.pt")
    seen: list[str] = []

    def record(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    loaded = torch.load(path, map_location=record, weights_only=True)
    assert sorted(seen) == ["cpu", "cuda:0", "cuda:1"]
    layout = layout_of(path)
    entries = layout.tensor_map()
    assert entries["a"].location == "cuda:1"
    assert entries["b"].location == "cuda:0"
    assert entries["c"].location == "cpu"
    assert sorted(r.location for r in layout.storages.values()) == sorted(seen)
    for name in "abc":
        record_ = layout.storages[entries[name].storage_keys[0]]
        assert record_.location == entries[name].location
        assert file_bytes(path, record_.offset, record_.nbytes) == tensor_storage_bytes(loaded[name])


def test_crc32_disabled(tmp_path: Path) -> None:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = _save(_sample(), tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(previous)
    assert torch.serialization.get_crc32_options() == previous
    # torch wrote zero CRCs: the archive really is one a CRC-checking reader would refuse
    crcs = [info.CRC for info in zipfile.ZipFile(path).infolist() if "/data/" in info.filename]
    assert crcs and all(crc == 0 for crc in crcs)
    layout = layout_of(path)
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_prefixed_archive(tmp_path: Path) -> None:
    plain = _save(_sample(), tmp_path / "plain.pt")
    prefix = b"#!junk\n" * 100
    path = tmp_path / "prefixed.pt"
    path.write_bytes(prefix + plain.read_bytes())
    # torch.load looks for the zip magic at byte 0: it does not read a prefixed archive.
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    # ckptd finds the directory from the end; every offset accounts for the prefix.
    plain_layout = layout_of(plain)
    layout = layout_of(path)
    assert layout.format is Format.TORCH_ZIP
    assert layout.size == plain_layout.size + len(prefix)
    assert set(layout.storages) == set(plain_layout.storages)
    for key, record in layout.storages.items():
        assert record.offset == plain_layout.storages[key].offset + len(prefix)
        assert record.nbytes == plain_layout.storages[key].nbytes
    for name, (offset, size) in plain_layout.records.items():
        assert layout.records[name] == (offset + len(prefix), size)
    assert_layout_matches(path, layout, torch.load(plain, weights_only=True))


def test_zip64_local_headers_from_python_zipfile(tmp_path: Path) -> None:
    raw = _save(_sample(), tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "zip64.pt"
    path.write_bytes(_rebuild(raw, force_zip64=True))
    # the local headers carry a zip64 extra field the central directory does not
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    header = file_bytes(path, info.header_offset, 30)
    assert struct.unpack("<H", header[28:30])[0] >= 20
    loaded = torch.load(path, weights_only=True)
    layout = layout_of(path)
    assert_layout_matches(path, layout, loaded)


def test_zip64_everywhere(tmp_path: Path) -> None:
    raw = _save(_sample(), tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "full64.pt"
    path.write_bytes(_full_zip64(_records_of(raw)))
    with zipfile.ZipFile(path) as archive:  # a valid archive for Python's reader
        assert archive.testzip() is None
    assert file_bytes(path, path.stat().st_size - 22, 4) == b"PK\x05\x06"
    assert b"PK\x06\x06" in path.read_bytes()
    loaded = torch.load(path, weights_only=True)
    layout = layout_of(path)
    assert layout.format is Format.TORCH_ZIP
    assert_layout_matches(path, layout, loaded)


@pytest.mark.parametrize("top", ["x", "some dir with spaces", "überarchiv", "archive.pt", "a" * 200])
def test_archive_top_dir_name_is_anything(tmp_path: Path, top: str) -> None:
    raw = _save(_sample(), tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "renamed.pt"
    path.write_bytes(_rebuild(raw, top=top))
    loaded = torch.load(path, weights_only=True)
    layout = layout_of(path)
    assert layout.prefix == top
    assert f"{top}/data.pkl" in layout.records
    assert_layout_matches(path, layout, loaded)


def test_byteorder_big_reported(tmp_path: Path) -> None:
    raw = _save({"x": torch.arange(4, dtype=torch.int32)}, tmp_path / "orig.pt").read_bytes()
    little = layout_of(tmp_path / "orig.pt")
    assert little.byteorder == "little"

    def swap(name: str, data: bytes) -> bytes:
        if name == "byteorder":
            assert data == b"little"
            return b"big"
        if name.startswith("data/"):
            return _swap32(data)
        return data

    path = tmp_path / "big.pt"
    path.write_bytes(_rebuild(raw, transform=swap))
    # torch reads the big-endian file back to the same values
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(4, dtype=torch.int32))
    layout = layout_of(path)
    assert layout.byteorder == "big"
    record = layout.storages[layout.tensor_map()["x"].storage_keys[0]]
    assert file_bytes(path, record.offset, record.nbytes) == struct.pack(">4i", 0, 1, 2, 3)


def _swap32(data: bytes) -> bytes:
    return b"".join(data[i : i + 4][::-1] for i in range(0, len(data), 4))


def test_missing_byteorder_record_means_little(tmp_path: Path) -> None:
    raw = _save({"x": torch.ones(2)}, tmp_path / "orig.pt").read_bytes()
    records = [(n, d) for n, d in _records_of(raw) if not n.endswith("/byteorder")]
    path = tmp_path / "nobo.pt"
    path.write_bytes(_full_zip64(records))
    assert layout_of(path).byteorder == "little"


def test_bad_byteorder_record_is_checkpoint_error(tmp_path: Path) -> None:
    raw = _save({"x": torch.ones(2)}, tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "badbo.pt"
    path.write_bytes(_rebuild(raw, transform=lambda n, d: b"middle" if n == "byteorder" else d))
    with pytest.raises(CheckpointError, match="badbo.pt"):
        layout_of(path)


def test_storage_record_shorter_than_table_is_checkpoint_error(tmp_path: Path) -> None:
    raw = _save({"x": torch.ones(8)}, tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "short.pt"
    path.write_bytes(_rebuild(raw, transform=lambda n, d: d[:5] if n.startswith("data/") else d))
    with pytest.raises(CheckpointError, match="short.pt"):
        layout_of(path)


def test_missing_storage_record_is_checkpoint_error(tmp_path: Path) -> None:
    raw = _save({"x": torch.ones(8)}, tmp_path / "orig.pt").read_bytes()
    records = [(n, d) for n, d in _records_of(raw) if "/data/" not in n]
    path = tmp_path / "nodata.pt"
    path.write_bytes(_full_zip64(records))
    with pytest.raises(CheckpointError, match="nodata.pt"):
        layout_of(path)


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.9, 0.999])
def test_truncated_zip_is_checkpoint_error(tmp_path: Path, cut: float) -> None:
    raw = _save(_sample(), tmp_path / "orig.pt").read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        with open_source(str(path)) as source:
            read_layout(source)


def test_input_forms_agree(tmp_path: Path) -> None:
    path = _save(_sample(), tmp_path / "forms.pt")
    raw = path.read_bytes()
    by_path = layout_of(path)
    with open_source(raw) as source:
        by_bytes = read_layout(source)
    with open(path, "rb") as f, open_source(f) as source:
        by_file = read_layout(source)
    with open_source(io.BytesIO(raw)) as source:
        by_bytesio = read_layout(source)
    for other in (by_bytes, by_file, by_bytesio):
        assert other.storages == by_path.storages
        assert other.tensors == by_path.tensors


# ---------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class _Scripted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(3, 2)
        self.shared = _Inner()
        self.alias = self.shared  # one submodule under two attribute names
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x) + self.shared(x) + self.alias(x)


def test_torchscript_archive(tmp_path: Path) -> None:
    module = torch.jit.script(_Scripted())
    path = tmp_path / "scripted.pt"
    torch.jit.save(module, str(path))
    with open_source(str(path)) as source:
        assert sniff(source) is Format.TORCH_ZIP  # the container; read_layout tells TorchScript apart
        layout = read_layout(source)
    assert layout.format is Format.TORCHSCRIPT
    reloaded = torch.jit.load(str(path))
    expected = dict(reloaded.state_dict())
    assert {"l.weight", "l.bias", "shared.weight", "alias.weight", "steps"} <= set(expected)
    entries = layout.tensor_map()
    assert set(entries) == set(expected)
    assert entries["shared.weight"].storage_keys == entries["alias.weight"].storage_keys
    assert entries["l.weight"].shape == (2, 3)
    assert entries["l.bias"].shape == (2,)
    assert entries["steps"].dtype == torch.int64
    for name, tensor in expected.items():
        entry = entries[name]
        assert entry.dtype == tensor.dtype, name
        assert entry.shape == tuple(tensor.shape), name
        assert entry.stride == tuple(tensor.stride()), name
        record = layout.storages[entry.storage_keys[0]]
        assert file_bytes(path, record.offset, record.nbytes) == tensor_storage_bytes(tensor), name
    # the shared submodule's weight is stored once
    assert len(layout.storages) == len({e.storage_keys for e in layout.tensors})
    assert collections.Counter(e.storage_keys for e in layout.tensors).most_common(1)[0][1] == 2


# ---------------------------------------------------------------------------------------
# dispatch: ckptd.formats.sniff / read_layout on things that are not checkpoints
# ---------------------------------------------------------------------------------------


def _tar_bytes(tmp_path: Path) -> bytes:
    import tarfile

    member = tmp_path / "member.txt"
    member.write_text("hello\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(member, arcname="member.txt")
    return buf.getvalue()


def _not_checkpoints(tmp_path: Path) -> dict[str, bytes]:
    return {
        "empty": b"",
        "one-byte": b"\x00",
        "garbage": bytes(range(256)) * 8,
        "zeros": b"\x00" * 4096,
        "text": b"Just some text.\nNot a checkpoint at all.\n" * 20,
        "json": b'{"weight": [1, 2, 3]}\n',
        "tar": _tar_bytes(tmp_path),
        "zip-magic-only": b"PK\x03\x04" + b"\x00" * 100,
        "safetensors-lookalike-short": b"\x10\x00\x00\x00\x00\x00\x00\x00{",
    }


@pytest.mark.parametrize(
    "kind", ["empty", "one-byte", "garbage", "zeros", "text", "json", "tar", "zip-magic-only", "safetensors-lookalike-short"]
)
def test_not_a_checkpoint_names_the_file(tmp_path: Path, kind: str) -> None:
    data = _not_checkpoints(tmp_path)[kind]
    path = tmp_path / f"input-{kind}.bin"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        with open_source(str(path)) as source:
            read_layout(source)
    assert str(path) in str(info.value)
    assert info.value.name == str(path)
    # the same from bytes: the name is the placeholder
    with pytest.raises(CheckpointError, match="<bytes>"):
        with open_source(data) as source:
            read_layout(source)


@pytest.mark.parametrize("kind", ["empty", "garbage", "text", "zeros", "one-byte"])
def test_sniff_rejects_non_checkpoints(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"sniff-{kind}.bin"
    path.write_bytes(_not_checkpoints(tmp_path)[kind])
    with pytest.raises(CheckpointError, match=f"sniff-{kind}.bin"):
        with open_source(str(path)) as source:
            sniff(source)


def test_empty_file_message(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as info:
        with open_source(str(path)) as source:
            sniff(source)
    assert info.value.name == str(path)


def test_text_file_message_says_what_it_expected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello world, this is text\n")
    with pytest.raises(CheckpointError, match="notes.txt") as info:
        with open_source(str(path)) as source:
            read_layout(source)
    assert "torch.save" in str(info.value)


def test_tar_is_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "old.tar"
    path.write_bytes(_tar_bytes(tmp_path))
    with open_source(str(path)) as source:
        assert source.read(257, 5) == b"ustar"
        with pytest.raises(UnsupportedFormatError, match="old.tar"):
            read_layout(source)


def test_zip_without_torch_records(tmp_path: Path) -> None:
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hi")
        archive.writestr("dir/other.txt", "there")
    with pytest.raises(CheckpointError, match="plain.zip"):
        with open_source(str(path)) as source:
            read_layout(source)


def test_zip_with_deflated_records_reads_like_miniz(tmp_path: Path) -> None:
    """torch (miniz) inflates deflated records; their storages' bytes come out equal."""
    raw = _save({"x": torch.arange(300.0), "y": torch.zeros(50, dtype=torch.int64)}, tmp_path / "orig.pt").read_bytes()
    zin = zipfile.ZipFile(io.BytesIO(raw))
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    loaded = torch.load(path, weights_only=True)
    with open_source(str(path)) as source:
        layout = read_layout(source)
        for name, tensor in loaded.items():
            record = layout.storages[layout.tensor_map()[name].storage_keys[0]]
            assert record.compressed_size is not None and record.compressed_size < record.nbytes
            assert bytes(inflate_storage(source, record)) == tensor_storage_bytes(tensor)
    assert layout.byteorder == "little" and layout.byteorder_recorded


def test_zip_with_unknown_compression_method_is_checkpoint_error(tmp_path: Path) -> None:
    raw = _save({"x": torch.ones(3)}, tmp_path / "orig.pt").read_bytes()
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_BZIP2) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    path = tmp_path / "bzip2.pt"
    path.write_bytes(out.getvalue())
    with pytest.raises(Exception):  # noqa: B017,PT011 - miniz has no bzip2
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="compression method 12"):
        layout_of(path)


def test_duplicate_record_names_first_wins(tmp_path: Path) -> None:
    buf = io.BytesIO(_save({"x": torch.arange(4.0)}, tmp_path / "orig.pt").read_bytes())
    with zipfile.ZipFile(buf, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("orig/data/0", struct.pack("<4f", 9, 9, 9, 9))
    path = tmp_path / "dup.pt"
    path.write_bytes(buf.getvalue())
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["x"], torch.arange(4.0))  # torch (miniz) takes the first
    assert_layout_matches(path, layout_of(path), loaded)


def test_zip64_locator_naming_disk_1(tmp_path: Path) -> None:
    raw = bytearray(_save(_sample(), tmp_path / "orig.pt").read_bytes())
    at = raw.rfind(b"PK\x06\x07")
    raw[at + 4 : at + 8] = struct.pack("<I", 1)
    path = tmp_path / "disk1.pt"
    path.write_bytes(raw)
    with pytest.raises(zipfile.BadZipFile, match="span multiple disks"):
        zipfile.ZipFile(path)
    assert_layout_matches(path, layout_of(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("disks", [2, 0])
def test_zip64_locator_counting_other_than_one_disk_is_refused_as_by_torch(tmp_path: Path, disks: int) -> None:
    raw = bytearray(_save(_sample(), tmp_path / "orig.pt").read_bytes())
    at = raw.rfind(b"PK\x06\x07")
    raw[at + 16 : at + 20] = struct.pack("<I", disks)
    path = tmp_path / "disks.pt"
    path.write_bytes(raw)
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="disks"):
        layout_of(path)


def test_sniffed_as_zip_only_by_its_local_header(tmp_path: Path) -> None:
    """A file starting with PK\\x03\\x04 is a zip; an end-of-directory record elsewhere proves nothing."""
    with open_source(b"PK\x03\x04" + bytes(40)) as source:
        assert sniff(source) is Format.TORCH_ZIP
    with open_source(b"\x80\x02" + b"PK\x05\x06" + bytes(30)) as source:
        assert sniff(source) is Format.TORCH_LEGACY


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        open_source(str(path))
    with pytest.raises(FileNotFoundError):
        open_source(str(path))


@pytest.mark.parametrize("record", ["version", ".data/serialization_id", ".storage_alignment"])
def test_records_torch_reads_first_fail_as_in_torch_when_broken(tmp_path: Path, record: str) -> None:
    """torch reads these small records before the pickle: a broken local header fails the load there."""
    raw = bytearray(_save({"x": torch.ones(2)}, tmp_path / "orig.pt").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        info = archive.getinfo(f"orig/{record}")
    raw[info.header_offset : info.header_offset + 4] = b"XXXX"
    path = tmp_path / "broken.pt"
    path.write_bytes(raw)
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match="no local header"):
        layout_of(path)
