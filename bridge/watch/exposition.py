"""The /metrics exposition: prometheus-client collectors that read the
counts and state ``bridge.watch.metrics.Metrics`` gathers (and what
``bridge.watch.operations`` keeps). Imported when /metrics is first served.

Names follow Prometheus's conventions: the ``icp_bridge_`` prefix, base
units in the name (``_seconds``), ``_total`` on counters (added by
prometheus-client), ``icp_bridge_build_info`` set to 1 with the versions as
labels, and the process's own metrics under the standard ``process_``
names from prometheus-client's ProcessCollector (the main process's; OTS
API worker processes are not in them).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bridge.sessions.model import ConnectState
from bridge.watch.operations import disk_free

if TYPE_CHECKING:
    from bridge.watch.metrics import Metrics
    from bridge.watch.operations import OperationsState


def collector_registry(metrics: Metrics) -> CollectorRegistry:
    """A registry of the bridge's metrics and its process's (not
    prometheus-client's global one: two bridges in one process, as in the
    tests, must not share it)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_BridgeCollector(metrics))
    for collector in metrics.collectors:
        registry.register(collector())
    # The standard process_* names (memory, descriptors, CPU, start time).
    ProcessCollector(registry=registry)
    return registry


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


class OperationsCollector(Collector):
    """What an operator's day adds to /metrics (see bridge.watch.operations)."""

    def __init__(self, state: OperationsState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        state = self.state
        users = state.users
        if users is not None:
            users.users()  # the file on disk now (a stat; read again only when it changed)
        yield GaugeMetricFamily(
            "icp_bridge_users_file_stale",
            "1 while the users file on disk has a bad entry and the last good version is "
            "used instead.", value=1 if users is not None and users.stale else 0)
        yield GaugeMetricFamily(
            "icp_bridge_users_file_bad_entries",
            "Bad entries in the users file on disk (their users cannot log on).",
            value=len(users.problems) if users is not None else 0)
        if state.certificate_not_after is not None:
            yield GaugeMetricFamily(
                "icp_bridge_tls_certificate_expiry_timestamp_seconds",
                "When the OTS API's certificate (ssl.certificate) expires, as a unix time.",
                value=state.certificate_not_after)
        reloads = CounterMetricFamily("icp_bridge_config_reloads",
                                      "Configuration reloads (SIGHUP) by outcome.",
                                      labels=["outcome"])
        for outcome in ("applied", "refused"):
            reloads.add_metric([outcome], state.reloads[outcome])
        yield reloads
        yield GaugeMetricFamily(
            "icp_bridge_config_reload_refused",
            "1 while the configuration on disk was refused at the last reload (the one "
            "before it runs).", value=1 if state.reload_refused else 0)
