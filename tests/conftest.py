"""Fixtures for the ckptd test suite.

The comparison helper and the checkpoint corpus live in the ``ckptd_testlib`` package (plain
modules, so pickle can find the classes some checkpoints hold); this file re-exports them and
adds fixtures that save each corpus object once per session.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from ckptd_testlib import (  # noqa: F401  (re-exported for tests)
    CORE,
    CORPUS,
    FORMS,
    LocationRecorder,
    NonSeekable,
    assert_conform,
    assert_same,
    load_both,
    save_bytes,
)


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """``saved(name, variant)`` -> path of corpus object ``name`` saved as ``variant`` (cached)."""
    root = tmp_path_factory.mktemp("corpus")
    cache: dict[tuple[str, str], pathlib.Path] = {}

    def get(name: str, variant: str = "zip") -> pathlib.Path:
        key = (name, variant)
        if key not in cache:
            obj = CORPUS[name].build()
            path = root / f"{name}.{variant}.pt"
            path.write_bytes(save_bytes(obj, variant))
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ckptd_mod():
    """The package under test (skips cleanly while ckptd.load is not there yet)."""
    import ckptd

    if not hasattr(ckptd, "load"):
        pytest.skip("ckptd.load is not implemented yet")
    return ckptd


@pytest.fixture
def same():
    """The strict deep comparison, as a fixture."""
    return assert_same


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
