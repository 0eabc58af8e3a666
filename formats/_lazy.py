"""Package attributes imported from their modules on first use.

ckptd's packages keep ``import ckptd`` torch-free (admin commands start in well under a
second): names whose modules need torch are listed in a table and imported when first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_attributes(
    namespace: dict[str, Any], table: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for the names in ``table`` (name -> relative module).

    >>> ns = {"__name__": "ckptd.formats"}
    >>> getattr_, dir_ = lazy_attributes(ns, {"sniff_zip": "._zip"}, ["sniff_zip"])
    >>> getattr_("nothing")
    Traceback (most recent call last):
    AttributeError: module 'ckptd.formats' has no attribute 'nothing'
    >>> dir_()
    ['__name__', 'sniff_zip']
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value  # cached: the next lookup is a plain global
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *public})

    return __getattr__, __dir__
