"""OTS API worker processes (bridge.otsapi.workers): what a client sees is
what one process would answer: the same answers, a token issued or revoked
taking effect at once on every connection, a connection's calls answered in
order; limits still hold across processes; a worker that dies or hangs is
survived."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread

from bridge.otsapi import workers as workers_module
from bridge.otsapi.workers import WorkerPool
from bridge.rdp.standin import StandInRdpServer
from bridge.security.permissions import FULL
from protocols.generated.otsapi_blocking import otsapi as blocking
from protocols.thrift_server import Outcome
from tests.conftest import BridgeUnderTest, kill_process_groups, start_bridge
from tests.e2e.otsapi_client import twisted_client
from tests.e2e.sse import get
from tests.e2e.test_admin import samples

WORKERS = 2


class Cluster:
    bridge: BridgeUnderTest
    pool: WorkerPool
    peer: StandInRdpServer
    alice: int
    bob: int

    def session_token(self, session_id: int) -> str:
        path = self.bridge.base / "tokens" / f"ogon.session.{session_id}"
        return path.read_text().splitlines()[0]

    async def connections_on_every_worker(self, at_least: int = 2) -> list[Any]:
        """Client connections (thrift's Twisted client) until every worker
        holds one, and at least ``at_least``."""
        clients: list[Any] = []
        for _ in range(60):
            clients.append(await twisted_client(self.bridge.thrift_port))
            await clients[-1].client.ping(0)
            await self.pool.sync()
            holders = [w for w in self.pool.workers.values() if w.alive and w.connections]
            if len(holders) == len(self.pool.workers) and len(clients) >= at_least:
                return clients
        raise AssertionError("the connections all went to one worker")


@pytest_twisted.async_yield_fixture
async def cluster(short_dir: Path) -> AsyncIterator[Cluster]:
    c = Cluster()
    c.bridge = await start_bridge(short_dir, otsapi_workers=WORKERS)
    pool = c.bridge.service.workers
    assert pool is not None
    c.pool = pool
    await pool.when_serving()
    c.peer = await c.bridge.peer()
    await c.peer.logon(1, "alice", "alice-pw")
    await c.peer.logon(2, "bob", "bob-pw")
    registry = c.bridge.service.registry
    c.alice = registry.by_connection(1).session_id
    c.bob = registry.by_connection(2).session_id
    yield c
    c.peer.release()
    await c.bridge.stop()
    for worker in pool.workers.values():
        assert not worker.alive


def workers_pids(pool: WorkerPool) -> list[int]:
    return [w.pid for w in pool.workers.values() if w.alive]


def plain(value: Any) -> Any:
    """A Thrift answer as plain data (the client's generated classes are not
    the handler's), without the time of the call that
    querySessionInformation(WTSSessionInfo) carries."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "thrift_spec"):
        fields = {k: plain(v) for k, v in vars(value).items()}
        if "CurrentTime" in fields:
            fields["CurrentTime"] = 0
        return (type(value).__name__, fields)
    return value


@pytest_twisted.ensureDeferred
async def test_workers_answer_what_the_main_process_answers(cluster: Cluster) -> None:
    """Every read-only call, with good and bad tokens, sessions and info
    classes: the answer through a worker equals the main process's own.
    Answers a worker can give it gives itself; refusals come from the main
    process (which logs them)."""
    [client] = [await twisted_client(cluster.bridge.thrift_port)]
    api = client.client
    handler = cluster.bridge.service.otsapi
    full = (await api.logonConnection("alice", "alice-pw", "")).authToken
    user = (await api.logonConnection("bob", "bob-pw", "")).authToken
    guest = (await api.logonConnection("guest", "guest-pw", "")).authToken
    tokens = [full, user, guest, cluster.session_token(cluster.alice), "x" * 43, "bogus", ""]
    calls: list[tuple[str, tuple[Any, ...]]] = [("ping", (7,)), ("getVersionInfo", (None,))]
    for token in tokens:
        calls.append(("getPermissionForToken", (token,)))
        calls.append(("enumerateSessions", (token, 1)))
        for session_id in (cluster.alice, cluster.bob, -1, 999):
            for info_class in range(0, 30):
                calls.append(("querySessionInformation", (token, session_id, info_class)))
    local = forwarded = 0
    for name, args in calls:
        before = cluster.pool.forwarded
        answer = await getattr(api, name)(*args)
        expected = getattr(handler, name)(*args)
        if isinstance(expected, Outcome):  # a refusal, as the call counts see it
            expected = expected.value
        assert plain(answer) == plain(expected), (name, args)
        if cluster.pool.forwarded == before:
            local += 1
            assert not _is_refusal(name, answer), (name, args, answer)
        else:
            forwarded += 1
            assert _is_refusal(name, answer), (name, args, answer)
    assert local > 100 and forwarded > 100, (local, forwarded)
    client.transport.loseConnection()


def _is_refusal(name: str, answer: Any) -> bool:
    if name == "getPermissionForToken":
        return answer == 0
    if name in ("enumerateSessions", "querySessionInformation"):
        return not answer.returnValue
    return False


@pytest_twisted.ensureDeferred
async def test_a_token_is_honoured_at_once_and_never_after_its_revocation(
        cluster: Cluster) -> None:
    """logonConnection's token works at once on every connection (whichever
    process holds it); after logoffConnection has answered, no connection
    is answered for it any more, over and over."""
    clients = await cluster.connections_on_every_worker(at_least=4)
    apis = [c.client for c in clients]
    for round_ in range(25):
        issuer, revoker = apis[round_ % len(apis)], apis[(round_ * 3 + 1) % len(apis)]
        token = (await issuer.logonConnection("alice", "alice-pw", "")).authToken
        for api in apis:
            assert await api.getPermissionForToken(token) == FULL
            assert (await api.enumerateSessions(token, 1)).returnValue
        assert await revoker.logoffConnection(token) is True
        for api in apis:
            assert await api.getPermissionForToken(token) == 0
            assert not (await api.enumerateSessions(token, 1)).returnValue
    for c in clients:
        c.transport.loseConnection()


def _connect_and_ping(port: int, count: int) -> list[bool]:
    """``count`` connections open at once (blocking, in a thread), a ping on
    each: answered? One False per connection refused or reset."""
    socks, answered = [], []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=20))
        except OSError:  # refused (reset) before the connect returned
            answered.append(False)
    data = _frames(("ping", (9,)))
    for s in socks:
        try:
            s.sendall(data)
            answered.append(len(s.recv(100)) > 0)
        except OSError:
            answered.append(False)
    for s in socks:
        s.close()
    return answered


