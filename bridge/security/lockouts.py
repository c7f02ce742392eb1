"""Failed-logon records: their keys and the state database's lockouts
table (bridge.security.throttle counts them; ``icp-bridge users`` lists
and clears them)."""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from protocols.logtext import escaped
from protocols.thrift_server import UNKNOWN_LOCAL_SOURCE

SCHEMA = """
CREATE TABLE IF NOT EXISTS lockouts (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    locked_until REAL NOT NULL
);
"""


@dataclass(slots=True)  # up to failure_records_max of them
class FailureCount:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


def user_key(username: str) -> str:
    return f"user:{username}"


def source_key(source: str) -> str:
    return f"source:{source}"


def pair_key(username: str, source: str) -> str:
    # A source never holds "|" (source_identity), so the user name follows it.
    return f"pair:{source}|{username}"


def describe_key(key: str) -> str:
    """A record's key as the operator reads it."""
    kind, _, rest = key.partition(":")
    if kind == "pair":
        source, _, username = rest.partition("|")
        return f"user {username} from {source}"
    return f"{kind} {rest}"


def source_identity(source: str) -> str:
    """How a client's ``source`` is counted: "" when it cannot be told apart
    from other clients (unknown, or a loopback address every local client
    shares) or is no address at all (text is never a source: it could hold
    anything, a line break included); ``uid:N`` and ``uid:unknown`` (the
    local callers whose owner the kernel could not name, one shared source)
    as given; an IPv6 address as its /64 (one host may pick any address in
    it); an IPv4-mapped one as its IPv4 address."""
    if not source:
        return ""
    if source.startswith("uid:"):
        named = source[4:].isascii() and source[4:].isdigit()
        return source if named or source == UNKNOWN_LOCAL_SOURCE else ""
    address = _address(source)
    if address is None or address.is_loopback:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{address.exploded}/64", strict=False))
    return str(address)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` is (brackets and an IPv6 zone dropped; an
    IPv4-mapped IPv6 address as its IPv4 address), or None."""
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def claimed_address(text: str) -> str:
    """An address an RDP client claims about itself, as a log line or an
    event may show it (never as a source: see bridge.security.throttle): an
    address as such, anything else escaped and cut short."""
    address = _address(text)
    if address is not None:
        return str(address)
    return escaped(text[:64]) + ("..." if len(text) > 64 else "")


class LockoutStore:
    """The lockouts table of the state database (its own connection: the
    CLI reads and clears it while the bridge runs)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=1.0)
        # As the state store: a commit survives the process dying; only a
        # power loss may take the last ones back (a lost failure count is
        # harmless), and a failure costs no fsync under a flood of them.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def load(self) -> dict[str, FailureCount]:
        """Every record, the least recently failed first."""
        return {key: FailureCount(failures, last, until) for key, failures, last, until in
                self._db.execute("SELECT key, failures, last_failure, locked_until "
                                 "FROM lockouts ORDER BY last_failure")}

    def get(self, key: str) -> FailureCount | None:
        row = self._db.execute("SELECT failures, last_failure, locked_until FROM lockouts "
                               "WHERE key = ?", (key,)).fetchone()
        return FailureCount(*row) if row else None

    def put(self, key: str, count: FailureCount) -> None:
        self.update([(key, count)], [])

    def update(self, changed: Iterable[tuple[str, FailureCount]], removed: Iterable[str]
               ) -> None:
        """Write ``changed`` and delete ``removed`` in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO lockouts VALUES (?, ?, ?, ?)",
                                 [(key, c.failures, c.last_failure, c.locked_until)
                                  for key, c in changed])
            self._db.executemany("DELETE FROM lockouts WHERE key = ?",
                                 [(key,) for key in removed])

    def delete(self, key: str) -> bool:
        return self._db.execute("DELETE FROM lockouts WHERE key = ?", (key,)).rowcount > 0

    def expire(self, now: float, forget_after: float) -> int:
        """Delete what a lock's end or ``forget_after`` made history."""
        return self._db.execute(
            "DELETE FROM lockouts WHERE (locked_until > 0 AND locked_until <= ?) "
            "OR (locked_until <= ? AND last_failure < ?)",
            (now, now, now - forget_after)).rowcount

    def unlock_user(self, username: str) -> int:
        """Clear a user's records: from anywhere and from each source."""
        keys = [key for (key,) in self._db.execute(
            "SELECT key FROM lockouts WHERE key = ? OR key LIKE 'pair:%'", (user_key(username),))
            if key == user_key(username) or key.partition("|")[2] == username]
        self.update([], keys)
        return len(keys)

    def unlock_source(self, source: str) -> int:
        """Clear a source's records: for any user and for each user."""
        source = source_identity(source) or source
        keys = [key for (key,) in self._db.execute(
            "SELECT key FROM lockouts WHERE key = ? OR substr(key, 1, ?) = ?",
            (source_key(source), len(source) + 6, f"pair:{source}|"))]
        self.update([], keys)
        return len(keys)

    def close(self) -> None:
        self._db.close()


