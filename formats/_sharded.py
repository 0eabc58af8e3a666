"""Reader for Hugging Face sharded-checkpoint indexes (``*.index.json``).

``model.safetensors.index.json`` and ``pytorch_model.bin.index.json`` map each tensor
name to the shard file holding it: ``{"metadata": {...}, "weight_map": {name: file}}``.
The shard names are hostile input: each must be a plain file name that stays inside the
index's directory, so an index can never make ckptd open a file elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["ShardedIndex", "read_sharded_index", "is_sharded_index", "checkpoint_in_directory", "HF_CHECKPOINT_FILES"]

_F = TypeVar("_F")
INDEX_SUFFIX = ".index.json"
# What a Hugging Face model directory holds its weights in, in transformers' order of preference.
HF_CHECKPOINT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Real indexes are a few MB even for the largest models; more is garbage or an attack.
MAX_INDEX_SIZE = 100_000_000


@dataclass(frozen=True)
class ShardedIndex:
    """A checked sharded-checkpoint index.

    ``weight_map`` maps tensor names to shard file names as written in the index;
    ``shards`` holds each shard's absolute path once, in order of first appearance.
    """

    name: str
    directory: str
    weight_map: Mapping[str, str]
    shards: tuple[str, ...]
    metadata: Mapping[str, object]


def is_sharded_index(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a sharded-checkpoint index (by its name alone).

    >>> is_sharded_index("model.safetensors.index.json"), is_sharded_index("model.safetensors")
    (True, False)
    """
    return os.fspath(path).endswith(INDEX_SUFFIX)


def checkpoint_in_directory(f: _F) -> _F | str:
    """``f`` itself (the same object), or for a directory the Hugging Face checkpoint file in
    it (one of :data:`HF_CHECKPOINT_FILES`, in that order), so a model directory loads like
    its file. Any other directory is returned as it is: opening it fails as torch.load's does.

    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "pytorch_model.bin").write_bytes(b"")
    >>> checkpoint_in_directory(str(folder)) == str(folder / "pytorch_model.bin")
    True
    >>> checkpoint_in_directory("model.pt"), checkpoint_in_directory(b"raw bytes")
    ('model.pt', b'raw bytes')
    """
    if not isinstance(f, (str, os.PathLike)) or not os.path.isdir(f):
        return f
    for filename in HF_CHECKPOINT_FILES:
        candidate = os.path.join(os.fspath(f), filename)
        if os.path.isfile(candidate):
            return candidate
    return f


def read_sharded_index(path: str | os.PathLike[str]) -> ShardedIndex:
    """Read and check a ``*.index.json`` file; every shard it names must exist.

    Raises :class:`CheckpointNotFoundError` for a missing index or shard and
    :class:`CheckpointError` for anything malformed or escaping the index's directory.

    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> (folder / "a.safetensors").write_bytes(b"")
    0
    >>> index = folder / "model.safetensors.index.json"
    >>> _ = index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    >>> read_sharded_index(index).shards == (str(folder / "a.safetensors"),)
    True
    """
    name = os.fspath(path)
    document = _load_json(name)
    weight_map = _check_weight_map(name, document.get("weight_map"))
    metadata = _check_metadata(name, document.get("metadata"))
    directory = os.path.dirname(os.path.abspath(name))
    shards: dict[str, str] = {}
    for filename in weight_map.values():
        if filename not in shards:
            shards[filename] = _resolve_shard(name, directory, filename)
    return ShardedIndex(
        name=name,
        directory=directory,
        weight_map=weight_map,
        shards=tuple(shards.values()),
        metadata=metadata,
    )


def _load_json(name: str) -> dict[str, Any]:
    text = _read_text(name)
    try:
        document = json.loads(text)
    # ValueError covers JSONDecodeError and int-digit limits; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(name, f"index is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(name, f"index is a JSON {type(document).__name__}, not an object")
    return document


def _read_text(name: str) -> str:
    try:
        with open(name, "rb") as file:
            raw = file.read(MAX_INDEX_SIZE + 1)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(name, "no such file") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(name, "is a directory, not an index file") from exc
    except OSError as exc:
        raise CheckpointError(name, f"cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_INDEX_SIZE:
        raise CheckpointError(name, f"index is larger than {MAX_INDEX_SIZE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(name, f"index is not valid UTF-8: {exc}") from exc


def _check_weight_map(name: str, raw: object) -> dict[str, str]:
    if raw is None:
        raise CheckpointError(name, "index has no 'weight_map'")
    if not isinstance(raw, dict):
        raise CheckpointError(name, f"index 'weight_map' is a {type(raw).__name__}, not an object")
    if not raw:
        raise CheckpointError(name, "index 'weight_map' is empty")
    for tensor, filename in raw.items():
        if not isinstance(filename, str):
            raise CheckpointError(
                name, f"index maps {tensor!r} to a {type(filename).__name__}, not a file name"
            )
    return dict(raw)


def _check_metadata(name: str, raw: object) -> dict[str, object]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(name, f"index 'metadata' is a {type(raw).__name__}, not an object")
    return dict(raw)


def _resolve_shard(name: str, directory: str, filename: str) -> str:
    _check_plain_name(name, filename)
    shard = os.path.join(directory, filename)
    real = os.path.realpath(shard)
    if not any(_is_within(real, root) for root in _allowed_roots(directory)):
        raise CheckpointError(
            name, f"shard {filename!r} resolves to {real}, outside the index's directory: hostile index"
        )
    if not os.path.isfile(real):
        raise CheckpointNotFoundError(shard, f"shard listed in {name} does not exist")
    return shard


def _check_plain_name(name: str, filename: str) -> None:
    # Only a bare file name: no separators (either OS's), no drive, no '.' or '..'.
    bad = (
        not filename
        or filename in (".", "..")
        or any(char in filename for char in ("/", "\\", "\0"))
        or os.path.isabs(filename)
        or bool(os.path.splitdrive(filename)[0])
    )
    if bad:
        raise CheckpointError(
            name,
            f"shard name {filename!r} is not a plain file name in the index's directory: hostile index",
        )


def _allowed_roots(directory: str) -> tuple[str, ...]:
    # The Hugging Face hub cache keeps shards as symlinks from <repo>/snapshots/<rev>/ to
    # <repo>/blobs/<hash>; that blobs folder is allowed too, or no hub download would load.
    real = os.path.realpath(directory)
    snapshots = os.path.dirname(real)
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs):
        return (real, blobs)
    return (real,)


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False
