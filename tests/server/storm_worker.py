"""The client process of ``test_storm`` (a module of its own, so that forked workers import
only torch and ckptd, preloaded once by the forkserver, and not the test suite's helpers)."""

from __future__ import annotations

import gc
import traceback
from typing import Any

import torch

import ckptd


def digest(state: dict[str, Any]) -> list[Any]:
    """What a worker compares: every tensor's values summed as float64, and the plain values."""
    return [(k, float(v.double().sum())) if isinstance(v, torch.Tensor) else (k, v) for k, v in state.items()]


def worker(url: str, paths: list[str], expected: list[list[Any]], rounds: int, barrier: Any, results: Any) -> None:
    """One client process: ``rounds`` rounds, each loading every checkpoint, checked, then dropped."""
    errors: list[str] = []
    try:
        with ckptd.Client(url) as client:
            for _ in range(rounds):
                barrier.wait(timeout=60)  # every worker starts the round together
                held = [client.load(path) for path in paths]
                errors += [f"{path}: wrong result" for path, got, want in zip(paths, held, expected) if digest(got) != want]
                del held
                gc.collect()  # the last tensors go: their leases are released
    except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
        errors.append(traceback.format_exc())
    results.put(errors)
