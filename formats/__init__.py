"""Checkpoint format readers: where every storage lies, found without running anything.

``ckptd.formats`` depends on the standard library and torch only. Each reader turns a
:class:`Source` into a :class:`Layout` (storages with file offsets, named tensors, the
pickle to rebuild from) and checks it whole before anything is allocated.

The public surface (``__all__``; everything else is private):

* reading: :func:`open_source` (a path, file object or bytes as a :class:`Source`;
  :class:`FileSource`, :data:`FileLike`), :func:`sniff`, :func:`read_layout`;
* what a reader finds: :class:`Layout` (:class:`Format`, :class:`StorageRecord`,
  :class:`TensorEntry`), checked whole by :func:`validate`; a deflated record's bytes,
  :func:`inflate_storage`; the byte order torch assumes where a file records none,
  :func:`default_load_byteorder`;
* the pickle, interpreted without running it: :func:`scan` gives a :class:`ScanResult`
  whose objects are :class:`Call` records, :class:`Global` stubs and :class:`PersistentId`
  storage references; :func:`storage_dtype` names a storage class's dtype; :func:`no_gc`
  pauses the collector while many records are built;
* Hugging Face shard indexes: :func:`is_sharded_index`, :func:`read_sharded_index`,
  :class:`ShardedIndex`; a model directory's checkpoint file, :func:`checkpoint_in_directory`
  (the names it looks for, in order: :data:`HF_CHECKPOINT_FILES`);
* :func:`lazy_attributes`, how ckptd's packages import torch-needing names on first use;
* the root of ckptd's exception tree, :class:`CkptdError`, and the reading errors
  (:class:`CheckpointError`, :class:`UnsupportedFormatError`,
  :class:`CheckpointNotFoundError`, :class:`NotFileLikeError`, :class:`NotSeekableError`,
  :class:`TensorNotFoundError`).

Importing it is torch-free (the readers import torch on first use).

>>> import io, torch
>>> buf = io.BytesIO(); torch.save({"w": torch.ones(2, 3)}, buf)
>>> with open_source(buf.getvalue()) as src:
...     layout = read_layout(src)
>>> layout.format.value, layout.tensors[0].shape
('torch-zip', (2, 3))
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from ._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    NotFileLikeError,
    NotSeekableError,
    TensorNotFoundError,
    UnsupportedFormatError,
)
from ._sharded import HF_CHECKPOINT_FILES, ShardedIndex, checkpoint_in_directory, is_sharded_index, read_sharded_index
from ._source import FileLike, FileSource, Source, open_source

if TYPE_CHECKING:
    from ._layout import Format, Layout, StorageRecord, TensorEntry, validate
    from ._pickle_scan import Call, Global, PersistentId, ScanResult, no_gc, scan, storage_dtype
    from ._zip import default_load_byteorder, inflate_storage

# The readers need torch; the errors, sources and index need only the standard library, so
# ``import ckptd.formats`` stays torch-free (ckptd's admin commands) until a reader is used.
_LAZY = {
    **dict.fromkeys(("Format", "Layout", "StorageRecord", "TensorEntry", "validate"), "._layout"),
    **dict.fromkeys(("default_load_byteorder", "inflate_storage"), "._zip"),
    **dict.fromkeys(("Call", "Global", "PersistentId", "ScanResult", "no_gc", "scan", "storage_dtype"), "._pickle_scan"),
}


__all__ = [
    "Call",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "FileLike",
    "FileSource",
    "Format",
    "Global",
    "HF_CHECKPOINT_FILES",
    "Layout",
    "NotFileLikeError",
    "NotSeekableError",
    "PersistentId",
    "ScanResult",
    "ShardedIndex",
    "Source",
    "StorageRecord",
    "TensorEntry",
    "TensorNotFoundError",
    "UnsupportedFormatError",
    "checkpoint_in_directory",
    "default_load_byteorder",
    "inflate_storage",
    "is_sharded_index",
    "lazy_attributes",
    "no_gc",
    "open_source",
    "read_layout",
    "read_sharded_index",
    "scan",
    "sniff",
    "storage_dtype",
    "validate",
]

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY, __all__)

_PICKLE_PROTO = 0x80


def sniff(source: Source) -> Format:
    """Tell a file's format from its bytes (never from its name).

    A zip is what starts with a local header, as torch decides (``_is_zipfile``): a legacy
    file whose tensor bytes hold an end-of-directory record stays legacy. An archive
    behind other bytes (which torch.load does not read) is found from its end.
    Raises :class:`CheckpointError` for empty files and anything unrecognised.
    """
    from ._layout import Format
    from ._legacy import is_legacy_tar
    from ._zip import has_zip_directory, is_zip

    if source.size == 0:
        raise CheckpointError(source.name, "file is empty")
    head = source.read(0, min(source.size, 9))
    if is_zip(source):
        return Format.TORCH_ZIP
    if head[0] == _PICKLE_PROTO or is_legacy_tar(source):
        return Format.TORCH_LEGACY
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= source.size - 8:
        return Format.SAFETENSORS
    if has_zip_directory(source):
        return Format.TORCH_ZIP
    raise CheckpointError(
        source.name,
        f"not a checkpoint ckptd can read (starts with {head[:8]!r}); expected a torch.save file, "
        "a TorchScript archive or a safetensors file",
    )


def read_layout(source: Source) -> Layout:
    """Read any single-file checkpoint's layout (zip, TorchScript, legacy, safetensors)."""
    from ._layout import Format
    from ._legacy import read_legacy_layout
    from ._safetensors import read_safetensors_layout
    from ._zip import read_zip_layout

    fmt = sniff(source)
    if fmt is Format.TORCH_ZIP:
        return read_zip_layout(source)
    if fmt is Format.TORCH_LEGACY:
        return read_legacy_layout(source)
    return read_safetensors_layout(source)
