"""The record of every backend process the bridge spawned and has not seen
exit: written the moment a process is spawned (before it is ready), so
that a bridge killed during a start (kill -9, a crash) leaves nothing
running that the next run does not know of. The next run adopts what a
session owns and stops the rest.

The state store keeps it (``bridge.state.store.SpawnRecords``); a launcher
without state (tests, tools) keeps it in memory.
"""

from __future__ import annotations

from typing import Protocol

from bridge.sessions.model import BackendRecord


class SpawnLedger(Protocol):
    def spawned(self, session_id: int, record: BackendRecord) -> None:
        """A process was spawned for ``session_id``. Raises StateWriteError
        when it cannot be recorded (the spawn is then undone)."""
        ...

    def gone(self, record: BackendRecord) -> None:
        """The process exited. Best effort: a row left behind is dropped
        by the next run, which finds the process gone."""
        ...

    def recorded(self) -> list[tuple[int, BackendRecord]]:
        """(session id, record) of every process recorded and not gone."""
        ...


class MemoryLedger:
    """A SpawnLedger that lives as long as the process."""

    def __init__(self) -> None:
        self._records: dict[tuple[int, int], tuple[int, BackendRecord]] = {}

    def spawned(self, session_id: int, record: BackendRecord) -> None:
        self._records[record.pid, record.start_ticks] = (session_id, record)

    def gone(self, record: BackendRecord) -> None:
        self._records.pop((record.pid, record.start_ticks), None)

    def recorded(self) -> list[tuple[int, BackendRecord]]:
        return list(self._records.values())
