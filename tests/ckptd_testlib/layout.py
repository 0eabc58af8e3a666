"""Checking a format reader's layout against the file and torch.load's result.

* :func:`layout_of` -- ckptd's layout of a checkpoint file.
* :func:`assert_layout_storages` / :func:`assert_layout_matches` -- the layout agrees with
  the file's bytes and with torch.load's tensors.
* :func:`named_tensors`, :func:`file_bytes`, :func:`tensor_storage_bytes` -- the pieces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "named_tensors",
    "layout_of",
    "file_bytes",
    "tensor_storage_bytes",
    "assert_layout_storages",
    "assert_layout_matches",
]


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors of a loaded object as ckptd names them (dotted keys, ints in decimal)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def layout_of(path: Path) -> Any:
    """ckptd's layout of the checkpoint at ``path``."""
    from ckptd.formats import open_source, read_layout

    with open_source(str(path)) as source:
        return read_layout(source)


def file_bytes(path: Path, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of the file at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def tensor_storage_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of the whole storage under ``tensor``."""
    storage = tensor.untyped_storage()
    return bytes(storage.tolist()) if storage.nbytes() else b""


def assert_layout_storages(path: Path, layout: Any, loaded: Any) -> None:
    """Names equal torch.load's; each name's storage read from the file equals torch's storage bytes."""
    expected = dict(named_tensors(loaded))
    got = layout.tensor_map()
    assert sorted(got) == sorted(expected)
    assert len(layout.tensors) == len(expected)
    for name, tensor in expected.items():
        entry = got[name]
        assert len(entry.storage_keys) == 1, name
        record = layout.storages[entry.storage_keys[0]]
        assert record.nbytes == tensor.untyped_storage().nbytes(), name
        assert record.numel * record.dtype.itemsize == record.nbytes, name
        assert file_bytes(path, record.offset, record.nbytes) == tensor_storage_bytes(tensor), name


def assert_layout_matches(path: Path, layout: Any, loaded: Any) -> None:
    """As :func:`assert_layout_storages`, and dtypes, shapes, strides, storage offsets and
    locations equal torch.load's (``loaded``: what torch.load returned for ``path``)."""
    assert_layout_storages(path, layout, loaded)
    got = layout.tensor_map()
    for name, tensor in named_tensors(loaded):
        entry = got[name]
        assert entry.dtype == tensor.dtype, name
        assert entry.shape == tuple(tensor.shape), name
        assert entry.stride == tuple(tensor.stride()), name
        assert entry.storage_offset == tensor.storage_offset(), name
        assert entry.location == "cpu", name
        assert entry.nbytes == tensor.numel() * tensor.element_size(), name
