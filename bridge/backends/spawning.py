"""How a backend's process is started: in its own session and process
group (stopping it reaches everything it started), as the session's
account when the bridge runs as root, its descriptors mapped as Twisted's
spawnProcess maps ``child_fds``, its exit told to a ProcessProtocol.

A spawn with descriptors 0, 1 and 2 only (every command module: the
logon's path) goes through subprocess, whose fork and exec are C code;
one with pipes the bridge reads (ogon's X11 server's -displayfd, the
launcher's channel) through Twisted, which runs Python in the forked
child until exec.

subprocess forks with vfork() (the child borrows the bridge's memory until
its exec, ~0.1 ms) unless it is to change the child's uid, gid or groups
itself; then it forks (copying the bridge's page tables, ~2 ms, and more
under load, on the reactor: a quarter of its time in a storm of logons).
So a backend that runs as another account is started through util-linux's
``setpriv`` instead, which makes the same switch (real, effective and
saved ids, the account's groups, no capabilities left) and then execs the
command: the bridge itself changes no id and keeps vfork. Without a
trustworthy setpriv (root's, not writable by others), when the command's
argv[0] is not its path, or when the environment names anything the
dynamic loader or libc acts on (setpriv runs as root with the backend's
environment: an LD_PRELOAD meant for the backend must not load into it),
subprocess switches as before."""

from __future__ import annotations

import errno
import os
import pwd
import stat
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


#: Where util-linux installs setpriv.
SETPRIV_PATHS = ("/usr/bin/setpriv", "/bin/setpriv")
_setpriv: str | bool | None = False  # False: not looked for yet


def trusted_setpriv() -> str | None:
    """The path of a setpriv only root can change (the file and the
    directory it is in), or None; looked for once."""
    global _setpriv
    if _setpriv is False:
        _setpriv = None
        for candidate in SETPRIV_PATHS:
            try:
                program = os.stat(candidate)
                directory = os.stat(os.path.dirname(os.path.realpath(candidate)))
            except OSError:
                continue
            if (stat.S_ISREG(program.st_mode) and program.st_uid == 0
                    and not program.st_mode & 0o022 and program.st_mode & 0o100
                    and directory.st_uid == 0 and not directory.st_mode & 0o022):
                _setpriv = os.path.realpath(candidate)
                break
    return _setpriv  # type: ignore[return-value]


#: What glibc drops from the environment of a setuid program (its
#: unsecure-envvars list), besides every LD_* and GLIBC_* name.
_LOADER_VARIABLES = frozenset((
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_PERTURB_", "MALLOC_TOP_PAD_", "MALLOC_TRACE", "MALLOC_TRIM_THRESHOLD_",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR"))


def _loader_sensitive(env: Mapping[str, str]) -> bool:
    return any(name.startswith(("LD_", "GLIBC_")) or name in _LOADER_VARIABLES
               for name in env)


def _check_executable(executable: str) -> None:
    """Raise the OSError exec would give for a program that is not there or
    not executable at all, as subprocess would have: through setpriv the
    exec that fails is setpriv's, which only exits 127 (its message in the
    backend's output)."""
    if os.sep not in executable:
        return  # looked up in PATH by setpriv as by subprocess
    info = os.stat(executable)  # FileNotFoundError, as exec gives
    if stat.S_ISDIR(info.st_mode) or not info.st_mode & 0o111:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), executable)


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
            groups = os.getgrouplist(entry.pw_name, group)
            setpriv = trusted_setpriv()
            if setpriv is not None and args and args[0] == executable \
                    and not _loader_sensitive(env):
                _check_executable(executable)
                args = [setpriv, f"--reuid={uid}", f"--regid={group}",
                        f"--groups={','.join(map(str, groups))}" if groups
                        else "--clear-groups", "--", *args]
                executable = setpriv
            else:
                switch = {"user": uid, "group": group, "extra_groups": groups}
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
