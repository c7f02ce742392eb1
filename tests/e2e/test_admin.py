"""The admin endpoint over real sockets: the event stream (resume, slow
readers, tokens), /sessions, /healthz, /metrics and ``ctl events``."""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from bridge.security.auth import Identity
from bridge.security.permissions import FULL, GUEST, USER
from bridge.sessions.model import ClientInfo
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.otsapi_client import BlockingClient
from tests.e2e.sse import get, open_events

ROOT = Path(__file__).resolve().parents[2]


def journal_ids(bridge: BridgeUnderTest) -> list[int]:
    return [e.id for e in bridge.service.store.events_after(0, 100_000)]


async def logon_token(bridge: BridgeUnderTest, user: str = "alice",
                      password: str = "alice-pw") -> str:
    client = BlockingClient(bridge.thrift_port)
    try:
        result = await client.call("logonConnection", user, password, "")
    finally:
        client.close()
    assert result.success
    return result.authToken


def churn(bridge: BridgeUnderTest, lives: int, first_connection: int = 100) -> None:
    """Session lives straight through the registry (5 journal events each),
    without backends: only the journal and its readers matter here."""
    registry = bridge.service.registry
    for n in range(lives):
        session = registry.create(first_connection + n, ClientInfo(), "carol", "", 1)
        registry.connected(session)
        registry.log_on(session, "carol", "", 1)
        registry.disconnect(session)
        registry.end(session)


