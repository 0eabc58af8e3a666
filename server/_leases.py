"""Leases: what keeps a client's arenas from being evicted under it.

Every load through the daemon returns a lease. Clients renew leases while they hold
tensors and release them when done; a client that dies stops renewing and its lease
expires after the TTL. A lease may belong to a client *session*, a connection the client
keeps open: when it drops (the process died), the session's leases go at once. The
cache evicts only checkpoints no live lease refers to.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ckptd import LeaseLostError


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

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def create(self, checkpoint: str, session: str | None = None) -> Lease:
        """A new lease on ``checkpoint``, valid for one TTL (and while ``session`` lasts)."""
        lease = Lease(secrets.token_urlsafe(16), checkpoint, self._clock() + self.ttl, session)
        with self._lock:
            self._leases[lease.id] = lease
        return lease

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
        """Drop a lease (idempotent); returns the checkpoint it held, if it was live."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        return lease.checkpoint if lease else None

    def end_session(self, session: str) -> list[Lease]:
        """Remove and return every lease of ``session`` (its connection dropped)."""
        with self._lock:
            ended = [lease for lease in self._leases.values() if lease.session == session]
            for lease in ended:
                del self._leases[lease.id]
        return ended

    def reap(self) -> list[Lease]:
        """Remove and return every expired lease."""
        now = self._clock()
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.expires <= now]
            for lease in expired:
                del self._leases[lease.id]
        return expired

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
            for lease_id in [k for k, v in self._leases.items() if v.checkpoint == checkpoint]:
                del self._leases[lease_id]
