"""Leases: what keeps a client's arenas from being evicted under it.

Every load through the daemon returns a lease. Clients renew leases while they hold
tensors and release them when done; a client that dies stops renewing and its lease
expires after the TTL. A lease may belong to a client *session*, a connection the client
keeps open (opened before its first load): when the session's last connection drops
(the process died), its leases go at once, and a lease granted after that (the client
died while the daemon was loading for it) is never kept. The cache evicts only
checkpoints no live lease refers to.

A lease that *expired* (its client stopped renewing but did not release it, and no
session end said it died) is remembered as *lapsed*: that client may still map the
arenas, so their memory stays counted (see :meth:`LeaseTable.lapsed_checkpoints`) until
the client releases it after all, its session ends, or ``lapse_ttls`` TTLs pass.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ckptd.engine import LeaseLostError

logger = logging.getLogger(__name__)

ENDED_SESSIONS_KEPT = 4096  # ended session ids remembered, so a late lease for one is refused
LAPSE_TTLS = 10  # TTLs a lapsed lease of no session is counted (nothing else tells its end)


@dataclass
class Lease:
    """One client's hold on one cached checkpoint until ``expires`` (monotonic seconds)."""

    id: str
    checkpoint: str
    expires: float
    session: str | None = None


class LeaseTable:
    """Thread-safe lease bookkeeping with a fixed time-to-live.

    >>> table = LeaseTable(ttl=30.0)
    >>> lease = table.create("ckpt")
    >>> table.count("ckpt"), table.release(lease.id), table.count("ckpt")
    (1, 'ckpt', 0)
    """

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic, lapse_ttls: float = LAPSE_TTLS) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lapse = ttl * lapse_ttls
        self._leases: dict[str, Lease] = {}
        self._lapsed: dict[str, Lease] = {}  # expired, not released: the client may still map
        self._sessions: dict[str, int] = {}  # session id -> open connections
        self._ended: OrderedDict[str, None] = OrderedDict()  # sessions whose last connection closed
        self._lock = threading.Lock()

    def create(self, checkpoint: str, session: str | None = None) -> Lease:
        """A new lease on ``checkpoint``, valid for one TTL (and while ``session`` lasts).

        A session that has ended means its client died while this lease was being made:
        the lease is returned (to no one) but not kept.
        """
        lease = Lease(secrets.token_urlsafe(16), checkpoint, self._clock() + self.ttl, session)
        with self._lock:
            if session is not None and session in self._ended:
                logger.info("lease on %s not kept: session %s ended during the load", checkpoint, session)
                return lease
            self._leases[lease.id] = lease
        return lease

    def open_session(self, session: str) -> None:
        """One more connection of ``session`` is open."""
        with self._lock:
            self._sessions[session] = self._sessions.get(session, 0) + 1
            self._ended.pop(session, None)

    def close_session(self, session: str) -> list[Lease]:
        """One connection of ``session`` closed; when it was the last, remove and return its leases."""
        with self._lock:
            left = self._sessions.pop(session, 0) - 1
            if left > 0:
                self._sessions[session] = left
                return []
            self._ended[session] = None
            while len(self._ended) > ENDED_SESSIONS_KEPT:
                self._ended.popitem(last=False)
            ended = [lease for lease in self._leases.values() if lease.session == session]
            for lease in ended:
                del self._leases[lease.id]
            for lease_id in [k for k, v in self._lapsed.items() if v.session == session]:
                del self._lapsed[lease_id]  # its process is gone, and its mappings with it
        return ended

    def sessions(self) -> int:
        """Sessions with at least one open connection."""
        with self._lock:
            return len(self._sessions)

    def renew(self, lease_id: str) -> float:
        """Extend a live lease by one TTL; returns seconds until it expires."""
        with self._lock:
            lease = self._leases.get(lease_id)
            now = self._clock()
            if lease is None or lease.expires <= now:
                self._leases.pop(lease_id, None)
                raise LeaseLostError(f"lease {lease_id!r} expired or was released; load the checkpoint again")
            lease.expires = now + self.ttl
            return self.ttl

    def checkpoint_of(self, lease_id: str) -> str:
        """The checkpoint a live lease holds; :class:`LeaseLostError` if it is gone."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires <= self._clock():
                raise LeaseLostError(f"lease {lease_id!r} expired or was released; load the checkpoint again")
            return lease.checkpoint

    def release(self, lease_id: str) -> str | None:
        """Drop a lease (idempotent); returns the checkpoint it held, if it was live.

        A lapsed lease released late ends too: its client has let go of the mappings.
        """
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            self._lapsed.pop(lease_id, None)
        return lease.checkpoint if lease else None

    def reap(self) -> list[Lease]:
        """Remove and return every expired lease (remembered as lapsed); forget old lapsed ones."""
        now = self._clock()
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.expires <= now]
            for lease in expired:
                del self._leases[lease.id]
                self._lapsed[lease.id] = lease
            for lease_id in [k for k, v in self._lapsed.items() if v.session is None and v.expires + self._lapse <= now]:
                del self._lapsed[lease_id]
        return expired

    def lapsed_checkpoints(self) -> set[str]:
        """Checkpoints that clients whose leases lapsed may still map."""
        with self._lock:
            return {lease.checkpoint for lease in self._lapsed.values()}

    def count(self, checkpoint: str) -> int:
        """Live leases on ``checkpoint``."""
        with self._lock:
            return sum(1 for lease in self._leases.values() if lease.checkpoint == checkpoint)

    def total(self) -> int:
        """Live leases on anything."""
        with self._lock:
            return len(self._leases)

    def drop_checkpoint(self, checkpoint: str) -> None:
        """Forget every lease on ``checkpoint`` (used on shutdown)."""
        with self._lock:
            for table in (self._leases, self._lapsed):
                for lease_id in [k for k, v in table.items() if v.checkpoint == checkpoint]:
                    del table[lease_id]
