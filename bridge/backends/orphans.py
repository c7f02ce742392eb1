"""Backend processes no session owns: what a previous run started and did
not hand on (a start cut short by kill -9, the greeter of a session that
ended at the restart), stopped and forgotten once gone; and how a process
is told apart from another that got its pid later (its start time)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.sessions.model import BackendRecord, process_start_ticks

if TYPE_CHECKING:
    from bridge.backends.ledger import SpawnLedger
    from bridge.backends.logs import BackendLogs, LogFile


def same_process(record: BackendRecord) -> bool:
    """Whether the process ``record`` names still runs (not a reused pid):
    its start time, and its real uid when the record knows it. A record
    with no start time (0) never matches: signalling its pid would be a
    guess. The uid keeps a record the bridge did not write (a state
    database someone else could replace) from naming another account's
    process -- root's, say -- by its pid and start time, which
    /proc/PID/stat shows to everyone."""
    if record.pid <= 0 or record.start_ticks <= 0:
        return False
    if process_start_ticks(record.pid) != record.start_ticks:
        return False
    return record.uid < 0 or process_uid(record.pid) == record.uid


def process_uid(pid: int) -> int | None:
    """The real uid of process ``pid`` (/proc/PID/status), None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _chained(d: Deferred[None]) -> Deferred[None]:
    """A Deferred of its own that fires when ``d`` does."""
    mine: Deferred[None] = Deferred()
    d.addBoth(lambda result: (mine.callback(None), result)[1])
    return mine


class PidfdReader:
    """IReadDescriptor for a pidfd: readable once the process has exited."""

    def __init__(self, fd: int, exited: Callable[[], None]) -> None:
        self.fd = fd
        self.exited = exited

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.exited()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "pidfd"


class _Orphan:
    def __init__(self, record: BackendRecord, output: LogFile | None) -> None:
        self.record = record
        self.output = output
        self.pidfd: PidfdReader | None = None
        self.calls: list[Any] = []
        self.gone: Deferred[None] = Deferred()


class Orphans:
    """Stops backends no session owns: SIGTERM to the process group,
    SIGKILL after the stop timeout (each only while it is still the same
    process), watched with a pidfd; once gone, its ledger row and its
    output file go too. Until then its output stays bounded.

    Invariant: ``_stopping`` holds the orphans signalled and not seen gone,
    by (pid, start time): each is stopped once however often it is named.
    """

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, ledger: SpawnLedger,
                 logs: BackendLogs) -> None:
        self.reactor = reactor
        self.clock = clock
        self.ledger = ledger
        self.logs = logs
        self._stopping: dict[tuple[int, int], _Orphan] = {}

    def stop(self, session_id: int, record: BackendRecord, stop_timeout: float,
             why: str, from_ledger: bool = False) -> Deferred[None]:
        """Stop the process ``record`` names (logged with ``why``); fires
        once it is gone (never, when pidfds are missing and it outlives the
        SIGKILL: the next run finds it in the ledger). ``from_ledger``: a
        spawn ledger row, which this version always writes with the uid; a
        row without one never makes root signal root's own process."""
        key = (record.pid, record.start_ticks)
        if key in self._stopping:
            return _chained(self._stopping[key].gone)
        if not same_process(record):
            if record.start_ticks > 0 and process_start_ticks(record.pid) == record.start_ticks:
                self.log.warn("session {session_id}: not stopping pid {pid}: it runs as uid "
                              "{found}, and the {module} backend recorded with its pid and "
                              "start time ran as uid {uid}; record forgotten",
                              session_id=session_id, pid=record.pid,
                              found=process_uid(record.pid), module=record.module,
                              uid=record.uid)
            orphan = _Orphan(record, None)
            self._gone(orphan)
            return orphan.gone
        if from_ledger and record.uid < 0 and process_uid(record.pid) == 0:
            # A record that does not say whose process it is (an older
            # version's, or not the bridge's) never makes root signal root's.
            self.log.warn("session {session_id}: not stopping pid {pid} ({module} backend "
                          "by its record): it is root's, and the record does not say whose "
                          "process it is (written by an older version?); record forgotten, "
                          "stop it by hand if it is that backend",
                          session_id=session_id, pid=record.pid, module=record.module)
            orphan = _Orphan(record, None)
            self._gone(orphan)
            return orphan.gone
        self.log.warn("session {session_id}: stopping {module} backend (pid {pid}): {why}",
                      session_id=session_id, module=record.module, pid=record.pid, why=why)
        output = self.logs.attach_path(record.log_path, f"session {session_id} {record.module}")
        orphan = self._stopping[key] = _Orphan(record, output)
        try:
            fd = os.pidfd_open(record.pid)
        except OSError:
            fd = -1  # gone already, or no pidfds: the next run forgets it
        if fd >= 0:
            orphan.pidfd = PidfdReader(fd, lambda: self._gone(orphan))
            self.reactor.addReader(orphan.pidfd)
        for signum, delay in ((signal.SIGTERM, 0.0), (signal.SIGKILL, stop_timeout)):
            orphan.calls.append(self.clock.callLater(delay, self._signal, orphan, signum))
        return _chained(orphan.gone)

    def _signal(self, orphan: _Orphan, signum: int) -> None:
        if same_process(orphan.record):
            try:
                os.killpg(orphan.record.pid, signum)
            except OSError:
                pass
        elif orphan.pidfd is None:
            self._gone(orphan)

    def _unwatch(self, orphan: _Orphan) -> None:
        """No more signals for ``orphan``, and its pidfd closed."""
        for call in orphan.calls:
            if call.active():
                call.cancel()
        if orphan.pidfd is not None:
            self.reactor.removeReader(orphan.pidfd)
            os.close(orphan.pidfd.fd)
            orphan.pidfd = None

    def _gone(self, orphan: _Orphan) -> None:
        record = orphan.record
        self._stopping.pop((record.pid, record.start_ticks), None)
        self._unwatch(orphan)
        self.ledger.gone(record)
        if orphan.output is not None:
            self.logs.release(orphan.output)
        else:
            self.logs.release_path(record.log_path)
        orphan.gone.callback(None)

    def stopping(self) -> list[BackendRecord]:
        return [orphan.record for orphan in self._stopping.values()]

    def close(self) -> None:
        """The bridge stops: the signals not sent yet stay unsent (the next
        run finds what is left in the ledger)."""
        for orphan in list(self._stopping.values()):
            self._unwatch(orphan)
        self._stopping.clear()
