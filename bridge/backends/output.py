"""A backend's output, followed: new lines of its log file copied into the
bridge's log, prefixed with the session, a burst and then a steady rate.
(How big the file may grow is ``bridge.backends.logs``'s business.)

A line is what ends at ``\n``; whatever else it holds (``\r``, ``\v``,
escape sequences, U+2028) is escaped (protocols.logtext), so that a
desktop's output never makes a log entry of its own or drives the
operator's terminal (review finding 9)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from protocols.logtext import escaped

if TYPE_CHECKING:
    from bridge.backends.launcher import Backend
    from bridge.backends.logs import LogFile

#: Backend output copied into the bridge's log: a burst, then this many a second.
OUTPUT_BURST = 20
OUTPUT_RATE = 2.0
#: At most this much is read at each look (the rest is read later, or dropped
#: when the file is started over first).
READ_LIMIT = 256 * 1024
_MAX_LINE = 500


_output_log = Logger(namespace="bridge.backends.output")


class OutputFollower:
    """Copies new lines of a backend's log file into the bridge's log,
    prefixed with the session and limited to a burst then a steady rate."""

    log = _output_log

    def __init__(self, backend: Backend, file: LogFile, clock: IReactorTime,
                 from_end: bool) -> None:
        self.backend = backend
        self.file = file
        self.clock = clock
        self._partial = b""
        self._restarts = file.restarts
        self._tokens = float(OUTPUT_BURST)
        self._last_refill = clock.seconds()
        self._dropped = 0
        if from_end:
            file.skip_to_end()

    def read(self) -> None:
        data = self.file.read(READ_LIMIT)
        if self.file.restarts != self._restarts:
            # Started over: the partial line before is not continued by this.
            self._restarts = self.file.restarts
            self._partial = b""
        if not data:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-_MAX_LINE:]
        for raw in lines:
            self._line(raw.decode("utf-8", "replace").rstrip("\r")[:_MAX_LINE])

    def _line(self, text: str) -> None:
        if not text:
            return
        text = escaped(text)
        self.backend.last_lines.append(text)
        now = self.clock.seconds()
        self._tokens = min(float(OUTPUT_BURST),
                           self._tokens + (now - self._last_refill) * OUTPUT_RATE)
        self._last_refill = now
        if self._tokens < 1:
            self._dropped += 1
            return
        self._tokens -= 1
        if self._dropped:
            self.log.info("session {session_id} {module}: {count} lines not logged (rate limit)",
                          session_id=self.backend.session_id, module=self.backend.module.name,
                          count=self._dropped)
            self._dropped = 0
        self.log.info("session {session_id} {module}: {line}", session_id=self.backend.session_id,
                      module=self.backend.module.name, line=text)

    def close(self) -> None:
        """The backend is gone: what is left of its output, then its last
        partial line."""
        self.read()
        if self._partial:
            self._line(self._partial.decode("utf-8", "replace"))
            self._partial = b""

