"""What an operator's day adds to /metrics and /healthz: the users file
(bad entries; an edit not in use), the served certificate's expiry, and
configuration reloads (applied or refused, and whether the file on disk is
the one running).

``OperationsState`` is what the parts update (the service, the reload);
``OperationsCollector`` (in ``bridge.watch.exposition``, imported with the
first scrape) reads it when Prometheus scrapes; ``degraded`` is the list
/healthz shows.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
