"""The farm under load: N bridges x M sessions on one PostgreSQL.

Runs a throwaway PostgreSQL 15 cluster (as tests/farm does) and N bridges
in this process, on one reactor, each with its own ICP socket, OTS API
port, admin endpoint, state directory and stand-in RDP server, and
measures:

1. outbox shipping: M sessions made on every bridge at once (created,
   connected, logged on: three journal events each, straight through each
   bridge's registry, no backend processes), and how fast the events reach
   the farm journal;
2. farm event latency: a session change on one host (bridges 2..N) until a
   ``/events?scope=farm`` client on bridge 1 has it: p50 and p99;
3. remote logoff round trip: ``POST /farm/sessions/HOST/ID/logoff`` on
   bridge 1 for a session on another host, until the answer (the host's
   RDP server got LogoffUserSession and answered);
4. a PostgreSQL outage: changes go on on every host while PostgreSQL is
   stopped for ``--outage`` seconds; then how long until every host has
   caught up, and whether any event was lost or stored twice (each host's
   farm journal against its SQLite journal), and whether the SSE client
   got each event once.

Bounded: each phase has a deadline (``--deadline``); the run ends by itself.
Prints a table and, with ``--json FILE``, the figures.

usage: python -m bench.farm [--bridges 10] [--sessions 1000] [--outage 30]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from bridge.config import Config
from bridge.rdp.standin import ClientConnection, StandInRdpServer
from bridge.security.auth import Identity, InMemoryAuthenticator
from bridge.security.permissions import FULL
from bridge.service import BridgeService
from bridge.sessions.model import ClientInfo, ConnectState, SessionChange
from tests.farm.pg import Cluster, FarmDatabase


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


class FarmStream(Protocol):
    """A ``/events?scope=farm`` client: when each (host, local id) arrived."""

    def __init__(self) -> None:
        self.buffer = b""
        self.arrived: dict[tuple[str, int], float] = {}
        self.farm_ids: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        now = time.perf_counter()
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: ") and b'"local_id"' in line:
                    event = json.loads(line[6:])
                    self.arrived[(event["host"], event["local_id"])] = now
                    self.farm_ids.append(event["id"])


class Farm:
    def __init__(self, bridges: int, base: Path, db: FarmDatabase) -> None:
        self.base = base
        self.db = db
        self.services: list[BridgeService] = []
        self.peers: list[StandInRdpServer] = []
        self.changed: dict[tuple[str, int], float] = {}
        for n in range(bridges):
            host = f"host-{n + 1:02d}"
            root = base / host
            root.mkdir()
            config = Config(
                icp_endpoint=f"unix:{root}/icp.sock:mode=600",
                thrift_endpoint="tcp:0:interface=127.0.0.1",
                admin_endpoint="tcp:0:interface=127.0.0.1", dbus_address="",
                state_dir=root / "state", users_file=root / "users", token_dir=root / "tokens",
                pipe_dir=root / "pipes", farm_database=db.conninfo,
                farm_password_file=db.password_file,
                farm_command_key_file=db.command_key_file, host_name=host, farm_heartbeat=1.0,
                farm_stale_after=5.0)
            service = BridgeService(config, reactor,
                                    authenticator=InMemoryAuthenticator({}))
            service.startService()
            service.registry.observe(self._observer(host))
            self.services.append(service)

    def _observer(self, host: str) -> Any:
        def seen(change: SessionChange) -> None:
            if change.event_id is not None:
                self.changed[(host, change.event_id)] = time.perf_counter()
        return seen

    async def connect_peers(self) -> None:
        for service in self.services:
            peer = StandInRdpServer(reactor)
            await peer.connect(f"unix:{service.config.icp_endpoint.split(':')[1]}")
            self.peers.append(peer)

    def admin_port(self, n: int) -> int:
        listener = self.services[n].admin_listener
        assert listener is not None and listener.port is not None
        return listener.port.getHost().port

    def backlog(self) -> int:
        return sum(s.farm.shipper.backlog for s in self.services if s.farm is not None)

    async def stop(self) -> None:
        for peer in self.peers:
            peer.close()
        for service in self.services:
            await service.stopService()


async def until(check: Any, deadline: float, what: str, step: float = 0.05) -> float:
    """Wait (polling) until ``check()``; returns when, or raises at ``deadline``."""
    while True:
        result = check()
        if isinstance(result, Deferred):
            result = await result
        if result:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not done in time: {what}")
        await task.deferLater(reactor, step, lambda: None)


async def farm_count(db: FarmDatabase) -> int:
    rows = await db.query("SELECT count(*) FROM farm_events")
    return int(rows[0][0])


async def make_sessions(farm: Farm, sessions: int) -> None:
    """``sessions`` logged-on sessions on every bridge, in slices so the
    reactor ships while they are made."""
    for start in range(0, sessions, 50):
        for service in farm.services:
            registry = service.registry
            for n in range(start, min(sessions, start + 50)):
                session = registry.create(10_000 + n, ClientInfo(host_name=f"c{n}"),
                                          f"user{n}", "", 0x049)
                registry.connected(session)
                registry.log_on(session, f"user{n}", "", 0x049)
        await task.deferLater(reactor, 0, lambda: None)


def flip(farm: Farm, n: int) -> None:
    """One session change on host 2..N: a disconnect, or a reconnect."""
    service = farm.services[1 + n % (len(farm.services) - 1)]
    session = list(service.registry)[n % len(service.registry)]
    if session.state is ConnectState.DISCONNECTED:
        service.registry.reconnect(session, 50_000 + n, session.client)
    else:
        service.registry.disconnect(session, "bench")


async def run(bridges: int, sessions: int, outage: float, samples: int, logoffs: int,
              deadline: float, cluster: Cluster | None = None) -> dict[str, Any]:
    own_cluster = cluster is None
    if cluster is None:
        cluster = Cluster()
        cluster.init()
    db = FarmDatabase(cluster, cluster.new_database())
    base = Path(tempfile.mkdtemp(prefix="ibf-", dir="/tmp"))
    report: dict[str, Any] = {"bridges": bridges, "sessions_per_bridge": sessions,
                              "load_before": os.getloadavg(), "cpus": os.cpu_count()}
    farm = Farm(bridges, base, db)
    try:
        await farm.connect_peers()
        await until(lambda: all(s.farm.shipper.connected for s in farm.services),
                    time.perf_counter() + deadline, "every host connected to the farm")
        # 1. shipping
        started = time.perf_counter()
        await make_sessions(farm, sessions)
        made = time.perf_counter()
        total = bridges * sessions * 3
        done = await until(lambda: farm.backlog() == 0, started + deadline, "shipping", 0.02)
        shipped = await farm_count(db)
        report["shipping"] = {"events": total, "in_farm": shipped,
                              "made_in_s": round(made - started, 2),
                              "shipped_in_s": round(done - started, 2),
                              "events_per_s": round(total / (done - started))}
        # 2. latency to a farm SSE client on bridge 1, once its farm journal
        # hub has read what phase 1 shipped (steady state, not a catch-up)
        token = farm.services[0].tokens.issue(Identity("bench", "", FULL))
        headers = Headers({b"authorization": [f"Bearer {token}".encode()]})
        last = (await db.query("SELECT max(id) FROM farm_events"))[0][0]
        hub = farm.services[0].farm.events
        await until(lambda: hub.last_id >= last, time.perf_counter() + deadline,
                    "bridge 1 has read the farm journal")
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{farm.admin_port(0)}/events?scope=farm&after={last}"
            .encode(), headers)
        stream = FarmStream()
        response.deliverBody(stream)
        farm.changed.clear()
        for n in range(samples):
            flip(farm, n)
            await task.deferLater(reactor, 0.02, lambda: None)
        await until(lambda: all(key in stream.arrived for key in farm.changed),
                    time.perf_counter() + deadline, "latency samples", 0.02)
        latencies = [(stream.arrived[key] - at) * 1000 for key, at in farm.changed.items()]
        report["latency_ms"] = {"samples": len(latencies),
                                "p50": round(percentile(latencies, 0.5), 1),
                                "p99": round(percentile(latencies, 0.99), 1),
                                "max": round(max(latencies), 1)}
        # 3. remote logoff round trips
        round_trips = []
        agent = Agent(reactor)
        for n in range(logoffs):
            k = 1 + n % (bridges - 1)
            service, peer = farm.services[k], farm.peers[k]
            session = next(s for s in service.registry if s.connection_id is not None)
            peer.connections[session.connection_id] = ClientConnection(
                session.connection_id, session.username)
            at = time.perf_counter()
            answer = await agent.request(
                b"POST", f"http://127.0.0.1:{farm.admin_port(0)}/farm/sessions/"
                         f"{service.config.host_name}/{session.session_id}/logoff".encode(),
                Headers({b"authorization": [f"Bearer {token}".encode()],
                         b"content-type": [b"application/json"]}),
                _body(b'{"wait": true, "timeout": 10}'))
            reader = _Body()
            answer.deliverBody(reader)
            body = json.loads(await reader.done)
            round_trips.append((time.perf_counter() - at) * 1000)
            [command] = body["commands"]
            if command["result"] != {"ok": True}:
                raise RuntimeError(f"remote logoff failed: {command}")
        report["remote_logoff_ms"] = {"count": len(round_trips),
                                      "p50": round(statistics.median(round_trips), 1),
                                      "p99": round(percentile(round_trips, 0.99), 1)}
        # 4. a PostgreSQL outage while changes go on everywhere
        changes = task.LoopingCall(lambda: [flip(farm, n) for n in range(bridges - 1)])
        changes.start(0.1)
        before = await farm_count(db)
        await cluster.stop_async()
        stopped = time.perf_counter()
        await task.deferLater(reactor, outage, lambda: None)
        changes.stop()
        backlog = farm.backlog()
        await cluster.start_async()
        restarted = time.perf_counter()
        caught = await until(lambda: farm.backlog() == 0, time.perf_counter() + deadline,
                             "catching up after the outage", 0.02)
        lost = doubled = 0
        for service in farm.services:
            host = service.config.host_name
            local = [e.id for e in service.store.events_after(0, 10_000_000)]
            rows = await db.query("SELECT local_id FROM farm_events WHERE host = %s "
                                  "ORDER BY id", (host,))
            farm_ids = [r[0] for r in rows]
            lost += len(set(local) - set(farm_ids))
            doubled += len(farm_ids) - len(set(farm_ids))
            if farm_ids != local:
                raise RuntimeError(f"{host}: the farm's journal is not the host's")
        await until(lambda: all(key in stream.arrived for key in farm.changed),
                    time.perf_counter() + deadline, "the SSE client caught up", 0.05)
        stream_doubled = len(stream.farm_ids) - len(set(stream.farm_ids))
        report["outage"] = {
            "seconds": round(restarted - stopped, 1),
            "events_during": (await farm_count(db)) - before,
            "backlog_at_restart": backlog,
            "caught_up_after_s": round(caught - restarted, 2),
            "lost": lost, "duplicated": doubled,
            "sse_client_duplicated": stream_doubled,
            "sse_client_in_order": stream.farm_ids == sorted(stream.farm_ids)}
        report["load_after"] = os.getloadavg()
        return report
    finally:
        await farm.stop()
        shutil.rmtree(base, ignore_errors=True)
        if own_cluster:
            cluster.destroy()


def _body(data: bytes) -> Any:
    return FileBodyProducer(io.BytesIO(data))


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


def show(report: dict[str, Any]) -> str:
    s, lat, lo, out = (report["shipping"], report["latency_ms"], report["remote_logoff_ms"],
                       report["outage"])
    return "\n".join([
        f"farm: {report['bridges']} bridges x {report['sessions_per_bridge']} sessions, one "
        f"PostgreSQL; {report['cpus']} CPUs, load average before "
        f"{report['load_before'][0]:.2f} / after {report['load_after'][0]:.2f}",
        f"outbox shipping     {s['events']} events made in {s['made_in_s']} s, all in the "
        f"farm after {s['shipped_in_s']} s: {s['events_per_s']} events/s",
        f"farm event latency  p50 {lat['p50']} ms  p99 {lat['p99']} ms  (max {lat['max']} ms,"
        f" {lat['samples']} changes on other hosts -> SSE client)",
        f"remote logoff       p50 {lo['p50']} ms  p99 {lo['p99']} ms  ({lo['count']} round "
        f"trips, HTTP -> farm -> host -> RDP server -> back)",
        f"{out['seconds']:g} s outage       {out['backlog_at_restart']} events waited; caught "
        f"up {out['caught_up_after_s']} s after PostgreSQL was back; lost {out['lost']}, "
        f"duplicated {out['duplicated']}; SSE client: duplicated "
        f"{out['sse_client_duplicated']}, in order {out['sse_client_in_order']}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bridges", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--samples", type=int, default=300, help="latency samples")
    parser.add_argument("--logoffs", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=180.0,
                        help="seconds each phase may take")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.bridges < 2:
        parser.error("--bridges: at least 2")
    result: list[Any] = []

    async def go() -> None:
        try:
            result.append(await run(args.bridges, args.sessions, args.outage, args.samples,
                                    args.logoffs, args.deadline))
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()).addErrback(
        lambda f: result.append(f)))
    reactor.run()
    if not result or not isinstance(result[0], dict):
        print(f"bench.farm failed: {result[0].getTraceback() if result else 'no result'}",
              file=sys.stderr)
        return 1
    print(show(result[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(result[0], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
