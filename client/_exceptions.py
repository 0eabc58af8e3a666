"""Every error ckptd raises on purpose derives from :class:`CkptdError`.

Where torch.load raises a builtin type for the same condition, ckptd's error is also an
instance of that type, so ``except RuntimeError`` written for torch.load keeps working::

    CkptdError
    ├── CheckpointError                 the input is not a readable checkpoint (names the file)
    │   ├── UnsupportedFormatError      well-formed, but a format or variant ckptd does not read
    │   └── CheckpointNotFoundError     no such file (also FileNotFoundError)
    ├── NotSeekableError                a stream that cannot seek (also io.UnsupportedOperation)
    ├── TensorNotFoundError             a selected name is absent; lists near matches (also LookupError)
    ├── DeviceError                     a map_location target that does not exist (also RuntimeError)
    ├── UnpicklingError                 weights_only refused a global (also pickle.UnpicklingError)
    └── UsageError                      arguments that do not fit together (also ValueError, RuntimeError)

Foreign errors are converted where they enter, with ``raise ... from exc``.
"""

from __future__ import annotations

import pickle

from ckptd.formats import (
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    NotSeekableError,
    TensorNotFoundError,
    UnsupportedFormatError,
)
from ckptd.gpu import DeviceError


class UnpicklingError(CkptdError, pickle.UnpicklingError):
    """The restricted (``weights_only=True``) unpickler refused something in the checkpoint."""


class UsageError(CkptdError, ValueError, RuntimeError):
    """Arguments that cannot be used together (torch.load raises ValueError or RuntimeError here)."""


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "DeviceError",
    "NotSeekableError",
    "TensorNotFoundError",
    "UnpicklingError",
    "UnsupportedFormatError",
    "UsageError",
]
