"""``ckptd.inspect``: what a checkpoint holds, read from its structure alone."""

from __future__ import annotations

import os

from ckptd.formats import FileLike, Format, Layout, TensorEntry, open_source, read_layout, read_sharded_index
from ckptd.formats import checkpoint_in_directory, is_sharded_index


def inspect(f: FileLike) -> Layout:
    """The layout of a checkpoint: format, storages and named tensors; no storage is read.

    Works on files of any size (only the directory and pickle are read). A sharded
    ``*.index.json`` gives one layout whose tensors are every shard's.

    >>> import io, torch, ckptd
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2, 2)}, buf)
    >>> [(t.name, t.shape) for t in ckptd.inspect(buf.getvalue()).tensors]
    [('w', (2, 2))]
    """
    f = checkpoint_in_directory(f)  # a Hugging Face model directory: its checkpoint
    if isinstance(f, (str, os.PathLike)) and is_sharded_index(os.fspath(f)):
        return _inspect_sharded(os.fspath(f))
    with open_source(f) as source:
        return read_layout(source)


def _inspect_sharded(path: str) -> Layout:
    index = read_sharded_index(path)
    tensors: list[TensorEntry] = []
    storages = {}
    size = 0
    for shard in index.shards:
        with open_source(shard) as source:
            layout = read_layout(source)
        size += layout.size
        tensors.extend(layout.tensors)
        storages.update({f"{shard}:{key}": record for key, record in layout.storages.items()})
    return Layout(index.name, Format.SHARDED, size, storages, tuple(tensors))
