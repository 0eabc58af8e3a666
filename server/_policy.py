"""One budget / LRU / lease policy for every tier of the cache.

The cache keeps bytes in several tiers: host memory (the checkpoints' arenas), each GPU
(GPU arenas), and the host tier (host copies of GPU arenas evicted from their GPU). Each
tier holds *holdings*, each with a size and the time it was last used, and each runs the
same rules, implemented here once:

* **Budget accounting.** What a tier uses is what it holds plus what loads under way have
  reserved (counted before they allocate, so two loads cannot both fit in the same room).
* **LRU eviction of what may go.** To fit a reservation, the least recently used holding
  that may go is evicted, one at a time; what may go is the tier's call (no lease holds
  it, no load is using it). A holding is detached under the tier's lock (no client can be
  handed it from then on) and disposed of outside it (freed, or moved to a slower tier:
  that may take a while).
* **A clear refusal.** When nothing more may go, the reservation fails with
  :class:`ckptd.OverBudgetError` (HTTP 507) and a message, written by the tier, that says
  what holds the memory and what to do.

What a holding is and what evicting it means belong to the tier (``_cache``,
``_devtier``); where storages go belongs to the placement plan.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from ckptd.engine import OverBudgetError

logger = logging.getLogger(__name__)


class Holding(Protocol):
    """What a tier holds and may evict: its size and when it was last used."""

    @property
    def nbytes(self) -> int: ...
    @property
    def last_used(self) -> float: ...


H = TypeVar("H", bound=Holding)
Refusal = Callable[[int, int], str]  # (bytes asked for, bytes used now) -> the OverBudgetError message


class TierPolicy(Generic[H]):
    """Budget, reservations and LRU eviction for one tier (see the module docstring).

    ``budget`` is the tier's bytes (``None``: no limit); ``holdings`` lists what the tier
    holds now; ``detach`` takes a holding out of the tier (called under ``lock``, which
    the tier uses for its own state too); ``dispose`` then frees it or moves it elsewhere
    (outside the lock); ``unheld`` is memory the tier no longer holds but must still count
    (pages clients with lapsed leases still map). Every method that may evict takes
    ``evictable``: may this holding go now?

    >>> import threading, types
    >>> held = [types.SimpleNamespace(name=n, nbytes=40, last_used=t) for n, t in (("a", 2.0), ("b", 1.0))]
    >>> gone = []
    >>> policy = TierPolicy("host memory", 100, threading.RLock(), lambda: held, held.remove, gone.append)
    >>> policy.reserve(50, lambda h: True, lambda n, used: "no room")  # evicts "b", the least recently used
    >>> [h.name for h in gone], policy.used(), policy.reserved
    (['b'], 90, 50)
    >>> policy.reserve(50, lambda h: False, lambda n, used: f"{n} more bytes do not fit in {used}")
    Traceback (most recent call last):
    ...
    ckptd.OverBudgetError: 50 more bytes do not fit in 90
    """

    def __init__(
        self,
        name: str,
        budget: int | None,
        lock: threading.RLock,
        holdings: Callable[[], Iterable[H]],
        detach: Callable[[H], None],
        dispose: Callable[[H], None] = lambda holding: None,
        unheld: Callable[[], int] = lambda: 0,
    ) -> None:
        self.name = name
        self.budget = budget
        self.reserved = 0  # bytes loads under way have reserved and not yet placed
        self._lock = lock
        self._holdings = holdings
        self._detach = detach
        self._dispose = dispose
        self._unheld = unheld

    def resident(self) -> int:
        """Bytes the tier holds now."""
        with self._lock:
            return sum(h.nbytes for h in self._holdings())

    def used(self) -> int:
        """Bytes counted against the budget: held, still mapped though no longer held, and
        reserved by loads under way."""
        with self._lock:
            return self.resident() + self._unheld() + self.reserved

    def fits(self, nbytes: int, evictable: Callable[[H], bool]) -> bool:
        """Reserve ``nbytes``, evicting what may go (least recently used first) to fit;
        whether it fits (nothing is reserved when not)."""
        while True:
            with self._lock:
                used = self.used()
                if self.budget is None or used + nbytes <= self.budget:
                    self.reserved += nbytes
                    return True
                victim, _ = self._take(evictable)
            if victim is None:
                return False
            self._dispose(victim)

    def reserve(self, nbytes: int, evictable: Callable[[H], bool], refusal: Refusal) -> None:
        """Reserve ``nbytes`` as :meth:`fits` does, or raise :class:`OverBudgetError` with
        the tier's ``refusal`` message (given the bytes asked for and those used now)."""
        if not self.fits(nbytes, evictable):
            raise OverBudgetError(refusal(nbytes, self.used()))

    def release(self, nbytes: int) -> None:
        """Give back a reservation: the load placed its bytes (now held) or failed."""
        with self._lock:
            self.reserved -= nbytes

    @contextlib.contextmanager
    def reservation(self, nbytes: int, evictable: Callable[[H], bool], refusal: Refusal) -> Iterator[None]:
        """:meth:`reserve`, then :meth:`release` once the block is done, whatever happens."""
        self.reserve(nbytes, evictable, refusal)
        try:
            yield
        finally:
            self.release(nbytes)

    def evict(self, nbytes: int, evictable: Callable[[H], bool]) -> int:
        """Evict what may go (least recently used first) until ``nbytes`` are freed or
        nothing more may go, whatever the budget (the memory itself is short); the bytes freed."""
        freed = 0
        while freed < nbytes:
            with self._lock:
                victim, nbytes_freed = self._take(evictable)
            if victim is None:
                break
            freed += nbytes_freed
            self._dispose(victim)
        return freed

    def _take(self, evictable: Callable[[H], bool]) -> tuple[H | None, int]:
        """The least recently used holding that may go, detached (lock held), and its size
        (taken before: a detached holding may hold nothing any more)."""
        victim = min((h for h in self._holdings() if evictable(h)), key=lambda h: h.last_used, default=None)
        if victim is None:
            return None, 0
        nbytes = victim.nbytes
        logger.info("%s: evicting %d bytes (least recently used) to make room", self.name, nbytes)
        self._detach(victim)
        return victim, nbytes
