"""The one budget / LRU / lease policy every tier of the cache runs (host memory, each GPU,
the host tier), on plain holdings: accounting, eviction order, what may go, refusals."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

import ckptd
from ckptd.engine import status_for
from ckptd.server._policy import TierPolicy


@dataclass(eq=False)
class Held:
    name: str
    nbytes: int
    last_used: float
    leased: bool = False


@dataclass
class Tier:
    """A tier that holds ``Held`` items; evicting one moves it to ``gone``."""

    held: list[Held]
    budget: int | None
    unheld: int = 0
    gone: list[str] = field(default_factory=list)
    disposed: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.policy: TierPolicy[Held] = TierPolicy(
            "test tier", self.budget, self.lock, lambda: self.held, self._detach, self._dispose, lambda: self.unheld
        )

    def _detach(self, item: Held) -> None:
        assert self.lock._is_owned()  # type: ignore[attr-defined]  # detached under the tier's lock
        self.held.remove(item)
        self.gone.append(item.name)

    def _dispose(self, item: Held) -> None:
        assert not self.lock._is_owned()  # type: ignore[attr-defined]  # disposed of outside it (may be slow)
        self.disposed.append(item.name)


def unleased(item: Held) -> bool:
    return not item.leased


def refusal(nbytes: int, used: int) -> str:
    return f"needs {nbytes}, {used} used"


def _tier(budget: int | None, *items: tuple[str, int, float]) -> Tier:
    return Tier([Held(name, n, t) for name, n, t in items], budget)


def test_what_fits_is_reserved_without_evicting() -> None:
    tier = _tier(100, ("a", 30, 1.0))
    tier.policy.reserve(70, unleased, refusal)
    assert tier.policy.reserved == 70 and tier.policy.used() == 100 and tier.gone == []
    tier.policy.release(70)
    assert tier.policy.reserved == 0 and tier.policy.used() == tier.policy.resident() == 30


def test_least_recently_used_goes_first_and_only_as_much_as_needed() -> None:
    tier = _tier(100, ("new", 30, 3.0), ("old", 30, 1.0), ("mid", 30, 2.0))
    tier.policy.reserve(40, unleased, refusal)  # 90 + 40 > 100: one must go, the oldest
    assert tier.gone == tier.disposed == ["old"]
    tier.policy.reserve(30, unleased, refusal)  # 60 + 40 + 30 > 100: the next oldest
    assert tier.gone == ["old", "mid"]
    assert tier.policy.used() == 30 + 70


def test_leased_holdings_are_never_evicted_and_the_refusal_is_the_tiers() -> None:
    tier = _tier(100, ("held", 60, 1.0), ("free", 20, 2.0))
    tier.held[0].leased = True
    with pytest.raises(ckptd.OverBudgetError, match="needs 50, 60 used") as info:
        tier.policy.reserve(50, unleased, refusal)
    assert status_for(info.value) == 507  # what the daemon answers
    assert tier.gone == ["free"]  # what could go went; the leased one stayed
    assert tier.policy.reserved == 0  # a refused reservation reserves nothing


def test_reservations_count_against_the_budget() -> None:
    """Two loads under way cannot both take the same room."""
    tier = _tier(100)
    tier.policy.reserve(60, unleased, refusal)
    with pytest.raises(ckptd.OverBudgetError, match="needs 60, 60 used"):
        tier.policy.reserve(60, unleased, refusal)


def test_memory_no_longer_held_but_still_mapped_is_counted() -> None:
    tier = _tier(100, ("a", 40, 1.0))
    tier.unheld = 50
    assert tier.policy.used() == 90
    with pytest.raises(ckptd.OverBudgetError):
        tier.policy.reserve(70, unleased, refusal)  # even with "a" gone: 50 + 70 > 100


def test_reservation_is_released_whatever_happens() -> None:
    tier = _tier(100)
    with pytest.raises(RuntimeError), tier.policy.reservation(80, unleased, refusal):
        assert tier.policy.reserved == 80
        raise RuntimeError("the read failed")
    assert tier.policy.reserved == 0


def test_no_budget_means_no_limit() -> None:
    tier = _tier(None, ("a", 10, 1.0))
    tier.policy.reserve(10**15, unleased, refusal)
    assert tier.gone == []


def test_fits_says_no_without_raising_or_reserving() -> None:
    tier = _tier(100, ("a", 50, 1.0))
    assert not tier.policy.fits(150, unleased)  # larger than the budget: nothing can make room
    assert tier.policy.reserved == 0
    assert tier.policy.fits(60, unleased) and tier.gone == ["a"] and tier.policy.reserved == 60


def test_evict_frees_what_may_go_whatever_the_budget() -> None:
    """The memory itself is short (a full GPU): evict until enough is freed, LRU first."""
    tier = _tier(1000, ("a", 30, 2.0), ("b", 30, 1.0), ("c", 30, 3.0), ("d", 30, 0.5))
    tier.held[3].leased = True
    assert tier.policy.evict(50, unleased) == 60
    assert tier.gone == ["b", "a"]
    assert tier.policy.evict(1000, unleased) == 30  # all that may go: "c"; "d" is leased
    assert [h.name for h in tier.held] == ["d"]


def test_what_may_go_is_asked_at_each_eviction() -> None:
    """A holding leased while the policy evicts is not taken (the tier answers per call)."""
    tier = _tier(100, ("a", 50, 1.0), ("b", 50, 2.0))
    asked: list[str] = []

    def evictable(item: Held) -> bool:
        asked.append(item.name)
        tier.held[-1].leased = True  # "b" gets a lease as soon as the policy looks
        return not item.leased

    with pytest.raises(ckptd.OverBudgetError):
        tier.policy.reserve(60, evictable, refusal)
    assert tier.gone == ["a"] and "b" in asked


def test_concurrent_reservations_never_overcommit() -> None:
    tier = _tier(1000)
    granted: list[int] = []
    barrier = threading.Barrier(8)

    def reserve() -> None:
        barrier.wait()
        for _ in range(50):
            if tier.policy.fits(30, unleased):
                granted.append(30)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == tier.policy.reserved <= 1000 and sum(granted) > 1000 - 30

