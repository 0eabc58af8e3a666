"""Selective loading: which named tensors a ``tensor_name``/``prefix``/``select`` asks for.

Names are the dotted paths of the saved object's containers (``layers.0.q.weight``). As in
the layer-wise loader ckptd follows, ``prefix`` is a leading module-name component that
saved names may lack, or carry where the request does not.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from ckptd.formats import TensorEntry, TensorNotFoundError

Select = str | Sequence[str] | None


def _variants(name: str, prefix: str | None) -> list[str]:
    if not prefix:
        return [name]
    head = prefix.rstrip(".") + "."
    if name.startswith(head):
        return [name, name[len(head) :]]
    return [name, head + name]


def _not_found(what: str, wanted: str, names: Iterable[str], source: str) -> TensorNotFoundError:
    close = difflib.get_close_matches(wanted, list(names), n=5, cutoff=0.4)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; run `ckptd inspect FILE` to list its tensors"
    return TensorNotFoundError(f"{source}: no {what} {wanted!r}{hint}")


def find(entries: dict[str, TensorEntry], name: str, prefix: str | None, source: str) -> TensorEntry:
    """The entry a ``tensor_name`` (with optional ``prefix``) refers to.

    >>> find({}, "w", None, "x.pt")
    Traceback (most recent call last):
    ...
    ckptd.TensorNotFoundError: x.pt: no tensor 'w'; run `ckptd inspect FILE` to list its tensors
    """
    for candidate in _variants(name, prefix):
        if candidate in entries:
            return entries[candidate]
    raise _not_found("tensor", name, entries, source)


def select_entries(
    entries: dict[str, TensorEntry], select: Select, prefix: str | None, source: str
) -> list[TensorEntry]:
    """The entries a ``select`` list, or a ``select`` name start, refers to (checkpoint order)."""
    if isinstance(select, str):
        starts = _variants(select, prefix)
        found = [e for n, e in entries.items() if any(n.startswith(s) for s in starts)]
        if not found:
            raise _not_found("tensor name starting with", select, entries, source)
        return found
    assert select is not None
    return [find(entries, name, prefix, source) for name in select]


def extract(obj: Any, entry: TensorEntry) -> Any:
    """Follow an entry's path through the loaded object (mappings, sequences, attributes)."""
    for part in entry.path:
        if isinstance(obj, dict):
            obj = obj[part]
        elif isinstance(obj, (list, tuple)):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, str(part))
    return obj
