"""Compact tables for ``POST /v1/load``: a plain checkpoint's object, described once.

A client that can rebuild from a table asks for one (``table: true``). For a checkpoint
the scan proves plain, the daemon then sends the table in place of the per-storage and
per-tensor JSON and the checkpoint's pickle, which a 20,000-tensor checkpoint made an
11 MB answer. The description is made once per cached checkpoint and the encoded table
once per set of arenas (arena ids are never reused, so a table cannot go stale); each load
afterwards costs a dictionary lookup.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ckptd.engine import Manifest, TableSpec, describe_table, encode_table

logger = logging.getLogger(__name__)

_NONE = TableSpec((), b"")  # remembered "no table": the checkpoint is not plain


class Tables:
    """Tables by checkpoint (descriptions) and by checkpoint and arenas (encoded), least
    recently used forgotten first.

    >>> Tables(limit=2).limit
    2
    """

    def __init__(self, limit: int = 16) -> None:  # ~2 MB per 20,000 tensors, twice
        self.limit = limit
        self._specs: OrderedDict[str, TableSpec] = OrderedDict()
        self._encoded: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def attach(self, manifest: Manifest) -> Manifest:
        """``manifest`` with its table in place of its storages, tensors and pickle; as it
        was when the checkpoint is not plain."""
        key = (manifest.checkpoint, tuple(sorted(info.id for info in manifest.arenas)))
        table = self._cached(self._encoded, key)
        if table is None:
            spec = self._spec(manifest)
            if spec is _NONE:
                return manifest
            where = {p.key: (p.arena, p.offset) for p in manifest.placements}
            table = encode_table(spec, where)
            self._remember(self._encoded, key, table)
        bare = replace(manifest.layout, storages={}, tensors=(), pickle=None, scanned=None)
        return replace(manifest, layout=bare, placements=(), table=table)

    def _spec(self, manifest: Manifest) -> TableSpec:
        spec = self._cached(self._specs, manifest.checkpoint)
        if spec is None:
            spec = describe_table(manifest.layout) or _NONE
            logger.debug("%s: %s", manifest.path, "table described" if spec is not _NONE else "not plain: no table")
            self._remember(self._specs, manifest.checkpoint, spec)
        return spec

    def _cached(self, cache: OrderedDict[Any, Any], key: object) -> Any:
        with self._lock:
            found = cache.get(key)
            if found is not None:
                cache.move_to_end(key)
            return found

    def _remember(self, cache: OrderedDict[Any, Any], key: object, value: object) -> None:
        with self._lock:
            cache[key] = value
            while len(cache) > self.limit:
                cache.popitem(last=False)
