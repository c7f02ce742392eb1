"""How a backend's process is started: in its own session and process
group (stopping it reaches everything it started), as the session's
account when the bridge runs as root, its descriptors mapped as Twisted's
spawnProcess maps ``child_fds``, its exit told to a ProcessProtocol.

A spawn with descriptors 0, 1 and 2 only (every command module: the
logon's path) goes through subprocess, whose fork and exec are C code;
one with pipes the bridge reads (ogon's X11 server's -displayfd, the
launcher's channel) through Twisted, which runs Python in the forked
child until exec."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping
from typing import Any

from twisted.internet import process
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from bridge.backends.orphans import PidfdReader


def start_process(reactor: Any, protocol: ProcessProtocol, executable: str, args: list[str],
                  env: dict[str, str], path: str | None, uid: int | None, gid: int | None,
                  child_fds: Mapping[int, int | str]) -> Any:
    """Start ``executable`` (see the module docstring); the process (its
    ``pid``). Raises OSError when it cannot start."""
    if sorted(child_fds) == [0, 1, 2] and all(isinstance(fd, int) for fd in child_fds.values()):
        return SpawnedProcess.start(reactor, protocol, executable, args, env, path, uid, gid,
                                    child_fds)  # type: ignore[arg-type]
    return GroupLeaderProcess(reactor, executable, args, env, path, protocol, uid, gid,
                              dict(child_fds))


class GroupLeaderProcess(process.Process):
    """A child in its own session and process group, so that stopping a
    backend reaches everything it started. Twisted's own PTY processes call
    setsid() at this point of the fork; the posix_spawn fast path has no
    hook for it, so it is not used."""

    def _trySpawnInsteadOfFork(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        os.setsid()
        super()._setupChild(*args, **kwargs)


class SpawnedProcess:
    """A backend started by subprocess, for the common spawn (descriptors 0,
    1 and 2 only): fork and exec are C code, so the child touches none of
    the bridge's memory before exec (Twisted's fork runs Python in the
    child: a copy-on-write of the bridge, page by page, per start). Its exit
    is watched with a pidfd and told to ``protocol`` as Twisted's Process
    tells it."""

    def __init__(self, reactor: Any, protocol: ProcessProtocol, popen: subprocess.Popen[bytes],
                 pidfd: int) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.popen = popen
        self.pid = popen.pid
        self.watch: PidfdReader | None = PidfdReader(pidfd, self._ended)
        reactor.addReader(self.watch)

    @classmethod
    def start(cls, reactor: Any, protocol: ProcessProtocol, executable: str, args: list[str],
              env: dict[str, str], path: str | None, uid: int | None, gid: int | None,
              child_fds: Mapping[int, int]) -> SpawnedProcess:
        """In its own session and process group (stopping it reaches
        everything it started), as ``uid``/``gid`` with the account's
        groups (as Twisted's switchUID). Raises OSError when it cannot
        start."""
        switch: dict[str, Any] = {}
        if uid is not None:
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:
                raise OSError(f"no account with uid {uid}") from None
            group = gid if gid is not None else entry.pw_gid
            switch = {"user": uid, "group": group,
                      "extra_groups": os.getgrouplist(entry.pw_name, group)}
        try:
            popen = subprocess.Popen(args, executable=executable, env=env, cwd=path,
                                     stdin=child_fds[0], stdout=child_fds[1],
                                     stderr=child_fds[2], close_fds=True,
                                     start_new_session=True, **switch)
        except subprocess.SubprocessError as e:
            raise OSError(str(e)) from None
        return cls(reactor, protocol, popen, os.pidfd_open(popen.pid))

    def _ended(self) -> None:
        try:
            status = self.popen.wait(timeout=0)
        except subprocess.TimeoutExpired:  # pragma: no cover - readable only at the exit
            return
        self.unwatch()
        if status == 0:
            reason: Exception = ProcessDone(0)
        elif status < 0:
            reason = ProcessTerminated(None, -status)
        else:
            reason = ProcessTerminated(status)
        self.protocol.processEnded(Failure(reason))

    def unwatch(self) -> None:
        if self.watch is not None:
            self.reactor.removeReader(self.watch)
            os.close(self.watch.fd)
            self.watch = None
