"""A load storm: dozens of client processes loading the same checkpoints at once, round
after round, against one daemon. Every load must return what torch.load returns, each
checkpoint must be read once and held once, and when the clients are gone no lease or
session may be left.

Workers are forked from a forkserver that has imported torch and ckptd once, so dozens
of them start in well under a second.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
from ckptd_testlib import Daemon, cached_entry, daemon_in, wait_for
from storm_worker import digest, worker

WORKERS = 32
ROUNDS = 3
NAMES = ("a.pt", "b.pt", "c.pt")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # a TTL long enough that no renewal comes late on a busy CI machine: leases end by release
    # and idle connections kept as long, so a slow round never races a keep-alive close
    yield from daemon_in(tmp_path_factory.mktemp("storm"), "--lease-ttl", "60", "--keep-alive-timeout", "60", "--request-timeout", "60")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(512, 256, generator=g),
        "layers.0.w": torch.randn(256, 256, generator=g).to(torch.bfloat16),
        "layers.0.b": torch.randn(256, generator=g),
        "step": seed,
    }


def test_storm_of_client_processes(daemon: Daemon) -> None:
    paths = []
    for seed, name in enumerate(NAMES):
        torch.save(_state(seed), daemon.root / name)
        paths.append(str(daemon.root / name))
    expected = [digest(torch.load(path)) for path in paths]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ckptd", "storm_worker"])
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    started = time.monotonic()
    procs = [ctx.Process(target=worker, args=(daemon.url, paths, expected, ROUNDS, barrier, results)) for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    try:
        reports = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    elapsed = time.monotonic() - started
    assert [e for report in reports for e in report] == []
    assert all(proc.exitcode == 0 for proc in procs)

    with ckptd.Client(daemon.url) as admin:
        for path in paths:
            entry = cached_entry(admin, Path(path))
            assert entry["misses"] == 1, entry  # read once, for every worker and round
            assert entry["hits"] == WORKERS * ROUNDS - 1, entry
            stored = sum(t.untyped_storage().nbytes() for t in torch.load(path).values() if isinstance(t, torch.Tensor))
            assert stored <= entry["resident_bytes"]["cpu"] <= stored + 64 * 16, entry  # one copy
        assert len(admin.checkpoints()) == len(paths)
        wait_for(lambda: admin.stats()["leases"] == 0, "every lease back", timeout=60)
        wait_for(lambda: admin.stats()["sessions"] == 0, "every session closed", timeout=60)
        stats = admin.stats()
    assert stats["resident_bytes"]["cpu"] == sum(cached_entry_bytes(daemon, p) for p in paths)
    print(f"storm: {WORKERS} processes x {ROUNDS} rounds x {len(paths)} checkpoints in {elapsed:.1f} s")


def cached_entry_bytes(daemon: Daemon, path: str) -> int:
    with ckptd.Client(daemon.url) as admin:
        return int(cached_entry(admin, Path(path))["resident_bytes"]["cpu"])
