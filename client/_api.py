"""The public front: ``ckptd.load`` and ``ckptd.jit_load`` choose, in this one place, between
the embedded engine (this process reads the file) and the daemon client (``ckptd.Client``).

A load goes through the daemon when ``server`` is given or ``ckptd.settings.url``
(``$CKPTD_URL``) is set; the engine modules (``ckptd.engine``) know nothing of the
daemon, and the client builds on them, so imports run one way: front → client → engine.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ckptd.formats import FileLike

from ckptd import engine
from ckptd.engine import MapLocation, Select, settings

if TYPE_CHECKING:
    from ._client import Client

Progress = engine.Progress


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
    server: str | None = None,
    **pickle_load_args: Any,
) -> Any:
    """Load a checkpoint exactly as :func:`torch.load` would, storages read straight into arenas.

    ``f`` is a path, a binary file-like object or ``bytes``: a torch.save file (zip or
    legacy), a safetensors file, or a Hugging Face ``*.index.json`` of shards.
    ``map_location``, ``pickle_module``, ``weights_only``, ``mmap`` and
    ``pickle_load_args`` mean what they mean to torch.load. ``tensor_name`` returns one
    tensor, ``select`` (a list of names, or one name start) a dict of them; either reads
    only the storages they need. ``prefix`` is a module-name component saved names may
    lack. ``progress`` is called with each chunk's byte count while storages are read (through
    the daemon, which reads them: once, with their total, when they are in place).
    ``server`` (default: ``ckptd.settings.url``, i.e. ``$CKPTD_URL``) loads through a
    daemon's shared cache instead of in this process (see :class:`ckptd.Client`).

    >>> import io, torch, ckptd
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf)
    >>> ckptd.load(buf.getvalue())
    {'w': tensor([1., 1.])}
    """
    client = _daemon(server)
    if client is not None:
        return client.load(
            f, map_location, pickle_module, weights_only=weights_only, mmap=mmap,
            tensor_name=tensor_name, prefix=prefix, select=select, progress=progress, **pickle_load_args,
        )
    return engine.load(
        f, map_location, pickle_module, weights_only=weights_only, mmap=mmap,
        tensor_name=tensor_name, prefix=prefix, select=select, progress=progress, **pickle_load_args,
    )


def jit_load(
    f: FileLike,
    map_location: MapLocation = None,
    _extra_files: dict[str, Any] | None = None,
    *,
    server: str | None = None,
) -> torch.jit.ScriptModule:
    """Load a TorchScript archive as :func:`torch.jit.load` does, tensors in ckptd's arenas.

    ``server`` (default: ``ckptd.settings.url``, i.e. ``$CKPTD_URL``) takes the tensors
    from a daemon's shared cache.

    >>> import io, torch, ckptd
    >>> buf = io.BytesIO(); torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    >>> module = ckptd.jit_load(buf.getvalue())
    >>> module(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """
    client = _daemon(server)
    if client is not None:
        return client.jit_load(f, map_location, _extra_files)
    return engine.jit_load(f, map_location, _extra_files)


def _daemon(server: str | None) -> Client | None:
    """The process's client for ``server`` (else ``ckptd.settings.url``); None: load embedded."""
    url = server or settings.url
    if not url:
        return None
    # Imported here: an embedded load never pays for the daemon client's HTTP stack
    # (httpx and what it imports: 0.1-0.4 s in a fresh process, more than a small load).
    from ._client import shared_client

    return shared_client(url)
