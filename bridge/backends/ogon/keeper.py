#!/usr/bin/env python3
"""The launcher keeper: the parent of every ogon-backend-launcher the bridge
starts, so that launcher sessions survive the bridge's restarts and
``kill -9``. Standard library only; run as ``python3 keeper.py --socket
PATH`` (the bridge starts it when it first needs it).

Why: ogon's launcher sets ``prctl(PR_SET_PDEATHSIG, SIGPIPE)`` and stops
its module when its parent dies or its pipe closes, so a launcher that is
the bridge's child dies with the bridge. The keeper outlives the bridge;
it starts each launcher with two pipes as its stdin and stdout (pipes, as
ogon's session manager gives it: WinPR opens the launcher's stdout for
writing only when the descriptor is write-only) and keeps a copy of the
bridge's ends, so the launcher never sees its channel close. A restarted
bridge asks for those copies again and goes on speaking ogon's module
protocol with it. One keeper serves all launchers.

The protocol, on a UNIX socket only the keeper's own uid may use (checked
with SO_PEERCRED; the bridge puts it in its 0700 state directory): one
request per connection, a big-endian uint32 length and a JSON object,
descriptors passed with SCM_RIGHTS; the answer likewise.

- ``{"op": "spawn", "executable", "argv", "env", "cwd"}`` with five
  descriptors (the launcher's stdin and stdout, the bridge's ends of those
  two pipes to keep, the launcher's stderr): starts it; answers ``{"ok",
  "pid", "start_ticks"}``.
- ``{"op": "attach", "pid", "start_ticks"}``: answers ``{"ok"}`` with
  copies of the kept ends (the one to write requests to, the one to read
  answers from), or ``{"ok": false, "error"}``.
- ``{"op": "status", "pid"}``: ``{"ok", "running", "returncode"}``.
- ``{"op": "list"}``: ``{"ok", "launchers": [{"pid", "start_ticks"}]}``.

It exits ``--linger`` seconds after its last launcher exited (or after
its start, when none came), removing its socket; the linger lets the
bridge ask how that launcher ended.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

MAX_MESSAGE = 1 << 20
MAX_FDS = 5
_LENGTH = struct.Struct("!I")


#: AF_UNIX paths hold at most 107 bytes; longer ones are reached through
#: /proc/self/fd/<directory descriptor>/<name>.
MAX_SOCKET_PATH = 100


def short_path(path: str) -> tuple[str, int | None]:
    """A path to bind or connect to for the socket at ``path``, and the
    directory descriptor it goes through (to close afterwards) when
    ``path`` itself is too long for a UNIX socket."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path, None
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{directory}/{os.path.basename(path)}", directory


