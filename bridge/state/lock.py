"""The state directory belongs to one bridge at a time.

Two bridges on one state directory (each on its own ICP socket and ports)
would each take the other's sessions for ones a restart left behind: mark
them Disconnected ("bridge restarted") and adopt their desktops. So a
bridge holds an ``flock`` on ``<state_dir>/state.lock``, beside the
database, from its start to its stop; the kernel releases it however the
process ends (``kill -9`` included), so nothing is left to clean up. A
second bridge, or ``icp-bridge state restore`` while a bridge runs, is
refused with one line naming the holder's pid. Readers of the database
(``state check``, ``state backup``, ``users lockouts|unlock``) take no lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bridge.endpoints import StartupError, open_lock_file
from bridge.state.trust import check_state_dir

LOCK_NAME = "state.lock"
#: What the holder writes after its pid, so that the refusal can name it.
BRIDGE = "icp-bridge"
RESTORE = "icp-bridge state restore"


class StateDirectoryBusyError(StartupError):
    """Another process holds the state directory; the text says who."""

    def __init__(self, state_dir: Path, holder_pid: int | None, holder: str) -> None:
        self.holder_pid = holder_pid
        self.lock = state_dir / LOCK_NAME
        who = f"{holder} (pid {holder_pid})" if holder_pid is not None else holder
        super().__init__(f"state_dir: {state_dir} is in use by {who}, which holds "
                         f"{state_dir / LOCK_NAME}; each bridge needs a state_dir of its own")


def _holder(fd: int) -> tuple[int | None, str]:
    """(pid, what) the holder wrote into the lock file."""
    text = os.pread(fd, 200, 0).decode("utf-8", "replace")
    pid, _, what = text.strip().partition(" ")
    return (int(pid) if pid.isdigit() else None), (what or "another process")


class StateDirectoryLock:
    """The state directory's lock, held until ``release()`` (or the
    process's end)."""

    def __init__(self, fd: int, path: Path, what: str) -> None:
        self._fd: int | None = fd
        self.path = path
        self.what = what

    @classmethod
    def claim(cls, state_dir: Path, what: str = BRIDGE) -> StateDirectoryLock:
        """Take the lock of ``state_dir`` (created 0700 when missing), or
        raise StateDirectoryBusyError naming the holder (StartupError: a
        state_dir others could write to)."""
        # Made 0700, or refused when others could write to it, before
        # anything is opened in it (bridge.state.trust).
        check_state_dir(state_dir)
        path = state_dir / LOCK_NAME
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, holder = _holder(fd)
            os.close(fd)
            raise StateDirectoryBusyError(state_dir, pid, holder) from None
        lock = cls(fd, path, what)
        lock.write_pid()
        return lock

    def write_pid(self) -> None:
        """Write this process's pid (again: twistd forks to daemonize after
        the service was made, and the pid changes)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()} {self.what}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the next bridge have it (the file stays: it is only a lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        # A service whose construction failed half-way is dropped without a
        # stop; its lock must not outlive it in a process that goes on.
        self.release()
