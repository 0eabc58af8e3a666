"""The engine: a checkpoint request resolved, its tensors selected, its storages read and
placed, its object rebuilt, in this process. It knows nothing of HTTP and of the daemon's
client: the public front (``ckptd.load``, ``ckptd.Client``) and the daemon
(``ckptd.server``) are both built on it, and use only the names below (``__all__``).
Importing it is torch-free: each name that needs torch imports its module on first use.

* loading: :func:`load` (torch.load's contract, embedded), :func:`jit_load`,
  :func:`inspect`; a request's pieces for a load served elsewhere: :class:`Request`,
  :func:`make_request`, :func:`check_daemon_load`, :func:`load_shards`, :func:`rebuild`,
  :func:`adopt_tensors` (TorchScript), :data:`Progress`;
* selecting: :data:`Select` (what ``select=`` takes), :func:`wanted_entries` (the tensors
  a load returns), :func:`keys_of` (the storages they need);
* placing: the placement plan, which decides once per load each storage's target and its
  offset in its arena (:func:`plan_storages`, a :class:`Plan` of :class:`StoragePlan` and
  :class:`ArenaPlan`; :func:`target_for` a :class:`Target` of a :class:`Kind`;
  :func:`lay_out`, an arena's offsets); :data:`MapLocation`, :func:`target_tag` (the tag
  ``map_location`` gives), :func:`with_current_device`, :func:`restore` (a storage moved
  to its target);
* reading: :func:`read_storages` (storages read into arenas), :class:`StorageSet`;
* the manifest a daemon's client attaches from: :class:`Manifest`, :class:`ArenaInfo`,
  :class:`Placement`; the compact table a plain checkpoint loaded whole travels as
  instead of its pickle and per-tensor JSON: :func:`describe_table` (the daemon, once per
  checkpoint), :func:`encode_table` (with the arenas' places), :class:`TableSpec`,
  :func:`table_applies` (whether a load's options allow one), :func:`table_bytes` (the
  bytes a table's load makes resident), :func:`rebuild_from_table`
  (the client), :data:`TABLE_MEDIA` (the media type of an answer carrying one),
  :data:`SESSION_MEDIA` (a worker's first load and its session in one answer);
* the protocol both ends of the daemon agree on (no transport): :func:`status_for`,
  :func:`error_body`, :func:`error_from`, :data:`CHECKSUM_HEADER` (the header carrying the
  CRC-32 of an arena range streamed to a worker);
* settings: :data:`settings` (``ckptd.settings``), :class:`ClientSettings`,
  :func:`default_socket` (where both ends look for the daemon), :func:`client_variables`
  (the ``CKPTD_*`` names the client reads, which the daemon leaves alone),
  :func:`parse_size` (sizes as pydantic's ``ByteSize`` reads them); :data:`__version__`;
* the error tree ``ckptd`` re-exports, rooted at :class:`CkptdError`:
  :class:`CheckpointError`, :class:`UnsupportedFormatError`, :class:`StorageMismatchError`,
  :class:`CheckpointNotFoundError`, :class:`NotSeekableError`, :class:`NotFileLikeError`,
  :class:`TensorNotFoundError`, :class:`DeviceError`, :class:`UnpicklingError`,
  :class:`UsageError`, :class:`ModelMismatchError`, :class:`DaemonError`,
  :class:`DaemonNotRunningError`, :class:`DaemonTimeoutError`, :class:`AuthenticationError`,
  :class:`PathNotAllowedError`, :class:`OverBudgetError`, :class:`CheckpointBusyError`,
  :class:`LeaseLostError`.

>>> import io, torch
>>> from ckptd.engine import load
>>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf); _ = buf.seek(0)
>>> load(buf, map_location="cpu")["w"]
tensor([1., 1.])
>>> sorted(client_variables())[:2]
['CKPTD_CHUNK_BYTES', 'CKPTD_READER_THREADS']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptd.formats import lazy_attributes as _lazy_attributes

from ._exceptions import (
    AuthenticationError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointNotFoundError,
    CkptdError,
    DaemonError,
    DaemonNotRunningError,
    DaemonTimeoutError,
    DeviceError,
    LeaseLostError,
    ModelMismatchError,
    NotFileLikeError,
    NotSeekableError,
    OverBudgetError,
    PathNotAllowedError,
    StorageMismatchError,
    TensorNotFoundError,
    UnpicklingError,
    UnsupportedFormatError,
    UsageError,
)
from ._protocol import CHECKSUM_HEADER, SESSION_MEDIA, TABLE_MEDIA, error_body, error_from, status_for
from ._settings import ClientSettings, client_variables, default_socket, parse_size, settings

if TYPE_CHECKING:
    from ._inspect import inspect
    from ._jit import adopt_tensors, jit_load
    from ._load import Progress, Request, check_daemon_load, keys_of, load, load_shards, make_request, rebuild
    from ._load import wanted_entries
    from ._manifest import ArenaInfo, Manifest, Placement
    from ._placement import MapLocation, restore, target_tag, with_current_device
    from ._plan import ArenaPlan, Kind, Plan, StoragePlan, Target, lay_out, plan_storages, target_for
    from ._select import Select
    from ._storages import StorageSet, read_storages
    from ._table import TableSpec, describe_table, encode_table, rebuild_from_table, table_applies, table_bytes

__version__ = "0.1.0"

_LAZY = {
    "inspect": "._inspect",
    **dict.fromkeys(("adopt_tensors", "jit_load"), "._jit"),
    **dict.fromkeys(
        ("Progress", "Request", "check_daemon_load", "keys_of", "load", "load_shards", "make_request", "rebuild",
         "wanted_entries"),
        "._load",
    ),
    **dict.fromkeys(("ArenaInfo", "Manifest", "Placement"), "._manifest"),
    **dict.fromkeys(("MapLocation", "restore", "target_tag", "with_current_device"), "._placement"),
    **dict.fromkeys(
        ("ArenaPlan", "Kind", "Plan", "StoragePlan", "Target", "lay_out", "plan_storages", "target_for"), "._plan"
    ),
    "Select": "._select",
    **dict.fromkeys(("StorageSet", "read_storages"), "._storages"),
    **dict.fromkeys(
        ("TableSpec", "describe_table", "encode_table", "rebuild_from_table", "table_applies", "table_bytes"), "._table"
    ),
}

__all__ = [
    "CHECKSUM_HEADER",
    "SESSION_MEDIA",
    "TABLE_MEDIA",
    "ArenaInfo",
    "ArenaPlan",
    "AuthenticationError",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CkptdError",
    "ClientSettings",
    "DaemonError",
    "DaemonNotRunningError",
    "DaemonTimeoutError",
    "DeviceError",
    "Kind",
    "LeaseLostError",
    "Manifest",
    "MapLocation",
    "ModelMismatchError",
    "NotFileLikeError",
    "NotSeekableError",
    "OverBudgetError",
    "PathNotAllowedError",
    "Placement",
    "Plan",
    "Progress",
    "Request",
    "Select",
    "StorageMismatchError",
    "StoragePlan",
    "StorageSet",
    "TableSpec",
    "Target",
    "TensorNotFoundError",
    "UnpicklingError",
    "UnsupportedFormatError",
    "UsageError",
    "__version__",
    "adopt_tensors",
    "check_daemon_load",
    "client_variables",
    "default_socket",
    "describe_table",
    "encode_table",
    "error_body",
    "error_from",
    "inspect",
    "jit_load",
    "keys_of",
    "lay_out",
    "load",
    "load_shards",
    "make_request",
    "parse_size",
    "plan_storages",
    "read_storages",
    "rebuild",
    "rebuild_from_table",
    "restore",
    "settings",
    "status_for",
    "table_applies",
    "table_bytes",
    "target_for",
    "target_tag",
    "wanted_entries",
    "with_current_device",
]

__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY, __all__)
