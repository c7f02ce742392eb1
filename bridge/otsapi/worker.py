"""An OTS API worker process: it accepts OTS API clients on the listening
socket it shares with the main process and its other workers, does their
TLS and framing, answers the read-only methods (``ReadOnlyCalls``) from its
copy of the sessions and tokens, and forwards every other call to the main
process over its channel (``bridge.otsapi.channel``).

It is forked from the main process (``bridge.otsapi.workers``), so it
starts with the main process's state at a known position and hears every
later change on the channel. It answers a call itself only when the answer
cannot be a refusal: a token it does not know (or that is close to its
expiry), a session it does not know, a missing permission or an info class
not available all go to the main process, which decides and logs. So a
token the main process has just issued is honoured at once, and a revoked
one never after its revocation was answered (the main process holds its
answers until every worker has applied the change; see ``workers``).

In the child right after the fork: every descriptor but its own is closed
(the RDP server's connection, the state database, locks: those stay the
main process's alone), its own reactor replaces the inherited one, and its
log goes to the main process. It ends when the channel does.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NoReturn

from google.protobuf.message import DecodeError, EncodeError, Message
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from bridge.otsapi import channel as wire
from bridge.otsapi.handler import OtsApiHandler
from bridge.otsapi.virtual_channels import VirtualChannelCalls
from bridge.security.tokens import DigestCache, TokenRecord
from bridge.sessions.model import Session
from bridge.sessions.properties import ChannelPolicy
from protocols import icp
from protocols.errors import IcpProtocolError
from protocols.listening import SharedConnectionCount, listen_stream
from protocols.thrift_server import (
    ConnectionLimits,
    ForwardCall,
    Outcome,
    ThriftServerFactory,
    ThriftServerProtocol,
)

#: The methods a worker answers itself (the last two asking the RDP server
#: through the main process).
LOCAL_METHODS = frozenset({"ping", "getVersionInfo", "getPermissionForToken",
                           "enumerateSessions", "querySessionInformation",
                           "virtualChannelOpen", "virtualChannelClose"})
#: A logon token this close to its expiry (as the main process last said)
#: is left to the main process, which slides or ends it. The worker tells
#: the main process of every use within TOUCH_DELAY, far inside this.
EXPIRY_MARGIN = 10.0
TOUCH_DELAY = 0.5
#: How often counts for the metrics are sent when they changed.
COUNTS_INTERVAL = 1.0
#: Connections taken per readable event of the shared listening socket: the
#: processes each take their part of a burst.
ACCEPTS_PER_READ = 4


class ReplicaSessions:
    """The sessions as the worker knows them (``Sessions`` of readonly)."""

    def __init__(self, sessions: dict[int, Session], clock: IReactorTime) -> None:
        self.sessions = sessions
        self.clock = clock

    def __iter__(self) -> Iterator[Session]:
        return iter(sorted(self.sessions.values(), key=lambda s: s.session_id))

    def get(self, session_id: int) -> Session | None:
        return self.sessions.get(session_id)


class ReplicaTokens:
    """The tokens as the worker knows them. A use of a logon token is noted
    for the main process (``touched``), which slides its expiry."""

    def __init__(self, records: dict[str, TokenRecord], clock: IReactorTime) -> None:
        self.records = records
        self.clock = clock
        self.touched: dict[str, float] = {}
        self._digests = DigestCache()

    def lookup(self, token: str) -> TokenRecord | None:
        digest = self._digests.digest(token)
        if digest is None:
            return None
        record = self.records.get(digest)
        if record is None:
            return None
        if record.expires_at is not None and record.lifetime is not None:
            now = self.clock.seconds()
            if record.expires_at - now <= EXPIRY_MARGIN:
                return None
            self.touched[digest] = now
        return record


class WorkerCalls(VirtualChannelCalls):
    """The read-only methods and the two that only ask the RDP server, on the
    worker's copy; whatever would be refused (an Outcome answered at once)
    goes to the main process instead, which decides, logs and counts it."""

    # Forwarded calls of these carry the client's address (the main process
    # reads it as current_peer); the worker's own calls read none.
    methods_wanting_peer = OtsApiHandler.methods_wanting_peer

    def _refuse(self, method: str, session_id: int | None, reason: str) -> None:
        """Not logged or counted here: a refused call is forwarded, and the
        main process, which decides it again, logs and counts it once."""

    def getPermissionForToken(self, authToken: str | None) -> Any:
        return _answered(super().getPermissionForToken(authToken))

    def enumerateSessions(self, authToken: str | None, Version: int | None) -> Any:
        return _answered(super().enumerateSessions(authToken, Version))

    def querySessionInformation(self, authToken: str | None, sessionId: int | None,
                                infoClass: int | None) -> Any:
        return _answered(super().querySessionInformation(authToken, sessionId, infoClass))

    def virtualChannelOpen(self, authToken: str | None, sessionId: int | None,
                           virtualName: str | None, isDynChannel: bool | None,
                           flags: int | None) -> Any:
        return _answered(super().virtualChannelOpen(authToken, sessionId, virtualName,
                                                    isDynChannel, flags))

    def virtualChannelClose(self, authToken: str | None, sessionId: int | None,
                            virtualName: str | None, instance: int | None) -> Any:
        return _answered(super().virtualChannelClose(authToken, sessionId, virtualName,
                                                     instance))


class WorkerRdp:
    """The RDP server as a worker's calls reach it (an RdpCaller): each ICP
    request goes to the main process, which sends it on its connection and
    relays the answer (or how the call failed) back."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._calls: dict[int, tuple[Deferred[Any], int]] = {}
        self._next_id = 1

    def call(self, msg_type: int, request: Message, timeout: float | None = None
             ) -> Deferred[Any]:
        try:
            payload = request.SerializeToString()
        except EncodeError as e:
            return fail(e)
        call_id, self._next_id = self._next_id, self._next_id + 1
        d: Deferred[Any] = Deferred()
        self._calls[call_id] = (d, msg_type)
        self.worker.send_call(wire.encode_icp_call(call_id, msg_type, timeout, payload))
        return d

    def answered(self, body: bytes) -> None:
        self.worker.answered()
        call_id, ok, rest = wire.decode_icp_answer(body)
        entry = self._calls.pop(call_id, None)
        if entry is None:
            return
        d, msg_type = entry
        if d.called:
            return
        if not ok:
            d.errback(wire.icp_error(json.loads(rest)))
            return
        method = icp.ICP_METHODS[msg_type]
        try:
            response = icp.parse(method.response, rest)
        except DecodeError as e:  # as the main process's ICP engine says it
            d.errback(IcpProtocolError(f"undecodable {method.name} answer: {e}"))
            return
        d.callback(response)


