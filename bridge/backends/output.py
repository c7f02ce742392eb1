"""A backend's output, followed: new lines of its log file copied into the
bridge's log, prefixed with the session, a burst and then a steady rate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

if TYPE_CHECKING:
    from bridge.backends.launcher import Backend

#: Backend output copied into the bridge's log: a burst, then this many a second.
OUTPUT_BURST = 20
OUTPUT_RATE = 2.0
#: A backend log file is emptied once it grows past this (it is followed, not archived).
OUTPUT_FILE_LIMIT = 1024 * 1024
_MAX_LINE = 500


_output_log = Logger(namespace="bridge.backends.output")


class OutputFollower:
    """Copies new lines of a backend's log file into the bridge's log,
    prefixed with the session and limited to a burst then a steady rate."""

    log = _output_log

    def __init__(self, backend: Backend, path: Path, clock: IReactorTime,
                 from_end: bool) -> None:
        self.backend = backend
        self.path = path
        self.clock = clock
        self._fd: int | None = None
        self._offset = 0
        self._partial = b""
        self._tokens = float(OUTPUT_BURST)
        self._last_refill = clock.seconds()
        self._dropped = 0
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            if from_end:
                self._offset = os.fstat(self._fd).st_size
        except OSError:
            self._fd = None

    def read(self) -> None:
        if self._fd is None:
            return
        try:
            size = os.fstat(self._fd).st_size
            if size < self._offset:  # emptied by us below, or by someone
                self._offset = 0
            if size == self._offset:
                return
            data = os.pread(self._fd, min(size - self._offset, 256 * 1024), self._offset)
            self._offset += len(data)
            if self._offset >= OUTPUT_FILE_LIMIT:
                # Followed, not archived: start the file over (writers use O_APPEND).
                os.truncate(self.path, 0)
                self._offset = 0
        except OSError:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-_MAX_LINE:]
        for raw in lines:
            self._line(raw.decode("utf-8", "replace").rstrip("\r")[:_MAX_LINE])

    def _line(self, text: str) -> None:
        if not text:
            return
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
        if self._partial:
            self._line(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
