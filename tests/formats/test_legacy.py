"""read_layout on legacy torch.save files (``_use_new_zipfile_serialization=False``), checked against torch.load."""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.formats import CheckpointError, Format, open_source, read_layout, sniff
from ckptd.formats._legacy import MAGIC_NUMBER, PROTOCOL_VERSION
from ckptd_testlib import assert_layout_matches, file_bytes, layout_of


def _save(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _sample() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=gen)
    return {
        "w": base,
        "t": base.t(),
        "row": base[1],
        "block": {"ids": torch.arange(9, dtype=torch.int64).reshape(3, 3), "mask": torch.tensor([True, False])},
        "layers": [torch.ones(2, dtype=torch.float64), {"b": torch.full((4,), 3, dtype=torch.int8)}],
        "half": torch.randn(6, generator=gen).half(),
        "bf16": torch.randn(2, 2, generator=gen).bfloat16(),
        "scalar": torch.tensor(-1.5),
        "step": 12,
        "note": "not a tensor",
    }


def test_sniffed_as_legacy(tmp_path: Path) -> None:
    path = _save({"x": torch.ones(2)}, tmp_path / "legacy.pt")
    with open_source(str(path)) as source:
        assert sniff(source) is Format.TORCH_LEGACY
        layout = read_layout(source)
    assert layout.format is Format.TORCH_LEGACY
    assert layout.name == str(path)
    assert layout.size == path.stat().st_size
    assert layout.byteorder == "little"


def test_offsets_names_strides_match_torch_load(tmp_path: Path) -> None:
    path = _save(_sample(), tmp_path / "sample.pt")
    layout = layout_of(path)
    loaded = torch.load(path, weights_only=True)
    assert_layout_matches(path, layout, loaded)
    names = {e.name for e in layout.tensors}
    assert {"block.ids", "block.mask", "layers.0", "layers.1.b"} <= names
    entries = layout.tensor_map()
    assert entries["layers.1.b"].path == ("layers", 1, "b")
    assert entries["row"].storage_offset == 5
    assert entries["t"].stride == (1, 5)


def test_each_storage_preceded_by_its_element_count(tmp_path: Path) -> None:
    path = _save(_sample(), tmp_path / "sample.pt")
    layout = layout_of(path)
    records = sorted(layout.storages.values(), key=lambda r: r.offset)
    assert records
    for record in records:
        (numel,) = struct.unpack("<q", file_bytes(path, record.offset - 8, 8))
        assert numel == record.numel
    # storages run back to back to the end of the file
    for before, after in zip(records, records[1:]):
        assert after.offset == before.offset + before.nbytes + 8
    assert records[-1].offset + records[-1].nbytes == path.stat().st_size


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    ],
)
def test_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = torch.arange(1, 8).to(dtype).reshape(7, 1)[2:]
    path = _save({"x": tensor, "other": torch.ones(3)}, tmp_path / "dtype.pt")
    layout = layout_of(path)
    entry = layout.tensor_map()["x"]
    assert entry.dtype == dtype
    assert layout.storages[entry.storage_keys[0]].dtype == dtype
    assert entry.storage_offset == 2
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_many_dtypes_in_one_file(tmp_path: Path) -> None:
    obj = {
        str(dtype).removeprefix("torch."): torch.arange(1, 6).to(dtype)
        for dtype in (torch.float64, torch.float16, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64)
    }
    path = _save(obj, tmp_path / "many.pt")
    layout = layout_of(path)
    assert len(layout.storages) == len(obj)
    assert {name: e.dtype for name, e in layout.tensor_map().items()} == {n: t.dtype for n, t in obj.items()}
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_shared_storage_is_one_record(tmp_path: Path) -> None:
    base = torch.arange(20.0)
    obj = {"first": base[:10].view(2, 5), "second": base[5:15], "again": [base[5:15]]}
    path = _save(obj, tmp_path / "shared.pt")
    layout = layout_of(path)
    assert len(layout.storages) == 1
    (record,) = layout.storages.values()
    assert record.numel == 20
    assert record.nbytes == 80
    entries = layout.tensor_map()
    assert entries["first"].storage_keys == entries["second"].storage_keys == (record.key,)
    assert entries["second"].storage_offset == 5
    assert entries["first"].shape == (2, 5)
    assert file_bytes(path, record.offset, 80) == base.numpy().tobytes()
    loaded = torch.load(path, weights_only=True)
    assert loaded["first"].untyped_storage().data_ptr() == loaded["second"].untyped_storage().data_ptr()
    assert_layout_matches(path, layout, loaded)


