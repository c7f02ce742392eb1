"""A soak: a real ``twistd -n icp-bridge`` under a mixed load for a while,
with its memory, descriptors, pending calls and errors printed per minute.

The load, all at once, from one Twisted process of its own:

- logons: the stand-in RDP server logs users on (each starts a stand-in
  backend), clients go away and come back (reconnects to the disconnected
  session) and sessions are logged off through the OTS API;
- bridged calls: OTS API clients call virtualChannelOpen back to back on
  the active sessions (every call crosses to the RDP server and back);
- RDP server reconnects: the stand-in RDP server goes away and comes back
  every ``--rdp-every`` seconds (bridged calls pause meanwhile: without an
  RDP server they fail by design, and that is not an error here);
- client churn: short OTS API connections (connect, ping, close);
- a storm: ``--storm`` clients connecting at once every ``--storm-every``
  seconds, each pinging once.

An error is any call that fails or answers other than expected while it
should have worked. At the end: one JSON line with the per-minute samples.

usage: python -m bench.soak [--minutes M] [--sample S] [--storm N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.transport import TTwisted
from twisted.internet import defer, task, threads
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.internet.protocol import Factory as ProtocolFactory

from bench.run import (
    ROOT,
    bench_config,
    encode_call,
    free_port,
    kill_backends,
    open_fds,
    port_open,
    raise_fd_limit,
    rss_mb,
    wait_for,
)
from protocols.generated.otsapi import otsapi

USERS = 12  # soak0 .. soak11, each at most one session at a time
PING = bytes.fromhex(encode_call("ping", input=7))


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Soak:
    def __init__(self, reactor: Any, base: Path, port: int, admin_port: int, bridge_pid: int,
                 args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.base = base
        self.port = port
        self.admin_port = admin_port
        self.bridge_pid = bridge_pid
        self.args = args
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.peer: Any = None
        self.rdp_up = False
        self.token = ""
        self.active: dict[int, tuple[int, str]] = {}  # connection id -> (session id, user)
        self.disconnected: dict[str, int] = {}  # user -> session id
        self.next_connection = 1
        self.stopping = False

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {detail[:200]}")

    async def client(self) -> Any:
        creator = ClientCreator(self.reactor, TTwisted.ThriftClientProtocol, otsapi.Client,
                                TBinaryProtocol.TBinaryProtocolFactory())
        proto = await creator.connectTCP("127.0.0.1", self.port, timeout=30)
        await proto.started
        return proto

    async def connect_rdp(self) -> None:
        from bridge.rdp.standin import StandInRdpServer

        self.peer = StandInRdpServer(self.reactor, pipe_dir=self.base / "pipes")
        await self.peer.connect(f"unix:{self.base}/icp.sock")
        self.rdp_up = True

    # -- the loads ---------------------------------------------------------------

    async def logons(self) -> None:
        """Log users on, let clients go and come back, log sessions off."""
        step = 0
        while not self.stopping:
            step += 1
            await task.deferLater(self.reactor, 0.5, lambda: None)
            if not self.rdp_up:
                continue
            try:
                if len(self.active) < 6 or step % 3 == 0:
                    await self.log_one_on()
                elif step % 3 == 1 and self.active:
                    connection_id = min(self.active)
                    session_id, user = self.active.pop(connection_id)
                    if await self.peer.client_disconnected(connection_id):
                        self.disconnected[user] = session_id
                        self.counts["client gone"] += 1
                    else:
                        self.error("disconnect", f"connection {connection_id}")
                else:
                    await self.log_one_off()
            except Exception as e:
                if self.rdp_up and not self.stopping:
                    self.error("logon churn", f"{type(e).__name__}: {e}")

    async def log_one_on(self) -> None:
        busy = {user for _, user in self.active.values()}
        # A user who went away comes back first (a reconnect), else a new one.
        candidates = [u for u in self.disconnected if u not in busy] or \
            [f"soak{n}" for n in range(USERS) if f"soak{n}" not in busy]
        if not candidates:
            return
        user = candidates[0]
        connection_id = self.next_connection
        self.next_connection += 1
        answer = await self.peer.logon(connection_id, user, f"{user}-pw", timeout=30)
        if not answer.serviceEndpoint.endswith("_xsession"):
            self.error("logon", f"{user} got {answer.serviceEndpoint}")
            return
        # The endpoint names the session: ogon_<session id>_xsession.
        expected = int(answer.serviceEndpoint.rsplit("_", 2)[-2])
        client = await self.client()
        try:
            sessions = await client.client.enumerateSessions(self.token, 1)
            ids = {s.sessionId for s in sessions.sessionInfoList
                   if s.sessionId == expected and s.connectState == 0}
        finally:
            client.transport.loseConnection()
        if len(ids) != 1:
            self.error("logon", f"no session on connection {connection_id}")
            return
        session_id = ids.pop()
        again = self.disconnected.pop(user, None)
        self.counts["reconnect" if again == session_id else "logon"] += 1
        self.active[connection_id] = (session_id, user)

    async def log_one_off(self) -> None:
        if self.disconnected:
            user, session_id = next(iter(self.disconnected.items()))
            del self.disconnected[user]
        elif self.active:
            connection_id = min(self.active)
            session_id, _ = self.active.pop(connection_id)
        else:
            return
        client = await self.client()
        try:
            ok = await client.client.logoffSession(self.token, session_id, True)
        finally:
            client.transport.loseConnection()
        if ok:
            self.counts["logoff"] += 1
        else:
            self.error("logoff", f"session {session_id}")

    async def bridged_calls(self, lane: int) -> None:
        """Back-to-back virtualChannelOpen calls on active sessions."""
        client = await self.client()
        try:
            while not self.stopping:
                targets = [sid for sid, _ in self.active.values()]
                if not self.rdp_up or not targets:
                    await task.deferLater(self.reactor, 0.05, lambda: None)
                    continue
                session_id = targets[(lane + self.counts["bridged"]) % len(targets)]
                was_up = self.rdp_up
                result = await client.client.virtualChannelOpen(
                    self.token, session_id, "CLIPRDR", False, 0)
                if result.pipeName:
                    self.counts["bridged"] += 1
                elif was_up and self.rdp_up and session_id in {
                        sid for sid, _ in self.active.values()}:
                    self.error("bridged", f"virtualChannelOpen on session {session_id}")
                if self.counts["bridged"] % 50 == 0:
                    await task.deferLater(self.reactor, 0, lambda: None)
        finally:
            client.transport.loseConnection()

    async def rdp_reconnects(self) -> None:
        while not self.stopping:
            await task.deferLater(self.reactor, self.args.rdp_every, lambda: None)
            if self.stopping:
                return
            self.rdp_up = False
            await task.deferLater(self.reactor, 0.2, lambda: None)  # calls in flight end
            closed = self.peer.protocol.when_closed()
            self.peer.close()
            await closed
            # Without an RDP server every session is disconnected.
            for session_id, user in self.active.values():
                self.disconnected[user] = session_id
            self.active.clear()
            await task.deferLater(self.reactor, 1.0, lambda: None)
            try:
                await self.connect_rdp()
                self.counts["rdp reconnect"] += 1
            except Exception as e:
                self.error("rdp reconnect", f"{type(e).__name__}: {e}")

    async def churn(self) -> None:
        while not self.stopping:
            await task.deferLater(self.reactor, 0.05, lambda: None)
            try:
                client = await self.client()
                value = await client.client.ping(5)
                client.transport.loseConnection()
                if value != 5:
                    self.error("churn", f"ping answered {value}")
                else:
                    self.counts["churn"] += 1
            except Exception as e:
                self.error("churn", f"{type(e).__name__}: {e}")

    async def storms(self) -> None:
        while not self.stopping:
            await task.deferLater(self.reactor, self.args.storm_every, lambda: None)
            if self.stopping:
                return
            started = time.monotonic()
            results = await defer.gatherResults(
                [defer.ensureDeferred(self.storm_client()) for _ in range(self.args.storm)],
                consumeErrors=True)
            ok = sum(results)
            self.counts["storm clients"] += ok
            if ok != self.args.storm:
                self.error("storm", f"{self.args.storm - ok} of {self.args.storm} not answered")
            self.counts["storm"] += 1
            self.counts["storm seconds x100"] += int((time.monotonic() - started) * 100)

    async def storm_client(self) -> bool:
        answered: defer.Deferred[bool] = defer.Deferred()

        class Once(Protocol):
            def connectionMade(self) -> None:
                self.data = b""
                self.transport.write(PING)

            def dataReceived(self, data: bytes) -> None:
                self.data += data
                if len(self.data) >= 4 and len(self.data) >= 4 + int.from_bytes(
                        self.data[:4], "big"):
                    self.transport.loseConnection()
                    if not answered.called:
                        answered.callback(True)

            def connectionLost(self, reason: Any = None) -> None:
                if not answered.called:
                    answered.callback(False)

        from twisted.internet.endpoints import TCP4ClientEndpoint

        try:
            await TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=60).connect(
                ProtocolFactory.forProtocol(Once))
        except Exception:
            return False
        timeout = self.reactor.callLater(60, lambda: answered.called or answered.callback(False))
        result = await answered
        if timeout.active():
            timeout.cancel()
        return result

    # -- sampling -------------------------------------------------------------------

    async def sample(self, minute: float) -> None:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        pending = in_flight = 0.0
        try:
            text = await threads.deferToThread(
                lambda: urllib.request.urlopen(url, timeout=30).read().decode())
            pending = metric(text, "icp_bridge_icp_calls_pending")
            in_flight = metric(text, "icp_bridge_otsapi_calls_in_flight")
        except Exception as e:
            self.error("metrics", f"{type(e).__name__}: {e}")
        row = {"minute": round(minute, 2), "rss_mb": rss_mb(self.bridge_pid),
               "fds": open_fds(self.bridge_pid), "icp_pending": int(pending),
               "otsapi_in_flight": int(in_flight), "errors": sum(self.errors.values()),
               **{k: v for k, v in sorted(self.counts.items())}}
        self.samples.append(row)
        print(json.dumps(row), flush=True)

    async def run(self) -> dict[str, Any]:
        await self.connect_rdp()
        client = await self.client()
        self.token = (await client.client.logonConnection("bench", "bench-pw", "")).authToken
        client.transport.loseConnection()
        started = time.monotonic()
        loads = [self.logons(), self.rdp_reconnects(), self.churn(), self.storms(),
                 *(self.bridged_calls(lane) for lane in range(self.args.lanes))]
        running = [defer.ensureDeferred(load) for load in loads]
        for d in running:
            d.addErrback(lambda f: self.error("load", f.getErrorMessage()))
        await self.sample(0.0)
        end = started + self.args.minutes * 60
        while time.monotonic() < end:
            await task.deferLater(self.reactor, min(self.args.sample,
                                                    max(0.0, end - time.monotonic())),
                                  lambda: None)
            await self.sample((time.monotonic() - started) / 60)
        self.stopping = True
        await defer.DeferredList(running)
        first, last = self.samples[0], self.samples[-1]
        after_warmup = self.samples[1] if len(self.samples) > 2 else first
        return {"minutes": self.args.minutes, "errors": dict(self.errors),
                "error_samples": self.error_samples, "counts": dict(self.counts),
                "rss_mb": [first["rss_mb"], after_warmup["rss_mb"], last["rss_mb"],
                           max(s["rss_mb"] for s in self.samples)],
                "fds": [first["fds"], after_warmup["fds"], last["fds"],
                        max(s["fds"] for s in self.samples)]}


def write_users(base: Path) -> Path:
    path = base / "users"
    code = ("import sys\nfrom pathlib import Path\n"
            "from bridge.security.auth import UserEntry, hash_password, write_users\n"
            "users = [UserEntry('bench', 0x1FF, hash_password('bench-pw', n=1024))] + "
            f"[UserEntry(f'soak{{n}}', 0x49, hash_password(f'soak{{n}}-pw', n=1024)) "
            f"for n in range({USERS})]\n"
            "write_users(Path(sys.argv[1]), users)\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--lanes", type=int, default=8, help="OTS API clients of bridged calls")
    parser.add_argument("--rdp-every", type=float, default=90.0)
    parser.add_argument("--storm", type=int, default=2000)
    parser.add_argument("--storm-every", type=float, default=150.0)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    raise_fd_limit()
    base = Path(tempfile.mkdtemp(prefix="ib-soak-", dir="/tmp"))
    port, admin_port = free_port(), free_port()
    config = bench_config(base)
    config.write_text(config.read_text().replace(
        'admin_endpoint = "tcp:0:interface=127.0.0.1"',
        f'admin_endpoint = "tcp:{admin_port}:interface=127.0.0.1"'))
    users = write_users(base)
    log = open(base / "bridge.log", "w")
    bridge = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "icp-bridge", "--config", str(config), "--icp", f"unix:{base}/icp.sock",
         "--thrift", f"tcp:{port}:interface=127.0.0.1", "--state", str(base / "state"),
         "--users", str(users), "--token-dir", str(base / "tokens")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
        stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
    summary: dict[str, Any] = {}
    try:
        wait_for(lambda: port_open(port) and port_open(admin_port), "the bridge", 30)

        async def soak(reactor: Any) -> None:
            summary.update(await Soak(reactor, base, port, admin_port, bridge.pid, args).run())

        run_reactor: Callable[..., None] = task.react
        try:
            run_reactor(lambda reactor: defer.ensureDeferred(soak(reactor)))
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        log_text = (base / "bridge.log").read_text(errors="replace")
        summary["bridge_log_lines"] = log_text.count("\n")
        kinds: Counter[str] = Counter(
            re.sub(r"\d+", "N", line[25:])[:90] for line in log_text.splitlines())
        summary["bridge_log_top"] = kinds.most_common(8)
        summary["bridge_tracebacks"] = log_text.count("Traceback")
        print(json.dumps(summary), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        return 0 if not summary.get("errors") and not summary["bridge_tracebacks"] else 1
    finally:
        if bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            try:
                bridge.wait(30)
            except subprocess.TimeoutExpired:
                bridge.kill()
        log.close()
        kill_backends(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
