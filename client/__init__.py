"""ckptd: torch.load's results, with storages streamed straight into shared memory.

The public surface is small: :func:`load` (torch.load's contract, plus selective
loading), :func:`jit_load` (torch.jit.load's), :func:`inspect` (a checkpoint's tensors
without reading them), :class:`Client` (the same through the daemon's shared cache),
:data:`settings` (the client's settings, from ``CKPTD_*`` variables or code) and the
exception tree rooted at :class:`CkptdError`. :func:`load_into` fills a model built
with :func:`meta_parameters` with the loaded tensors themselves (no copy), so workers
served by the daemon share one copy of their weights. ``load(..., server=url)`` or
``settings.url`` (``$CKPTD_URL``) send ``load`` and ``jit_load`` through the daemon.

``import ckptd`` imports neither torch nor httpx: each function imports what it needs on
first use, so the admin commands (``ckptd health``) start fast.

>>> import io, torch, ckptd
>>> buf = io.BytesIO(); torch.save({"w": torch.zeros(3)}, buf)
>>> ckptd.load(buf.getvalue(), map_location="cpu")["w"]
tensor([0., 0., 0.])
"""

from __future__ import annotations

import typing

from ckptd.engine import (
    AuthenticationError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    DaemonError,
    DaemonNotRunningError,
    DaemonTimeoutError,
    DeviceError,
    LeaseLostError,
    ModelMismatchError,
    NotFileLikeError,
    NotSeekableError,
    OverBudgetError,
    PathNotAllowedError,
    StorageMismatchError,
    TensorNotFoundError,
    UnpicklingError,
    UnsupportedFormatError,
    UsageError,
    __version__,
    settings,
)
from ckptd.formats import lazy_attributes as _lazy_attributes

if typing.TYPE_CHECKING:
    from ._api import jit_load, load
    from ._client import Client
    from ckptd.engine import inspect
    from ._load_into import load_into, meta_parameters

__all__ = [
    "AuthenticationError",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "Client",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonTimeoutError",
    "DeviceError",
    "LeaseLostError",
    "ModelMismatchError",
    "NotFileLikeError",
    "NotSeekableError",
    "OverBudgetError",
    "PathNotAllowedError",
    "StorageMismatchError",
    "TensorNotFoundError",
    "UnpicklingError",
    "UnsupportedFormatError",
    "UsageError",
    "__version__",
    "inspect",
    "jit_load",
    "load",
    "load_into",
    "meta_parameters",
    "settings",
]

# The public errors show as ``ckptd.X`` wherever they are defined (httpx does the same).
for _name in __all__:
    if _name.endswith("Error"):
        globals()[_name].__module__ = __name__

_LAZY = {
    "Client": "._client",
    "inspect": "ckptd.engine",
    "jit_load": "._api",
    "load": "._api",
    "load_into": "._load_into",
    "meta_parameters": "._load_into",
}

__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY, __all__)

