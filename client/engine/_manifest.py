"""The manifest: what the daemon tells a client about a loaded checkpoint.

A manifest names the shared-memory arenas holding the storages, where each storage lies
in them, the checkpoint's structure (named tensors, the pickle to rebuild from) and the
lease that keeps the arenas alive. It travels as JSON; this module is its one definition,
used by both ends.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ckptd.formats import CheckpointError, Format, Layout, StorageRecord, TensorEntry

from ._protocol import TABLE_MEDIA


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``'bfloat16'``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``'bfloat16'`` → ``torch.bfloat16`` (looked up among torch's dtypes only)."""
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise CheckpointError("<manifest>", f"unknown dtype {name!r}")
    return found


@dataclass(frozen=True)
class ArenaInfo:
    """One arena: a shared-memory file the client maps copy-on-write (``device`` ``'cpu'``),
    or a GPU buffer (``device`` its UUID) the client opens through ``handle``."""

    id: str
    path: str
    nbytes: int
    device: str = "cpu"
    handle: dict[str, Any] | None = None


@dataclass(frozen=True)
class Placement:
    """Where one storage's bytes lie: ``nbytes`` at ``offset`` in arena ``arena``."""

    key: str
    arena: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """A loaded checkpoint as a client sees it."""

    checkpoint: str
    path: str
    layout: Layout
    arenas: tuple[ArenaInfo, ...]
    placements: tuple[Placement, ...]
    lease: str
    lease_ttl: float
    # A plain checkpoint's compact table (ckptd.engine._table), sent in place of the layout's
    # storages, tensors and pickle and of the placements, which are then empty.
    table: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON body the daemon sends."""
        body = self._head()
        if self.table is not None:
            body["table"] = base64.b64encode(self.table).decode()
        return body

    def _head(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "path": self.path,
            "layout": layout_to_json(self.layout),
            "arenas": [vars(a) for a in self.arenas],
            "placements": [vars(p) for p in self.placements],
            "lease": self.lease,
            "lease_ttl": self.lease_ttl,
        }

    def to_bytes(self) -> bytes:
        """The answer when a table travels (media type ``TABLE_MEDIA``): 4 bytes of
        length, the JSON of everything else, then the table as it is (base64 and a JSON
        string of a 20,000-tensor table cost more than building the tensors).

        >>> from ckptd.formats import Format, Layout
        >>> m = Manifest("c", "/m.pt", Layout("m.pt", Format.TORCH_ZIP, 1, {}, ()), (), (), "l", 30.0, b"T")
        >>> Manifest.from_bytes(m.to_bytes()) == m
        True
        """
        if self.table is None:
            raise ValueError("a manifest without a table travels as JSON (to_json)")
        head = json.dumps(self._head()).encode()
        return len(head).to_bytes(4, "big") + head + self.table

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse what :meth:`to_bytes` produced; a malformed body is a :class:`CheckpointError`."""
        size = int.from_bytes(data[:4], "big")
        if len(data) < 4 + size:
            raise CheckpointError("<manifest>", "malformed manifest from the daemon (truncated)")
        try:
            head = json.loads(data[4 : 4 + size])
        except ValueError as exc:
            raise CheckpointError("<manifest>", f"malformed manifest from the daemon ({exc!r})") from exc
        manifest = cls.from_json(head)
        return replace(manifest, table=data[4 + size :])

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Manifest:
        """Parse what :meth:`to_json` produced; a malformed body is a :class:`CheckpointError`."""
        try:
            return cls(
                checkpoint=str(body["checkpoint"]),
                path=str(body["path"]),
                layout=layout_from_json(body["layout"]),
                arenas=tuple(ArenaInfo(**a) for a in body["arenas"]),
                placements=tuple(Placement(**p) for p in body["placements"]),
                lease=str(body["lease"]),
                lease_ttl=float(body["lease_ttl"]),
                table=base64.b64decode(body["table"]) if body.get("table") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError("<manifest>", f"malformed manifest from the daemon ({exc!r})") from exc


def layout_to_json(layout: Layout) -> dict[str, Any]:
    """A :class:`Layout` as JSON (the pickle base64-encoded)."""
    return {
        "name": layout.name,
        "format": layout.format.value,
        "size": layout.size,
        "byteorder": layout.byteorder,
        "byteorder_recorded": layout.byteorder_recorded,
        "header": base64.b64encode(layout.header).decode() if layout.header is not None else None,
        "pickle": base64.b64encode(layout.pickle).decode() if layout.pickle is not None else None,
        "storages": [
            [r.key, dtype_name(r.dtype), r.numel, r.location, r.offset, r.nbytes] for r in layout.storages.values()
        ],
        "tensors": [_tensor_to_json(t) for t in layout.tensors],
    }


def _tensor_to_json(t: TensorEntry) -> dict[str, Any]:
    return {
        "name": t.name,
        "path": list(t.path),
        "storage_keys": list(t.storage_keys),
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "stride": list(t.stride) if t.stride is not None else None,
        "storage_offset": t.storage_offset,
        "location": t.location,
        "kind": t.kind,
    }


def layout_from_json(body: Mapping[str, Any]) -> Layout:
    """The inverse of :func:`layout_to_json`."""
    storages = {
        key: StorageRecord(key, dtype_from_name(dtype), numel, location, offset, nbytes)
        for key, dtype, numel, location, offset, nbytes in body["storages"]
    }
    tensors = tuple(
        TensorEntry(
            t["name"],
            tuple(t["path"]),
            tuple(t["storage_keys"]),
            dtype_from_name(t["dtype"]),
            tuple(t["shape"]),
            tuple(t["stride"]) if t["stride"] is not None else None,
            t["storage_offset"],
            t["location"],
            t["kind"],
        )
        for t in body["tensors"]
    )
    pickle = base64.b64decode(body["pickle"]) if body["pickle"] is not None else None
    return Layout(
        body["name"], Format(body["format"]), body["size"], storages, tensors, pickle, body["byteorder"],
        byteorder_recorded=bool(body.get("byteorder_recorded", True)),
        header=base64.b64decode(body["header"]) if body.get("header") else None,
    )
