"""The launcher: starts a module's backend for a session, waits until it is
ready, watches it until it exits, stops it, and adopts it again after a
restart; ``Backend`` is one such process.

A backend is started in its own process group (and session), as the
session's user when the bridge runs as root, with a clean environment
(WIRE.md section 5). It is *ready* once its endpoint socket appears in the
pipe directory, made by the backend (see ``bridge.backends.endpoint``:
decided from the file, never by connecting). Its output goes to a file
bounded by size (``bridge.backends.logs``), which the bridge follows and
copies into its own log (``bridge.backends.output``): a file rather than a
pipe, so a backend writing after the bridge was killed does not die of
SIGPIPE. Every process is recorded the moment it is spawned
(``bridge.backends.ledger``). A backend outlives the bridge; a restarted
bridge adopts it again by pid and start time and watches it with a pidfd,
and stops the ones no session owns (``bridge.backends.orphans``).

``spawn_backend`` is the one way a backend process comes to be, whatever
kind of module starts it: its output file, the spawn, the ledger, the
follower.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.backends.endpoint import (
    FOREIGN,
    READY,
    EndpointClaim,
    PipeDirectoryWatch,
    clear,
    free_endpoint,
    listen_wait,
    remove_if_same,
    start_mark,
)
from bridge.backends.environment import (
    OGON_BIN_DIRS,
    Account,
    environment,
    exec_problem,
    manager_environment,
    own_account,
    placeholders,
)
from bridge.backends.ledger import MemoryLedger, SpawnLedger
from bridge.backends.logs import BackendLogs, LogFile
from bridge.backends.modules import BackendError, LaunchContext, Module, pipe_file
from bridge.backends.orphans import Orphans, PidfdReader, same_process
from bridge.backends.output import OutputFollower
from bridge.backends.spawning import SpawnedProcess, start_process
from bridge.sessions.model import BackendRecord, StateWriteError, process_start_ticks

__all__ = ["Backend", "BackendLauncher", "process_start_ticks"]

#: How often a starting backend's endpoint is looked at, besides inotify's
#: word that something appeared there.
READY_PROBE_INTERVAL = 0.1
#: Lines kept for the log line of a failed start.
LAST_LINES = 5


class _Watcher(ProcessProtocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803
        if self.backend.on_child_data is not None:
            self.backend.on_child_data(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:  # noqa: N802,N803
        if childFD > 2 and self.backend.on_child_data is not None:
            self.backend.on_child_data(childFD, b"")

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"was killed by signal {sig}" if sig is not None else f"exited with status {code}"
        self.backend._exited(how, code, sig)


class Backend:
    """One backend process, started by this bridge or adopted from a
    previous run. ``when_exited()`` fires with a description of how it ended."""

    log = Logger()

    def __init__(self, launcher: BackendLauncher, session_id: int, module: Module,
                 record: BackendRecord) -> None:
        self.launcher = launcher
        self.session_id = session_id
        self.module = module
        self.record = record
        self.running = True
        self.exit_reason: str | None = None
        self.last_lines: deque[str] = deque(maxlen=LAST_LINES)
        self._exit_waiters: list[Deferred[str]] = []
        self._process: Any = None
        self._pidfd: PidfdReader | None = None
        self._kill_call: Any = None
        self._output: OutputFollower | None = None
        self._output_file: LogFile | None = None
        # What its endpoint must be to count as its own, while it starts;
        # then the (device, inode) of the socket it made.
        self.claim: EndpointClaim | None = None
        self.endpoint_identity: tuple[int, int] | None = None
        # Whether the bridge asked it to stop (SIGTERM), and had to SIGKILL it.
        self._stop_asked = False
        self._kill_sent = False
        # Data from a descriptor beyond 0/1/2 (spawn_backend's child_fds "r",
        # the X server's -displayfd); b"" at its end.
        self.on_child_data: Callable[[int, bytes], None] | None = None

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def name(self) -> str:
        return self.module.name

    def connected(self) -> None:
        """A command module hears nothing of clients coming (SessionBackend)."""

    def disconnected(self) -> None:
        """Nor of them going."""

    def detach(self) -> None:
        """It keeps running; the launcher stops following it at close()."""

    def when_exited(self) -> Deferred[str]:
        if not self.running:
            assert self.exit_reason is not None
            return succeed(self.exit_reason)
        d: Deferred[str] = Deferred()
        self._exit_waiters.append(d)
        return d

    def _exited(self, how: str, code: int | None = None, sig: int | None = None) -> None:
        if not self.running:
            return
        self.running = False
        self.exit_reason = how
        self.launcher.exits[self.module.name, self._exit_kind(code, sig)] += 1
        if self._pidfd is not None:
            self.launcher.reactor.removeReader(self._pidfd)
            os.close(self._pidfd.fd)
            self._pidfd = None
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        if self._output is not None:
            self._output.close()
        if self._output_file is not None:
            self.launcher.logs.release(self._output_file)
        if not self.launcher.closed:  # else the state is closed: the next run sees it gone
            self.launcher.ledger.gone(self.record)
        if self.claim is not None:
            # Its socket, if it left it: the name is free for the next start.
            remove_if_same(self.claim.path, self.endpoint_identity)
        self.launcher._forget(self)
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(how)

    def _exit_kind(self, code: int | None, sig: int | None) -> str:
        """How it ended, for the metrics: stopped (by the bridge),
        stop_timeout (SIGKILLed after stop_timeout), killed (a signal not
        ours), exited (status 0), failed (another status), unknown (adopted
        after a restart: its status is not ours to read)."""
        if self._kill_sent:
            return "stop_timeout"
        if self._stop_asked:
            return "stopped"
        if sig is not None:
            return "killed"
        if code is None:
            return "unknown"
        return "exited" if code == 0 else "failed"

    def follow_output(self, output: LogFile | None, from_end: bool) -> None:
        """Copy the backend's output into the bridge's log as it comes."""
        self._output_file = output
        if output is not None:
            self._output = OutputFollower(self, output, self.launcher.clock, from_end)
            output.on_read = self._output.read

    def _signal(self, signum: int) -> None:
        """Signal the backend's process group (its pid, since it leads it)."""
        if not self.running:
            return
        if self._process is None and not same_process(self.record):
            self._exited("exited (adopted: pid gone or reused)")
            return
        self._kill_sent = self._kill_sent or signum == signal.SIGKILL
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            self.log.error("cannot signal backend of session {session_id} (pid {pid}): "
                           "{error}", session_id=self.session_id, pid=self.pid,
                           error=e.strerror)

    def stop(self) -> Deferred[str]:
        """SIGTERM to the process group, SIGKILL after the module's
        stop_timeout; fires once the backend is gone."""
        d = self.when_exited()
        if self.running:
            self._stop_asked = True
            self._signal(signal.SIGTERM)
            if self.running and (self._kill_call is None or not self._kill_call.active()):
                self._kill_call = self.launcher.clock.callLater(
                    self.module.stop_timeout, self._signal, signal.SIGKILL)
        return d


