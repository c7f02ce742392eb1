"""Limits under attack and bad days, on StringTransports and a Clock:
slow and idle clients, caps, clients that do not read, string bombs, an
RDP server that never handshakes or stops reading, failed-logon throttling."""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from bridge.security.auth import Identity, InMemoryAuthenticator
from bridge.security.throttle import (
    OTSAPI,
    RDP,
    LockoutStore,
    LogonGuard,
    ThrottlePolicy,
    pair_key,
    user_key,
)
from bridge.security.tokens import TokenStore
from protocols.errors import IcpBackpressureError, IcpDisconnectedError
from protocols.generated import ICP_pb2
from protocols.generated.otsapi_blocking import otsapi
from protocols.icp import MSG_PING, IcpState
from protocols.loglimit import LogLimiter
from protocols.thrift_server import ConnectionLimits, ThriftServerFactory
from tests.test_thrift_server import call_bytes, decode_replies, framed
from tests.wire import connected_icp, frame, handshake


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [e["log_format"].format(**e) for e in events if "log_format" in e]


class Handler:
    def __init__(self) -> None:
        self.pending: list[Deferred[int]] = []

    def ping(self, value: int) -> Any:
        if value < 0:  # negative: answered later
            d: Deferred[int] = Deferred()
            self.pending.append(d)
            return d
        return value

    def logonConnection(self, username: str, password: str, domain: str) -> Any:
        from protocols.generated.otsapi.ttypes import TReturnLogonConnection

        return TReturnLogonConnection(success=False, authToken="")


class ThriftLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = Handler()
        self.limits = ConnectionLimits(clock=self.clock, max_connections=3,
                                       max_calls_in_flight=2, max_pending_output=1000)
        from protocols.generated.otsapi import otsapi as twisted_otsapi

        self.factory = ThriftServerFactory(twisted_otsapi, self.handler, limits=self.limits)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
        proto.makeConnection(transport)
        return proto, transport

    def test_a_frame_begun_must_finish_in_time_even_trickled(self) -> None:
        proto, transport = self.connect()
        request = framed(call_bytes("ping", 1, input=5))
        with capturedLogs() as events:
            for i in range(3):  # a byte every 3 s: active, but the frame never completes
                proto.dataReceived(request[i:i + 1])
                self.clock.advance(3)
            self.clock.advance(3)
        assert transport.disconnecting
        assert any("frame begun but not finished within 10 s" in m for m in messages(events))

    def test_a_flood_of_bad_calls_is_a_few_log_lines_with_a_count(self) -> None:
        self.limits.max_calls_in_flight = 10_000
        proto, transport = self.connect()
        unknown = struct.pack("!Ii", 0x80010001, 5) + b"nosuc" + struct.pack("!i", 1) + b"\0"
        with capturedLogs() as events:
            proto.dataReceived(framed(unknown) * 1000)
            assert len(decode_replies(transport.value(), "ping")) == 1000, "each is answered"
            self.clock.advance(10)
        lines = [m for m in messages(events) if "unknown method" in m]
        assert lines == ["OTS API client 192.0.2.9:5000 called unknown method nosuc",
                         "OTS API client 192.0.2.9:5000 called unknown method nosuc "
                         "(999 like it in the last 10 s)"]

    def test_a_connection_that_says_nothing_is_closed(self) -> None:
        _, transport = self.connect()
        self.clock.advance(29)
        assert not transport.disconnecting
        with capturedLogs() as events:
            self.clock.advance(3)  # checked every 2.5 s (a quarter of the shortest timeout)
        assert transport.disconnecting
        assert any("no call within 30 s of connecting" in m for m in messages(events))

    def test_idle_but_never_with_a_call_in_flight(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(framed(call_bytes("ping", 1, input=-1)))  # held
        self.clock.advance(4000)
        assert not transport.disconnecting, "a call in flight is not idleness"
        self.handler.pending.pop().callback(1)
        self.clock.advance(3599)
        assert not transport.disconnecting
        self.clock.advance(3)
        assert transport.disconnecting

    def test_over_the_cap_connections_are_refused_at_once(self) -> None:
        for _ in range(3):
            self.connect()
        with capturedLogs() as events:
            _, refused = self.connect()
            _, refused_too = self.connect()
        assert refused.disconnecting and refused_too.disconnecting
        assert len(self.factory.connections) == 3 and self.factory.refused == 2
        assert [m for m in messages(events) if "refusing OTS API connections" in m] == [
            "refusing OTS API connections: 3 connections already (max_connections) "
            "(1 refused so far)"], "one log line, not one per refused connection"

    def test_descriptors_in_reserve_are_not_given_to_clients(self) -> None:
        self.limits.fd_limit = 1000
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        transport.fileno = lambda: 900  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        assert transport.disconnecting, "fd 900 is in the 256 kept for the RDP server"

    def test_calls_in_flight_are_capped_by_pausing_reading(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(framed(call_bytes("ping", 1, input=-1)))
        assert transport.producerState == "producing"
        proto.dataReceived(framed(call_bytes("ping", 2, input=-1)))
        assert transport.producerState == "paused"
        self.handler.pending.pop(0).callback(1)
        assert transport.producerState == "producing"

    def test_a_frame_held_up_by_our_own_pause_is_no_slowloris(self) -> None:
        proto, transport = self.connect()
        calls = b"".join(framed(call_bytes("ping", n, input=-1)) for n in (1, 2))
        third = framed(call_bytes("ping", 3, input=5))
        proto.dataReceived(calls + third[:5])  # the rest is unread while we are paused
        assert transport.producerState == "paused"
        self.clock.advance(30)
        assert not transport.disconnecting, "we were not reading: the frame could not finish"
        self.handler.pending.pop(0).callback(1)
        self.clock.advance(9)
        proto.dataReceived(third[5:])
        assert not transport.disconnecting
        assert [seqid for seqid, _ in decode_replies(transport.value(), "ping")] == [1, 3]

    def test_a_client_that_does_not_read_is_dropped(self) -> None:
        proto, transport = self.connect()
        transport.dataBuffer = b"x" * 5000  # what Twisted holds for it  # type: ignore[attr-defined]
        transport.producer.pauseProducing()  # as Twisted does past its buffer size
        with capturedLogs() as events:
            proto.dataReceived(framed(call_bytes("ping", 1, input=5)))
        assert transport.disconnecting
        assert any("does not read its replies" in m for m in messages(events))

    def test_huge_strings_and_names_are_refused_and_never_echoed(self) -> None:
        proto, transport = self.connect()
        with capturedLogs() as events:
            proto.dataReceived(framed(call_bytes("logonConnection", 1, username="u" * 200_000,
                                                 password="p", domain="")))
        [(seqid, error)] = decode_replies(transport.value(), "logonConnection")
        assert seqid == 1 and "bad arguments" in error.message
        assert all(len(m) < 600 for m in messages(events)), "nothing of it in the log"
        transport.clear()
        long_name = b"x" * 10_000
        bad = b"\x80\x01\x00\x01" + len(long_name).to_bytes(4, "big") + long_name + b"\0" * 8
        with capturedLogs() as events:
            proto.dataReceived(framed(bad))
        assert transport.disconnecting
        assert any("method name of 10000 bytes" in m for m in messages(events))
        assert all(len(m) < 600 for m in messages(events))

    def test_unknown_method_names_are_cut_in_the_reply(self) -> None:
        proto, transport = self.connect()
        name = "n" * 60
        from thrift.protocol import TBinaryProtocol
        from thrift.Thrift import TMessageType
        from thrift.transport.TTransport import TMemoryBuffer

        buffer = TMemoryBuffer()
        out = TBinaryProtocol.TBinaryProtocol(buffer)
        out.writeMessageBegin(name, TMessageType.CALL, 3)
        otsapi.ping_args(input=1).write(out)
        out.writeMessageEnd()
        proto.dataReceived(framed(buffer.getvalue()))
        assert len(transport.value()) < 400


def test_junk_tokens_are_never_kept() -> None:
    tokens = TokenStore(Clock())
    for n in range(600):
        assert tokens.lookup(f"{n}" + "J" * 4_000_000 if n < 3 else f"junk-{n}") is None
    assert tokens._digests._digests == {}, "only tokens of the issued shape are cached"
    real = tokens.issue(Identity("u", "", 1), lifetime=60)
    assert tokens.lookup(real) is not None and list(tokens._digests._digests) == [real]


class IcpLimitsTests(SynchronousTestCase):
    def test_a_peer_that_never_handshakes_is_dropped(self) -> None:
        proto, transport, clock = connected_icp(handshake_timeout=10)
        clock.advance(9)
        assert proto.state is IcpState.HANDSHAKING
        with capturedLogs() as events:
            clock.advance(2)
        assert proto.state is IcpState.CLOSED and transport.disconnecting
        assert any("no handshake within 10 s" in m for m in messages(events))

    def test_handshake_in_time_cancels_the_timer(self) -> None:
        proto, _, clock = connected_icp(handshake_timeout=10)
        proto.dataReceived(frame(handshake(tag=1)))
        clock.advance(100)
        assert proto.state is IcpState.READY

    def test_calls_fail_fast_when_the_peer_does_not_keep_up(self) -> None:
        proto, _, _ = connected_icp(max_pending=3)
        proto.dataReceived(frame(handshake(tag=1)))
        calls = [proto.call(MSG_PING, ICP_pb2.PingRequest()) for _ in range(3)]
        with capturedLogs() as events:
            over = proto.call(MSG_PING, ICP_pb2.PingRequest())
        assert isinstance(self.failureResultOf(over).value, IcpBackpressureError)
        assert any("not keeping up" in m for m in messages(events))
        for d in calls:
            d.addErrback(lambda f: f.trap(IcpDisconnectedError))
        proto.connectionLost(None)

    def test_reading_pauses_while_the_peer_does_not_read(self) -> None:
        _, transport, _ = connected_icp()
        assert transport.producer is not None and transport.streaming
        transport.producer.pauseProducing()
        assert transport.producerState == "paused"


class ThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.checks: list[str] = []
        inner = InMemoryAuthenticator({"alice": ("pw", 1), "bob": ("pw", 1)})

        def authenticate(username: str, password: str, domain: str) -> Deferred[Any]:
            self.checks.append(username)
            return inner.authenticate(username, password, domain)

        self.inner = type("Auth", (), {"authenticate": staticmethod(authenticate)})()
        self.guard = LogonGuard(self.inner, self.clock, ThrottlePolicy(
            failures_before_delay=3, delay_max=8, lockout_failures=10, lockout_time=900))

    def attempt(self, user: str, password: str, source: str = "198.51.100.7",
                kind: str = OTSAPI) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.guard.authenticate(user, password, "", source, kind))

    def test_delay_doubles_then_lockout_then_it_lifts(self) -> None:
        for _ in range(3):
            assert self.successResultOf(self.attempt("alice", "bad")) is None
        delays = []
        for _ in range(7):
            d = self.attempt("alice", "bad")
            waited = 0.0
            while not d.called:
                self.clock.advance(0.25)
                waited += 0.25
            delays.append(waited)
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0], "answered through the clock"
        checks = len(self.checks)
        with capturedLogs() as events:
            locked = self.attempt("alice", "pw")
        assert self.successResultOf(locked) is None and len(self.checks) == checks, \
            "locked out: not even checked"
        assert any("locked out for" in m for m in messages(events))
        self.clock.advance(900)
        d = self.attempt("alice", "pw", source="203.0.113.5")
        self.clock.advance(10)
        assert self.successResultOf(d) is not None, "the lockout lifted"
        assert user_key("alice") not in self.guard.counts, "a success clears the count"

    def test_an_attack_on_one_user_leaves_others_alone(self) -> None:
        for _ in range(12):
            d = self.attempt("alice", "bad", source="198.51.100.7")
            self.clock.advance(10)
            self.successResultOf(d)
        d = self.attempt("bob", "pw", source="203.0.113.5")
        assert self.successResultOf(d) is not None, "another user from elsewhere: at once"
        d = self.attempt("bob", "pw", source="198.51.100.7")
        assert self.successResultOf(d) is None, "but the attacker's address is locked out"

    def test_the_log_counts_failures_never_the_password(self) -> None:
        with capturedLogs() as events:
            self.successResultOf(self.attempt("alice", "s3cret!"))
        text = " ".join(messages(events))
        assert "failed logon for user alice from 198.51.100.7 (1 in a row)" in text
        assert "s3cret" not in text

    def test_queues_are_bounded_and_separate(self) -> None:
        held: list[Deferred[Any]] = []
        self.inner.authenticate = lambda u, p, d: held.append(Deferred()) or held[-1]
        guard = LogonGuard(self.inner, self.clock, ThrottlePolicy(concurrency=2, queue_limit=3))
        ots = [Deferred.fromCoroutine(guard.authenticate(f"u{n}", "x", "", f"10.0.0.{n}",
                                                         OTSAPI)) for n in range(6)]
        assert [d.called for d in ots] == [False] * 5 + [True], "2 checking, 3 waiting"
        assert self.successResultOf(ots[5]) is None
        rdp = Deferred.fromCoroutine(guard.authenticate("alice", "pw", "", "10.1.0.1", RDP))
        assert len(held) == 3, "the RDP server's logon has its own lane: checked at once"
        held[2].callback(Identity("alice", "", 1))
        assert self.successResultOf(rdp) is not None

    def test_a_burst_of_guesses_queued_at_once_gets_no_more_checks_than_the_lockout(
            self) -> None:
        # 258 guesses from one source at once, pipelined on its connections
        # before the first failure is counted: all pass the door, all wait
        # in the queue; a lock set while they wait refuses the rest unchecked.
        checked: list[Deferred[Any]] = []
        self.inner.authenticate = lambda u, p, d: checked.append(Deferred()) or checked[-1]
        policy = ThrottlePolicy(failures_before_delay=100)
        guard = LogonGuard(self.inner, self.clock, policy)
        burst = [Deferred.fromCoroutine(guard.authenticate("alice", "guess", "", "uid:1000",
                                                           OTSAPI))
                 for _ in range(policy.concurrency + policy.queue_limit)]
        while not all(d.called for d in burst):
            for d in [d for d in checked if not d.called]:
                d.callback(None)  # a wrong password
            self.clock.advance(0)
        assert all(d.called and d.result is None for d in burst)
        assert len(checked) <= policy.lockout_failures + policy.concurrency, len(checked)
        assert guard.outcomes[OTSAPI, "locked_out"] >= len(burst) - len(checked)

    def test_lockouts_survive_a_restart_and_an_admin_clears_them(self) -> None:
        path = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, path, True)
        store = LockoutStore(path / "state.sqlite3")
        guard = LogonGuard(self.inner, self.clock, ThrottlePolicy(lockout_failures=2,
                                                                  failures_before_delay=5),
                           store)
        for _ in range(2):
            self.successResultOf(Deferred.fromCoroutine(
                guard.authenticate("alice", "bad", "", "198.51.100.7", OTSAPI)))
        again = LogonGuard(self.inner, self.clock, guard.policy, LockoutStore(path /
                                                                               "state.sqlite3"))
        assert again.locked(pair_key("alice", "198.51.100.7")) > 0, "kept in the state database"
        admin = LockoutStore(path / "state.sqlite3")  # icp-bridge users unlock
        assert admin.unlock_user("alice") == 2, "alice from anywhere and from that source"
        assert admin.unlock_source("198.51.100.7") == 1
        assert again.locked(pair_key("alice", "198.51.100.7")) == 0
        assert self.successResultOf(Deferred.fromCoroutine(
            again.authenticate("alice", "pw", "", "198.51.100.7", OTSAPI))) is not None


