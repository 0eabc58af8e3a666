"""The daemon's HTTP answers as pydantic models: what ``/openapi.json`` publishes.

The routes send the JSON the cache builds (``Manifest.to_json()``, ``CheckpointInfo.to_json()``)
without running it through these models, so a load's manifest (tens of thousands of
tensors) costs no validation; ``tests/server/test_openapi.py`` checks that real answers
match what is published here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BEARER_SCHEME = "bearerAuth"


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Answer):
    """What went wrong: the ckptd exception's name (the client raises that type) and its message."""

    type: str = Field(description="a ckptd exception: UsageError, PathNotAllowedError, OverBudgetError, ...")
    message: str


class ErrorResponse(_Answer):
    """Every error, whatever the route and status."""

    error: ErrorDetail


class ArenaModel(_Answer):
    """A shared-memory file (``device`` ``cpu``) or a GPU buffer (``device`` its UUID)."""

    id: str
    path: str = Field(description="the arena file, mapped copy-on-write (CPU arenas)")
    nbytes: int
    device: str = "cpu"
    handle: dict[str, Any] | None = Field(default=None, description="how to open a GPU arena (IPC or VMM)")


class PlacementModel(_Answer):
    """Where one storage's bytes lie: ``nbytes`` at ``offset`` in arena ``arena``."""

    key: str
    arena: str
    offset: int
    nbytes: int


class TensorModel(_Answer):
    """One named tensor of the checkpoint (as ``ckptd inspect`` lists it)."""

    name: str
    path: list[str | int]
    storage_keys: list[str]
    dtype: str
    shape: list[int]
    stride: list[int] | None
    storage_offset: int
    location: str
    kind: str


class LayoutModel(_Answer):
    """The checkpoint's structure: storages ``[key, dtype, numel, location, offset, nbytes]``,
    tensors, and the pickle (base64) the client rebuilds the object from."""

    name: str
    format: str
    size: int
    byteorder: str | None
    byteorder_recorded: bool = Field(description="whether the file records its byte order (else the default applies)")
    header: str | None = Field(default=None, description="a legacy file's header pickles, base64")
    pickle: str | None = Field(description="the checkpoint's data.pkl, base64")
    storages: list[list[str | int]]
    tensors: list[TensorModel]


class ManifestModel(_Answer):
    """``POST /v1/load``: where the storages lie, and the lease that keeps them there."""

    checkpoint: str
    path: str
    layout: LayoutModel
    arenas: list[ArenaModel]
    placements: list[PlacementModel]
    lease: str
    lease_ttl: float = Field(description="seconds the lease lives unless renewed")
    table: str | None = Field(
        default=None,
        description="base64: a plain checkpoint's compact table, sent when the request asked for one; "
        "the layout's storages, tensors and pickle and the placements are then empty",
    )


class ShardedIndexModel(_Answer):
    """``POST /v1/index``: a Hugging Face ``*.index.json``, checked (every shard inside its directory)."""

    name: str
    directory: str
    weight_map: dict[str, str] = Field(description="tensor name -> shard file name")
    shards: list[str] = Field(description="each shard's absolute path once, in order of first appearance")
    metadata: dict[str, Any]


class CheckpointInfoModel(_Answer):
    """One cached checkpoint (``ckptd ls``)."""

    id: str
    path: str
    identity: list[int] = Field(description="device, inode, size, mtime_ns of the file it was read from")
    format: str
    resident_bytes: dict[str, int] = Field(description="bytes in memory now, per device (cpu, GPU UUIDs)")
    storages_resident: int
    storages_total: int
    leases: int
    hits: int
    misses: int
    last_used: float = Field(description="Unix time")
    freed_bytes: dict[str, int] = Field(
        default_factory=dict, description="what an eviction freed, per device (DELETE /v1/checkpoints only)"
    )


class LeaseRenewal(_Answer):
    """``POST /v1/leases/{lease}/renew``."""

    lease: str
    expires_in: float = Field(description="seconds")


class StatsModel(BaseModel):
    """``GET /v1/stats``: cache totals and daemon facts (more keys may follow)."""

    model_config = ConfigDict(extra="allow")

    checkpoints: int
    resident_bytes: dict[str, int]
    budget_bytes: dict[str, int]
    leases: int
    sessions: int
    hits: int
    misses: int
    evictions: int
    version: str
    uptime_s: float
    socket: str
    tcp: str | None


class HealthModel(_Answer):
    """``GET /healthz``."""

    status: Literal["ok"]


# What any route can answer, whatever it does: malformed HTTP and requests that do not
# arrive whole in time (the server's limits, before any route runs).
ANY_ROUTE = (400, 408)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` documenting the error body for ``statuses`` (and :data:`ANY_ROUTE`).

    >>> sorted(error_responses(401, 422))
    [400, 401, 408, 422]
    """
    return {
        status: {"model": ErrorResponse, "description": _ERROR_TEXT.get(status, "error")}
        for status in sorted({*statuses, *ANY_ROUTE})
    }


_ERROR_TEXT = {
    400: "malformed HTTP (UsageError)",
    408: "the request did not arrive whole within request_timeout (UsageError)",
    401: "missing or wrong bearer token over TCP (AuthenticationError)",
    403: "the path resolves outside the daemon's roots (PathNotAllowedError)",
    404: "no such checkpoint, tensor or route",
    409: "leases hold the checkpoint (CheckpointBusyError)",
    410: "the lease expired or was released (LeaseLostError)",
    413: "request body over max_body_bytes (UsageError)",
    415: "a checkpoint format ckptd does not read (UnsupportedFormatError)",
    416: "a Range outside the arena (UsageError)",
    422: "a malformed request or checkpoint (UsageError, CheckpointError, ...)",
    500: "the daemon failed (DaemonError); see its log",
    507: "the checkpoint does not fit the memory budget (OverBudgetError)",
}
