"""A backend's endpoint: the socket file it creates in the pipe directory,
and how the bridge decides that the file is the backend's.

Readiness is decided from the file, never by connecting to it: ogon's Qt
platform plugin (the greeter, started ``-platform ogon``) accepts exactly
one connection and then closes its listening socket, so a connection made
only to look would spend the one the RDP server needs. ogon's own modules
wait for the pipe file too (WinPR's WaitNamedPipeA).

The pipe directory is world-writable (mode 1777, as WinPR makes
``/tmp/.pipe``), so a file at an endpoint proves nothing by itself: any
local user can create one at the next session's name. A file counts as
the backend's only when

- it is a socket (``lstat``: a symlink to one does not count),
- it belongs to the uid the backend runs as (another user cannot make a
  socket that belongs to someone else), and
- it was made after the start: its ctime is not older than the moment
  before the spawn, read from the coarse clock that file times come from.

The socket file appears at bind(), a moment before the backend listens;
inotify sees it at once, so the RDP server, told then, could be refused.
Whether it listens is asked of the kernel (sock_diag, still no connection),
for the socket bound to that very file; where the kernel cannot be asked,
the file is given the few milliseconds WinPR's own wait for a pipe file
(10 ms steps) gives.

Before a start whatever stands at the endpoint is removed (root may, also
in the sticky directory); a name that cannot be cleared is replaced by
another one the backend is told through ``{endpoint}``.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from bridge.backends.modules import BackendError, Module, pipe_file
from bridge.endpoints import move_aside
from protocols.localpeer import listening_unix_files

_log = Logger()
#: Names no one can guess tried when an endpoint's own cannot be had.
ALTERNATIVE_NAMES = 3
#: What EndpointClaim.check finds.
READY, MISSING, FOREIGN = "ready", "missing", "foreign"
#: A socket bound but not listening yet is looked at again after this; where
#: the kernel cannot be asked, one counts as ready this long after it
#: appeared (WinPR's wait for a pipe file looks every 10 ms).
LISTEN_RECHECK = 0.002
UNLISTED_GRACE = 0.01
#: Linux's CLOCK_REALTIME_COARSE (Python's time module does not name it).
_CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def start_mark() -> int:
    """Now, in ns, on the clock file timestamps come from (the kernel's
    coarse clock: a file made right after this is never dated before it)."""
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


@dataclass(frozen=True)
class EndpointClaim:
    """What the socket at ``path`` must be to count as the backend's."""

    path: Path
    uid: int
    not_before_ns: int
    # Whether something else found there may be removed: only a name the
    # bridge chose and cleared for this start. A name a backend reported
    # itself (X11's display) may be another session's: never removed.
    take_back: bool = True

    def check(self) -> tuple[str, str]:
        """(READY, MISSING or FOREIGN; why not): whether the backend's socket
        is there. FOREIGN: something stands there that the backend did not
        make (another user's socket, a file, a symlink)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return MISSING, f"nothing at {self.path}"
        except OSError as e:
            return MISSING, f"{self.path}: {e.strerror}"
        if not stat.S_ISSOCK(info.st_mode):
            return FOREIGN, f"{self.path} is {_kind(info.st_mode)}, not a socket"
        if info.st_uid != self.uid:
            return FOREIGN, (f"{self.path} belongs to uid {info.st_uid}, not to the backend's "
                             f"uid {self.uid}")
        if info.st_ctime_ns < self.not_before_ns:
            return FOREIGN, f"{self.path} is older than the backend's start"
        return READY, ""

    def owner(self) -> int | None:
        """The uid owning what stands at the path, None if nothing does."""
        try:
            return os.lstat(self.path).st_uid
        except OSError:
            return None

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the socket at the path, None if there is none."""
        try:
            info = os.lstat(self.path)
        except OSError:
            return None
        return info.st_dev, info.st_ino


def listening(path: Path) -> bool | None:
    """Whether the socket whose file is at ``path`` listens yet, asked of the
    kernel (sock_diag; no connection is made): True, False (bound, not
    listening yet: a backend between bind() and listen()), or None when the
    kernel cannot be asked. The socket is found by its file (device and
    inode), never by the name it was bound under: another socket once bound
    to that name, its file since removed, may still listen."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    files = listening_unix_files()
    if files is None:
        return None
    return (info.st_dev, info.st_ino) in files


def listen_wait(path: Path, seen_at: float, now: float) -> float:
    """Seconds to wait before the backend's socket at ``path``, there since
    ``seen_at``, counts as ready: 0 once it listens; LISTEN_RECHECK while it
    is bound but not listening yet; when the kernel cannot say, what is left
    of UNLISTED_GRACE."""
    state = listening(path)
    if state is True:
        return 0.0
    if state is False:
        return LISTEN_RECHECK
    return max(0.0, seen_at + UNLISTED_GRACE - now)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISREG, "a file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return name
    return "a device"


def clear(path: Path) -> tuple[str, str | None]:
    """Remove whatever stands at ``path`` (never following a symlink).
    Returns (what was there, "" if nothing; why it could not be removed,
    None when the name is free now)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "", None
    except OSError as e:
        return "", e.strerror or str(e)
    found = f"{_kind(info.st_mode)} of uid {info.st_uid}" if not stat.S_ISSOCK(info.st_mode) \
        else f"a socket of uid {info.st_uid}"
    try:
        if stat.S_ISDIR(info.st_mode):
            try:
                os.rmdir(path)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Filled so that it cannot be removed: moved aside instead.
                aside = move_aside(path)
                found += f" (moved aside to {aside.name})"
        else:
            os.unlink(path)
    except FileNotFoundError:
        return found, None
    except OSError as e:
        return found, e.strerror or str(e)
    return found, None