class BackendLauncher:
    """Starts, adopts and stops backends; one per service."""

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, pipe_dir: Path,
                 logs: BackendLogs | Path, as_root: bool | None = None,
                 spawn: Callable[..., Any] | None = None,
                 ledger: SpawnLedger | None = None, allow_root: bool = False,
                 bin_dirs: tuple[str, ...] = OGON_BIN_DIRS) -> None:
        """``logs``: the backends' output files (a directory: with the
        default caps). ``ledger``: where spawned processes are recorded
        (default: in memory). ``allow_root``: desktops may run as uid 0.
        ``bin_dirs``: put in front of PATH to find ogon's programs."""
        self.reactor = reactor
        self.clock = clock
        self.pipe_dir = pipe_dir
        self.logs = logs if isinstance(logs, BackendLogs) else BackendLogs(reactor, clock, logs)
        self.as_root = os.geteuid() == 0 if as_root is None else as_root
        self.allow_root = allow_root
        self.bin_dirs = bin_dirs
        self.ledger: SpawnLedger = ledger if ledger is not None else MemoryLedger()
        self.orphans = Orphans(reactor, clock, self.ledger, self.logs)
        self._spawn = spawn or self._spawn_process
        self._backends: dict[int, Backend] = {}
        self._warned_own_user = False
        self.closed = False
        self._pipes = PipeDirectoryWatch(reactor, pipe_dir)
        # For the metrics: starts by (module, outcome: ready or failed),
        # exits by (module, reason: see Backend._exit_kind).
        self.starts: Counter[tuple[str, str]] = Counter()
        self.exits: Counter[tuple[str, str]] = Counter()

    @property
    def manager_env(self) -> dict[str, str]:
        """The session manager's environment as ogon's has it, as it is now:
        environment.filter copies from it, ogon's programs are looked up
        in its PATH, ogon-backend-launcher runs with it."""
        return manager_environment(self.bin_dirs)

    # -- accounts -------------------------------------------------------------------

    def account_for(self, module: Module, context: LaunchContext) -> Account:
        """The account the backend runs as. Raises BackendError."""
        if not self.as_root:
            if not self._warned_own_user:
                self.log.warn("not running as root: backends run as the bridge's own user "
                              "({user}), not as the session's user",
                              user=own_account().name)
                self._warned_own_user = True
            return own_account()
        name = context.username if module.user == "session" else module.user
        if not name:
            return own_account()  # a greeter: no user yet, as ogon runs it
        try:
            entry = pwd.getpwnam(name)
        except (KeyError, ValueError):
            raise BackendError(f"no system account {name[:64]!r} to run {module.name} "
                               f"as") from None
        if entry.pw_uid == 0 and module.user == "session" and context.username \
                and not self.allow_root:
            # A users-file or PAM user whose system account is root (toor):
            # a desktop as root is the operator's decision (allow_root_desktops,
            # or a module's own ``user``), never a side effect of a user name.
            raise BackendError(f"{module.name} for user {context.username[:64]!r} would run as "
                               f"{entry.pw_name} (uid 0): refused; set allow_root_desktops = "
                               f"true to allow desktops as root")
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)

    def _spawn_process(self, protocol: ProcessProtocol, executable: str, args: list[str],
                       env: dict[str, str], path: str | None, uid: int | None,
                       gid: int | None, child_fds: dict[int, int | str]) -> Any:
        """Start a process as Twisted's spawnProcess maps ``child_fds``:
        by subprocess when it needs descriptors 0, 1 and 2 only (every
        command module: the logon's path), else by Twisted (the pipes ogon's
        X11 and launcher modules read)."""
        return start_process(self.reactor, protocol, executable, args, env, path, uid, gid,
                             child_fds)

    def start(self, module: Module, context: LaunchContext) -> Deferred[Backend]:
        """Start ``module`` for a session; fires with the Backend once its
        endpoint socket is there, made by it, or fails with BackendError
        (the process is then stopped)."""
        def once(guessable: bool) -> Deferred[Backend]:
            try:
                return self.wait_ready(self._start(module, context, guessable))
            except BackendError as e:
                return fail(e)

        def again(failure: Failure) -> Any:
            # Someone took the endpoint's name while the backend started (a
            # backend running as its user cannot remove another user's file
            # in the sticky directory): once more, under a name no one can
            # guess.
            if not failure.check(BackendError) or not failure.value.taken:
                return failure
            self.log.warn("session {session_id}: {module}'s endpoint was taken during its "
                          "start; starting it again under a name no one can guess",
                          session_id=context.session_id, module=module.name)
            return once(guessable=False)

        return self.counted(module.name, once(guessable=True).addErrback(again))

    def counted(self, name: str, d: Deferred[Any]) -> Deferred[Any]:
        """Count a start (for the metrics) once ``d`` says how it went."""
        def counted(result: Any) -> Any:
            self.starts[name, "failed" if isinstance(result, Failure) else "ready"] += 1
            return result

        return d.addBoth(counted)

    def _start(self, module: Module, context: LaunchContext, guessable: bool = True) -> Backend:
        account = self.account_for(module, context)
        values = placeholders(module, context, self.pipe_dir)
        values["endpoint"] = endpoint = free_endpoint(
            self.pipe_dir, context.session_id, module, values["endpoint"],
            owners=(0, os.geteuid(), account.uid), guessable=guessable)
        try:
            argv = [part.format(**values) for part in module.command]
        except (KeyError, IndexError, ValueError) as e:
            raise BackendError(f"module {module.name}: bad placeholder in command ({e})") \
                from None
        env = environment(module, context, account, values, self.manager_env)
        search = env["PATH"] if module.search_path is None else module.search_path
        executable = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=search)
        if executable is None:
            raise BackendError(f"module {module.name}: command {argv[0]!r} not found in PATH "
                               f"({search})")
        problem = exec_problem(argv, env)
        if problem is not None:
            raise BackendError(f"module {module.name}: not started: {problem}")
        if module.cwd is None:
            home: str | None = account.home if os.path.isdir(account.home) else "/"
        else:
            home = module.cwd or None  # "": the bridge's own directory, inherited
        switch = self.as_root and account.uid != os.geteuid()
        backend = Backend(self, context.session_id, module,
                          BackendRecord(module.name, 0, 0, endpoint, kind=module.kind))
        backend.claim = EndpointClaim(pipe_file(self.pipe_dir, endpoint),
                                      account.uid if switch else os.geteuid(), start_mark())
        self.spawn_backend(backend, argv, env, home, account.uid if switch else None,
                           account.gid if switch else None, executable=executable)
        self.log.info("session {session_id}: started {module} (pid {pid}) as {user}: {command}",
                      session_id=context.session_id, module=module.name, pid=backend.pid,
                      user=account.name, command=" ".join(argv)[:300])
        return backend

    def spawn_backend(self, backend: Backend, argv: list[str], env: Mapping[str, str],
                      path: str | None, uid: int | None, gid: int | None,
                      executable: str | None = None,
                      child_fds: Mapping[int, int | str] | None = None,
                      recorded: bool = True) -> None:
        """Spawn ``backend``'s process: stdin /dev/null, stdout and stderr
        its output file; recorded in the ledger at once (a bridge killed
        from here on leaves nothing the next run does not know of), its
        output followed, its exit watched. Every kind of module's processes
        come to be here. ``executable`` is the file run (default argv[0]),
        ``path`` its working directory (None: the bridge's), ``child_fds``
        more descriptors as Twisted's spawnProcess maps them; ``recorded``
        false leaves it out of the ledger (the launcher keeper, which no
        session owns and which must outlive restarts). Raises BackendError
        (nothing is left running)."""
        module = backend.module
        try:
            log_path, log_fd = self.logs.create(backend.session_id, module.name)
        except OSError as e:
            raise BackendError(f"cannot create an output file for {module.name} in "
                               f"{self.logs.directory}: {e.strerror or e}") from None
        null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            child = self._spawn(_Watcher(backend), executable or argv[0], list(argv), dict(env),
                                path, uid, gid,
                                {0: null_fd, 1: log_fd, 2: log_fd, **(child_fds or {})})
        except OSError as e:
            log_path.unlink(missing_ok=True)
            raise BackendError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        finally:
            os.close(log_fd)
            os.close(null_fd)
        if child.pid is None:  # Twisted reaped it in spawnProcess: it exited at once
            log_path.unlink(missing_ok=True)
            raise BackendError(f"{module.name} exited at once")
        backend._process = child
        backend.record = dataclasses.replace(
            backend.record, pid=child.pid, start_ticks=process_start_ticks(child.pid) or 0,
            log_path=str(log_path), station=f"{module.kind or module.name}:{child.pid}",
            uid=os.getuid() if uid is None else uid)
        backend.follow_output(self.logs.attach(log_path, f"session {backend.session_id} "
                                                         f"{module.name}"), from_end=False)
        self._track(backend)
        if not recorded:
            return
        try:
            self.ledger.spawned(backend.session_id, backend.record)
        except StateWriteError as e:
            # Not recorded, not run: a bridge killed now would leave it unknown.
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            raise BackendError(f"{module.name} stopped at once: the spawn could not be "
                               f"recorded ({e})") from None

    def wait_ready(self, backend: Backend, timeout: float | None = None) -> Deferred[Backend]:
        """Fires with ``backend`` once its endpoint socket is there, made by
        it (``EndpointClaim``); looked at on every inotify event for that
        name and every READY_PROBE_INTERVAL. On a timeout (default the
        module's ready_timeout) it is stopped and the Deferred fails with
        BackendError."""
        d: Deferred[Backend] = Deferred()
        claim = backend.claim
        assert claim is not None
        if timeout is None:
            timeout = backend.module.ready_timeout
        deadline = self.clock.seconds() + timeout
        call: list[Any] = []
        foreign_seen: list[str] = []
        seen: list[float] = []  # when the backend's socket was first seen

        def done() -> None:
            self._pipes.remove(claim.path, probe)
            for pending in call:
                if pending.active():
                    pending.cancel()
            call.clear()

        def exited(how: str) -> None:
            if not d.called:
                done()
                d.errback(BackendError(f"{backend.module.name} {how} before it was ready",
                                       list(backend.last_lines), taken=bool(foreign_seen)))

        def probe() -> None:
            if d.called or not backend.running:
                return
            found, why_not = claim.check()
            if found == READY:
                seen[:] = seen or [self.clock.seconds()]
                wait = listen_wait(claim.path, seen[0], self.clock.seconds())
                if wait and self.clock.seconds() < deadline:
                    call[:] = [self.clock.callLater(wait, poll)]
                    return
                done()
                backend.endpoint_identity = claim.identity()
                d.callback(backend)
                return
            seen.clear()
            if found == FOREIGN and not claim.take_back and claim.owner() != claim.uid:
                done()
                backend.stop()
                d.errback(BackendError(f"{backend.module.name}'s endpoint is not its own "
                                       f"({why_not})", list(backend.last_lines)))
                return
            if found == FOREIGN and claim.take_back:
                # Made after the name was cleared, by someone else: the name
                # is this backend's, so it is taken back (once per kind).
                _, error = clear(claim.path)
                if why_not not in foreign_seen:
                    foreign_seen.append(why_not)
                    self.log.error("session {session_id}: {module}'s endpoint was taken by "
                                   "someone else ({why}); {outcome}",
                                   session_id=backend.session_id, module=backend.module.name,
                                   why=why_not, outcome="removed" if error is None
                                   else f"cannot remove it: {error}")
            if self.clock.seconds() >= deadline:
                done()
                backend.stop()
                if backend._output is not None:
                    backend._output.read()
                d.errback(BackendError(
                    f"{backend.module.name} not ready within {timeout:g} s "
                    f"({why_not})", list(backend.last_lines), taken=bool(foreign_seen)))
                return
            if not call or not call[0].active():
                call[:] = [self.clock.callLater(READY_PROBE_INTERVAL, poll)]

        def poll() -> None:
            call.clear()
            probe()

        backend.when_exited().addCallback(exited)
        self._pipes.add(claim.path, probe)
        probe()
        return d

    # -- adopting after a restart -----------------------------------------------

    def adopt(self, session_id: int, module: Module, record: BackendRecord) -> Backend | None:
        """Watch a backend a previous run started; None if it is gone."""
        if not same_process(record):
            return None
        try:
            fd = os.pidfd_open(record.pid)
        except OSError:
            return None
        backend = Backend(self, session_id, module, record)
        backend._pidfd = PidfdReader(
            fd, lambda: backend._exited("exited (adopted after a restart: status unknown)"))
        backend.follow_output(self.logs.attach_path(record.log_path, f"session {session_id} "
                                                                     f"{module.name}"),
                              from_end=True)
        self._track(backend)
        # An exit between the checks above and now makes the pidfd readable at once.
        self.reactor.addReader(backend._pidfd)
        self.log.info("session {session_id}: adopted {module} backend (pid {pid})",
                      session_id=session_id, module=module.name, pid=record.pid)
        return backend

    def kill_orphan(self, record: BackendRecord, stop_timeout: float = 5.0,
                    session_id: int = 0, why: str = "its session is gone") -> Deferred[None]:
        """Stop a backend a previous run left for a session that is gone;
        fires once it is gone."""
        return self.orphans.stop(session_id, record, stop_timeout, why)

    def stop_unowned(self, modules: Mapping[str, Module],
                     also_owned: Iterable[BackendRecord] = ()) -> None:
        """After a restart, once the sessions adopted their backends: stop
        every backend the ledger names that no session owns (a start the
        last run did not finish, the greeter of a session that ended with
        it), forget those that are gone, and remove the output files no
        backend writes to any more. ``also_owned``: sessions' backends this
        launcher does not track itself (ogon-backend-launcher's)."""
        owned = {(b.record.pid, b.record.start_ticks) for b in self._backends.values()}
        owned |= {(record.pid, record.start_ticks) for record in also_owned}
        for session_id, record in self.ledger.recorded():
            if (record.pid, record.start_ticks) in owned:
                continue
            module = modules.get(record.module)
            self.orphans.stop(session_id, record,
                              module.stop_timeout if module is not None else 5.0,
                              "started by the last run, and no session owns it (it was still "
                              "starting, or its session ended with that run)",
                              from_ledger=True)
        self.logs.sweep({Path(b.record.log_path) for b in self._backends.values()})

    # -- bookkeeping --------------------------------------------------------------

    def _track(self, backend: Backend) -> None:
        self._backends[id(backend)] = backend

    def _forget(self, backend: Backend) -> None:
        self._backends.pop(id(backend), None)

    def running(self) -> list[Backend]:
        return list(self._backends.values())

    def close(self) -> None:
        """Stop following output and watching (the backends themselves keep
        running; a restarted bridge takes them up again)."""
        self.closed = True
        self._pipes.close()
        self.orphans.close()
        for backend in list(self._backends.values()):
            if isinstance(backend._process, SpawnedProcess):
                backend._process.unwatch()
            if backend._pidfd is not None:
                self.reactor.removeReader(backend._pidfd)
                os.close(backend._pidfd.fd)
                backend._pidfd = None
            if backend._output is not None:
                backend._output.read()
                backend._output = None
            backend._output_file = None
        self.logs.close()
