"""The three loads (``ckptd.load``, the engine's, ``Client.load``) take torch.load's arguments,
in torch's order, kinds and defaults; ckptd's own (``tensor_name``, ``prefix``, ``select``,
``progress``, ``server``) are keyword-only. The same for the three ``jit_load``s and
torch.jit.load. (The signature is still written three times: this keeps them from drifting.)"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ckptd
import ckptd.engine

EXTRAS = {"tensor_name", "prefix", "select", "progress", "server"}
Param = tuple[str, Any, Any]


def _params(fn: Callable[..., Any]) -> list[Param]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _torch_jit_load_params() -> list[Param]:
    # torch-internal ``_restore_shapes`` aside: what a caller of torch.jit.load passes
    return [p for p in _params(torch.jit.load) if p[0] != "_restore_shapes"]


@pytest.mark.parametrize("fn", [ckptd.load, ckptd.engine.load, ckptd.Client.load], ids=["ckptd", "engine", "client"])
def test_each_load_takes_torch_load_s_arguments(fn: Callable[..., Any]) -> None:
    params = _params(fn)
    assert [p for p in params if p[0] not in EXTRAS] == _params(torch.load)
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for name, kind, _ in params if name in EXTRAS)
    assert {"tensor_name", "prefix", "select"} <= {name for name, _, _ in params}


@pytest.mark.parametrize("fn", [ckptd.jit_load, ckptd.engine.jit_load, ckptd.Client.jit_load], ids=["ckptd", "engine", "client"])
def test_each_jit_load_takes_torch_jit_load_s_arguments(fn: Callable[..., Any]) -> None:
    params = _params(fn)
    assert [p for p in params if p[0] not in EXTRAS] == _torch_jit_load_params()
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for name, kind, _ in params if name in EXTRAS)