def log(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} launcher keeper [{os.getpid()}]: "
                     f"{text}\n")
    sys.stderr.flush()


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def zombie(pid: int) -> bool:
    """Whether the process has exited and waits to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class Launcher:
    def __init__(self, process: subprocess.Popen[bytes], keep: list[int], ticks: int) -> None:
        self.process = process
        self.keep = keep
        self.ticks = ticks


class Keeper:
    def __init__(self, path: str, linger: float) -> None:
        self.path = path
        self.linger = linger
        self.launchers: dict[int, Launcher] = {}
        self.exited: dict[int, int] = {}
        # Since when it has had no launcher (its start, or the last one's exit).
        self.idle_since = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.identity: tuple[int, int] | None = None

    # -- the socket ------------------------------------------------------------------

    def listen(self) -> bool:
        """Bind the socket; False when another keeper holds it."""
        self.lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        where, directory = short_path(self.path)
        try:
            self.server.bind(where)
        finally:
            os.umask(old_umask)
            if directory is not None:
                os.close(directory)
        info = os.lstat(self.path)
        self.identity = (info.st_dev, info.st_ino)
        self.server.listen(64)
        self.server.setblocking(False)
        self.selector.register(self.server, selectors.EVENT_READ, "accept")
        return True

    def close(self) -> None:
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass
        self.server.close()

    # -- requests ----------------------------------------------------------------------

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            request, fds = self.receive(conn)
            if uid != os.geteuid():
                answer, send = {"ok": False, "error": f"uid {uid} may not ask"}, []
            else:
                answer, send = self.handle(request, fds)
            payload = json.dumps(answer).encode()
            message = _LENGTH.pack(len(payload)) + payload
            if send:
                conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", send))])
            else:
                conn.sendall(message)
        except (OSError, ValueError) as e:
            log(f"request failed: {e}")
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()

    @staticmethod
    def receive(conn: socket.socket) -> tuple[dict, list[int]]:
        fds: list[int] = []
        data = b""
        while len(data) < 4 or len(data) < 4 + _LENGTH.unpack_from(data)[0]:
            chunk, ancdata, _flags, _addr = conn.recvmsg(
                65536, socket.CMSG_LEN(MAX_FDS * array.array("i").itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if not chunk:
                raise ValueError("request cut short")
            data += chunk
            if len(data) >= 4 and _LENGTH.unpack_from(data)[0] > MAX_MESSAGE:
                raise ValueError("request too large")
        (length,) = _LENGTH.unpack_from(data)
        return json.loads(data[4:4 + length]), fds

    def handle(self, request: dict, fds: list[int]) -> tuple[dict, list[int]]:
        op = request.get("op")
        if op == "spawn":
            return self.spawn(request, fds), []
        if op == "attach":
            launcher = self.launchers.get(int(request.get("pid", 0)))
            if launcher is None or launcher.ticks != request.get("start_ticks") \
                    or launcher.process.poll() is not None:
                return {"ok": False, "error": "no such launcher"}, []
            return {"ok": True}, list(launcher.keep)
        if op == "status":
            pid = int(request.get("pid", 0))
            launcher = self.launchers.get(pid)
            if launcher is not None:
                # The bridge asks once it saw the exit, maybe before our SIGCHLD.
                if launcher.process.poll() is None and not zombie(pid):
                    return {"ok": True, "running": True, "returncode": None}, []
                launcher.process.wait()
                self.reap()
            return {"ok": True, "running": False, "returncode": self.exited.get(pid)}, []
        if op == "list":
            return {"ok": True, "launchers": [{"pid": pid, "start_ticks": launcher.ticks}
                                              for pid, launcher in self.launchers.items()]}, []
        return {"ok": False, "error": f"unknown op {op!r}"}, []

    def spawn(self, request: dict, fds: list[int]) -> dict:
        if len(fds) != 5:
            return {"ok": False, "error": "spawn needs five descriptors"}
        stdin, stdout, keep_in, keep_out, errors = fds
        try:
            process = subprocess.Popen(
                request["argv"], executable=request["executable"], stdin=stdin,
                stdout=stdout, stderr=errors, env=request["env"], cwd=request.get("cwd"),
                close_fds=True, restore_signals=True)
        except (OSError, KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"cannot start {request.get('executable')}: {e}"}
        ticks = start_ticks(process.pid) or 0
        self.launchers[process.pid] = Launcher(process, [os.dup(keep_in), os.dup(keep_out)],
                                               ticks)
        log(f"started {' '.join(request['argv'])[:200]} (pid {process.pid})")
        return {"ok": True, "pid": process.pid, "start_ticks": ticks}

    # -- children ------------------------------------------------------------------------

    def reap(self) -> None:
        for pid, launcher in list(self.launchers.items()):
            code = launcher.process.poll()
            if code is None:
                continue
            del self.launchers[pid]
            for fd in launcher.keep:
                os.close(fd)
            self.exited[pid] = code
            while len(self.exited) > 256:
                del self.exited[next(iter(self.exited))]
            log(f"launcher {pid} exited with {code}")
            if not self.launchers:
                self.idle_since = time.monotonic()

    def done(self) -> bool:
        return not self.launchers and time.monotonic() - self.idle_since > self.linger

    def run(self) -> int:
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # The bridge's terminal and its stop never reach us (own session), and
        # we must not die of a write to a bridge that went away.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        log(f"listening on {self.path}")
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "wake":
                    try:
                        while os.read(wake_read, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif key.data == "accept":
                    try:
                        conn, _ = self.server.accept()
                    except BlockingIOError:
                        continue
                    self.serve(conn)
            self.reap()
            if self.done():
                log("no launchers left; exiting")
                self.close()
                return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="keeps ogon-backend-launchers alive for icp-bridge")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--linger", type=float, default=10.0,
                        help="seconds without a launcher before it exits")
    args = parser.parse_args(argv)
    keeper = Keeper(args.socket, args.linger)
    if not keeper.listen():
        log(f"another keeper holds {args.socket}")
        return 0
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