@pytest_twisted.ensureDeferred
async def test_a_client_that_drops_and_resumes_misses_nothing_and_sees_nothing_twice(
        short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        token = await logon_token(bridge)
        first = await open_events(bridge.admin_port, token, "?after=0")
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await first.wait_for(lambda events: any(e.data["event"] == "logged-on"
                                                for e in events))
        seen = first.ids
        first.drop()
        await first.closed
        # While it is away: a disconnect, a logoff, more sessions.
        await peer.client_disconnected(1)
        session_id = bridge.service.registry.sessions_of("alice", "")[0].session_id
        client = BlockingClient(bridge.thrift_port)
        assert await client.call("logoffSession", token, session_id, True)
        client.close()
        churn(bridge, 3)
        again = await open_events(bridge.admin_port, token, last_event_id=seen[-1])
        last = journal_ids(bridge)[-1]
        await again.wait_for(lambda events: bool(events) and events[-1].id == last)
        both = seen + again.ids
        assert both == journal_ids(bridge) == list(range(1, last + 1)), \
            "every journal event once, in order, across the drop"
        assert again.sessions[0].data["event"] == "disconnected"
        # And live: a new event reaches the resumed stream.
        churn(bridge, 1, first_connection=200)
        await again.wait_for(lambda events: events[-1].id == last + 5)
        again.drop()
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_reading_is_paused_not_buffered(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        token = await logon_token(bridge)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", bridge.admin_port))
        sock.sendall(f"GET /events?after=0 HTTP/1.1\r\nHost: 127.0.0.1:{bridge.admin_port}\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        hub = bridge.service.events
        while not hub.subscriptions:  # the request reaches the bridge
            await deferLater(reactor, 0.01, lambda: None)
        # A slow link: loopback's send buffer would otherwise take megabytes.
        [subscription] = hub.subscriptions
        server_side = subscription.subscriber.request.channel.transport.getHandle()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(20):
            churn(bridge, 50, first_connection=1000)
            await deferLater(reactor, 0, lambda: None)
        assert subscription.paused, "Twisted paused the stream: the client reads nothing"
        assert subscription.position < hub.last_id == 5000
        stream = subscription.subscriber
        transport = stream.request.channel.transport
        assert len(transport.dataBuffer) + transport._tempDataLen < 256 * 1024, \
            "what waits for the client is bounded by the transport's buffer, not the backlog"
        # Reading again: it is caught up from the journal, in order.
        sock.setblocking(False)
        received = b""
        while b"id: 5000\n" not in received:
            try:
                received += sock.recv(1 << 20)
            except BlockingIOError:
                await deferLater(reactor, 0.01, lambda: None)
        ids = [int(line[4:]) for line in received.decode().split("\n")
               if line.startswith("id: ")]
        assert ids == list(range(1, 5001))
        sock.close()
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_events_and_sessions_need_a_query_information_token(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        guest = bridge.service.tokens.issue(Identity("guest", "", GUEST))
        full = bridge.service.tokens.issue(Identity("alice", "", FULL))
        for path in ("/events", "/sessions"):
            for token in (None, "x" * 43, guest):
                code, body, headers = await get(bridge.admin_port, path, token)
                assert code == 401, (path, token)
                assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="icp-bridge"']
                assert b"QUERY_INFORMATION" in body
        code, body, _ = await get(bridge.admin_port, "/sessions", full)
        assert code == 200
        assert {k: v for k, v in json.loads(body).items() if k != "caller"} == {
            "sessions": [], "last_event_id": 0}
        code, body, _ = await get(bridge.admin_port, "/events?after=x", full)
        assert code == 400
        code, body, _ = await get(bridge.admin_port, "/nothing-here", full)
        assert code == 404
        code, body, headers = await get(bridge.admin_port, "/")
        assert code == 200 and b"<title>icp-bridge</title>" in body
        assert b"default-src 'none'" in headers.getRawHeaders(b"content-security-policy")[0]
    finally:
        await bridge.stop()


def sse_data(body: bytes) -> list[dict[str, object]]:
    """The session events of a finished (``?once=1``) /events answer."""
    return [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
            if line.startswith("data: ")]


def user_lives(bridge: BridgeUnderTest, *users: tuple[int, str, str]) -> dict[str, int]:
    """A live session per (connection, user, client address), through the registry."""
    registry = bridge.service.registry
    ids = {}
    for connection_id, user, address in users:
        session = registry.create(connection_id, ClientInfo(f"{user}-pc", address), user, "", 1)
        registry.connected(session)
        registry.log_on(session, user, "", 1)
        ids[user] = session.session_id
    return ids


@pytest_twisted.ensureDeferred
async def test_a_token_below_full_sees_only_its_users_events_and_clients(
        short_dir: Path) -> None:
    """Every desktop holds a USER token (/tmp/ogon.session.<id>): with it,
    /events has only that user's session events (no failed logon, whose
    name may be a password typed into the name field), /sessions every
    session but other users' without client name and address. FULL: all."""
    bridge = await start_bridge(short_dir)
    try:
        client = BlockingClient(bridge.thrift_port)
        try:
            failed = await client.call("logonConnection", "Sup3r-Secret!", "nope", "")
        finally:
            client.close()
        assert not failed.success
        user_lives(bridge, (1, "alice", "203.0.113.50"), (2, "bob", "198.51.100.7"))
        bob = bridge.service.tokens.issue(Identity("bob", "", USER))
        full = bridge.service.tokens.issue(Identity("root", "", FULL))

        code, body, _ = await get(bridge.admin_port, "/events?after=0&once=1", full)
        everything = sse_data(body)
        assert code == 200
        assert {e["username"] for e in everything} == {"Sup3r-Secret!", "alice", "bob"}
        code, body, _ = await get(bridge.admin_port, "/events?after=0&once=1", bob)
        bobs = sse_data(body)
        assert code == 200
        assert bobs == [e for e in everything if e["username"] == "bob"]
        assert len(bobs) == 3 and not any(e["event"] == "logon-failed" for e in bobs)

        code, body, _ = await get(bridge.admin_port, "/sessions", bob)
        view = json.loads(body)
        clients = {s["user"]: (s["client_name"], s["client_address"]) for s in view["sessions"]}
        assert clients == {"alice": (None, None), "bob": ("bob-pc", "198.51.100.7")}
        assert view["caller"]["sees_everything"] is False
        code, body, _ = await get(bridge.admin_port, "/sessions", full)
        clients = {s["user"]: (s["client_name"], s["client_address"])
                   for s in json.loads(body)["sessions"]}
        assert clients == {"alice": ("alice-pc", "203.0.113.50"),
                           "bob": ("bob-pc", "198.51.100.7")}

        # A token of no user owns nothing, greeter sessions (no user either) included.
        greeter = bridge.service.registry.create(3, ClientInfo("kiosk", "192.0.2.99"))
        bridge.service.registry.connected(greeter)
        nobody = bridge.service.tokens.issue(Identity("", "", USER))
        code, body, _ = await get(bridge.admin_port, "/events?after=0&once=1", nobody)
        assert (code, sse_data(body)) == (200, [])
        code, body, _ = await get(bridge.admin_port, "/sessions", nobody)
        assert {(s["client_name"], s["client_address"])
                for s in json.loads(body)["sessions"]} == {(None, None)}

        # A live stream: what happens to alice never reaches bob's.
        stream = await open_events(bridge.admin_port, bob)
        registry = bridge.service.registry
        registry.disconnect(registry.by_connection(1))
        registry.disconnect(registry.by_connection(2))
        await stream.wait_for(lambda events: any(e.data["event"] == "disconnected"
                                                 for e in events))
        assert [(e.data["username"], e.data["event"]) for e in stream.sessions] == [
            ("bob", "disconnected")]
        stream.drop()
        await stream.closed
    finally:
        await bridge.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by prometheus-client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest_twisted.ensureDeferred
async def test_healthz_sessions_and_metrics_move_with_what_happens(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        port = bridge.admin_port
        code, body, _ = await get(port, "/healthz")
        health = json.loads(body)
        assert code == 200 and health["ok"] and not health["rdp_server_connected"]
        assert health["dbus"] == "off"
        code, text, headers = await get(port, "/metrics")
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        before = samples(text.decode())
        assert before["icp_bridge_rdp_server_connected", ()] == 0

        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        token = await logon_token(bridge)
        client = BlockingClient(bridge.thrift_port)
        for n in range(3):
            assert await client.call("ping", n) == n
        session_id = bridge.service.registry.by_connection(1).session_id
        opened = await client.call("virtualChannelOpen", token, session_id, "CLIPRDR", False, 0)
        assert opened.pipeName
        assert not (await client.call("logonConnection", "alice", "wrong", "")).success
        # Refused (no such session) and failed (the RDP server fails it) apart.
        assert not (await client.call("querySessionInformation", token, 999, 5)).returnValue
        peer.refuse.add("OtsApiVirtualChannelOpenRequest")
        failed = await client.call("virtualChannelOpen", token, session_id, "CLIPRDR", False, 0)
        assert failed.pipeName == ""
        client.close()

        code, body, _ = await get(port, "/healthz")
        assert json.loads(body)["rdp_server_connected"] is True
        code, body, _ = await get(port, "/sessions", token)
        [row] = json.loads(body)["sessions"]
        assert (row["session_id"], row["user"], row["state_name"]) == (session_id, "alice",
                                                                       "Active")
        assert row["client_address"] and row["since"] >= row["connect_time"]

        after = samples((await get(port, "/metrics"))[1].decode())
        calls = "icp_bridge_otsapi_calls_total"
        assert after[calls, (("method", "ping"), ("outcome", "answered"))] == 3
        assert after[calls, (("method", "logonConnection"), ("outcome", "refused"))] == 1
        assert after[calls, (("method", "querySessionInformation"),
                             ("outcome", "refused"))] == 1
        assert after[calls, (("method", "virtualChannelOpen"), ("outcome", "answered"))] == 1
        assert after[calls, (("method", "virtualChannelOpen"), ("outcome", "failed"))] == 1
        assert after["icp_bridge_rdp_server_connected", ()] == 1
        assert after["icp_bridge_sessions", (("state", "active"),)] == 1
        assert after["icp_bridge_logons_total", (("kind", "rdp"), ("outcome", "ok"))] == 1
        assert after["icp_bridge_logons_total", (("kind", "otsapi"), ("outcome", "failed"))] == 1
        assert after["icp_bridge_icp_calls_total", (
            ("direction", "to_rdp_server"), ("method", "OtsApiVirtualChannelOpen"),
            ("outcome", "ok"))] == 1
        assert after["icp_bridge_icp_calls_total", (
            ("direction", "from_rdp_server"), ("method", "LogonUser"), ("outcome", "ok"))] == 1
        assert after["icp_bridge_bridged_call_seconds_count", (
            ("method", "OtsApiVirtualChannelOpen"),)] == 2
        assert after["icp_bridge_backend_starts_total", (("module", "xsession"),
                                                         ("outcome", "ready"))] == 1
        assert after["icp_bridge_state_write_seconds_count", ()] > \
            before["icp_bridge_state_write_seconds_count", ()]
        assert after["icp_bridge_event_journal_last_id", ()] == journal_ids(bridge)[-1]
        assert after["process_open_fds", ()] > 0

        # A connection the bridge closes is counted by reason.
        junk = socket.create_connection(("127.0.0.1", bridge.thrift_port), timeout=20)
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert await deferToThread(junk.recv, 100) == b""
        junk.close()
        dropped = samples((await get(port, "/metrics"))[1].decode())
        assert dropped["icp_bridge_dropped_connections_total", (("listener", "otsapi"),
                                                                ("reason", "bad_data"))] == 1
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_ctl_events_prints_the_journal(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        token = await logon_token(bridge)
        churn(bridge, 2)
        argv = ["-m", "bridge.cli", "ctl", "events", "--admin",
                f"http://127.0.0.1:{bridge.admin_port}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ICP_BRIDGE_TOKEN": token}
        out, err, code = await getProcessOutputAndValue(sys.executable, [*argv, "--json"],
                                                        env=env, path=str(ROOT))
        assert code == 0, err
        events = [json.loads(line) for line in out.decode().splitlines()]
        assert [e["id"] for e in events] == journal_ids(bridge) == list(range(1, 11))
        assert events[2]["new_state_name"] == "Active" and events[2]["username"] == "carol"
        # Times as ISO strings, as everything ctl --json prints.
        stored = bridge.service.store.events_after(0, 1)[0].time
        assert events[0]["time"] == datetime.fromtimestamp(stored).astimezone().isoformat(
            timespec="seconds")
        out, err, code = await getProcessOutputAndValue(sys.executable, [*argv, "--after", "8"],
                                                        env=env, path=str(ROOT))
        lines = out.decode().splitlines()
        assert code == 0 and len(lines) == 2
        assert lines[0].startswith("#9 ") and "disconnected carol Active -> Disconnected" \
            in lines[0]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv, env={**env, "ICP_BRIDGE_TOKEN": "x" * 43}, path=str(ROOT))
        assert code != 0 and b"401" in err
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_the_journal_keeps_at_most_events_keep_count(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    churn(bridge, 4)  # 20 events
    await bridge.stop()
    again = await start_bridge(short_dir, events_keep_count=6)  # pruned as it starts
    try:
        ids = journal_ids(again)
        assert ids == list(range(15, 21)), ids
        churn(again, 1, first_connection=300)
        assert journal_ids(again)[-1] == 25, "ids go on after pruning"
    finally:
        await again.stop()


class Lines(ProcessProtocol):
    def __init__(self, wanted: int) -> None:
        self.buffer = b""
        self.lines: list[str] = []
        self.wanted = wanted
        self.enough: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        self.lines += [line.decode() for line in complete]
        if len(self.lines) >= self.wanted and not self.enough.called:
            self.enough.callback(None)

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_ctl_events_follow_prints_new_events_as_they_come(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        token = await logon_token(bridge)
        churn(bridge, 1)  # before it starts: not printed with --follow
        lines = Lines(wanted=5)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ICP_BRIDGE_TOKEN": token}
        process = reactor.spawnProcess(
            lines, sys.executable, [sys.executable, "-m", "bridge.cli", "ctl", "events",
                                    "--admin", f"127.0.0.1:{bridge.admin_port}", "--follow",
                                    "--json"], env=env, path=str(ROOT))
        try:
            while not bridge.service.events.subscriptions:  # it is listening
                await deferLater(reactor, 0.02, lambda: None)
            churn(bridge, 1, first_connection=50)
            await lines.enough
        finally:
            process.signalProcess("KILL")
            await lines.ended
        assert [json.loads(line)["id"] for line in lines.lines] == [6, 7, 8, 9, 10]
    finally:
        await bridge.stop()
