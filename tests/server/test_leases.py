"""The lease table: sessions that end with their last connection, late leases of ended
sessions, and lapsed leases remembered for the memory their clients may still map."""

from __future__ import annotations

from ckptd.server._leases import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_end_with_the_sessions_last_connection() -> None:
    table = LeaseTable(30.0)
    table.open_session("S")
    table.open_session("S")  # a second connection of the same client
    lease = table.create("ck", "S")
    assert table.close_session("S") == []  # one connection left: the client lives
    assert table.count("ck") == 1 and table.sessions() == 1
    assert [ended.id for ended in table.close_session("S")] == [lease.id]
    assert table.count("ck") == 0 and table.sessions() == 0


def test_a_lease_granted_after_its_session_ended_is_not_kept() -> None:
    """The client died while the daemon was loading for it: nobody will ever release it."""
    table = LeaseTable(30.0)
    table.open_session("S")
    table.close_session("S")
    table.create("ck", "S")
    assert table.count("ck") == 0
    table.open_session("S")  # the same client connected again: its leases count again
    table.create("ck", "S")
    assert table.count("ck") == 1


def test_other_sessions_are_untouched() -> None:
    table = LeaseTable(30.0)
    for session in ("A", "B"):
        table.open_session(session)
    table.create("ck", "A")
    table.create("ck", "B")
    table.create("ck")
    table.close_session("A")
    assert table.count("ck") == 2


def test_expired_leases_lapse_until_released_or_their_session_ends() -> None:
    clock = Clock()
    table = LeaseTable(10.0, clock=clock)
    table.open_session("S")
    late = table.create("a", "S")
    hung = table.create("b", "S")
    clock.now += 11
    assert {lease.id for lease in table.reap()} == {late.id, hung.id}
    assert table.count("a") == table.count("b") == 0  # no longer holding: evictable
    assert table.lapsed_checkpoints() == {"a", "b"}  # but their pages may still be mapped
    table.release(late.id)  # the client woke up and let go
    assert table.lapsed_checkpoints() == {"b"}
    table.close_session("S")  # the process is gone: so are its mappings
    assert table.lapsed_checkpoints() == set()


def test_lapsed_leases_without_a_session_are_forgotten_after_lapse_ttls() -> None:
    clock = Clock()
    table = LeaseTable(10.0, clock=clock, lapse_ttls=3)
    table.create("a")
    clock.now += 11
    table.reap()
    assert table.lapsed_checkpoints() == {"a"}
    clock.now += 25
    table.reap()
    assert table.lapsed_checkpoints() == {"a"}
    clock.now += 10
    table.reap()
    assert table.lapsed_checkpoints() == set()
