"""Zero-copy workers: a model whose parameters *are* the loaded (shared) tensors.

``model.load_state_dict(state)`` copies every tensor into the model's own parameters,
which throws the daemon's sharing away: each worker would hold a private copy. Here the
model is built without memory for its parameters (on the ``meta`` device) and
``load_state_dict(assign=True)`` makes each parameter and buffer wrap the loaded tensor
itself. The result is then checked: nothing left on ``meta``, every tensor from the
checkpoint aliasing the loaded storage, tied parameters still tied.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ckptd.engine import MapLocation, ModelMismatchError, UsageError
from ckptd.formats import FileLike

from ._api import load

logger = logging.getLogger(__name__)

__all__ = ["load_into", "meta_parameters"]


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with their parameters on ``meta`` (no memory) and their buffers real.

    Non-persistent buffers (a rotary embedding's ``inv_freq``) are not in checkpoints, so
    they must be computed when the model is built; parameters will come from the
    checkpoint. Under ``torch.device("meta")`` both would be empty; here only parameters
    are. Each parameter is created as the module's ``__init__`` creates it and moved to
    ``meta`` as it is registered, so no memory stays behind; ``torch.nn.init``'s
    initializers leave meta tensors as they are (there are no values to fill).

    >>> with meta_parameters():
    ...     layer = torch.nn.Linear(4, 2)
    >>> layer.weight.device.type
    'meta'
    """
    original = nn.Module.register_parameter
    initializers = {name: getattr(nn.init, name) for name in _INITIALIZERS}

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            placed = module._parameters[name]
            assert placed is not None
            module._parameters[name] = type(placed)(placed.to("meta"), requires_grad=placed.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign, assignment]
    for name, init in initializers.items():
        setattr(nn.init, name, _skipping_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, init in initializers.items():
            setattr(nn.init, name, init)


# torch.nn.init's in-place initializers. A meta tensor has no values to fill, yet torch runs
# its Python meta kernels for the random ones, and the first of those imports torch._dynamo:
# ~1.3 s of CPU in a worker's first model build, for nothing (the checkpoint's values come next).
_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


def _skipping_meta(init: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``init`` that leaves a meta tensor as it is (and fills any other as before)."""

    @functools.wraps(init)
    def skipping(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return skipping


def load_into(
    model: nn.Module,
    f: FileLike,
    map_location: MapLocation = None,
    *,
    key: str | None = None,
    strict: bool = True,
    weights_only: bool | None = None,
    server: str | None = None,
) -> Any:
    """Fill ``model`` with a checkpoint's tensors *without copying them*; returns torch's
    ``load_state_dict`` result (missing and unexpected keys).

    ``f`` and ``map_location`` are :func:`ckptd.load`'s; ``server`` (default
    ``ckptd.settings.url``) loads through the daemon, so every worker's model maps one shared
    copy. ``key`` picks the state dict inside a larger checkpoint (``{"model": ...}``).
    Build the model with :func:`meta_parameters` (or ``torch.device("meta")`` when it
    has no non-persistent buffers). Raises :class:`ckptd.ModelMismatchError` when keys
    do not match (``strict``), when anything is left on ``meta``, or when a tensor did
    not end up aliasing the loaded storage.

    >>> import io, torch, ckptd
    >>> buf = io.BytesIO(); torch.save(torch.nn.Linear(4, 2).state_dict(), buf)
    >>> with ckptd.meta_parameters():
    ...     layer = torch.nn.Linear(4, 2)
    >>> ckptd.load_into(layer, buf.getvalue())
    <All keys matched successfully>
    >>> layer.weight.device.type
    'cpu'
    """
    tied = _tied_groups(model)
    state = _state_dict(load(f, map_location, weights_only=weights_only, server=server), key, f)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that do not fit
        raise ModelMismatchError(f"{_name(f)} does not fit {type(model).__name__}: {exc}") from exc
    _retie(model, tied)
    # A tied name the checkpoint omits is filled by its twin (save_pretrained drops them).
    filled = {name for names in tied if any(n in state for n in names) for name in names}
    result = type(result)([k for k in result.missing_keys if k not in filled], result.unexpected_keys)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ModelMismatchError(
            f"{_name(f)} does not fit {type(model).__name__}: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]} (pass strict=False to load what matches)"
        )
    _check_aliasing(model, state, f)
    return result


def _state_dict(loaded: Any, key: str | None, f: FileLike) -> Mapping[str, torch.Tensor]:
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            keys = sorted(map(str, loaded)) if isinstance(loaded, Mapping) else []
            raise UsageError(f"{_name(f)} has no entry {key!r} (top-level keys: {keys[:10]})")
        loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        hint = "" if key else "; if the state dict is one entry of it, pass key= (e.g. key='model')"
        raise UsageError(f"{_name(f)} does not hold a state dict of tensors (it holds a {type(loaded).__name__}){hint}")
    return loaded


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter object (tied embeddings): they must stay one."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """``assign=True`` gives each name its own Parameter; give the tied names the first's."""
    for names in tied:
        loaded = [n for n in names if model.get_parameter(n).device.type != "meta"]
        param = model.get_parameter((loaded or names)[0])
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def _check_aliasing(model: nn.Module, state: Mapping[str, torch.Tensor], f: FileLike) -> None:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    on_meta = [name for name, t in tensors if t.device.type == "meta"]
    if on_meta:
        raise ModelMismatchError(
            f"after loading {_name(f)}, {len(on_meta)} tensor(s) of {type(model).__name__} are still on the meta device "
            f"(not in the checkpoint): {on_meta[:8]}; build the model inside ckptd.meta_parameters() so buffers are "
            "computed, or add the missing tensors to the checkpoint"
        )
    copied = [name for name, t in tensors if name in state and t.data_ptr() != state[name].data_ptr()]
    if copied:
        raise ModelMismatchError(f"{len(copied)} tensor(s) of {type(model).__name__} were copied, not shared: {copied[:8]}")


def _name(f: FileLike) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else f"<{type(f).__name__}>"
