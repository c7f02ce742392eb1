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
trustworthy setpriv (util-linux's, only root can change it), under secure
bits, when the command is not an absolute path that is also its argv[0],
or when the environment names anything the dynamic loader or libc acts on
(setpriv runs as root with the backend's environment: an LD_PRELOAD meant
for the backend must not load into it), subprocess switches as before."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
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
    """The path of util-linux's setpriv if only root can change it (the
    file and every directory above it) and the bridge runs without secure
    bits (setpriv's switch fails under keep-caps-locked, subprocess's does
    not), or None; looked for once."""
    global _setpriv
    if _setpriv is False:
        _setpriv = None
        if _secure_bits() == 0:
            for candidate in SETPRIV_PATHS:
                real = os.path.realpath(candidate)
                # BusyBox's setpriv (a link to busybox) lacks --groups.
                if os.path.basename(real) == "setpriv" and _only_root_can_change(real):
                    _setpriv = real
                    break
    return _setpriv  # type: ignore[return-value]


def _only_root_can_change(path: str) -> bool:
    try:
        program = os.stat(path)
        if not (stat.S_ISREG(program.st_mode) and program.st_mode & 0o100):
            return False
        for held in (program, *(os.stat(d) for d in Path(path).parents)):
            if held.st_uid != 0 or held.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def _secure_bits() -> int | None:
    """prctl(PR_GET_SECUREBITS), None if it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        bits = libc.prctl(27, 0, 0, 0, 0)  # PR_GET_SECUREBITS
    except (OSError, AttributeError):
        return None
    return None if bits < 0 else int(bits)


#: What glibc drops from the environment of a setuid program (its
#: unsecure-envvars list), besides every LD_* and GLIBC_* name; and
#: LANGUAGE, whose value is a path into the message catalogues.
_LOADER_VARIABLES = frozenset((
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LANGUAGE", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_PERTURB_", "MALLOC_TOP_PAD_", "MALLOC_TRACE",
    "MALLOC_TRIM_THRESHOLD_", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS",
    "TMPDIR", "TZDIR"))


def _loader_sensitive(env: Mapping[str, str]) -> bool:
    """Whether ``env`` could make setpriv, running as root, load or read
    anything of another's choosing: loader and libc variables, and a
    locale or time zone that is a path rather than a name."""
    for name, value in env.items():
        if name.startswith(("LD_", "GLIBC_")) or name in _LOADER_VARIABLES:
            return True
        if (name in ("LANG", "TZ") or name.startswith("LC_")) and "/" in value:
            return True
    return False


def _check_executable(executable: str, uid: int, groups: list[int]) -> None:
    """Raise the OSError subprocess's exec as ``uid`` would have given for a
    program that is missing, not executable by that account, or neither a
    script nor a binary: through setpriv, the exec that could fail is
    setpriv's own, which only exits (126, 127) with its message in the
    backend's output. (What this does not see, a directory on the way the
    account may not search or a noexec mount, still shows that way.)"""
    info = os.stat(executable)  # FileNotFoundError, as exec gives
    if info.st_uid == uid:
        allowed = info.st_mode & 0o100
    elif info.st_gid in groups:
        allowed = info.st_mode & 0o010
    else:
        allowed = info.st_mode & 0o001
    if stat.S_ISDIR(info.st_mode) or not allowed:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), executable)
    with open(executable, "rb") as program:
        start = program.read(4)
    if not (start.startswith(b"#!") or start == b"\x7fELF"):
        # execve refuses it; setpriv's execvp would run it with /bin/sh.
        raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), executable)


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
                    and os.path.isabs(executable) and not _loader_sensitive(env):
                _check_executable(executable, uid, groups)
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