def unpredictable(endpoint: str) -> str:
    """Another name for ``endpoint`` that no other user can guess in advance."""
    return f"{endpoint}-{secrets.token_hex(4)}"


def free_endpoint(pipe_dir: Path, session_id: int, module: Module, endpoint: str,
                  owners: tuple[int, ...] = (), guessable: bool = True) -> str:
    """Clear the endpoint's name before the start: a socket or file there
    (left by a dead backend, or planted by another local user at the next
    session's name) would be taken for the backend's. Where another user
    than ``owners`` (the bridge's, the backend's) had put something there,
    or the name cannot be cleared, or ``guessable`` is false (a start again
    after someone took the name during one), the backend gets a name no one
    can guess, which it learns through ``{endpoint}``, so the user still
    gets a session. Raises BackendError when no name can be had."""
    candidates = [endpoint] if guessable else []
    candidates += [unpredictable(endpoint) for _ in range(ALTERNATIVE_NAMES)]
    for name in candidates:
        path = pipe_file(pipe_dir, name)
        try:
            owner: int | None = os.lstat(path).st_uid
        except OSError:
            owner = None
        found, error = clear(path)
        if error is None:
            if found:
                _log.info("session {session_id}: removed {found} at {module}'s endpoint {path} "
                          "before the start", session_id=session_id, found=found,
                          module=module.name, path=str(path))
            if name == endpoint and owner is not None and owner not in owners:
                _log.warn("session {session_id}: {module}'s endpoint {name} was taken by uid "
                          "{owner}: using a name no one can guess", session_id=session_id,
                          module=module.name, name=name, owner=owner)
                continue
            if name != endpoint:
                _log.warn("session {session_id}: {module} uses endpoint {name} instead",
                          session_id=session_id, module=module.name, name=name)
            return name
        _log.error("session {session_id}: cannot clear endpoint {path} for {module} "
                   "({found}): {error}", session_id=session_id, module=module.name,
                   path=str(path), found=found, error=error)
    raise BackendError(f"module {module.name}: no endpoint name of {endpoint!r} could be "
                       f"cleared in {pipe_dir}")


def remove_if_same(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove the socket a backend left behind, if the very same file still
    stands at ``path`` (never another one made there since)."""
    if identity is None:
        return
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity and stat.S_ISSOCK(info.st_mode):
            os.unlink(path)
    except OSError:
        pass


class PipeDirectoryWatch:
    """Wakes waiters the moment a file appears (or changes owner) in the
    pipe directory, with inotify where the kernel allows it. Waiters also
    poll: a missed or unavailable event only costs the poll interval."""

    log = Logger()

    def __init__(self, reactor: Any, directory: Path) -> None:
        self.reactor = reactor
        self.directory = directory
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._notifier: Any = None
        self._failed = False

    def _ensure(self) -> None:
        if self._notifier is not None or self._failed:
            return
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            notifier.watch(FilePath(str(self.directory)),
                           mask=inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_ATTRIB,
                           callbacks=[self._event])
        except Exception as e:  # no inotify here (or no watches left): polling only
            self._failed = True
            self.log.info("not watching {directory} with inotify ({error}); backends' "
                          "endpoints are polled", directory=str(self.directory), error=str(e))
            return
        self._notifier = notifier

    def _event(self, _watch: Any, filepath: Any, _mask: int) -> None:
        name = os.path.basename(filepath.path)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        for wake in list(self._waiters.get(name, ())):
            wake()

    def add(self, path: Path, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever something happens to ``path``."""
        if path.parent != self.directory:
            return
        self._ensure()
        self._waiters.setdefault(path.name, []).append(wake)

    def remove(self, path: Path, wake: Callable[[], None]) -> None:
        waiters = self._waiters.get(path.name)
        if waiters is not None and wake in waiters:
            waiters.remove(wake)
            if not waiters:
                del self._waiters[path.name]

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        self._waiters.clear()