def _frames(*calls: tuple[str, tuple[Any, ...]]) -> bytes:
    out = b""
    for seqid, (name, args) in enumerate(calls, 1):
        buffer = TTransport.TMemoryBuffer()
        client = blocking.Client(TBinaryProtocol.TBinaryProtocol(buffer))
        client._seqid = seqid
        getattr(client, f"send_{name}")(*args)
        out += struct.pack("!I", len(buffer.getvalue())) + buffer.getvalue()
    return out


def _pipelined(port: int, data: bytes, names: list[str]) -> list[Any]:
    """One connection, every call sent at once; the replies in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        stream = sock.makefile("rb")
        answers = []
        for name in names:
            (length,) = struct.unpack("!I", stream.read(4))
            buffer = TTransport.TMemoryBuffer(stream.read(length))
            client = blocking.Client(TBinaryProtocol.TBinaryProtocol(buffer))
            answers.append(getattr(client, f"recv_{name}")())
        return answers


@pytest_twisted.ensureDeferred
async def test_a_connections_calls_see_each_others_changes_in_order(cluster: Cluster) -> None:
    """Sent together on one connection: the revocation is answered, then the
    read-only call after it refused, as one process would."""
    port = cluster.bridge.thrift_port
    for _ in range(10):
        client = await twisted_client(port)
        token = (await client.client.logonConnection("alice", "alice-pw", "")).authToken
        client.transport.loseConnection()
        answers = await deferToThread(_pipelined, port, _frames(
            ("getPermissionForToken", (token,)), ("logoffConnection", (token,)),
            ("getPermissionForToken", (token,)), ("ping", (5,))),
            ["getPermissionForToken", "logoffConnection", "getPermissionForToken", "ping"])
        assert answers == [FULL, True, 0, 5]


@pytest_twisted.ensureDeferred
async def test_a_worker_behind_the_main_process_forwards_what_it_would_answer(
        cluster: Cluster) -> None:
    """A change the main process made (and may have shown: an ICP answer, a
    D-Bus signal) that a worker has not applied yet: the worker's calls go
    to the main process until it has."""
    client = await twisted_client(cluster.bridge.thrift_port)
    api, pool = client.client, cluster.pool
    token = (await api.logonConnection("alice", "alice-pw", "")).authToken
    handler = cluster.bridge.service.otsapi

    async def enumerate_forwarded() -> bool:
        before = pool.forwarded
        answer = await api.enumerateSessions(token, 1)
        assert plain(answer) == plain(handler.enumerateSessions(token, 1))
        return pool.forwarded > before

    assert not await enumerate_forwarded()
    pool.published.publish(pool.position + 1)  # made, not yet sent to the workers
    assert await enumerate_forwarded()
    pool.published.publish(pool.position)
    assert not await enumerate_forwarded()
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_session_answered_over_icp_is_seen_at_once_through_any_worker(
        cluster: Cluster) -> None:
    """The RDP server's LogonUser answer, then at once a new OTS API
    connection (whichever process takes it) lists the session, connected."""
    admin = await twisted_client(cluster.bridge.thrift_port)
    token = (await admin.client.logonConnection("alice", "alice-pw", "")).authToken
    admin.transport.loseConnection()
    registry = cluster.bridge.service.registry
    for connection_id in range(10, 30):
        await cluster.peer.logon(connection_id, "bob", "bob-pw")
        session_id = registry.by_connection(connection_id).session_id
        client = await twisted_client(cluster.bridge.thrift_port)
        listed = await client.client.enumerateSessions(token, 1)
        client.transport.loseConnection()
        states = {s.sessionId: s.connectState for s in listed.sessionInfoList}
        assert states.get(session_id) == 0, (connection_id, session_id, states)


@pytest_twisted.ensureDeferred
async def test_a_forwarded_logon_is_throttled_by_who_the_client_is(cluster: Cluster) -> None:
    """A failed logonConnection on a worker's connection is counted against
    the client as the main process would see it on its own: a loopback
    client is its local user (uid:N, found by the worker, which holds the
    connection), not the shared address nor nobody."""
    failed: list[tuple[str, str]] = []

    class Seen:
        def logon_failed(self, username: str, source: str, kind: str, failures: int) -> None:
            failed.append((username, source))

        def locked_out(self, *args: Any) -> None:
            pass

    cluster.bridge.service.guard.observers.append(Seen())
    client = await twisted_client(cluster.bridge.thrift_port)
    before = cluster.pool.forwarded
    answer = await client.client.logonConnection("alice", "not-her-password", "")
    assert not answer.success and cluster.pool.forwarded == before + 1
    assert failed == [("alice", f"uid:{os.geteuid()}")]
    client.transport.loseConnection()


#: A client in a process of its own (so that it closes while the bridge
#: works, as an attacker's would): a ping answered, then the frame given in
#: hex, then a reset at once (SO_LINGER {1, 0}).
RESET_CLIENT = """
import socket, struct, sys
port, ping, frame = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
s.sendall(ping)
reply = b""
while len(reply) < 4 or len(reply) < 4 + struct.unpack_from("!i", reply)[0]:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit("closed before the ping's answer")
    reply += chunk
