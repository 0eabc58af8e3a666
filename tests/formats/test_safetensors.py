"""read_safetensors_layout against files written by the real safetensors library, and hostile headers."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptd.formats._errors import CheckpointError, UnsupportedFormatError
from ckptd.formats._layout import Format, Layout
from ckptd.formats._safetensors import MAX_HEADER_SIZE, SAFETENSORS_DTYPES, read_safetensors_layout
from ckptd.formats._source import open_source


def _read_path(path: Path) -> Layout:
    with open_source(str(path)) as source:
        return read_safetensors_layout(source)


def _raw_file(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors file by hand: ``header`` is JSON-encoded unless already bytes."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(encoded) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + encoded + data)
    return path


def _as_bytes(tensor: torch.Tensor) -> bytes:
    # reshape(-1) first: view(uint8) refuses 0-d tensors of wider dtypes.
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, generator=generator)
    tensors = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(3, 2),
        "i32": torch.arange(-4, 4, dtype=torch.int32),
        "i16": torch.arange(-2, 3, dtype=torch.int16),
        "i8": torch.arange(-5, 5, dtype=torch.int8).reshape(2, 5),
        "u8": torch.arange(0, 250, 25, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8_e4m3": base.to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "u16": torch.arange(0, 7, dtype=torch.int32).to(torch.uint16),
        "u32": torch.arange(0, 5, dtype=torch.int64).to(torch.uint32),
        "u64": torch.arange(0, 3, dtype=torch.int64).to(torch.uint64),
        "c64": torch.complex(base, -base),
        "scalar": torch.tensor(3.5),
        "scalar_i8": torch.tensor(-7, dtype=torch.int8),
        "empty": torch.zeros(0),
        "empty_3d": torch.zeros(2, 0, 3, dtype=torch.float16),
        "layers.10.weight": torch.ones(4, 1),
        "layers.2.weight": torch.full((1, 4), 2.0),
    }
    if hasattr(torch, "float8_e8m0fnu"):
        tensors["f8_e8m0"] = torch.tensor([1.0, 2.0, 0.5]).to(torch.float8_e8m0fnu)
    return tensors


@pytest.fixture
def real_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _all_dtype_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "ümlaut ✓"})
    return path, tensors


def test_layout_matches_real_file(real_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, originals = real_file
    layout = _read_path(path)
    loaded = load_file(str(path))
    raw = path.read_bytes()
    assert layout.format is Format.SAFETENSORS
    assert layout.name == str(path) and layout.size == len(raw)
    assert set(layout.tensor_map()) == set(loaded) == set(originals)
    for entry in layout.tensors:
        tensor = loaded[entry.name]
        record = layout.storages[entry.name]
        assert entry.path == (entry.name,) and entry.storage_keys == (entry.name,)
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        assert entry.stride == tensor.stride() and entry.storage_offset == 0
        assert (record.dtype, record.numel, record.location) == (tensor.dtype, tensor.numel(), "cpu")
        on_disk = raw[record.offset : record.offset + record.nbytes]
        assert on_disk == _as_bytes(tensor) == _as_bytes(originals[entry.name])


def test_every_listed_dtype_is_covered(real_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = real_file
    found = {entry.dtype for entry in _read_path(path).tensors}
    # The FNUZ variants are mapped but save_file is not exercised for them here.
    expected = {dtype for name, dtype in SAFETENSORS_DTYPES.items() if "FNUZ" not in name}
    assert expected <= found


def test_fnuz_dtypes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "fnuz.safetensors"
    tensors = {
        "a": torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fnuz),
        "b": torch.tensor([0.5]).to(torch.float8_e5m2fnuz),
    }
    save_file(tensors, str(path))
    layout = _read_path(path)
    assert {e.name: e.dtype for e in layout.tensors} == {k: v.dtype for k, v in tensors.items()}


def test_metadata_is_read(real_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = real_file
    assert dict(_read_path(path).metadata) == {"format": "pt", "note": "ümlaut ✓"}


def test_no_metadata_gives_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    assert dict(_read_path(path).metadata) == {}


def test_null_metadata_is_accepted(tmp_path: Path) -> None:
    header = {"__metadata__": None, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    layout = _read_path(_raw_file(tmp_path / "nullmeta.safetensors", header, bytes(4)))
    assert dict(layout.metadata) == {} and [e.name for e in layout.tensors] == ["w"]


def test_order_matches_load_file(tmp_path: Path) -> None:
    path = tmp_path / "order.safetensors"
    tensors = {
        "zeta": torch.zeros(3),
        "alpha": torch.ones(2, dtype=torch.float64),
        "layer.10.w": torch.ones(1),
        "layer.2.w": torch.ones(5, dtype=torch.int8),
        "B": torch.ones(1, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path))
    names = [entry.name for entry in _read_path(path).tensors]
    assert names == list(load_file(str(path)))
    # Not simply sorted by name: load_file goes by data offset.
    assert names != sorted(names)


def test_order_is_by_data_offsets_in_hand_written_file(tmp_path: Path) -> None:
    header = {
        "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "z_empty": {"dtype": "F32", "shape": [0], "data_offsets": [3, 3]},
        "a_empty": {"dtype": "F32", "shape": [0, 2], "data_offsets": [3, 3]},
    }
    path = _raw_file(tmp_path / "hand.safetensors", header, b"\x01\x02\x03\x04\x05")
    layout = _read_path(path)
    # Zero-size tensors sharing an offset are legal; ties go by name.
    assert [entry.name for entry in layout.tensors] == ["a", "a_empty", "z_empty", "b"]
    assert set(load_file(str(path))) == set(layout.tensor_map())
    data_start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert layout.storages["b"].offset == data_start + 3
    assert path.read_bytes()[layout.storages["b"].offset :][:2] == b"\x04\x05"


def test_scalars_and_empty_tensors(real_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = real_file
    tensors = _read_path(path).tensor_map()
    assert (tensors["scalar"].shape, tensors["scalar"].stride, tensors["scalar"].nbytes) == ((), (), 4)
    assert (tensors["empty"].shape, tensors["empty"].nbytes) == ((0,), 0)
    assert (tensors["empty_3d"].shape, tensors["empty_3d"].stride) == ((2, 0, 3), (3, 3, 1))


def test_zero_size_tensor_with_large_dims(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2**40, 0, 3], "data_offsets": [0, 0]}}
    path = _raw_file(tmp_path / "wide-empty.safetensors", header)
    entry = _read_path(path).tensors[0]
    assert (entry.shape, entry.nbytes) == ((2**40, 0, 3), 0)
    assert entry.stride == torch.empty(entry.shape).stride()
    assert load_file(str(path))["w"].shape == entry.shape


def test_empty_header_object(tmp_path: Path) -> None:
    layout = _read_path(_raw_file(tmp_path / "none.safetensors", {}))
    assert layout.tensors == () and dict(layout.storages) == {}


@pytest.mark.parametrize("wrap", [bytes, io.BytesIO], ids=["bytes", "bytesio"])
def test_in_memory_sources(real_file: tuple[Path, dict[str, torch.Tensor]], wrap: Any) -> None:
    path, _ = real_file
    from_path = _read_path(path)
    with open_source(wrap(path.read_bytes())) as source:
        from_memory = read_safetensors_layout(source)
    assert from_memory.tensors == from_path.tensors
    assert dict(from_memory.storages) == dict(from_path.storages)


def test_header_padding_is_tolerated(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}).encode() + b"     "
    layout = _read_path(_raw_file(tmp_path / "pad.safetensors", header, b"\x07\x08"))
    assert layout.storages["w"].offset == 8 + len(header)


def test_unknown_extra_fields_are_ignored_like_safetensors(tmp_path: Path) -> None:
    header = {"w": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1], "extra": [1, 2]}}
    path = _raw_file(tmp_path / "extra.safetensors", header, b"\x01")
    assert list(load_file(str(path))) == [entry.name for entry in _read_path(path).tensors]


# --- hostile input ------------------------------------------------------------------------

_F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

_BAD_HEADERS: dict[str, tuple[Any, bytes, str]] = {
    "bad_utf8": (b'{"\xff": 1}', b"", "UTF-8"),
    "bad_json": (b'{"w": {"dtype": ', b"", "not valid JSON"),
    "trailing_nul": (json.dumps({"w": _F32_2}).encode() + b"\0", bytes(8), "not valid JSON"),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON"),
    "json_list": ([1, 2], b"", "not an object"),
    "json_string": ("hello", b"", "not an object"),
    "json_number": (5, b"", "not an object"),
    "duplicate_key": (
        b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
        bytes(2),
        "twice",
    ),
    "entry_not_object": ({"w": [1, 2]}, b"", "not an object"),
    "missing_dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "'dtype'"),
    "missing_shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "'shape'"),
    "missing_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "'data_offsets'"),
    "dtype_not_string": ({"w": {**_F32_2, "dtype": 4}}, bytes(8), "dtype"),
    "shape_not_list": ({"w": {**_F32_2, "shape": 2}}, bytes(8), "not a list"),
    "shape_float": ({"w": {**_F32_2, "shape": [2.0]}}, bytes(8), "not an integer"),
    "shape_bool": ({"w": {**_F32_2, "shape": [True, 2]}}, bytes(8), "not an integer"),
    "shape_string": ({"w": {**_F32_2, "shape": ["2"]}}, bytes(8), "not an integer"),
    "shape_negative": ({"w": {**_F32_2, "shape": [-2]}}, bytes(8), "negative"),
    "offsets_three": ({"w": {**_F32_2, "data_offsets": [0, 4, 8]}}, bytes(8), "[begin, end]"),
    "offsets_one": ({"w": {**_F32_2, "data_offsets": [8]}}, bytes(8), "[begin, end]"),
    "offsets_negative": ({"w": {**_F32_2, "data_offsets": [-8, 0]}}, bytes(8), "negative"),
    "offsets_reversed": ({"w": {**_F32_2, "data_offsets": [8, 0]}}, bytes(8), "begin after end"),
    "offsets_past_file": ({"w": {**_F32_2, "data_offsets": [4, 12]}}, bytes(8), "past the data section"),
    "truncated_data": ({"w": _F32_2}, bytes(5), "past the data section"),
    "size_too_small": ({"w": {**_F32_2, "shape": [3]}}, bytes(8), "needs 12 bytes"),
    "size_too_large": ({"w": {**_F32_2, "shape": [1]}}, bytes(8), "needs 4 bytes"),
    "huge_shape": ({"w": {**_F32_2, "shape": [2**62] * 10_000}}, bytes(8), "overflows"),
    "dim_past_int64": ({"w": {**_F32_2, "shape": [2**63], "data_offsets": [0, 0]}}, b"", "overflows"),
    # torch.empty refuses this too: the running product overflows before reaching the 0.
    "zero_size_overflow": (
        {"w": {**_F32_2, "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}},
        b"",
        "overflows",
    ),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
        "overlap",
    ),
    "same_span": (
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]},
        },
        bytes(4),
        "overlap",
    ),
    "metadata_not_object": ({"__metadata__": ["x"], "w": _F32_2}, bytes(8), "__metadata__"),
    "metadata_value_int": ({"__metadata__": {"k": 1}, "w": _F32_2}, bytes(8), "'k'"),
}


@pytest.mark.parametrize("case", sorted(_BAD_HEADERS))
def test_hostile_header_is_rejected(tmp_path: Path, case: str) -> None:
    header, data, words = _BAD_HEADERS[case]
    path = _raw_file(tmp_path / f"hostile-{case}.safetensors", header, data)
    with pytest.raises(CheckpointError) as caught:
        _read_path(path)
    assert str(path) in str(caught.value)
    assert words in str(caught.value)


def test_unknown_dtype_is_unsupported(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "f4.safetensors", {"w": {**_F32_2, "dtype": "F4"}}, bytes(8))
    with pytest.raises(UnsupportedFormatError, match="'F4'") as caught:
        _read_path(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "seven_or_less"])
def test_file_shorter_than_prefix(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="too short") as caught:
        _read_path(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 1000], ids=["u64max", "2e63", "past_end"])
def test_header_length_past_end_of_file(tmp_path: Path, length: int) -> None:
    path = _raw_file(tmp_path / "long.safetensors", b"{}", length=length)
    with pytest.raises(CheckpointError, match="larger than the rest of the file") as caught:
        _read_path(path)
    assert str(path) in str(caught.value)


def test_header_length_over_limit_in_big_file(tmp_path: Path) -> None:
    # A sparse file big enough that only the 100 MB cap, not the file size, rejects it.
    path = tmp_path / "sparse.safetensors"
    with path.open("wb") as file:
        file.write(struct.pack("<Q", MAX_HEADER_SIZE + 1))
        file.truncate(MAX_HEADER_SIZE + 64)
    with pytest.raises(CheckpointError, match="limit") as caught:
        _read_path(path)
    assert str(path) in str(caught.value)


def test_real_file_truncated(real_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = real_file
    cut = path.with_name("cut.safetensors")
    cut.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="past the data section") as caught:
        _read_path(cut)
    assert str(cut) in str(caught.value)
