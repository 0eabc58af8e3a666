"""The engine's pieces the daemon (``ckptd.server``) is built on: internal, but a public surface.

``ckptd.server`` imports only public names: ``ckptd``'s ``__all__``, ``ckptd.formats``'s,
``ckptd.gpu``'s, and these (``tests/test_package.py`` checks it). They are documented and
kept in step with the daemon, but they are not for users: no promise holds across
releases.

* selecting: :data:`Select` (what ``select=`` takes), :func:`wanted_entries` (the tensors
  a load returns), :func:`keys_of` (the storages they need);
* placing and reading: :func:`target_tag` (where ``map_location`` sends a storage),
  :func:`read_storages` (storages read into arenas, as the embedded engine reads them);
* the manifest a client attaches from: :class:`Manifest`, :class:`ArenaInfo`,
  :class:`Placement`;
* errors on the wire: :func:`status_for`, :func:`error_body`; :data:`CHECKSUM_HEADER`, the
  header carrying the CRC-32 of an arena range streamed to a worker;
* the client's side of the environment: :func:`default_socket` (where both ends look for
  the daemon), :func:`client_variables` (the ``CKPTD_*`` names the client reads, which the
  daemon leaves alone), :func:`parse_size` (the client's size parser, which agrees with
  the daemon's ``ByteSize``).

>>> sorted(client_variables())[:2]
['CKPTD_CHUNK_BYTES', 'CKPTD_READER_THREADS']
"""

from __future__ import annotations

from ._load import keys_of, wanted_entries
from ._manifest import ArenaInfo, Manifest, Placement
from ._placement import target_tag
from ._select import Select
from ._settings import ClientSettings, default_socket, parse_size
from ._storages import read_storages
from ._wire import CHECKSUM_HEADER, error_body, status_for


def client_variables() -> frozenset[str]:
    """The ``CKPTD_*`` variables a client reads (``ckptd.settings``)."""
    return frozenset(ClientSettings.variables().values())


__all__ = [
    "CHECKSUM_HEADER",
    "ArenaInfo",
    "Manifest",
    "Placement",
    "Select",
    "client_variables",
    "default_socket",
    "error_body",
    "keys_of",
    "parse_size",
    "read_storages",
    "status_for",
    "target_tag",
    "wanted_entries",
]
