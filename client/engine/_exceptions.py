"""Every error ckptd raises on purpose derives from :class:`CkptdError`.

Where torch.load raises a builtin type for the same condition, ckptd's error is also an
instance of that type, so ``except RuntimeError`` written for torch.load keeps working::

    CkptdError
    ├── CheckpointError                 the input is not a readable checkpoint (names the file)
    │   ├── UnsupportedFormatError      well-formed, but a format or variant ckptd does not read
    │   ├── StorageMismatchError        a tensor does not fit its storage (also RuntimeError)
    │   └── CheckpointNotFoundError     no such file (also FileNotFoundError)
    ├── NotSeekableError                a stream that cannot seek (also io.UnsupportedOperation)
    ├── NotFileLikeError                no seek, tell or read: not a file-like object (also AttributeError)
    ├── TensorNotFoundError             a selected name is absent; lists near matches (also LookupError)
    ├── DeviceError                     a map_location target that does not exist (also RuntimeError)
    ├── UnpicklingError                 weights_only refused a global (also pickle.UnpicklingError)
    ├── UsageError                      arguments that do not fit together (also ValueError, RuntimeError)
    ├── ModelMismatchError              load_into: checkpoint and model do not fit, or a tensor was copied (also RuntimeError)
    └── DaemonError                     the daemon refused or could not serve a request
        ├── DaemonNotRunningError       nothing listens at the URL; the message says how to start it
        ├── DaemonTimeoutError          the daemon did not answer in time (also TimeoutError)
        ├── AuthenticationError         missing or wrong token (also PermissionError)
        ├── PathNotAllowedError         the path resolves outside the daemon's roots (also PermissionError)
        ├── OverBudgetError             the checkpoint does not fit the memory budget (also MemoryError)
        ├── CheckpointBusyError         eviction refused: clients hold leases on it
        └── LeaseLostError              the lease expired or was released

Foreign errors are converted where they enter, with ``raise ... from exc`` (every transport
failure in one place, ``ckptd._wire.transport_errors``). Every class shows as ``ckptd.X``
and takes one message, ``X("...")``; :class:`CheckpointError` also takes ``(name, problem)``.
"""

from __future__ import annotations

import pickle

from ckptd.formats import (
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    NotFileLikeError,
    NotSeekableError,
    TensorNotFoundError,
    UnsupportedFormatError,
)
from ckptd.gpu import DeviceError


class UnpicklingError(CkptdError, pickle.UnpicklingError):
    """The restricted (``weights_only=True``) unpickler refused something in the checkpoint."""


class StorageMismatchError(CheckpointError, RuntimeError):
    """A tensor in the checkpoint does not fit the storage the file gives it (torch.load
    fails there with RuntimeError: ``storage has wrong byte size``)."""


class UsageError(CkptdError, ValueError, RuntimeError):
    """Arguments that cannot be used together (torch.load raises ValueError or RuntimeError here)."""


class ModelMismatchError(CkptdError, RuntimeError):
    """:func:`ckptd.load_into` could not make the model's tensors *be* the checkpoint's.

    Missing or unexpected keys (torch's ``load_state_dict`` raises RuntimeError there),
    a parameter or buffer left on the ``meta`` device, or one that does not alias the
    loaded storage.
    """


class DaemonError(CkptdError):
    """The daemon refused a request or could not serve it."""


class DaemonNotRunningError(DaemonError, ConnectionError):
    """Nothing answers at the daemon's URL."""


class DaemonTimeoutError(DaemonError, TimeoutError):
    """The daemon did not answer in time (the client's timeout; see ``ckptd.settings``)."""


class AuthenticationError(DaemonError, PermissionError):
    """The daemon wants a token this client did not send, or sent wrong."""


class PathNotAllowedError(DaemonError, PermissionError):
    """The checkpoint path resolves outside every root the daemon serves."""


class OverBudgetError(DaemonError, MemoryError):
    """The checkpoint does not fit the daemon's memory budget, even after evicting what it may."""


class CheckpointBusyError(DaemonError):
    """The checkpoint cannot be evicted: clients hold leases on it."""


class LeaseLostError(DaemonError):
    """The lease is gone (expired or released); its arenas may be evicted."""


__all__ = [
    "AuthenticationError",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonTimeoutError",
    "DeviceError",
    "LeaseLostError",
    "ModelMismatchError",
    "StorageMismatchError",
    "NotFileLikeError",
    "NotSeekableError",
    "OverBudgetError",
    "PathNotAllowedError",
    "TensorNotFoundError",
    "UnpicklingError",
    "UnsupportedFormatError",
    "UsageError",
]
