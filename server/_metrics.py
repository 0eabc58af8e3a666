"""The daemon's Prometheus metrics, in a registry of their own (never the global one).

The cache reports through the methods below; ``GET /metrics`` serves :meth:`Metrics.render`.

>>> m = Metrics()
>>> m.read(4096); m.hit(); m.set_resident("cpu", 4096)
>>> b"ckptd_bytes_read_total 4096.0" in m.render()
True
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

# Load latencies span a cache hit (milliseconds) to a cold read of a large model (minutes).
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Counters, gauges and a histogram describing the cache, rendered in Prometheus text format.

    >>> m = Metrics(); m.set_budget("cpu", 1 << 30); m.set_leases(2)
    >>> m.content_type.startswith("text/plain")
    True
    """

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._bytes_read = Counter("ckptd_bytes_read", "Bytes read from checkpoint files.", registry=self.registry)
        self._hits = Counter("ckptd_cache_hits", "Loads served entirely from resident storages.", registry=self.registry)
        self._misses = Counter("ckptd_cache_misses", "Loads that had to read from disk.", registry=self.registry)
        self._evictions = Counter("ckptd_evictions", "Checkpoints evicted from the cache.", registry=self.registry)
        self._load_seconds = Histogram(
            "ckptd_load_seconds", "Time to serve a load request.", buckets=LOAD_BUCKETS, registry=self.registry
        )
        self._resident = Gauge("ckptd_resident_bytes", "Bytes resident per device.", ["device"], registry=self.registry)
        self._leases = Gauge("ckptd_active_leases", "Leases currently held by clients.", registry=self.registry)
        self._budget = Gauge("ckptd_budget_bytes", "Memory budget per device.", ["device"], registry=self.registry)
        self._sessions = Gauge("ckptd_active_sessions", "Client session connections open.", registry=self.registry)
        self._pinned = Gauge(
            "ckptd_pinned_bytes", "Page-locked host memory held: GPU staging buffers and the host tier.", registry=self.registry
        )
        self._gpu_evictions = Counter(
            "ckptd_gpu_evictions", "GPU arenas moved to the host tier (or freed) under a GPU budget.", registry=self.registry
        )

    def read(self, nbytes: int) -> None:
        """Count ``nbytes`` read from disk."""
        self._bytes_read.inc(nbytes)

    def hit(self) -> None:
        """Count a cache hit."""
        self._hits.inc()

    def miss(self) -> None:
        """Count a cache miss."""
        self._misses.inc()

    def evicted(self) -> None:
        """Count an eviction."""
        self._evictions.inc()

    def observe_load(self, seconds: float) -> None:
        """Record how long a load took."""
        self._load_seconds.observe(seconds)

    def set_resident(self, device: str, nbytes: int) -> None:
        """Set the bytes resident on ``device`` (``"cpu"``, ``"cuda:0"``...)."""
        self._resident.labels(device=device).set(nbytes)

    def set_leases(self, n: int) -> None:
        """Set the number of active leases."""
        self._leases.set(n)

    def set_budget(self, device: str, nbytes: int) -> None:
        """Set the memory budget of ``device``."""
        self._budget.labels(device=device).set(nbytes)

    def set_sessions(self, n: int) -> None:
        """Set the number of open client session connections."""
        self._sessions.set(n)

    def set_pinned(self, nbytes: int) -> None:
        """Set the pinned host bytes the GPU backend holds (what it really pinned)."""
        self._pinned.set(nbytes)

    def gpu_evicted(self, n: int = 1) -> None:
        """Count GPU arenas moved out under a GPU budget."""
        self._gpu_evictions.inc(n)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
