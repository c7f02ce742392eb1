"""The state database's schema version (``PRAGMA user_version``) and its
ordered migrations, applied when the bridge opens the database.

Every table of the database is here, the lockouts of
``bridge.security.throttle`` too: one version for the whole file. A
migration that has shipped is never edited; a change is a new migration
with the next version. A database newer than the code knows is refused
(an older bridge would misread it): restore the backup taken before the
upgrade, or run the newer version.

Before migrating a database that already has a version, the bridge copies
it (SQLite's backup API) to ``<file>.schema-<old version>``, so that a
downgrade has something to go back to.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from bridge.endpoints import StartupError

log = Logger(namespace="bridge.state.schema")


@dataclass(frozen=True)
class Migration:
    """One step: from ``version - 1`` to ``version``."""

    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


def _statements(*sql: str) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        for statement in sql:
            db.execute(statement)
    return apply


#: The tables of databases without a version (0.1's, and the backends that
#: bridges from before versions recorded), which such databases already
#: have, all or some (hence IF NOT EXISTS: version 1 makes what is missing
#: and stamps the rest).
_V1 = _statements(
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sessions (session_id INTEGER PRIMARY KEY, data TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tokens (
        digest TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        permission INTEGER NOT NULL,
        session_id INTEGER,
        expires_at REAL,
        lifetime REAL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        session_id INTEGER NOT NULL,
        username TEXT NOT NULL,
        event TEXT NOT NULL,
        old_state INTEGER,
        new_state INTEGER,
        reason TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS lockouts (
        key TEXT PRIMARY KEY,
        failures INTEGER NOT NULL,
        last_failure REAL NOT NULL,
        locked_until REAL NOT NULL
    )""",
    # Every backend process spawned and not seen exit (bridge.backends.ledger).
    """CREATE TABLE IF NOT EXISTS backends (
        pid INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        session_id INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (pid, start_ticks)
    )""",
)

#: The farm's outbox (bridge.state.outbox): what a host owes the farm, the
#: farm commands it started, the journal's identity and shipped position.
_V2 = _statements(
    """CREATE TABLE IF NOT EXISTS farm_outbox (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (kind, key)
    )""",
    """CREATE TABLE IF NOT EXISTS farm_commands_run (
        command_id INTEGER PRIMARY KEY,
        started REAL NOT NULL,
        result TEXT
    )""",
    "CREATE TABLE IF NOT EXISTS farm_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

#: In order, without gaps; the last one is the version this code writes.
MIGRATIONS: list[Migration] = [
    Migration(1, "sessions, tokens, event journal, meta, lockouts and backends (the tables "
                 "before schema versions)", _V1),
    Migration(2, "the farm's outbox: farm_outbox, farm_commands_run, farm_state", _V2),
]


def latest() -> int:
    return MIGRATIONS[-1].version


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def too_new(path: Path | str, version: int) -> str:
    return (f"state database {path} has schema version {version}, newer than this icp-bridge "
            f"knows ({latest()}): it was written by a newer icp-bridge; run that one, or "
            f"restore the backup taken before the upgrade")


def migrate(db: sqlite3.Connection, path: Path | str) -> tuple[int, int]:
    """Bring the database to the latest version, each migration in its own
    transaction; returns (version before, version after). StartupError for a
    database newer than this code."""
    before = version_of(db)
    if before > latest():
        raise StartupError(too_new(path, before))
    pending = [m for m in MIGRATIONS if m.version > before]
    if not pending:
        return before, before
    if before >= 1 and path != ":memory:":
        copy = Path(f"{path}.schema-{before}")
        target = sqlite3.connect(str(copy))
        try:
            db.backup(target)
        finally:
            target.close()
        copy.chmod(0o600)
        log.info("state database {path}: schema {version} saved to {copy} before migrating",
                 path=str(path), version=before, copy=str(copy))
    for migration in pending:
        db.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(db)
            # In the same transaction: the version says exactly what was applied.
            db.execute(f"PRAGMA user_version = {int(migration.version)}")
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not isinstance(e, sqlite3.Error):
                raise
            raise StartupError(
                f"state database {path}: migration to schema {migration.version} "
                f"({migration.what}) failed ({e}); it stays at schema {migration.version - 1}"
            ) from None
        log.info("state database {path}: schema {version} ({what})", path=str(path),
                 version=migration.version, what=migration.what)
    return before, latest()