def test_empty_tensors(tmp_path: Path) -> None:
    obj = {
        "empty": torch.zeros(0),
        "empty2d": torch.empty(0, 3, dtype=torch.int64),
        "x": torch.arange(4, dtype=torch.int16),
        "last_empty": torch.empty(5, 0, dtype=torch.float16),
    }
    path = _save(obj, tmp_path / "empty.pt")
    layout = layout_of(path)
    entries = layout.tensor_map()
    assert entries["empty2d"].shape == (0, 3)
    assert entries["last_empty"].shape == (5, 0)
    for name in ("empty", "empty2d", "last_empty"):
        record = layout.storages[entries[name].storage_keys[0]]
        assert record.numel == 0 and record.nbytes == 0
        assert 0 <= record.offset <= path.stat().st_size
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_nested_module_state_dict_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    state = model.state_dict()
    assert type(state) is collections.OrderedDict
    path = _save({"model": state, "epoch": 3}, tmp_path / "sd.pt")
    layout = layout_of(path)
    assert {e.name for e in layout.tensors} == {f"model.{k}" for k in state}
    assert "model.2.0.weight" in layout.tensor_map()
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_input_forms_agree(tmp_path: Path) -> None:
    path = _save(_sample(), tmp_path / "forms.pt")
    raw = path.read_bytes()
    by_path = layout_of(path)
    with open_source(raw) as source:
        by_bytes = read_layout(source)
    with open(path, "rb") as f, open_source(f) as source:
        by_file = read_layout(source)
    for other in (by_bytes, by_file):
        assert other.storages == by_path.storages
        assert other.tensors == by_path.tensors


def test_large_pickle_beyond_first_read(tmp_path: Path) -> None:
    # a main pickle larger than the reader's first 1 MiB read, storages after it
    obj = {"a": torch.arange(5.0), "notes": "x" * (3 << 20), "b": torch.arange(3, dtype=torch.int64)}
    path = _save(obj, tmp_path / "bigpickle.pt")
    layout = layout_of(path)
    assert min(r.offset for r in layout.storages.values()) > 3 << 20
    assert_layout_matches(path, layout, torch.load(path, weights_only=True))


def test_truncated_at_every_point_is_checkpoint_error(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    obj = {"a": base, "v": base[2:], "e": torch.zeros(0), "i": torch.arange(3, dtype=torch.int16)}
    raw = _save(obj, tmp_path / "whole.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError) as info:
            layout_of(path)
        assert str(path) in str(info.value), cut
        assert info.value.name == str(path)


@pytest.mark.parametrize("where", ["magic", "pickle", "keys", "storage"])
def test_truncated_in_each_part_from_bytes(tmp_path: Path, where: str) -> None:
    raw = _save(_sample(), tmp_path / "whole.pt").read_bytes()
    layout = layout_of(tmp_path / "whole.pt")
    first = min(r.offset for r in layout.storages.values() if r.nbytes)
    cut = {"magic": 5, "pickle": len(raw) // 4, "keys": first - 12, "storage": first + 3}[where]
    with pytest.raises(CheckpointError, match="<bytes>"):
        with open_source(raw[:cut]) as source:
            read_layout(source)


def _legacy_bytes(magic: Any, protocol: Any, keys: Any, *, main: Any = None, tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    for obj in (magic, protocol, {"protocol_version": 1001, "little_endian": True}, main, keys):
        pickle.dump(obj, buf, protocol=2)
    return buf.getvalue() + tail


def test_wrong_magic_is_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="magic"):
        with open_source(_legacy_bytes(12345, PROTOCOL_VERSION, [])) as source:
            read_layout(source)


def test_wrong_protocol_is_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="protocol"):
        with open_source(_legacy_bytes(MAGIC_NUMBER, 999, [])) as source:
            read_layout(source)


def test_malformed_key_list_is_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="<bytes>"):
        with open_source(_legacy_bytes(MAGIC_NUMBER, PROTOCOL_VERSION, {"not": "a list"})) as source:
            read_layout(source)


def test_storage_count_mismatch_is_checkpoint_error(tmp_path: Path) -> None:
    raw = bytearray(_save({"x": torch.ones(4)}, tmp_path / "one.pt").read_bytes())
    layout = layout_of(tmp_path / "one.pt")
    (record,) = layout.storages.values()
    raw[record.offset - 8 : record.offset] = struct.pack("<q", 3)
    with pytest.raises(CheckpointError, match="elements"):
        with open_source(bytes(raw)) as source:
            read_layout(source)


def test_plain_pickle_is_not_a_checkpoint() -> None:
    # starts with the pickle PROTO byte, so it is sniffed as legacy, then rejected
    with pytest.raises(CheckpointError, match="<bytes>"):
        with open_source(pickle.dumps({"a": 1}, protocol=2)) as source:
            read_layout(source)


def test_uint8_checkpoint_holding_an_end_of_directory_record_is_legacy(tmp_path: Path) -> None:
    """torch sniffs a zip by its first bytes; Python's zipfile.is_zipfile would call this a zip."""
    import zipfile

    tensor = torch.frombuffer(bytearray(b"PK\x05\x06" + bytes(18)), dtype=torch.uint8)
    path = _save({"t": tensor}, tmp_path / "pk.pt")
    assert zipfile.is_zipfile(path)
    with open_source(str(path)) as source:
        assert sniff(source) is Format.TORCH_LEGACY
    assert_layout_matches(path, layout_of(path), torch.load(path, weights_only=True))


def test_end_is_just_past_the_last_storage(tmp_path: Path) -> None:
    """Where torch.load leaves a stream: the checkpoint's end, so what follows reads on."""
    path = _save(_sample(), tmp_path / "sample.pt")
    with open(path, "ab") as f:
        f.write(b"trailing bytes")
    layout = layout_of(path)
    assert layout.end == path.stat().st_size - len(b"trailing bytes")
    last = max(layout.storages.values(), key=lambda r: r.offset)
    assert layout.end == last.offset + last.nbytes