def test_zero_disables_a_timeout() -> None:
    clock = Clock()
    from protocols.generated.otsapi import otsapi as twisted_otsapi

    factory = ThriftServerFactory(twisted_otsapi, Handler(), limits=ConnectionLimits(
        clock=clock, frame_timeout=0, first_call_timeout=0, idle_timeout=0,
        tls_handshake_timeout=0))
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"\x00\x00")
    clock.advance(10**6)
    assert not transport.disconnecting


def test_tls_handshakes_are_served_in_turn() -> None:
    """Past max_handshakes, new TLS connections wait (not read) for their
    turn; past the queue's length the listener stops accepting."""
    clock = Clock()
    from protocols.generated.otsapi import otsapi as twisted_otsapi

    factory = ThriftServerFactory(twisted_otsapi, Handler(), limits=ConnectionLimits(
        clock=clock, max_handshakes=2, max_handshake_queue=2))
    accepting: list[bool] = []
    factory.pause_accepting = lambda: accepting.append(False)
    factory.resume_accepting = lambda: accepting.append(True)
    protos = []
    for _ in range(5):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        transport._handshakeDone = False  # what Twisted's TLS wrapper shows  # type: ignore
        proto.makeConnection(transport)
        protos.append((proto, transport))
    states = [t.producerState for _, t in protos]
    assert states == ["producing", "producing", "paused", "paused", "paused"]
    assert accepting == [False], "the queue is full: stop accepting"
    clock.advance(30)
    assert not protos[2][1].disconnecting, "waiting does not count toward its timeout"
    protos[0][0].handshakeCompleted()
    assert protos[2][1].producerState == "producing", "first come, first served"
    protos[1][0].handshakeCompleted()
    assert protos[3][1].producerState == "producing" and accepting == [False, True]


class LogLimiterTests(SynchronousTestCase):
    def test_one_line_per_kind_and_interval_then_a_count(self) -> None:
        clock = Clock()
        limiter = LogLimiter(clock, interval=10)
        log = Logger(namespace="test")
        with capturedLogs() as events:
            for n in range(5):
                limiter.warn(log, "a", "call {n} failed", n=n)
            limiter.warn(log, "b", "other {n}", n=0)
            assert messages(events) == ["call 0 failed", "other 0"]
            clock.advance(10)
            assert messages(events)[2:] == ["call 4 failed (4 like it in the last 10 s)"]
            limiter.warn(log, "a", "call {n} failed", n=9)
            assert messages(events)[3:] == ["call 9 failed"], "a quiet kind logs at once again"
            limiter.warn(log, "a", "call {n} failed", n=10)
            limiter.flush()
            assert messages(events)[4:] == ["call 10 failed (1 like it in the last 10 s)"]
        assert not clock.getDelayedCalls()
