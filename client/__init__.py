"""ckptd: torch.load's results, with storages streamed straight into shared memory.

The public surface is small: :func:`load` (torch.load's contract, plus selective
loading), :func:`jit_load` (torch.jit.load's), :func:`inspect` (a checkpoint's tensors
without reading them), :class:`Client` (the same through the daemon's shared cache) and
the exception tree rooted at :class:`CkptdError`. :func:`load_into` fills a model built
with :func:`meta_parameters` with the loaded tensors themselves (no copy), so workers
served by the daemon share one copy of their weights. ``load(..., server=url)`` or the
``CKPTD_URL`` environment variable send ``load`` and ``jit_load`` through the daemon.

>>> import io, torch, ckptd
>>> buf = io.BytesIO(); torch.save({"w": torch.zeros(3)}, buf)
>>> ckptd.load(buf.getvalue(), map_location="cpu")["w"]
tensor([0., 0., 0.])
"""

from __future__ import annotations

from ._client import Client
from ._exceptions import (
    AuthenticationError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    DaemonError,
    DaemonNotRunningError,
    DeviceError,
    LeaseLostError,
    ModelMismatchError,
    NotFileLikeError,
    NotSeekableError,
    OverBudgetError,
    PathNotAllowedError,
    TensorNotFoundError,
    UnpicklingError,
    UnsupportedFormatError,
    UsageError,
)
from ._inspect import inspect
from ._jit import jit_load
from ._load import load
from ._load_into import load_into, meta_parameters

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "Client",
    "DaemonError",
    "DaemonNotRunningError",
    "DeviceError",
    "LeaseLostError",
    "ModelMismatchError",
    "NotFileLikeError",
    "NotSeekableError",
    "OverBudgetError",
    "PathNotAllowedError",
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
]
