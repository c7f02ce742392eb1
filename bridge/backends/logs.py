"""Backends' output files: one per backend in a directory of their own
(``backend_log_dir``, off the state database's filesystem by default),
bounded by size however fast a backend writes, and removed once nothing
writes to them any more.

A backend's stdout and stderr are a file, not a pipe to the bridge:
backends outlive the bridge (kill -9, restarts), and a pipe whose reader
is gone kills its writer with SIGPIPE or blocks it. The file is bounded by
its size, never by how fast the bridge reads it: the directory is watched
with inotify (IN_MODIFY), and a file that passes ``per_session`` is started
over (truncated: writers append) in the same turn of the reactor; while
all files together pass ``total`` the largest are. A timer looks as well,
for an event missed. What is cut off unread is counted and logged, at most
once per file per 10 s. RLIMIT_FSIZE is not used: it would cap the user's
own files as well (and kill with SIGXFSZ).

The bridge holds each file with a read-only descriptor, so that a read
lease can tell when no process has it open for writing any more: only
then is a file whose backend is gone removed. A process the backend left
behind that still has the file as its stdout is bounded like the backend
was, rather than writing on into an unlinked file no one bounds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.endpoints import StartupError
from protocols.loglimit import LogLimiter

#: How often every file is looked at (sizes, removals, the followers' reads).
POLL_INTERVAL = 1.0
#: What a file's name looks like (the leftovers of a previous run are swept).
PREFIX, SUFFIX = "session-", ".log"
#: A name ``create`` makes: session id, module, random hex digits.
_OWN_NAME = re.compile(re.escape(PREFIX) + r"[0-9]+-[^/]+\.[0-9a-f]+" + re.escape(SUFFIX))
#: inotify's "a descriptor open for writing was closed" (linux/inotify.h).
_IN_CLOSE_WRITE = 0x00000008


class LogFile:
    """One backend's output file, as the bridge holds it: read-only (for the
    follower, and so that a lease can tell whether anyone still writes to
    it). ``offset`` is how far the follower has read; ``restarts`` counts
    the times the file was started over (a partial line before is gone)."""

    def __init__(self, path: Path, fd: int, label: str) -> None:
        self.path = path
        self.fd = fd
        self.label = label
        self.offset = 0
        self.size = 0
        self.restarts = 0
        self.dropped = 0
        self.released = False
        # Called on each look at the file (the backend's output follower).
        self.on_read: Callable[[], None] | None = None

    def used(self) -> int:
        """Bytes the file takes: its size, or its blocks when more (space
        kept with fallocate counts too). 0 when it cannot be looked at."""
        try:
            info = os.fstat(self.fd)
        except OSError:
            return 0
        return max(info.st_size, info.st_blocks * 512)

    def skip_to_end(self) -> None:
        """Read nothing written so far (an adopted backend's old output)."""
        try:
            self.offset = os.fstat(self.fd).st_size
        except OSError:
            pass

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes not read yet."""
        try:
            size = os.fstat(self.fd).st_size
            if size < self.offset:  # started over by us, or by someone
                self.offset = 0
                self.restarts += 1
            if size == self.offset:
                return b""
            data = os.pread(self.fd, min(size - self.offset, limit), self.offset)
        except OSError:
            return b""
        self.offset += len(data)
        return data

    def start_over(self) -> int:
        """Truncate the file (writers append, so they go on at its start);
        returns how many bytes went that the follower had not read."""
        try:
            size = os.fstat(self.fd).st_size
            # Through our descriptor's inode: the name may be gone, and no
            # write descriptor is opened (it would spoil the lease below).
            os.truncate(f"/proc/self/fd/{self.fd}", 0)
        except OSError:
            return 0
        unread = max(0, size - self.offset)
        self.offset = 0
        self.restarts += 1
        self.dropped += unread
        return unread

    def has_writers(self) -> bool:
        """Whether any process still has the file open for writing: a read
        lease is granted only when none has. Without leases (fs.leases-enable
        = 0) the answer is yes while the file is not empty."""
        try:
            # A lease break (someone opening it for writing in the microseconds
            # the lease is held) signals SIGWINCH, ignored, instead of SIGIO,
            # which would end the bridge.
            fcntl.fcntl(self.fd, fcntl.F_SETSIG, signal.SIGWINCH)
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            return self.used() > 0
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BackendLogs:
    """The backends' output files of one bridge: created for each spawn,
    bounded by size (``per_session`` each, ``total`` together), followed,
    and removed when no one writes to them any more.

    Invariant: ``_files`` holds every file the bridge bounds, by path;
    ``_total`` is the sum of their ``size`` (as last looked at).
    """

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, directory: Path,
                 per_session: int = 8 * 1024 * 1024, total: int = 256 * 1024 * 1024) -> None:
        self.reactor = reactor
        self.clock = clock
        # Absolute, as inotify's events name the files (a relative path
        # would match none of them).
        self.directory = Path(os.path.abspath(directory))
        self.per_session = per_session
        self.total = total
        self.dropped_bytes = 0
        self._files: dict[Path, LogFile] = {}
        self._total = 0
        self._poll: Any = None
        self._notifier: Any = None
        self._watching = False
        self._log_limit = LogLimiter(clock)

    # -- the directory ------------------------------------------------------------

    def prepare(self) -> None:
        """Make the directory (0700), or refuse one another user could plant
        files in. Raises StartupError."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = self.directory.lstat()
        except OSError as e:
            raise StartupError(f"backend_log_dir: cannot create directory {self.directory}: "
                               f"{e.strerror or e}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise StartupError(f"backend_log_dir: {self.directory} is not a directory")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise StartupError(f"backend_log_dir: {self.directory} must belong to the "
                               f"bridge's user and be writable by no one else (chmod 700 it)")

    def sweep(self, known: set[Path]) -> None:
        """After a restart: files of this directory that no backend the
        state knows of writes to (``known`` are attached already). Those no
        one writes to any more are removed; those still written to (by what
        a backend left behind) are bounded and removed once left alone."""
        try:
            names = [name for name in os.listdir(self.directory)
                     if name.startswith(PREFIX) and name.endswith(SUFFIX)]
        except OSError:
            return
        for name in names:
            path = self.directory / name
            if path not in known and path not in self._files:
                log = self.attach(path, f"leftover {name}")
                if log is not None:
                    self.release(log)

    # -- files ---------------------------------------------------------------------

    def create(self, session_id: int, module: str) -> tuple[Path, int]:
        """A new file for a backend about to be spawned, and a descriptor the
        child writes to (O_APPEND; the caller closes it after the spawn).
        Raises OSError."""
        self._watch()
        for _ in range(8):
            path = self.directory / (f"{PREFIX}{session_id}-{module}."
                                     f"{secrets.token_hex(4)}{SUFFIX}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            return path, fd
        raise FileExistsError(errno.EEXIST, "no free name", str(self.directory))

    def attach(self, path: Path, label: str) -> LogFile | None:
        """Bound (and let a follower read) the file at ``path``; None when
        it is not a file the bridge can hold."""
        current = self._files.get(path)
        if current is not None:
            return current
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        log = LogFile(path, fd, label)
        self._files[path] = log
        self._check(log)
        self._watch()
        if self._poll is None:
            self._poll = self.clock.callLater(POLL_INTERVAL, self._look)
        return log

    def release(self, log: LogFile) -> None:
        """Its backend is gone: the file goes as soon as no one writes to
        it (at once, as a rule), bounded until then."""
        if self._files.get(log.path) is not log:
            return  # no longer held (the bridge stopped bounding)
        log.released = True
        log.on_read = None
        self._remove_if_left(log)

    def attach_path(self, path: str, label: str) -> LogFile | None:
        """``attach`` for a path as a backend record keeps it ("": none).
        Only a file of this directory named as the bridge names them: a
        record comes from the state database, and a path elsewhere would
        make root truncate and remove a file it never made."""
        if not path:
            return None
        if not self.is_own_name(path):
            self._log_limit.warn(
                self.log, ("foreign", path),
                "{label}: not following or removing {path}: not a backend log of {directory}",
                label=label, path=path, directory=str(self.directory))
            return None
        return self.attach(Path(path), label)

    def is_own_name(self, path: str) -> bool:
        """Whether ``path`` names a file as ``create`` makes them: right in
        this directory (no "..", no other directory), with the bridge's
        file name pattern."""
        candidate = Path(path)
        return (candidate.is_absolute() and ".." not in candidate.parts
                and candidate.parent == self.directory
                and _OWN_NAME.fullmatch(candidate.name) is not None)

    def release_path(self, path: str) -> None:
        """A backend of a previous run is gone: its file too, once left alone."""
        log = self.attach_path(path, f"file {Path(path).name}")
        if log is not None:
            self.release(log)

    def _remove_if_left(self, log: LogFile) -> None:
        if log.has_writers():
            return
        try:
            os.unlink(log.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warn("cannot remove backend log {path}: {error}", path=str(log.path),
                          error=e.strerror or str(e))
        self._forget(log)

    def _forget(self, log: LogFile) -> None:
        self._files.pop(log.path, None)
        self._total -= log.size
        log.close()

    # -- bounds --------------------------------------------------------------------

    def _check(self, log: LogFile) -> None:
        used = log.used()
        if used > self.per_session:
            self._start_over(log, used, "its cap", self.per_session)
            used = log.used()
        self._total += used - log.size
        log.size = used
        for _ in range(len(self._files)):  # each file at most once (one may not shrink)
            if self._total <= self.total:
                break
            largest = max(self._files.values(), key=lambda f: f.size)
            if largest.size == 0:
                break
            self._start_over(largest, largest.size, "the total cap of all backend logs",
                             self.total)
            self._total -= largest.size
            largest.size = largest.used()
            self._total += largest.size

    def _start_over(self, log: LogFile, used: int, what: str, cap: int) -> None:
        unread = log.start_over()
        self.dropped_bytes += unread
        self._log_limit.warn(
            self.log, ("over", log.path),
            "{label}: output over {what} ({cap} bytes; the file had {used}): started over, "
            "{unread} bytes not read dropped, {dropped} in all",
            label=log.label, what=what, cap=cap, used=used, unread=unread, dropped=log.dropped)

    def _look(self) -> None:
        """Every POLL_INTERVAL: each file's size, its follower, the removals."""
        self._poll = None
        for log in list(self._files.values()):
            self._check(log)
            if log.on_read is not None:
                log.on_read()
            if log.released:
                self._remove_if_left(log)
        if self._files:
            self._poll = self.clock.callLater(POLL_INTERVAL, self._look)

    def _event(self, _watch: Any, filepath: Any, mask: int) -> None:
        log = self._files.get(Path(os.fsdecode(filepath.path)))
        if log is None:
            return
        self._check(log)
        if log.released and mask & _IN_CLOSE_WRITE:
            self._remove_if_left(log)

    def _watch(self) -> None:
        """inotify on the directory: a file is looked at the moment it was
        written to (coalesced by the kernel: once per turn of the reactor
        however fast it is written). Without inotify, the timer alone."""
        if self._watching:
            return
        self._watching = True
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            notifier.watch(FilePath(str(self.directory)),
                           mask=inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE,
                           callbacks=[self._event])
        except Exception as e:  # no inotify here (or no watches left)
            self.log.warn("not watching {directory} with inotify ({error}): backend logs are "
                          "bounded once a second only", directory=str(self.directory),
                          error=str(e))
            return
        self._notifier = notifier

    def files(self) -> list[LogFile]:
        return list(self._files.values())

    def close(self) -> None:
        """Stop bounding (the bridge stops; backends go on writing)."""
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        self._watching = False
        self._log_limit.flush()
        for log in list(self._files.values()):
            log.close()
        self._files.clear()
        self._total = 0

