"""Errors of the device layer."""

from __future__ import annotations

from ckptd.formats import CkptdError


class DeviceError(CkptdError, RuntimeError):
    """A target device does not exist or cannot hold the data.

    Also a :class:`RuntimeError` carrying torch's own message where torch.load would
    have raised, so code written against torch.load keeps working.
    """


def missing_cuda_device(index: int, count: int) -> DeviceError:
    """torch.load's error for a storage sent to ``cuda:<index>`` where only ``count`` GPUs
    exist, word for word (code written against torch.load may match it).

    >>> str(missing_cuda_device(2, 1)).split(".")[0]
    'Attempting to deserialize object on CUDA device 2 but torch'
    """
    return DeviceError(
        f"Attempting to deserialize object on CUDA device {index} but torch.cuda.device_count() is {count}. "
        "Please use torch.load with map_location to map your storages to an existing device."
    )
