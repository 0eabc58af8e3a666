"""The out-of-memory error of the device layer (apart from ``_errors``: it needs torch's type,
and importing :mod:`ckptd.gpu` stays torch-free)."""

from __future__ import annotations

import torch

from ._errors import DeviceError


class DeviceOutOfMemoryError(DeviceError, torch.cuda.OutOfMemoryError):
    """A GPU has no room for an allocation (also torch's :class:`torch.cuda.OutOfMemoryError`)."""
