"""Prometheus metrics for the admin endpoint's /metrics.

The components count in plain ``Counter`` dicts as they work (a dict
increment is all the hot path pays); this collector reads them, and the
live state (sessions, connections, calls waiting), when Prometheus
scrapes; prometheus-client formats them.

Names follow Prometheus's conventions: the ``icp_bridge_`` prefix, base
units in the name (``_seconds``), ``_total`` on counters (added by
prometheus-client), ``icp_bridge_build_info`` set to 1 with the versions as
labels, and the process's own metrics under the standard ``process_``
names from prometheus-client's ProcessCollector.
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bridge.sessions.model import ConnectState

if TYPE_CHECKING:
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


def disk_free(paths: Iterable[Path]) -> dict[str, int]:
    """Bytes free for unprivileged writers on the filesystem of each path
    (one that cannot be looked at counts as 0: nothing can be written)."""
    free = {}
    for path in paths:
        try:
            info = os.statvfs(path)
            free[str(path)] = info.f_bavail * info.f_frsize
        except OSError:
            free[str(path)] = 0
    return free


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
        self.registry = CollectorRegistry(auto_describe=True)
        self.bridged_latency = Latencies(LATENCY_BUCKETS)
        self.state_write_latency = Latencies(WRITE_BUCKETS)
        link.set_latency_observer(self.bridged_latency.observe)
        store.observe_write = lambda seconds: self.state_write_latency.observe("", seconds)
        self.registry.register(_BridgeCollector(self))
        # The standard process_* names (memory, descriptors, CPU, start time).
        ProcessCollector(registry=self.registry)


def build_info() -> dict[str, str]:
    """What runs: the package, Python and Twisted versions."""
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {"version": installed("icp-bridge"), "python": platform.python_version(),
            "twisted": installed("twisted")}


def _counter(name: str, documentation: str, labels: list[str],
             counts: dict[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _BridgeCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.build = build_info()

    def collect(self) -> Iterator[Any]:
        parts = self.metrics
        yield InfoMetricFamily("icp_bridge_build", "The running icp-bridge, Python and "
                               "Twisted versions (always 1).", value=self.build)
        yield self.metrics.bridged_latency.family(
            "icp_bridge_bridged_call_seconds",
            "Calls from the bridge to the RDP server, until answered or failed.", ["method"])
        yield self.metrics.state_write_latency.family(
            "icp_bridge_state_write_seconds", "State database transactions.", [])
        factory = parts.otsapi
        link = parts.link
        yield _counter("icp_bridge_otsapi_calls", "OTS API calls by method and outcome "
                       "(answered: done; refused: token, permission, no such session; "
                       "failed: the RDP server failed it or did not answer, or it could "
                       "not be stored; error: a bug in the handler; bad_request: unknown "
                       "method or undecodable arguments).", ["method", "outcome"],
                       factory.call_counts)
        workers = parts.workers
        yield _gauge("icp_bridge_otsapi_calls_in_flight",
                     "OTS API calls waiting for an answer (mostly from the RDP server).",
                     sum(proto.calls_in_flight for proto in factory.connections)
                     + (workers.calls_in_flight if workers is not None else 0))
        yield _gauge("icp_bridge_otsapi_connections", "Open OTS API connections.",
                     len(factory.connections)
                     + (workers.connections if workers is not None else 0))
        dropped = {("otsapi", reason): n for reason, n in factory.dropped.items()}
        dropped.update({("icp", reason): n for reason, n in link.dropped.items()})
        dropped.update({("admin", reason): n for reason, n in parts.admin_dropped.items()})
        yield _counter("icp_bridge_dropped_connections", "Connections refused or closed by "
                       "the bridge, by listener and reason.", ["listener", "reason"], dropped)
        calls = {("to_rdp_server", method, outcome): n
                 for (method, outcome), n in link.call_counts.items()}
        calls.update({("from_rdp_server", method, outcome): n
                      for (method, outcome), n in link.request_counts.items()})
        yield _counter("icp_bridge_icp_calls", "ICP calls by direction, message type and "
                       "outcome.", ["direction", "method", "outcome"], calls)
        current = link.current
        yield _gauge("icp_bridge_icp_calls_pending",
                     "Calls sent to the RDP server and not answered yet.",
                     len(current._pending) if current is not None else 0)
        yield _gauge("icp_bridge_rdp_server_connected",
                     "1 while an RDP server is connected and has shaken hands.",
                     1 if link.ready else 0)
        sessions = GaugeMetricFamily("icp_bridge_sessions", "Sessions by state.",
                                     labels=["state"])
        by_state = {state: 0 for state in ConnectState}
        for session in parts.sessions:
            by_state[session.state] += 1
        for state, n in by_state.items():
            sessions.add_metric([state.name.lower()], n)
        yield sessions
        yield _counter("icp_bridge_logons", "Logons by kind (rdp: LogonUser and the "
                       "greeter's; otsapi: logonConnection) and outcome.", ["kind", "outcome"],
                       parts.guard.outcomes)
        yield _counter("icp_bridge_backend_starts", "Backends started, by module and outcome "
                       "(ready, or failed to start or become ready).", ["module", "outcome"],
                       parts.launcher.starts)
        yield _counter("icp_bridge_backend_exits", "Backends that ended, by module and reason "
                       "(exited: status 0; failed: another status; killed: a signal not the "
                       "bridge's; stopped: by the bridge; stop_timeout: SIGKILLed after "
                       "stop_timeout; unknown: adopted, status not known).",
                       ["module", "reason"], getattr(parts.launcher, "exits", {}))
        events = parts.logon_events
        yield _counter("icp_bridge_lockouts", "Lockouts set after failed logons, by what was "
                       "locked (pair: a user from one source; source: a client address or "
                       "local uid, for every user; user: past account_failure_limit).",
                       ["what"],
                       events.lockouts if events is not None else {})
        logs = parts.launcher.logs
        yield _counter("icp_bridge_backend_output_dropped_bytes", "Backend output cut off "
                       "unread when a file was started over at its cap.", [],
                       {(): logs.dropped_bytes})
        yield _gauge("icp_bridge_backend_output_bytes", "Bytes the backends' output files "
                     "take now.", sum(log.size for log in logs.files()))
        free = GaugeMetricFamily("icp_bridge_disk_free_bytes", "Bytes free on the filesystem "
                                 "of the state and of the backends' output.", labels=["path"])
        for path, n in disk_free([Path(str(parts.store.path)).parent, logs.directory]).items():
            free.add_metric([path], n)
        yield free
        yield _counter("icp_bridge_state_write_failures",
                       "State transactions the disk refused.", [],
                       {(): parts.store.write_failures})
        yield _gauge("icp_bridge_state_unwritten", "Session changes waiting for the disk.",
                     parts.sessions.unwritten)
        hub = parts.journal
        yield _gauge("icp_bridge_event_journal_last_id", "Id of the newest journal event.",
                     hub.last_id)
        yield _gauge("icp_bridge_event_stream_clients", "Clients of /events.",
                     len(hub.subscriptions))
        notifier = parts.dbus
        yield _gauge("icp_bridge_dbus_connected",
                     "1 while the D-Bus session notifications can be sent.",
                     1 if notifier is not None and notifier.connected else 0)
        yield _counter("icp_bridge_dbus_signals", "SessionNotification signals sent.", [],
                       {(): notifier.sent if notifier is not None else 0})
