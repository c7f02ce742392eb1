"""Log lines that a client can cause by the thousand (failed calls under
backpressure, refused frames), at most one per kind per interval.

The first line of a kind is logged at once; the rest within the interval
are counted, and at its end one line (the last of them) says how many
there were. Nothing is lost from the log but repetition, and a flood of
bad calls cannot turn into a flood of log.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel


@dataclass
class _Window:
    until: float
    held: int = 0
    last: tuple[Logger, LogLevel, str, dict[str, Any]] | None = None
    call: IDelayedCall | None = field(default=None, repr=False)


class LogLimiter:
    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self._windows: dict[Hashable, _Window] = {}

    def emit(self, log: Logger, level: LogLevel, kind: Hashable, format: str,
             **kwargs: Any) -> None:
        now = self.clock.seconds()
        window = self._windows.get(kind)
        if window is None or (window.held == 0 and now >= window.until):
            self._windows[kind] = _Window(until=now + self.interval)
            log.emit(level, format, **kwargs)
            return
        window.held += 1
        window.last = (log, level, format, kwargs)
        if window.call is None:
            window.call = self.clock.callLater(max(0.0, window.until - now), self._flush, kind)

    def warn(self, log: Logger, kind: Hashable, format: str, **kwargs: Any) -> None:
        self.emit(log, LogLevel.warn, kind, format, **kwargs)

    def error(self, log: Logger, kind: Hashable, format: str, **kwargs: Any) -> None:
        self.emit(log, LogLevel.error, kind, format, **kwargs)

    def _flush(self, kind: Hashable) -> None:
        window = self._windows.pop(kind)
        assert window.last is not None
        log, level, format, kwargs = window.last
        log.emit(level, format + " ({log_held} like it in the last {log_interval:g} s)",
                 **kwargs, log_held=window.held, log_interval=self.interval)

    def flush(self) -> None:
        """Say now what is held back (at shutdown)."""
        for kind, window in list(self._windows.items()):
            if window.call is not None and window.call.active():
                window.call.cancel()
                self._flush(kind)
        self._windows.clear()
