"""One process of a backend, started the way every backend process is
(``BackendLauncher.spawn_backend``: its bounded output file, the ledger,
its exit watched), for the modules that run more than one command line:
ogon's X11 module (X server, window manager, stopwm, startvc), the
launcher keeper."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.logger import Logger

from bridge.backends.endpoint import EndpointClaim, start_mark
from bridge.backends.environment import Account, exec_problem
from bridge.backends.launcher import Backend, BackendLauncher
from bridge.backends.modules import BackendError, Module, pipe_file
from bridge.sessions.model import BackendRecord

log = Logger(namespace="bridge.backends.processes")


@dataclass(frozen=True)
class Spawn:
    """One process to start. ``module`` names it (log lines, its output
    file, the metrics) and gives its stop_timeout; ``argv[0]`` is what the
    process sees, ``executable`` the file run; ``cwd`` None inherits the
    bridge's working directory; ``child_fds`` maps more descriptors than
    0/1/2 as Twisted's spawnProcess does (``"r"``: a pipe the bridge reads,
    e.g. the X server's -displayfd); ``recorded`` false keeps it out of the
    ledger of session backends."""

    session_id: int
    module: Module
    executable: str
    argv: list[str]
    env: Mapping[str, str]
    account: Account
    cwd: str | None
    child_fds: Mapping[int, int | str] = field(default_factory=dict)
    recorded: bool = True


def find(command: str, path: str | None) -> str | None:
    """Where ``command`` is run from: itself when it names a path, else the
    first match in ``path`` (WinPR's and execvpe's lookup, in the session
    manager's PATH); None when there is none."""
    if "/" in command or path is None:
        return command
    return shutil.which(command, path=path)


def spawn_process(launcher: BackendLauncher, spec: Spawn, endpoint: str = "") -> Backend:
    """Start one process as ``spec`` says, in its own session and process
    group, as its account when the bridge runs as root. With ``endpoint``,
    the socket it must make there counts as its own only when made by its
    uid after this moment. Raises BackendError."""
    module, account = spec.module, spec.account
    problem = exec_problem(spec.argv, spec.env)
    if problem is not None:
        raise BackendError(f"{module.name}: not started: {problem}")
    switch = launcher.as_root and account.uid != os.geteuid()
    backend = Backend(launcher, spec.session_id, module,
                      BackendRecord(module.name, 0, 0, endpoint, kind=module.kind))
    if endpoint:
        backend.claim = EndpointClaim(pipe_file(launcher.pipe_dir, endpoint),
                                      account.uid if switch else os.geteuid(), start_mark())
    launcher.spawn_backend(backend, spec.argv, spec.env, spec.cwd,
                           account.uid if switch else None, account.gid if switch else None,
                           executable=spec.executable, child_fds=spec.child_fds,
                           recorded=spec.recorded)
    log.info("session {session_id}: started {module} (pid {pid}) as {user}: {command}",
             session_id=spec.session_id, module=module.name, pid=backend.pid,
             user=account.name, command=" ".join(spec.argv)[:300])
    return backend
