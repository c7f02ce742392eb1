"""The bridge's side of the launcher keeper (``bridge.backends.ogon.keeper``):
starting it when it is not running, and its requests (start a launcher,
hand back a launcher's channel, how a launcher ended).

Each request is a short blocking exchange on a local socket, run in a
thread so that the reactor never waits on it; the keeper's identity is
checked (SO_PEERCRED: the bridge's own uid) before anything is sent, since
a request carries a session's environment, cookies included.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.backends.environment import own_account
from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import BackendError, Module
from bridge.backends.ogon import keeper as keeper_module
from bridge.backends.ogon.keeper import short_path
from bridge.backends.processes import Spawn, spawn_process

_LENGTH = struct.Struct("!I")
#: How long a request may take, and how long a keeper just started has to listen.
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 10.0
START_POLL = 0.05


class KeeperUnavailableError(Exception):
    """No keeper listens at the socket (none runs, or it went away)."""


def exchange(path: str, request: Mapping[str, Any], fds: list[int] | None = None
             ) -> tuple[dict[str, Any], list[int]]:
    """One request to the keeper at ``path``, blocking (run it in a thread).
    Raises KeeperUnavailableError, or OSError/ValueError when the exchange
    fails."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(REQUEST_TIMEOUT)
    received: list[int] = []
    try:
        where, directory = short_path(path)
        try:
            conn.connect(where)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise KeeperUnavailableError(str(e)) from None
        finally:
            if directory is not None:
                os.close(directory)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.geteuid():
            raise OSError(f"the keeper's socket {path} is held by uid {uid}, not by us")
        payload = json.dumps(dict(request)).encode()
        message = _LENGTH.pack(len(payload)) + payload
        if fds:
            conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", fds))])
        else:
            conn.sendall(message)
        data = b""
        while len(data) < 4 or len(data) < 4 + _LENGTH.unpack_from(data)[0]:
            chunk, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_LEN(8 * 4))
            for level, kind, extra in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(extra[:len(extra) - len(extra) % got.itemsize])
                    received.extend(got)
            if not chunk:
                raise ValueError("the keeper closed the connection without an answer")
            data += chunk
        (length,) = _LENGTH.unpack_from(data)
        answer = json.loads(data[4:4 + length])
        if not isinstance(answer, dict):
            raise ValueError("the keeper's answer is not an object")
        return answer, received
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    finally:
        conn.close()


class LauncherKeeper:
    """Starts ogon-backend-launchers under the keeper process at
    ``socket_path`` (started through the launcher's spawn primitive when it
    is not running) and gets their channels back after a restart."""

    log = Logger()

    def __init__(self, reactor: Any, launcher: BackendLauncher, socket_path: Path) -> None:
        self.reactor = reactor
        self.launcher = launcher
        self.socket_path = socket_path
        # Those waiting for the keeper being started (one start at a time).
        self._waiters: list[Deferred[None]] = []

    def _in_thread(self, request: Mapping[str, Any], fds: list[int] | None
                   ) -> Deferred[tuple[dict[str, Any], list[int]]]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), exchange,
                                 str(self.socket_path), request, fds)

    async def request(self, request: Mapping[str, Any], fds: list[int] | None = None,
                      start: bool = True) -> tuple[dict[str, Any], list[int]]:
        """Ask the keeper; with ``start``, start it first when none runs.
        Raises BackendError."""
        try:
            return await self._in_thread(request, fds)
        except KeeperUnavailableError:
            if not start:
                raise
        except (OSError, ValueError) as e:
            raise BackendError(f"launcher keeper at {self.socket_path}: {e}") from None
        await self._start_keeper()
        try:
            return await self._in_thread(request, fds)
        except (KeeperUnavailableError, OSError, ValueError) as e:
            raise BackendError(f"launcher keeper at {self.socket_path}: {e}") from None

    async def _start_keeper(self) -> None:
        """Start the keeper (one start at a time) and wait until it listens."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._start()).addBoth(self._started)
        await waiter

    def _started(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        script = keeper_module.__file__
        argv = [sys.executable, script, "--socket", str(self.socket_path)]
        module = Module("launcher-keeper", (), "", stop_timeout=5.0)
        # Not in the ledger of session backends: no session owns it, and a
        # restarted bridge must leave it (and its launchers) running.
        spawn_process(self.launcher, Spawn(
            0, module, sys.executable, argv,
            {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, own_account(), "/",
            recorded=False))
        self.log.info("started the launcher keeper on {path}", path=str(self.socket_path))
        clock = self.launcher.clock
        waited = 0.0
        while waited < START_TIMEOUT:
            try:
                await self._in_thread({"op": "list"}, None)
                return
            except KeeperUnavailableError:
                pass
            except (OSError, ValueError) as e:
                raise BackendError(f"launcher keeper at {self.socket_path}: {e}") from None
            await task.deferLater(clock, START_POLL, lambda: None)
            waited += START_POLL
        raise BackendError(f"the launcher keeper did not listen on {self.socket_path} within "
                           f"{START_TIMEOUT:g} s")

    async def spawn(self, executable: str, argv: list[str], env: Mapping[str, str],
                    cwd: str | None, stdin: int, stdout: int, keep_in: int, keep_out: int,
                    errors: int) -> tuple[int, int]:
        """Start a launcher under the keeper, with ``stdin`` and ``stdout``
        (pipe ends) as its own; the keeper keeps copies of ``keep_in`` and
        ``keep_out``, the bridge's ends. Returns (pid, start ticks). Raises
        BackendError."""
        answer, extra = await self.request(
            {"op": "spawn", "executable": executable, "argv": argv, "env": dict(env),
             "cwd": cwd}, [stdin, stdout, keep_in, keep_out, errors])
        for fd in extra:
            os.close(fd)
        if not answer.get("ok"):
            raise BackendError(str(answer.get("error", "the keeper refused")))
        return int(answer["pid"]), int(answer["start_ticks"])

    async def attach(self, pid: int, start_ticks: int) -> tuple[int, int] | None:
        """Copies of the bridge's ends of the launcher's channel (to write
        requests to, to read answers from), None when the keeper (or the
        launcher) is gone."""
        try:
            answer, fds = await self.request({"op": "attach", "pid": pid,
                                              "start_ticks": start_ticks}, start=False)
        except (KeeperUnavailableError, BackendError):
            return None
        if not answer.get("ok") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0], fds[1]

    async def status(self, pid: int) -> str:
        """How a launcher ended, for the log ("" when the keeper cannot say)."""
        try:
            answer, _ = await self.request({"op": "status", "pid": pid}, start=False)
        except (KeeperUnavailableError, BackendError):
            return ""
        code = answer.get("returncode")
        if not isinstance(code, int):
            return ""
        return f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"

