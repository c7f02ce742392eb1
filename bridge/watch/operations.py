"""What an operator's day adds to /metrics and /healthz: the users file
(bad entries; an edit not in use), the served certificate's expiry, and
configuration reloads (applied or refused, and whether the file on disk is
the one running).

``OperationsState`` is what the parts update (the service, the reload);
``OperationsCollector`` reads it when Prometheus scrapes; ``degraded``
is the list /healthz shows.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.security.auth import UsersFileAuthenticator

#: A certificate that expires sooner than this makes /healthz degraded.
CERTIFICATE_DEGRADED = 7 * 24 * 3600.0


@dataclass
class OperationsState:
    """``users``: the users-file authenticator (None with PAM);
    ``certificate_not_after``: unix time the served certificate expires
    (None: not TLS, or unknown); ``reloads``: by outcome (applied,
    refused); ``reload_refused``: why the last reload was refused, until
    one is applied."""

    users: UsersFileAuthenticator | None = None
    certificate_not_after: float | None = None
    certificate_path: str = ""
    reloads: Counter[str] = field(default_factory=Counter)
    reload_refused: str = ""

    def degraded(self) -> list[str]:
        """Why the bridge is degraded (it serves, but something needs an
        operator): [] when nothing does."""
        reasons = list(self.users.health()) if self.users is not None else []
        if self.reload_refused:
            reasons.append(f"the configuration on disk was refused at the last reload "
                           f"({self.reload_refused}); the one before it runs")
        expiry = self.certificate_not_after
        if expiry is not None and expiry - time.time() < CERTIFICATE_DEGRADED:
            left = expiry - time.time()
            reasons.append(f"the certificate {self.certificate_path} "
                           f"{'expired' if left <= 0 else 'expires within 7 days'}")
        return reasons


class OperationsCollector(Collector):
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
