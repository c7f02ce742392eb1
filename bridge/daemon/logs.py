"""The log's observer under twistd: where lines go, in which form, from
which level on.

- When the output is the journal (systemd sets ``JOURNAL_STREAM`` to the
  device and inode of the stream it connected; the output's own must
  match), every line starts with a ``<N>`` syslog priority taken from the
  event's level and has no timestamp of its own: journald records both.
  An event is one line, one journal entry; only a traceback adds lines,
  each with the priority and the system and marked ``| ``.
- Elsewhere (a terminal, ``--logfile``), twistd's own format.
- Either way an event's text is escaped (protocols.logtext): a line break,
  ``\r``, an escape sequence or U+2028 in a field from outside (a user
  name, a client's address, a backend's output) or in the text itself is
  written as ``\n``, ``\r``, ``\x1b``, ``\u2028``, so that it can neither
  make an entry of its own nor drive the operator's terminal (review
  finding 9: forged entries).
- ``log_level`` (debug, info, warn, error) drops lines below it; a reload
  changes it in place.
- ``--logfile``: SIGUSR1 starts a new file when the old one was moved away
  (logrotate's ``mv`` then signal), else rotates it as twistd does.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile

from protocols.logtext import escaped, has_unsafe

#: syslog priorities (sd-daemon(3)'s SD_DEBUG ... SD_CRIT) of Twisted's levels.
PRIORITIES = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
              LogLevel.critical: 2}
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


def is_journal_stream(stream: IO[Any], environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal's: ``JOURNAL_STREAM`` (device:inode,
    as systemd sets it for the service's stdout and stderr) names it."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def escaped_event(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its text escaped: formatted once (the fields
    interpolated), escaped, and put back as a format of its own. The same
    event when there is nothing to escape; a traceback is left to the
    caller."""
    text = formatEvent(event)
    system = str(event.get("log_system") or "")
    if not has_unsafe(text) and not has_unsafe(system):
        return event
    safe = {key: value for key, value in event.items() if key != "log_flattened"}
    safe.update(log_format="{log_escaped}", log_escaped=escaped(text))
    if system:
        safe["log_system"] = escaped(system)
    return safe


def journal_line(event: dict[str, Any]) -> str | None:
    """One event for journald: ``<N>[system] text``, no timestamp, one line
    (its text escaped); a traceback's lines follow, each ``<N>[system] | ``
    and escaped, so that none of them reads as an entry of its own."""
    event = escaped_event(event)
    text = eventAsText(event, includeTimestamp=False, includeSystem=False,
                       includeTraceback=True)
    if not text:
        return None
    # The level is the priority: the system column is the namespace alone.
    system = event.get("log_system") or event.get("log_namespace") or "-"
    priority = PRIORITIES.get(event.get("log_level", LogLevel.info), 6)
    # Only a traceback breaks the text into lines (the message is escaped):
    # split at "\n" alone, never at what str.splitlines() also takes.
    lines = text.rstrip("\n").split("\n")
    return "".join(f"<{priority}>[{system}] {line}\n" if i == 0
                   else f"<{priority}>[{system}] | {escaped(line)}\n"
                   for i, line in enumerate(lines))


def classic_line(event: dict[str, Any]) -> str | None:
    """One event in twistd's own format (a terminal, ``--logfile``), its
    text escaped; a traceback's lines indented by a tab, as twistd does."""
    return formatEventAsClassicLogText(escaped_event(event))


class LogFileReopener:
    """``--logfile`` for SIGUSR1: a file moved away is replaced by a new one
    at its path; a file still in place is rotated (twistd's own SIGUSR1)."""

    def __init__(self, log_file: LogFile) -> None:
        self.log_file = log_file
        self._inode = self._current_inode()

    def _current_inode(self) -> int | None:
        try:
            return os.stat(self.log_file.path).st_ino
        except OSError:
            return None

    def __call__(self) -> str:
        """Reopen or rotate; returns which ("reopened" or "rotated")."""
        if self._current_inode() != self._inode:
            self.log_file.reopen()
            what = "reopened"
        else:
            self.log_file.rotate()
            what = "rotated"
        self._inode = self._current_inode()
        return what


class BridgeLogging:
    """The observer twistd begins logging to, and the parts the service
    changes later (the level; the log file on SIGUSR1)."""

    def __init__(self, logfile: str | None, level: str = "info",
                 environ: dict[str, str] | None = None, stdout: IO[Any] | None = None) -> None:
        """``logfile`` as twistd's ``--logfile`` ("-" or None: standard
        output)."""
        self.predicate = LogLevelFilterPredicate(LEVELS[level])
        self.reopen: LogFileReopener | None = None
        self.journal = False
        inner: ILogObserver
        if logfile and logfile != "-":
            log_file = LogFile.fromFullPath(logfile)
            self.reopen = LogFileReopener(log_file)
            inner = FileLogObserver(log_file, classic_line)
        else:
            stream = stdout or sys.stdout
            self.journal = is_journal_stream(stream, environ)
            inner = FileLogObserver(stream, journal_line if self.journal else classic_line)
        self.observer = FilteringLogObserver(inner, [self.predicate])

    def set_level(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LEVELS[level])
