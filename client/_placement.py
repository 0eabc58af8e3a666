"""map_location, exactly as torch.load reads it.

torch.load turns ``map_location`` into a per-storage rule: ``None`` keeps the saved
location tag, a string or :class:`torch.device` replaces every tag, a dict remaps the tags
it lists, and a callable is handed each storage (on the CPU) with its tag. ckptd resolves
the non-callable forms *before* reading, so each storage is read straight to its device;
callables are applied afterwards, once per storage, to the CPU storage, as torch does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Union

import torch

from ._exceptions import DeviceError

MapLocation = Union[
    None,
    str,
    bytes,
    torch.device,
    Mapping[str, str],
    Callable[[torch.UntypedStorage, str], Union[torch.UntypedStorage, None]],
]


def target_tag(map_location: MapLocation, location: str) -> str | None:
    """The location tag a storage saved at ``location`` goes to; ``None`` for a callable.

    >>> target_tag({"cuda:1": "cuda:0"}, "cuda:1"), target_tag("cpu", "cuda:1")
    ('cuda:0', 'cpu')
    """
    if map_location is None:
        return location
    if isinstance(map_location, Mapping):
        return str(map_location.get(location, location))
    if isinstance(map_location, bytes):
        return map_location.decode("ascii")
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    if callable(map_location):
        return None
    raise TypeError(
        "map_location must be None, a str, a torch.device, a dict of location tags or a callable, "
        f"not {type(map_location).__name__}"
    )


@functools.lru_cache(maxsize=64)
def device_for_tag(tag: str) -> torch.device:
    """The device torch.load would put a storage tagged ``tag`` on, with torch's errors.

    torch's own restore function is run on an empty storage, so validation (device
    exists, index in range, backend registered) and its messages are torch's.
    """
    return restore(torch.UntypedStorage(0), tag).device


def restore(storage: torch.UntypedStorage, tag: str) -> torch.UntypedStorage:
    """``torch.serialization.default_restore_location``, with its errors as :class:`DeviceError`."""
    try:
        result: torch.UntypedStorage = torch.serialization.default_restore_location(storage, tag)
    except RuntimeError as exc:
        raise DeviceError(str(exc)) from exc
    except (AssertionError, TypeError, ValueError) as exc:
        raise DeviceError(f"cannot place a storage at location {tag!r}: {exc}") from exc
    return result


def apply_callable(
    map_location: Callable[[torch.UntypedStorage, str], torch.UntypedStorage | None],
    storage: torch.UntypedStorage,
    location: str,
) -> torch.UntypedStorage:
    """Call a map_location function as torch.load does: ``None`` means the default placement."""
    result = map_location(storage, location)
    if result is None:
        result = restore(storage, location)
    return result
