"""The parts of the service a start does not need, built when first used:
the admin endpoint's site (twisted.web, the status page, prometheus-client)
for its first client, the /metrics collectors for the first scrape. And
``warm_up``: what the first logon and the first admin request would load on
their way, loaded off the reactor thread right after the start.

Importing this module imports none of them: bridge.service may.
"""

from __future__ import annotations

import importlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure


def operations_collector(service: Any) -> Any:
    """/metrics of an operator's day (made with the first scrape)."""
    from bridge.watch.exposition import OperationsCollector

    return OperationsCollector(service.operations)


def farm_collector(service: Any) -> Any:
    """/metrics of the farm (made with the first scrape)."""
    from bridge.watch.farm_metrics import FarmCollector

    return FarmCollector(service.farm)


def admin_site_factory(service: Any) -> Factory:
    """The admin endpoint's site, built for its first client: twisted.web and
    prometheus-client are imported then, not at startup."""
    from bridge.watch.actions import SessionActionRoutes
    from bridge.watch.admin import HealthResource, admin_site

    config = service.config
    health = HealthResource(service.icp_listener, service.thrift_listener, service.link,
                            service.registry, service.dbus,
                            [config.state_dir, service.launcher.logs.directory],
                            config.min_free_disk, service.operations.degraded)
    # Real time, not ``clock``: keepalives and stalls are the network's.
    site, service.admin_events = admin_site(
        service.tokens, service.registry, service.events, service.metrics.registry, health,
        service.reactor, SessionActionRoutes(service.tokens, service.registry, service.actions),
        service.farm,
        # This host's own name too (a farm's hosts are named so).
        allowed_hosts=[*config.admin_allowed_hosts, config.host_name],
        max_connections=config.admin_max_connections, dropped=service.metrics.admin_dropped,
        refresh_metrics=service.workers.sync if service.workers is not None else None)
    if service.running:
        service.admin_events.start()
    return site


def warm_up(service: Any) -> Deferred[None]:
    """Load, off the reactor thread and after the start, what the first
    logon and the first admin request would load on their way (the reactor
    would stand still meanwhile): libpam (python-pam finds it with
    ldconfig), inotify for backends' endpoints (ctypes finds libc the same
    way), the admin endpoint's twisted.web and prometheus-client."""
    def warm() -> None:
        names = ["twisted.internet.inotify"]
        if service.config.admin_endpoint:
            names += ["bridge.watch.admin", "bridge.watch.exposition", "bridge.watch.actions"]
        for name in names:
            importlib.import_module(name)
        warm_authenticator = getattr(service.authenticator, "warm", None)
        if warm_authenticator is not None:
            warm_authenticator()

    def failed(failure: Failure) -> None:
        service.log.info("not loaded ahead of the first logon: {error}",
                         error=failure.getErrorMessage())

    return service._run_blocking(warm).addErrback(failed)
