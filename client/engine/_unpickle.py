"""Rebuilding the saved object with torch's own unpickling, storages from the arenas.

These mirror ``torch.serialization._load`` and ``_legacy_load``: the same Unpickler
subclass (``find_class`` maps storage class names to ``StorageType``), the same
``persistent_load`` contract (a ``TypedStorage`` per key, cached unless empty), the same
post-checks. Only where the bytes come from differs: a :class:`StorageSet`.
"""

from __future__ import annotations

import io
import pickle
from types import ModuleType
from typing import Any

import torch
from torch.serialization import StorageType

from ckptd.formats import CheckpointError, Layout

from ._exceptions import StorageMismatchError, UnpicklingError
from ._storages import StorageSet

# torch.serialization._load's own remapping (https://github.com/pytorch/pytorch/pull/51633).
_MODULE_MAPPING = {"torch.tensor": "torch._tensor"}


def _text(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _unpickler_class(pickle_module: ModuleType) -> type:
    class UnpicklerWrapper(pickle_module.Unpickler):  # type: ignore[name-defined,misc]
        def find_class(self, mod_name: str, name: str) -> Any:
            if type(name) is str and "Storage" in name:
                try:
                    return StorageType(name)
                except KeyError:
                    pass
            return super().find_class(_MODULE_MAPPING.get(mod_name, mod_name), name)

    return UnpicklerWrapper


def _typed(storage: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def unpickle(
    layout: Layout,
    storages: StorageSet,
    pickle_module: ModuleType,
    weights_only: bool,
    load_args: dict[str, Any],
) -> Any:
    """Rebuild the object of a zip, TorchScript-data or legacy checkpoint.

    Raises :class:`UnpicklingError` when the restricted unpickler refuses the file.
    """
    assert layout.pickle is not None
    if layout.header is not None:
        _unpickle_header(layout.header, pickle_module, weights_only, load_args, layout.name)
    persistent_load = _zip_persistent_load(layout, storages)
    if layout.format.value == "torch-legacy":
        persistent_load = _legacy_persistent_load(layout, storages)
    unpickler = _unpickler_class(pickle_module)(io.BytesIO(layout.pickle), **load_args)
    unpickler.persistent_load = persistent_load
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if tls is not None:
        # torch sets this for wrapper subclasses rebuilt on a device (torch._utils reads it).
        tls.map_location = storages.map_location
    try:
        result = unpickler.load()
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnpicklingError(weights_only_message(layout.name, exc)) from None
        raise
    except RuntimeError as exc:
        # torch grows a legacy storage a tensor overruns (and fails later, reading the file);
        # ckptd's storages are views that cannot grow: the same file, refused at once
        if layout.header is not None and "not resizable" in str(exc):
            raise StorageMismatchError(layout.name, f"a tensor lies past the end of its storage ({exc})") from exc
        raise
    finally:
        if tls is not None:
            tls.map_location = None
    storages.wait()  # the sparse-tensor checks read index data
    torch._utils._validate_loaded_sparse_tensors()
    return result


def _unpickle_header(header: bytes, pickle_module: ModuleType, weights_only: bool, load_args: dict[str, Any], name: str) -> None:
    """Unpickle a legacy file's magic number, protocol and system info as torch.load does,
    so what its unpickler refuses there is refused here too (the scan has checked their values)."""
    stream = io.BytesIO(header)
    try:
        for _ in range(3):
            pickle_module.load(stream, **load_args)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnpicklingError(weights_only_message(name, exc)) from None
        raise


def weights_only_message(name: str, exc: Exception) -> str:
    """What to tell a user whose file the restricted unpickler refused."""
    return (
        f"Weights only load failed for {name}. If you trust the file's source, load it with "
        "weights_only=False (this runs code from the file); or allow the globals it needs with "
        "torch.serialization.add_safe_globals([...]) or the torch.serialization.safe_globals "
        f"context manager.\n\nWeightsUnpickler error: {exc}"
    )


def _zip_persistent_load(layout: Layout, storages: StorageSet) -> Any:
    loaded: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or _text(saved_id[0]) != "storage" or len(saved_id) != 5:
            raise CheckpointError(layout.name, f"unexpected persistent id {saved_id!r}")
        storage_type, key, location, _numel = saved_id[1:]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        key = str(_text(key))
        if key in loaded:
            return loaded[key]
        typed = _typed(storages.get(key, _text(location)), dtype)
        if typed._data_ptr() != 0:
            loaded[key] = typed
        return typed

    return persistent_load


def _legacy_persistent_load(layout: Layout, storages: StorageSet) -> Any:
    objects: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple):
            raise CheckpointError(layout.name, f"unexpected persistent id {saved_id!r}")
        typename = _text(saved_id[0])
        data = saved_id[1:]
        if typename == "module":
            return data[0]  # a whole-module pickle names its class; the source check is torch's
        if typename != "storage":
            raise CheckpointError(layout.name, f"unknown persistent id type {typename!r}")
        storage_type, root_key, location, _numel, view_metadata = data
        root_key, dtype = str(_text(root_key)), storage_type.dtype
        if root_key not in objects:
            objects[root_key] = _typed(storages.get(root_key, _text(location)), dtype)
        root = objects[root_key]
        if root._data_ptr() == 0:  # as torch: an empty storage is never shared
            root = torch.storage.TypedStorage(device=root._untyped_storage.device, dtype=dtype, _internal=True)
        if view_metadata is None:
            return root
        view_key, offset, size = view_metadata
        view_key = str(_text(view_key))
        if view_key not in objects:
            start = offset * dtype.itemsize
            objects[view_key] = _typed(root._untyped_storage[start : start + size * dtype.itemsize], dtype)
        return objects[view_key]

    return persistent_load
