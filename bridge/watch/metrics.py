"""Prometheus metrics for the admin endpoint's /metrics.

The components count in plain ``Counter`` dicts as they work (a dict
increment is all the hot path pays); the collector
(``bridge.watch.exposition``) reads them, and the live state (sessions,
connections, calls waiting), when Prometheus scrapes; prometheus-client
formats them. prometheus-client is imported with the first scrape, not at
startup. The names are ``bridge.watch.exposition``'s.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily

    from bridge.backends.launcher import BackendLauncher
    from bridge.otsapi.workers import WorkerPool
    from bridge.rdp.link import RdpServerLink
    from bridge.security.throttle import LogonGuard
    from bridge.sessions.registry import SessionRegistry
    from bridge.state.journal import EventHub, LogonEvents
    from bridge.state.store import StateStore
    from bridge.watch.dbus import SessionNotifier
    from protocols.thrift_server import ThriftServerFactory

# Bridged calls answer in about a millisecond; timeouts take call_timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 1.0)


class Latencies:
    """Seconds per label value in fixed buckets, exported as a Prometheus
    histogram. prometheus-client's Histogram.observe takes a lock and walks
    its buckets (~3 us, a tenth of a bridged call here); the reactor is one
    thread, so this is a bisect and two additions."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[str, list[Any]] = {}  # label -> [bucket counts, sum]

    def observe(self, label: str, seconds: float) -> None:
        entry = self.series.get(label)
        if entry is None:
            entry = self.series[label] = [[0] * (len(self.bounds) + 1), 0.0]
        entry[0][bisect_left(self.bounds, seconds)] += 1
        entry[1] += seconds

    def family(self, name: str, documentation: str, labels: list[str]
               ) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(name, documentation, labels=labels)
        for label, (counts, total) in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([label] if labels else [], buckets, sum_value=total)
        return family


class Metrics:
    """The bridge's registry of metrics (not prometheus-client's global one:
    two bridges in one process, as in the tests, must not share it)."""

    def __init__(self, sessions: SessionRegistry, link: RdpServerLink,
                 otsapi: ThriftServerFactory, store: StateStore, journal: EventHub,
                 guard: LogonGuard, launcher: BackendLauncher,
                 dbus: SessionNotifier | None, logon_events: LogonEvents | None = None,
                 workers: WorkerPool | None = None) -> None:
        """The parts whose counts and state are exported; the link and the
        store are given observers for the latency histograms."""
        self.sessions = sessions
        self.link = link
        self.otsapi = otsapi
        self.store = store
        self.journal = journal
        self.guard = guard
        self.launcher = launcher
        self.dbus = dbus
        self.logon_events = logon_events
        # The admin endpoint's refused connections, by reason (its site counts).
        self.admin_dropped: Counter[str] = Counter()
        # OTS API worker processes: their calls are counted into the
        # factory's counts; their connections are theirs.
        self.workers = workers
        self._registry: CollectorRegistry | None = None
        # More prometheus-client collectors (made when the registry is).
        self.collectors: list[Callable[[], Any]] = []
        self.bridged_latency = Latencies(LATENCY_BUCKETS)
        self.state_write_latency = Latencies(WRITE_BUCKETS)
        link.set_latency_observer(self.bridged_latency.observe)
        store.observe_write = lambda seconds: self.state_write_latency.observe("", seconds)

    @property
    def registry(self) -> CollectorRegistry:
        """prometheus-client's registry with the bridge's collectors (built,
        and prometheus-client imported, when first asked: the first scrape)."""
        if self._registry is None:
            from bridge.watch.exposition import collector_registry

            self._registry = collector_registry(self)
        return self._registry
