"""The farm outbox: what a host owes the farm, kept in the host's own
state database so that neither a PostgreSQL outage nor a ``kill -9``
loses it.

- Journal events need no copy: the journal itself is the outbox. What is
  shipped is a position (``shipped_event_id`` here, and the farm's own
  ``max(local_id)``, which wins); the journal is not pruned past it.
- Sessions need no copy either: each shipment upserts the sessions its
  events touched, as they are then, and a host that (re)connects ships all
  of them.
- Failed-logon counts and command results are rows of ``farm_outbox``,
  one per (kind, key), the latest value replacing the one before: a count
  that changed five times while the farm was away is shipped once.
- ``farm_commands_run`` is the host's record of every farm command it
  started, written before the command runs: a command is never run twice,
  also when its result never reached the farm (the host died meanwhile, or
  PostgreSQL did).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

FAILURES = "failures"
COMMAND_RESULT = "command-result"


class FarmOutbox:
    """The outbox tables of the host's state database (a connection of
    its own, like the lockouts'; the tables are schema version 2's, made by
    the state store when it opened the database). Every method is one
    short transaction on the reactor, as the state store's are."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=1.0)
        self._seq = int(self._db.execute("SELECT coalesce(max(seq), 0) FROM farm_outbox")
                        .fetchone()[0])

    def close(self) -> None:
        self._db.close()

    # -- journal position, identity ---------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM farm_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO farm_state VALUES (?, ?)", (key, value))

    @property
    def shipped_event_id(self) -> int:
        """The last journal event the farm is known to hold (0: none)."""
        return int(self.get("shipped_event_id") or 0)

    @shipped_event_id.setter
    def shipped_event_id(self, value: int) -> None:
        self.set("shipped_event_id", str(value))

    # -- rows owed -----------------------------------------------------------------

    def put(self, kind: str, key: str, payload: Any) -> None:
        """Owe the farm ``payload`` for (kind, key), replacing what was owed."""
        self._seq += 1
        self._db.execute("INSERT OR REPLACE INTO farm_outbox VALUES (?, ?, ?, ?)",
                         (kind, key, json.dumps(payload), self._seq))

    def owed(self, kind: str, limit: int = 1000) -> list[tuple[str, Any, int]]:
        """(key, payload, seq) owed of ``kind``, oldest first."""
        return [(key, json.loads(payload), seq) for key, payload, seq in self._db.execute(
            "SELECT key, payload, seq FROM farm_outbox WHERE kind = ? ORDER BY seq LIMIT ?",
            (kind, limit))]

    def delivered(self, kind: str, items: list[tuple[str, Any, int]]) -> None:
        """These were shipped; a row replaced since (a newer seq) stays owed."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("DELETE FROM farm_outbox WHERE kind = ? AND key = ? AND seq = ?",
                                 [(kind, key, seq) for key, _, seq in items])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM farm_outbox").fetchone()[0])

    # -- commands ------------------------------------------------------------------

    def start_command(self, command_id: int, now: float) -> bool:
        """Record that the command starts; False if it was started before
        (then it must not run again)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO farm_commands_run (command_id, started) VALUES (?, ?)",
            (command_id, now))
        return cursor.rowcount == 1

    def finish_command(self, command_id: int, result: dict[str, Any]) -> None:
        """The command's result, recorded and owed to the farm, in one transaction."""
        self._seq += 1
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("UPDATE farm_commands_run SET result = ? WHERE command_id = ?",
                             (json.dumps(result), command_id))
            self._db.execute("INSERT OR REPLACE INTO farm_outbox VALUES (?, ?, ?, ?)",
                             (COMMAND_RESULT, str(command_id), json.dumps(result), self._seq))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def interrupted_commands(self) -> list[int]:
        """Commands started but without a result: the host died while
        running them. They are not run again."""
        return [int(row[0]) for row in self._db.execute(
            "SELECT command_id FROM farm_commands_run WHERE result IS NULL")]

    def prune_commands(self, older_than: float) -> None:
        self._db.execute("DELETE FROM farm_commands_run WHERE started < ? AND result IS NOT "
                         "NULL", (older_than,))
