"""Reader for the safetensors format: a JSON header, then raw little-endian tensor bytes.

The file is ``N`` (u64, little-endian), ``N`` bytes of UTF-8 JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional
``"__metadata__"`` of strings), then the data section; offsets are relative to its start.
The header is hostile input: every field is checked before a :class:`Layout` is returned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import CheckpointError, UnsupportedFormatError
from ._layout import Format, Layout, StorageRecord, TensorEntry, validate
from ._source import Source

__all__ = ["read_safetensors_layout", "SAFETENSORS_DTYPES"]

# The same cap the safetensors library applies (MAX_HEADER_SIZE): a bigger length is
# garbage or an attempt to make us allocate, never a real header.
MAX_HEADER_SIZE = 100_000_000

_PREFIX = 8
_MAX_NUMEL = 2**63 - 1
_METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def _dtype_table() -> dict[str, torch.dtype]:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "C64": torch.complex64,
    }
    # Newer dtypes exist only in some torch builds; safetensors.torch maps them the same way.
    # F4 is left out on purpose: its shape counts 4-bit elements, torch's counts byte pairs.
    optional = {
        "F8_E8M0": "float8_e8m0fnu",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
    }
    for name, attr in optional.items():
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = _dtype_table()


def read_safetensors_layout(source: Source) -> Layout:
    """Read and check a safetensors header; no tensor byte is read.

    Tensors come in ``safetensors.torch.load_file`` order: by data offsets (ties, which
    only zero-size tensors can have, by name). Raises :class:`CheckpointError` naming the
    file and the first problem found, :class:`UnsupportedFormatError` for an unknown dtype.

    >>> import json
    >>> from ckptd.formats._source import open_source
    >>> header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    >>> blob = len(header).to_bytes(8, "little") + header + bytes(8)
    >>> with open_source(blob) as src:
    ...     layout = read_safetensors_layout(src)
    >>> layout.tensors[0].shape, layout.storages["w"].offset == 8 + len(header)
    ((2,), True)
    """
    header_size = _read_header_size(source)
    header = _parse_header(source, header_size)
    metadata = _check_metadata(source.name, header.pop(_METADATA_KEY, None))
    data_start = _PREFIX + header_size
    data_size = source.size - data_start
    storages: dict[str, StorageRecord] = {}
    tensors: list[tuple[int, int, TensorEntry]] = []
    for name, raw in header.items():
        entry, record, begin, end = _read_entry(source.name, name, raw, data_start, data_size)
        storages[name] = record
        tensors.append((begin, end, entry))
    tensors.sort(key=lambda item: (item[0], item[1], item[2].name))
    layout = Layout(
        name=source.name,
        format=Format.SAFETENSORS,
        size=source.size,
        storages=storages,
        tensors=tuple(entry for _, _, entry in tensors),
        metadata=metadata,
    )
    validate(layout)
    return layout


def _read_header_size(source: Source) -> int:
    if source.size < _PREFIX:
        raise CheckpointError(
            source.name,
            f"file has {source.size} bytes, too short for a safetensors header "
            f"(needs at least {_PREFIX})",
        )
    size = int.from_bytes(source.read(0, _PREFIX), "little")
    if size > source.size - _PREFIX:
        raise CheckpointError(
            source.name,
            f"safetensors header length {size} is larger than the rest of the file "
            f"({source.size - _PREFIX} bytes): truncated or not a safetensors file",
        )
    if size > MAX_HEADER_SIZE:
        raise CheckpointError(
            source.name, f"safetensors header length {size} exceeds the {MAX_HEADER_SIZE}-byte limit"
        )
    return size


def _parse_header(source: Source, size: int) -> dict[str, Any]:
    raw = source.read(_PREFIX, size)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(source.name, f"safetensors header is not valid UTF-8: {exc}") from exc
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise CheckpointError(
            source.name, f"safetensors header names {exc.key!r} twice: corrupt or hostile"
        ) from exc
    # ValueError covers JSONDecodeError and int-digit limits; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(source.name, f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            source.name, f"safetensors header is a JSON {type(header).__name__}, not an object"
        )
    return header


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last duplicate silently; two readers could then disagree on
    # what a hostile file holds, so a repeated key is an error.
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKeyError(key)
        found[key] = value
    return found


def _check_metadata(name: str, raw: object) -> dict[str, str]:
    # safetensors itself accepts an explicit null for the optional metadata.
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(name, f"safetensors {_METADATA_KEY} is a {_json_type(raw)}, not an object")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise CheckpointError(
                name,
                f"safetensors {_METADATA_KEY} value for {key!r} is a {_json_type(value)}, not a string",
            )
    return dict(raw)


def _read_entry(
    name: str, tensor: str, raw: object, data_start: int, data_size: int
) -> tuple[TensorEntry, StorageRecord, int, int]:
    dtype, shape, begin, end = _check_fields(name, tensor, raw)
    if begin > end:
        raise CheckpointError(
            name, f"tensor {tensor!r} has data_offsets [{begin}, {end}]: begin after end"
        )
    if end > data_size:
        raise CheckpointError(
            name,
            f"tensor {tensor!r} data_offsets [{begin}, {end}] run past the data section "
            f"({data_size} bytes): truncated or corrupt",
        )
    numel = _numel(name, tensor, shape)
    if numel * dtype.itemsize != end - begin:
        raise CheckpointError(
            name,
            f"tensor {tensor!r} of shape {list(shape)} and dtype {dtype} needs "
            f"{numel * dtype.itemsize} bytes but data_offsets [{begin}, {end}] span {end - begin}",
        )
    record = StorageRecord(
        key=tensor,
        dtype=dtype,
        numel=numel,
        location="cpu",
        offset=data_start + begin,
        nbytes=end - begin,
    )
    entry = TensorEntry(
        name=tensor,
        path=(tensor,),
        storage_keys=(tensor,),
        dtype=dtype,
        shape=shape,
        stride=_contiguous_strides(shape),
        storage_offset=0,
        location="cpu",
    )
    return entry, record, begin, end


def _check_fields(name: str, tensor: str, raw: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(raw, dict):
        raise CheckpointError(
            name, f"safetensors entry {tensor!r} is a {_json_type(raw)}, not an object"
        )
    # Unknown extra fields are ignored, as the safetensors library does.
    missing = [field for field in _ENTRY_FIELDS if field not in raw]
    if missing:
        raise CheckpointError(name, f"tensor {tensor!r} lacks the field {missing[0]!r}")
    dtype = _check_dtype(name, tensor, raw["dtype"])
    shape = _int_list(name, tensor, "shape", raw["shape"])
    offsets = _int_list(name, tensor, "data_offsets", raw["data_offsets"])
    if len(offsets) != 2:
        raise CheckpointError(
            name, f"tensor {tensor!r} data_offsets has {len(offsets)} items, expected [begin, end]"
        )
    return dtype, shape, offsets[0], offsets[1]


def _check_dtype(name: str, tensor: str, raw: object) -> torch.dtype:
    if not isinstance(raw, str):
        raise CheckpointError(name, f"tensor {tensor!r} dtype is a {_json_type(raw)}, not a string")
    dtype = SAFETENSORS_DTYPES.get(raw)
    if dtype is None:
        raise UnsupportedFormatError(
            name, f"tensor {tensor!r} has unsupported safetensors dtype {raw!r}"
        )
    return dtype


def _int_list(name: str, tensor: str, field: str, raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise CheckpointError(name, f"tensor {tensor!r} {field} is a {_json_type(raw)}, not a list")
    for item in raw:
        # bool is an int subclass in Python, but JSON true is no size.
        if not isinstance(item, int) or isinstance(item, bool):
            raise CheckpointError(
                name,
                f"tensor {tensor!r} {field} holds a {_json_type(item)}, not an integer: {raw!r:.200}",
            )
        if item < 0:
            raise CheckpointError(name, f"tensor {tensor!r} {field} holds the negative value {item}")
    return tuple(raw)


def _numel(name: str, tensor: str, shape: tuple[int, ...]) -> int:
    # Multiply left to right and stop at int64, as torch (and safetensors' checked_mul) do:
    # torch.empty cannot build such a shape, and a hostile one would build a huge integer.
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _MAX_NUMEL:
            raise CheckpointError(
                name, f"tensor {tensor!r} shape {list(shape)!r:.200} overflows a 64-bit element count"
            )
    return numel


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # torch's rule: a zero-size dimension counts as 1, so torch.empty(2, 0, 3) has (3, 3, 1).
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


def _json_type(value: object) -> str:
    names = {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