def _answered(value: Any) -> Any:
    if type(value) is Outcome:
        raise ForwardCall()
    return value


class Worker:
    """The worker's side of its channel, and its OTS API factory's
    forwarder (``CallForwarder``)."""

    local = LOCAL_METHODS

    def __init__(self, index: int, reactor: Any, sessions: ReplicaSessions,
                 tokens: ReplicaTokens, factory: ThriftServerFactory, position: int,
                 published: wire.PublishedPosition) -> None:
        self.index = index
        self.published = published
        self.reactor = reactor
        self.sessions = sessions
        self.tokens = tokens
        self.factory = factory
        self.position = position
        self.channel = wire.Channel(reactor, {
            wire.SESSION: self._session, wire.TOKEN: self._token, wire.REPLY: self._reply,
            wire.SYNC: self._sync, wire.LIMITS: self._limits, wire.POLICY: self._policy,
            wire.ICP_ANSWER: self._icp_answer}, on_lost=self._lost)
        self.rdp = WorkerRdp(self)
        # Connections with forwarded calls out: id -> protocol.
        self._connections: dict[int, ThriftServerProtocol] = {}
        self._ids: dict[int, int] = {}  # id(protocol) -> connection id
        self._next_id = 1
        # Calls forwarded and not answered yet (whatever their connection).
        self._calls_out = 0
        self._counts_sent: tuple[Any, ...] = ()
        self._applied = False

    # -- forwarding (CallForwarder) ---------------------------------------------

    def behind(self) -> bool:
        """Whether the main process made a change this worker has not
        applied yet (it is on its way): a call now is forwarded, so that
        it sees what a client may already have seen of the change."""
        return self.published.read() > self.position

    def forward(self, proto: ThriftServerProtocol, message: bytes, host: str,
                source: str) -> None:
        key = id(proto)
        connection_id = self._ids.get(key)
        if connection_id is None:
            connection_id = self._ids[key] = self._next_id
            self._next_id += 1
            self._connections[connection_id] = proto
        self.send_call(wire.encode_call(connection_id, host, source, message))

    def send_call(self, message: bytes) -> None:
        """A CALL or ICP_CALL: the main process answers each."""
        self._flush_touches()  # uses before this call count before it
        self._calls_out += 1
        self.channel.send(message, now=self._calls_out == 1)

    def answered(self) -> None:
        self._calls_out -= 1

    def _icp_answer(self, body: bytes) -> None:
        self.rdp.answered(body)

    def forget(self, proto: ThriftServerProtocol) -> None:
        connection_id = self._ids.pop(id(proto), None)
        if connection_id is not None:
            del self._connections[connection_id]

    def _reply(self, body: bytes) -> None:
        self.answered()
        connection_id, message = wire.decode_reply(body)
        proto = self._connections.get(connection_id)
        if proto is not None:
            proto.forwarded_reply(message)

    # -- state from the main process ----------------------------------------------

    def _session(self, body: bytes) -> None:
        change = json.loads(body)
        self.position = change["p"]
        if "ended" in change:
            self.sessions.sessions.pop(change["ended"], None)
        else:
            session = wire.session_from_json(change["session"])
            self.sessions.sessions[session.session_id] = session
        self._applied_one()

    def _token(self, body: bytes) -> None:
        change = json.loads(body)
        self.position = change["p"]
        if "gone" in change:
            self.tokens.records.pop(change["gone"], None)
            self.tokens.touched.pop(change["gone"], None)
        else:
            record = wire.token_from_json(change["token"])
            self.tokens.records[record.digest] = record
        self._applied_one()

    def _applied_one(self) -> None:
        # One ACK per batch of changes read together, after all of them.
        if not self._applied:
            self._applied = True
            self.reactor.callLater(0, self._ack)

    def _ack(self) -> None:
        self._applied = False
        self.channel.send(wire.encode_number(wire.ACK, self.position))
        self.channel.flush()

    def _limits(self, body: bytes) -> None:
        """A reload changed the connection limits: new connections get
        them, and the sweeps apply them (as in the main process)."""
        for name, value in json.loads(body).items():
            setattr(self.factory.limits, name, value)

    def _policy(self, body: bytes) -> None:
        """A reload changed the properties or the channel lists."""
        change = json.loads(body)
        calls = self.factory.handler
        if "properties" in change:
            global_values, per_user = change["properties"]
            calls.channels.properties.replace(global_values, per_user)
        if "channels" in change:
            allow, deny = change["channels"]
            calls.channels.reconfigure(allow, deny)

    # -- what the main process counts and keeps --------------------------------

    def _flush_touches(self) -> None:
        if self.tokens.touched:
            self.channel.send(wire.encode_json(wire.TOUCH, self.tokens.touched))
            self.tokens.touched = {}

    def counts(self) -> dict[str, Any]:
        factory = self.factory
        return {
            "calls": [[method, outcome, n] for (method, outcome), n
                      in factory.call_counts.items()],
            "dropped": dict(factory.dropped),
            "connections": len(factory.connections),
            "in_flight": sum(proto.calls_in_flight for proto in factory.connections),
        }

    def _send_counts(self, always: bool = False) -> None:
        counts = self.counts()
        key = (tuple(map(tuple, counts["calls"])), tuple(counts["dropped"].items()),
               counts["connections"], counts["in_flight"])
        if always or key != self._counts_sent:
            self._counts_sent = key
            self.channel.send(wire.encode_json(wire.COUNTS, counts))

    def _every_second(self) -> None:
        self._send_counts()
        self.reactor.callLater(COUNTS_INTERVAL, self._every_second)

    def _sync(self, body: bytes) -> None:
        self._flush_touches()
        self._send_counts(always=True)
        self.channel.send(wire.encode_number(wire.SYNCED, wire.decode_number(body)))
        self.channel.flush()

    # -- life ---------------------------------------------------------------------

    def hello(self) -> None:
        self.channel.send(wire.encode_json(wire.HELLO, {
            "index": self.index, "pid": os.getpid(), "position": self.position}))
        self.reactor.callLater(COUNTS_INTERVAL, self._every_second)
        self.reactor.callLater(TOUCH_DELAY, self._touch_loop)

    def _touch_loop(self) -> None:
        self._flush_touches()
        self.channel.flush()
        self.reactor.callLater(TOUCH_DELAY, self._touch_loop)

    def _lost(self, reason: Failure) -> None:
        # The main process is gone (or closed the channel): so is this worker.
        if self.reactor.running:
            self.reactor.stop()

    def log_event(self, event: dict[str, Any]) -> None:
        """A log observer: the event goes to the main process's log."""
        level = event.get("log_level")
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.channel.send(wire.encode_json(wire.LOG, {
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", "-"), "text": text}))


class _WorkerFactory(ThriftServerFactory):
    """Tells the worker which connections are gone."""

    worker: Worker

    def forget(self, proto: ThriftServerProtocol) -> None:
        super().forget(proto)
        self.worker.forget(proto)


def _only_these_descriptors(keep: set[int]) -> None:
    """Close every inherited descriptor but ``keep`` (and 0-2)."""
    highest = 2
    for fd in sorted(keep):
        os.closerange(highest + 1, fd)
        highest = fd
    os.closerange(highest + 1, os.sysconf("SC_OPEN_MAX"))


def _fresh_reactor() -> Any:
    """Install a new BridgeReactor in place of the inherited one (whose
    epoll descriptor is the main process's)."""
    from twisted.internet import main as internet_main

    from bridge.reactor import BridgeReactor

    _inherited.append(sys.modules.pop("twisted.internet.reactor", None))
    process = sys.modules.get("twisted.internet.process")
    if process is not None:
        process.reapProcessHandlers.clear()  # the main process's children
    reactor = BridgeReactor()
    internet_main.installReactor(reactor)
    return reactor


#: What the child inherited and must keep alive: were these collected,
#: their finalizers could close descriptor numbers the worker reuses.
_inherited: list[Any] = []


def serve(index: int, listening: socket.socket, channel_socket: socket.socket,
          context: ssl.SSLContext | None, count: SharedConnectionCount,
          published: wire.PublishedPosition, limits: ConnectionLimits, max_frame: int,
          service_module: Any,
          sessions: dict[int, Session], tokens: dict[str, TokenRecord], position: int,
          channels: ChannelPolicy, keep: Any) -> NoReturn:
    """Run worker ``index`` in this (just forked) process until its channel
    closes; never returns. ``keep`` is everything the main process had
    (kept referenced, see ``_inherited``)."""
    status = 1
    try:
        gc.freeze()  # what was inherited is never scanned (nor collected)
        _inherited.append(keep)
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for signum in (signal.SIGHUP, signal.SIGUSR1):  # a reload, a log reopen: not ours
            signal.signal(signum, signal.SIG_IGN)
        _only_these_descriptors({listening.fileno(), channel_socket.fileno(), count.fd})
        for observer in list(globalLogPublisher._observers):
            globalLogPublisher.removeObserver(observer)
        reactor = _fresh_reactor()
        replica_sessions = ReplicaSessions(dict(sessions), reactor)
        replica_tokens = ReplicaTokens(dict(tokens), reactor)
        factory = _WorkerFactory(service_module, None, max_frame, replace(limits, clock=reactor))
        worker = Worker(index, reactor, replica_sessions, replica_tokens, factory, position,
                        published)
        factory.handler = WorkerCalls(replica_sessions, replica_tokens, worker.rdp, channels)
        factory.worker = worker
        factory.forwarder = worker
        factory.count = count.for_slot(index)
        count.reset(index)  # present, with no connection yet
        globalLogPublisher.addObserver(worker.log_event)
        reactor.adoptStreamConnection(channel_socket.fileno(), socket.AF_UNIX,
                                      Factory.forProtocol(lambda: worker.channel))
        channel_socket.close()
        port = listen_stream(reactor, listening, factory, context, ACCEPTS_PER_READ)
        slot = factory.count
        # Each worker takes its part of the connections: the kernel wakes
        # every process waiting on the socket, and the one already running
        # would otherwise take most of them.
        port.accept_now = lambda: slot.fair_share(range(1, count.slots))

        def pause() -> None:
            port.accepting_paused = True
            port.stopReading()

        def resume() -> None:
            port.accepting_paused = False
            port.startReading()

        factory.pause_accepting = pause
        factory.resume_accepting = resume
        worker.hello()
        reactor.run()
        status = 0
    except BaseException:  # the child must never return into the parent's code
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            status = 1
    finally:
        os._exit(status)