s.sendall(frame)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


@pytest_twisted.ensureDeferred
async def test_a_forwarded_logon_reset_at_once_still_carries_the_local_user(
        cluster: Cluster) -> None:
    """The worker that accepts a loopback connection asks the kernel for
    its owner then, and every call it forwards carries it: a logon whose
    client reset the connection right after the frame is counted against
    that local user in the main process (redteam finding 8)."""
    import subprocess
    import sys

    from tests.e2e.test_lockouts import FailuresSeen
    from tests.test_thrift_server import call_bytes, framed

    seen = FailuresSeen()
    cluster.bridge.service.guard.observers.append(seen)
    before = cluster.pool.forwarded
    ping = framed(call_bytes("ping", 1, input=1))
    logon = framed(call_bytes("logonConnection", 2, username="alice",
                              password="not-her-password", domain=""))
    done = await deferToThread(subprocess.run, [
        sys.executable, "-c", RESET_CLIENT, str(cluster.bridge.thrift_port), ping.hex(),
        logon.hex()], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    await seen.until(1)
    assert seen.failed == [("alice", f"uid:{os.geteuid()}")]
    assert cluster.pool.forwarded == before + 1


@pytest_twisted.ensureDeferred
async def test_a_dead_worker_is_survived_and_forked_again(cluster: Cluster) -> None:
    pool = cluster.pool
    clients = await cluster.connections_on_every_worker(at_least=4)
    victim = next(w for w in pool.workers.values() if w.connections)
    os.kill(victim.pid, signal.SIGKILL)
    await victim.gone
    survivors = []
    for c in clients:
        try:
            assert await c.client.ping(3) == 3
            survivors.append(c)
        except Exception:  # this client's connection was the dead worker's
            continue
    assert survivors, "the other worker's clients are still served"
    # A state change with a worker gone is answered (not held for it).
    token = (await survivors[0].client.logonConnection("alice", "alice-pw", "")).authToken
    assert await survivors[0].client.logoffConnection(token) is True
    await pool.when_serving(WORKERS)
    assert len(workers_pids(pool)) == WORKERS and victim.pid not in workers_pids(pool)
    fresh = await twisted_client(cluster.bridge.thrift_port)
    assert await fresh.client.getPermissionForToken(token) == 0
    for c in [*survivors, fresh]:
        c.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_hung_worker_is_killed_so_answers_do_not_wait_for_it(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that stops taking state changes is killed after ACK_TIMEOUT,
    and the answers held for it go out."""
    monkeypatch.setattr(workers_module, "ACK_TIMEOUT", 0.5)
    pool = cluster.pool
    clients = await cluster.connections_on_every_worker()
    stopped = next(w for w in pool.workers.values() if w.connections)
    os.kill(stopped.pid, signal.SIGSTOP)
    # Every client asks for a token (a state change the stopped worker does
    # not acknowledge); the other worker's clients are answered once the
    # stopped one is killed, the stopped one's lose their connection.
    calls = [c.client.logonConnection("alice", "alice-pw", "") for c in clients]
    answered = await DeferredList(calls, fireOnOneCallback=True, consumeErrors=True)
    token, index = answered[0].authToken, answered[1]
    await stopped.gone
    assert await clients[index].client.getPermissionForToken(token) == FULL
    for call in calls:
        await DeferredList([call], consumeErrors=True)
    for c in clients:
        c.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_an_idle_hung_worker_is_found_by_the_heartbeat(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no state change to acknowledge, a stopped worker still goes: it
    does not answer a heartbeat, the next heartbeat kills it, and a live
    worker that answered stays."""
    pool = cluster.pool
    assert pool._heartbeat is not None
    pool._heartbeat.stop()  # the test drives the heartbeats
    clients = await cluster.connections_on_every_worker()
    stopped = next(w for w in pool.workers.values() if w.connections)
    live = next(w for w in pool.workers.values() if w is not stopped)
    os.kill(stopped.pid, signal.SIGSTOP)
    answered: Deferred[None] = Deferred()
    synced = pool._synced

    def watch(worker: Any, number: int) -> None:
        synced(worker, number)
        if worker is live and worker.heartbeat_sent is None and not answered.called:
            answered.callback(None)

    monkeypatch.setattr(pool, "_synced", watch)
    pool._check_alive()
    await answered
    pool._check_alive()
    await stopped.gone
    assert live.alive and stopped.pid not in workers_pids(pool)
    served = 0
    for c in clients:
        try:
            served += await c.client.ping(1)
        except Exception:  # this client's connection was the killed worker's
            pass
        c.transport.loseConnection()
    assert served >= 1, "the live worker's clients are still served"


@pytest_twisted.ensureDeferred
async def test_max_connections_counts_every_process(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, otsapi_workers=WORKERS, max_connections=3)
    pool = bridge.service.workers
    assert pool is not None
    await pool.when_serving()
    answered = await deferToThread(_connect_and_ping, bridge.thrift_port, 8)
    assert answered.count(True) == 3, answered
    await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_calls_answered_by_workers_are_in_the_metrics_at_once(cluster: Cluster) -> None:
    client = await twisted_client(cluster.bridge.thrift_port)
    for i in range(25):
        assert await client.client.ping(i) == i
    _, text, _ = await get(cluster.bridge.admin_port, "/metrics")
    counts = samples(text.decode())
    assert counts["icp_bridge_otsapi_calls_total", (("method", "ping"), ("outcome", "answered"))] \
        >= 25
    assert counts["icp_bridge_otsapi_connections", ()] >= 1
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_with_no_worker_left_the_main_process_serves(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "RESTART_DELAY", 3600.0)
    pool = cluster.pool
    for worker in list(pool.workers.values()):
        os.kill(worker.pid, signal.SIGKILL)
        await worker.gone
    client = await twisted_client(cluster.bridge.thrift_port)
    token = (await client.client.logonConnection("alice", "alice-pw", "")).authToken
    assert await client.client.getPermissionForToken(token) == FULL
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_reload_gives_the_workers_the_new_connection_limits(short_dir: Path) -> None:
    from tests.e2e.test_reload import start, toml

    bridge, reloader, path = await start(short_dir, toml(short_dir, otsapi_workers=WORKERS))
    try:
        pool = bridge.service.workers
        assert pool is not None
        await pool.when_serving()
        port = bridge.thrift_port
        first = await deferToThread(_connect_and_ping, port, 5)
        assert all(first), first
        path.write_text(toml(short_dir, otsapi_workers=WORKERS, max_connections=2))
        assert reloader.reload()
        # The workers have the new limits a channel round trip later (the
        # reload itself does not wait): after a SYNC, which comes after them.
        await pool.sync()
        answered = await deferToThread(_connect_and_ping, port, 5)
        assert answered.count(True) == 2, answered
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_virtual_channels_are_opened_by_the_worker_through_the_main_process(
        cluster: Cluster) -> None:
    """virtualChannelOpen/Close are answered by the worker, which asks the RDP
    server through the main process (its one ICP connection); whatever would
    be refused goes to the main process; the RDP server failing a call is
    the worker's failure value, as the main process's would be."""
    pool, peer = cluster.pool, cluster.peer
    client = await twisted_client(cluster.bridge.thrift_port)
    api = client.client
    token = (await api.logonConnection("alice", "alice-pw", "")).authToken
    before = pool.forwarded
    opened = await api.virtualChannelOpen(token, cluster.bob, "CLIPRDR", False, 0)
    assert opened.pipeName.endswith("_svc_CLIPRDR_1") and opened.instance == 1
    name, request = peer.requests_seen[-1]
    assert name == "OtsApiVirtualChannelOpenRequest"
    assert (request.connectionId, request.dynamicChannel, request.flags) == (2, False, 0)
    dynamic = await api.virtualChannelOpen(token, cluster.bob, "echo", True, 0x5)
    assert "_dvc_echo_" in dynamic.pipeName
    assert (peer.requests_seen[-1][1].dynamicChannel, peer.requests_seen[-1][1].flags) == (
        True, 5)
    assert await api.virtualChannelClose(token, cluster.bob, "CLIPRDR", opened.instance)
    assert not await api.virtualChannelClose(token, cluster.bob, "CLIPRDR", opened.instance)
    assert pool.forwarded == before, "answered by the worker"

    for args in [("x" * 43, cluster.bob, "CLIPRDR", False, 0),
                 (token, cluster.bob, "blocked", False, 0),  # channels_deny
                 (token, 999, "CLIPRDR", False, 0)]:
        before = pool.forwarded
        refused = await api.virtualChannelOpen(*args)
        assert (refused.pipeName, refused.instance) == ("", 0)
        assert pool.forwarded == before + 1, f"refused by the main process: {args}"

    peer.refuse.add("OtsApiVirtualChannelOpenRequest")
    before = pool.forwarded
    failed = await api.virtualChannelOpen(token, cluster.bob, "CLIPRDR", False, 0)
    assert (failed.pipeName, failed.instance) == ("", 0) and pool.forwarded == before
    await pool.sync()
    counts = cluster.bridge.service.thrift_factory.call_counts
    assert counts["virtualChannelOpen", "failed"] == 1
    assert counts["virtualChannelOpen", "answered"] == 2
    link_counts = cluster.bridge.service.link.call_counts
    assert link_counts["OtsApiVirtualChannelOpen", "failed"] == 1, link_counts
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_reload_gives_the_workers_the_new_channel_policy(short_dir: Path) -> None:
    from tests.e2e.test_reload import start, toml

    bridge, reloader, path = await start(short_dir, toml(short_dir, otsapi_workers=WORKERS))
    pids: list[int] = []
    try:
        pool = bridge.service.workers
        assert pool is not None
        await pool.when_serving()
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        pids = bridge.backend_pids()
        session_id = bridge.service.registry.by_connection(1).session_id
        clients = [await twisted_client(bridge.thrift_port) for _ in range(4)]
        token = (await clients[0].client.logonConnection("alice", "alice-pw", "")).authToken
        for c in clients:
            assert (await c.client.virtualChannelOpen(token, session_id, "rdpsnd", False,
                                                      0)).pipeName
        path.write_text(toml(short_dir, otsapi_workers=WORKERS,
                             properties='"virtualChannel.whiteList" = "cliprdr"'))
        assert reloader.reload()
        await pool.sync()  # the new policy is the workers' a round trip later
        for c in clients:
            assert not (await c.client.virtualChannelOpen(token, session_id, "rdpsnd", False,
                                                          0)).pipeName
            assert (await c.client.virtualChannelOpen(token, session_id, "CLIPRDR", False,
                                                      0)).pipeName
        path.write_text(toml(short_dir, otsapi_workers=WORKERS, channels_deny='["cliprdr"]',
                             properties='"virtualChannel.whiteList" = "cliprdr"'))
        assert reloader.reload()
        await pool.sync()
        for c in clients:
            assert not (await c.client.virtualChannelOpen(token, session_id, "CLIPRDR", False,
                                                          0)).pipeName
            c.transport.loseConnection()
    finally:
        await bridge.stop()
        kill_process_groups(pids)


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 1), (4, 2), (16, 14)])
def test_the_default_worker_count_leaves_two_cores(
        monkeypatch: pytest.MonkeyPatch, cores: int, workers: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert workers_module.default_worker_count() == workers
