"""The embedded engine's ``load``: torch.load's contract, storages read straight into arenas.

``ckptd.load`` (``ckptd._api``) calls it when no daemon is asked for.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import _weights_only_unpickler

_torch_serialization_config: Any
try:  # torch's load config (2.5+); imported here, not per call: a worker's first attach is timed in ms
    from torch.utils.serialization import config as _torch_serialization_config
except ImportError:
    _torch_serialization_config = None

from ckptd.formats import (
    CheckpointError,
    FileLike,
    Format,
    Layout,
    ShardedIndex,
    Source,
    TensorEntry,
    checkpoint_in_directory,
    default_load_byteorder,
    is_sharded_index,
    no_gc,
    open_source,
    read_layout,
    read_sharded_index,
    sniff,
)

from ._exceptions import UnpicklingError, UsageError
from ._placement import MapLocation, target_tag
from ._rebuild import rebuild_plain
from ._select import Select, extract, find, select_entries
from ._storages import StorageSet, read_storages
from ._unpickle import unpickle, weights_only_message

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]

# torch.serialization.UNSAFE_MESSAGE's first sentence, for the errors torch raises with it.
_UNSAFE = (
    "In PyTorch 2.6, we changed the default value of the `weights_only` argument in `torch.load` "
    "from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
    "trusted source."
)
_TRUE = ("1", "y", "yes", "true")


def load(
    f: FileLike,
    map_location: MapLocation = None,
    pickle_module: ModuleType | None = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    tensor_name: str | None = None,
    prefix: str | None = None,
    select: Select = None,
    progress: Progress | None = None,
    **pickle_load_args: Any,
) -> Any:
    """Load a checkpoint in this process exactly as :func:`torch.load` would (see :func:`ckptd.load`).

    ``f`` is a path, a binary file-like object or ``bytes``: a torch.save file (zip or
    legacy), a safetensors file, or a Hugging Face ``*.index.json`` of shards.
    ``map_location``, ``pickle_module``, ``weights_only``, ``mmap`` and
    ``pickle_load_args`` mean what they mean to torch.load. ``tensor_name`` returns one
    tensor, ``select`` (a list of names, or one name start) a dict of them; either reads
    only the storages they need. ``prefix`` is a module-name component saved names may
    lack. ``progress`` is called with each chunk's byte count while storages are read.

    >>> import io, torch
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf)
    >>> load(buf.getvalue())
    {'w': tensor([1., 1.])}
    """
    f = checkpoint_in_directory(f)  # a Hugging Face model directory loads like its file
    request = make_request(map_location, pickle_module, weights_only, mmap, progress, pickle_load_args)
    if isinstance(f, (str, os.PathLike)) and is_sharded_index(os.fspath(f)):
        return _load_sharded(os.fspath(f), request, tensor_name, prefix, select)
    with open_source(f) as source, no_gc():  # a load builds many objects and frees none
        layout = _read_layout(source, request.weights_only)
        if layout.format is Format.TORCHSCRIPT:
            return _torchscript_via_load(f, source, map_location, request.weights_only)
        if request.mmap:
            _check_mmap(f, layout)
        result = _load_layout(source, layout, request, tensor_name, prefix, select)
        source.settle(layout.end)  # a stream is left where torch.load leaves it
        return result


def _read_layout(source: Source, weights_only: bool) -> Layout:
    """Read the layout; a refused legacy header is torch's UnpicklingError where torch's would be.

    torch.load unpickles a non-zip file's first pickle (the magic number) with the
    restricted unpickler when ``weights_only``, so a hostile pickle there is reported as
    an UnpicklingError. ckptd's scan has already refused it; the restricted unpickler (never
    the full one) is run on that pickle only to give the same verdict.
    """
    try:
        return read_layout(source)
    except CheckpointError as exc:
        if weights_only and sniff(source) is Format.TORCH_LEGACY:
            head = source.read(0, min(source.size, 1 << 20))
            try:
                _weights_only_unpickler.Unpickler(io.BytesIO(head), encoding="utf-8").load()
            except pickle.UnpicklingError as refused:
                raise UnpicklingError(weights_only_message(source.name, refused)) from None
            except Exception:  # noqa: BLE001 - any other failure: the scan's own error stands
                pass
        raise exc


@dataclass(frozen=True)
class Request:
    """The options of one load, resolved once (torch.load's rules) and passed down."""

    map_location: MapLocation
    pickle_module: ModuleType
    weights_only: bool
    mmap: bool
    progress: Progress | None
    pickle_load_args: dict[str, Any]
    skip_data: bool = False  # inside torch.serialization.skip_data(): storages are left unread


def make_request(
    map_location: MapLocation,
    pickle_module: ModuleType | None,
    weights_only: bool | None,
    mmap: bool | None,
    progress: Progress | None,
    pickle_load_args: dict[str, Any],
) -> Request:
    """Resolve torch.load's options as torch does: defaults, environment, warnings, checks.

    What torch.load does under a fake tensor mode (fake tensors, no data) ckptd does not:
    it refuses rather than return something else.
    """
    if torch._guards.detect_fake_mode(None) is not None:
        raise UsageError(
            "loading under a FakeTensorMode (fake tensors, no data) is not supported by ckptd: use torch.load"
        )
    weights_only, module = _resolve_weights_only(weights_only, pickle_module)
    if pickle_load_args and weights_only:
        warnings.warn("pickle_load_args only works if `weights_only=False`.", stacklevel=3)
    args = {"encoding": "utf-8", **pickle_load_args}
    mmap = _default_mmap() if mmap is None else mmap
    return Request(map_location, module, weights_only, mmap, progress, args, skip_data=_skip_data())


def _skip_data() -> bool:
    """Whether the caller is inside ``torch.serialization.skip_data()`` (torch 2.5+)."""
    tls = getattr(torch.serialization, "_serialization_tls", None)
    return bool(getattr(tls, "skip_data", False))


def check_daemon_load(request: Request, layout: Layout | None = None) -> None:
    """Refuse what a load through the daemon cannot do as torch.load would.

    The daemon reads every storage (``skip_data`` leaves them unread), and it reads files
    without a ``byteorder`` record in its own default load endianness, not this process's.
    """
    if request.skip_data:
        raise UsageError("torch.serialization.skip_data() is not supported by ckptd through a daemon: load without server=")
    if layout is not None and not layout.byteorder_recorded and layout.byteorder != default_load_byteorder():
        raise UsageError(
            f"{layout.name} has no byteorder record and torch.serialization.get_default_load_endianness() "
            f"asks for {default_load_byteorder()}-endian storages, but the daemon read them as {layout.byteorder}-endian: "
            "not supported by ckptd through a daemon; load without server="
        )


def _resolve_weights_only(weights_only: bool | None, pickle_module: ModuleType | None) -> tuple[bool, ModuleType]:
    """torch.load's rules: the default, the two ``TORCH_FORCE_*`` variables, the pickle_module check."""
    not_set = weights_only is None
    if not_set:
        weights_only = pickle_module is None
    force = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE
    force_no = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE
    if force and force_no:
        raise UsageError(
            "Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` "
            "should be set, but both were set."
        )
    if force:
        weights_only = True
    elif force_no and not_set:
        warnings.warn(
            "Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected, since the"
            "`weights_only` argument was not explicitly passed to `torch.load`, forcing weights_only=False.",
            UserWarning,
            stacklevel=4,
        )
        weights_only = False
    if weights_only:
        if pickle_module is not None:
            raise UsageError("Can not safely load weights when explicit pickle_module is specified")
        return True, _weights_only_unpickler
    module = pickle_module if pickle_module is not None else pickle
    check_dill = getattr(torch.serialization, "_check_dill_version", None)
    if check_dill is not None:
        try:  # torch refuses dill older than 0.3.1 (its own check and message)
            check_dill(module)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return False, module


def _default_mmap() -> bool:
    """torch's ``torch.utils.serialization.config.load.mmap`` (False where torch lacks the config)."""
    if _torch_serialization_config is None:
        return False
    return bool(_torch_serialization_config.load.mmap)


def _load_layout(
    source: Source,
    layout: Layout,
    request: Request,
    tensor_name: str | None,
    prefix: str | None,
    select: Select,
) -> Any:
    wanted = wanted_entries(layout, tensor_name, prefix, select)
    keys = list(layout.storages) if wanted is None else keys_of(wanted)
    if layout.format is Format.SAFETENSORS:
        _check_safetensors_map_location(request.map_location)
    storages = read_storages(
        source, layout, keys, request.map_location, mmap=request.mmap and not request.skip_data,
        progress=request.progress, wait=False, skip_data=request.skip_data,
    )
    return rebuild(layout, storages, request, tensor_name is not None, wanted)


def rebuild(layout: Layout, storages: StorageSet, request: Request, single: bool, wanted: list[TensorEntry] | None) -> Any:
    """The object torch.load would return, around ``storages``; the selected part of it if asked."""
    try:  # the object is rebuilt while the storages' bytes arrive
        if layout.format is Format.SAFETENSORS:
            obj: Any = _safetensors_dict(layout, storages)
        else:
            built = rebuild_plain(layout, storages, request.pickle_module, request.pickle_load_args)
            if built is not None:
                obj = built.value
            else:
                obj = unpickle(layout, storages, request.pickle_module, request.weights_only, request.pickle_load_args)
    finally:
        storages.wait()
    if wanted is None:
        return obj
    if single:
        return extract(obj, wanted[0])
    return {entry.name: extract(obj, entry) for entry in wanted}


def wanted_entries(layout: Layout, tensor_name: str | None, prefix: str | None, select: Select) -> list[TensorEntry] | None:
    if tensor_name is not None and select is not None:
        raise UsageError("pass either tensor_name= or select=, not both")
    if tensor_name is None and select is None:
        return None  # the whole object: no name map (tens of thousands of entries) to build per load
    entries = layout.tensor_map()
    if tensor_name is not None:
        return [find(entries, tensor_name, prefix, layout.name)]
    if select is not None:
        return select_entries(entries, select, prefix, layout.name)
    return None


def keys_of(entries: list[TensorEntry]) -> list[str]:
    return list(dict.fromkeys(key for entry in entries for key in entry.storage_keys))


def _check_mmap(f: FileLike, layout: Layout) -> None:
    """torch.load's mmap rules and messages: zip files only, and only given by path."""
    if layout.format is Format.TORCH_LEGACY:
        f_name = f"{f}, " if isinstance(f, str) else ""
        raise UsageError(
            "mmap can only be used with files saved with "
            f"`torch.save({f_name}_use_new_zipfile_serialization=True), "
            "please torch.save your checkpoint with this option in order to use mmap."
        )
    if not isinstance(f, (str, os.PathLike)):
        raise UsageError("f must be a file path in order to use the mmap argument")


def _check_safetensors_map_location(map_location: MapLocation) -> None:
    """torch.load refuses dict and callable map_locations for safetensors files; so does ckptd."""
    if isinstance(map_location, Mapping):
        raise UsageError(
            "Loading safetensors file with dict map_location is not supported. "
            "Use a device string or torch.device instead."
        )
    if map_location is not None and target_tag(map_location, "cpu") is None:
        raise UsageError(
            "Loading safetensors file with callable map_location is not supported. "
            "Use a device string or torch.device instead."
        )


def _safetensors_dict(layout: Layout, storages: StorageSet) -> dict[str, torch.Tensor]:
    """What ``safetensors.torch.load_file`` returns: contiguous tensors, each on its own storage."""
    result: dict[str, torch.Tensor] = {}
    for entry in layout.tensors:
        storage = storages.get(entry.storage_keys[0], entry.location)
        tensor = torch.empty(0, dtype=entry.dtype, device=storage.device)
        result[entry.name] = tensor.set_(storage, 0, entry.shape, entry.stride)
    return result


def _torchscript_via_load(f: FileLike, source: Source, map_location: MapLocation, weights_only: bool) -> Any:
    """torch.load hands TorchScript archives to torch.jit.load, with a warning; so does ckptd."""
    warnings.warn(
        "'torch.load' received a zip file that looks like a TorchScript archive"
        " dispatching to 'torch.jit.load' (call 'torch.jit.load' directly to"
        " silence this warning)",
        UserWarning,
        stacklevel=3,
    )
    if weights_only:
        raise UsageError("Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``. " + _UNSAFE)
    from ._jit import jit_load_source

    return jit_load_source(f, source, map_location, None)


def sharded_plan(
    path: str, tensor_name: str | None, prefix: str | None, select: Select, index: ShardedIndex | None = None
) -> tuple[list[str], dict[str, list[str]]]:
    """Which names a sharded load returns (in index order) and which shard holds each
    (``index``: the index already read, e.g. by the daemon, else it is read from ``path``).

    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for shard in ("a.pt", "b.pt"): (folder / shard).write_bytes(b"")
    0
    0
    >>> index = folder / "m.bin.index.json"
    >>> _ = index.write_text(json.dumps({"weight_map": {"x": "a.pt", "y": "b.pt", "z": "a.pt"}}))
    >>> names, shards = sharded_plan(str(index), None, None, ["x", "y"])
    >>> names, [os.path.basename(s) for s in shards]
    (['x', 'y'], ['a.pt', 'b.pt'])
    """
    index = index if index is not None else read_sharded_index(path)
    names = list(index.weight_map)
    entries = {name: _shard_entry(name) for name in names}
    if tensor_name is not None:
        names = [find(entries, tensor_name, prefix, index.name).name]
    elif select is not None:
        names = [entry.name for entry in select_entries(entries, select, prefix, index.name)]
    shard_of = {name: os.path.join(index.directory, index.weight_map[name]) for name in names}
    plan = {shard: [name for name in names if shard_of[name] == shard] for shard in index.shards}
    return names, {shard: wanted for shard, wanted in plan.items() if wanted}


def load_shards(
    path: str, tensor_name: str | None, prefix: str | None, select: Select,
    load_shard: Callable[[str, list[str]], Mapping[str, Any]], index: ShardedIndex | None = None,
) -> Any:
    """A Hugging Face sharded checkpoint, ``load_shard(shard, names)`` per shard, merged into
    one state dict in the index's order (or the one tensor ``tensor_name`` names)."""
    names, plan = sharded_plan(path, tensor_name, prefix, select, index)
    merged: dict[str, Any] = {}
    for shard, wanted in plan.items():
        merged.update(load_shard(shard, wanted))
    result = {name: merged[name] for name in names}
    return result[names[0]] if tensor_name is not None else result


def _load_sharded(path: str, request: Request, tensor_name: str | None, prefix: str | None, select: Select) -> Any:
    """A Hugging Face sharded checkpoint, loaded shard by shard in this process."""

    def load_shard(shard: str, wanted: list[str]) -> Mapping[str, Any]:
        with open_source(shard) as source:
            loaded: Mapping[str, Any] = _load_layout(source, read_layout(source), request, None, None, wanted)
            return loaded

    return load_shards(path, tensor_name, prefix, select, load_shard)


def _shard_entry(name: str) -> TensorEntry:
    # Only names matter for lookup in an index; the shard's own layout gives the rest.
    return TensorEntry(name, (name,), (), torch.uint8, (), None, 0, "cpu")
