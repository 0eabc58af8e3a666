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


def device_for_tag(tag: str) -> torch.device:
    """The device torch.load would put a storage tagged ``tag`` on, with torch's errors.

    torch's own restore function is run on an empty storage, so validation (device
    exists, index in range, backend registered) and its messages are torch's. A tag
    without an index (``"cuda"``) names the calling thread's current device, so it is
    resolved on every call; tags with an index are cached.

    >>> device_for_tag("cpu")
    device(type='cpu')
    """
    if ":" not in tag and tag not in ("cpu", "meta"):
        return restore(torch.UntypedStorage(0), tag).device
    return _indexed_device(tag)


@functools.lru_cache(maxsize=64)
def _indexed_device(tag: str) -> torch.device:
    return restore(torch.UntypedStorage(0), tag).device


def with_current_device(map_location: MapLocation, current: Callable[[], int]) -> MapLocation:
    """``map_location`` with each bare ``"cuda"`` target made ``cuda:<current()>``: what torch
    would resolve it to in this thread now (``current`` is asked at most once).

    >>> with_current_device({"cuda:1": "cuda"}, lambda: 3), with_current_device("cpu", lambda: 3)
    ({'cuda:1': 'cuda:3'}, 'cpu')
    """
    index: list[int] = []

    def fix(target: str) -> str:
        if target != "cuda":
            return target
        if not index:
            index.append(current())
        return f"cuda:{index[0]}"

    if isinstance(map_location, Mapping):
        if not any(str(v) == "cuda" for v in map_location.values()):
            return map_location
        return {str(k): fix(str(v)) for k, v in map_location.items()}
    if isinstance(map_location, (str, bytes, torch.device)):
        target = map_location.decode("ascii") if isinstance(map_location, bytes) else str(map_location)
        return fix(target) if target == "cuda" else map_location
    return map_location


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
