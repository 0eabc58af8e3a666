"""Errors of the device layer."""

from __future__ import annotations

from ckptd.formats import CkptdError


class DeviceError(CkptdError, RuntimeError):
    """A target device does not exist or cannot hold the data.

    Also a :class:`RuntimeError` carrying torch's own message where torch.load would
    have raised, so code written against torch.load keeps working.
    """
