"""ICP: length-prefixed pbRPC frames on a stream socket, both sides calling.

Three layers, each in its own method group of :class:`IcpProtocol`:

* framing: a big-endian uint32 length and one serialized ``RPCBase``,
  with a per-connection ceiling on the length;
* the connection lifecycle, an explicit machine (``IcpState``):
  connecting -> handshaking -> ready -> closed;
* the call engine: outbound calls keyed by ``tag`` in a table of
  outstanding Deferreds, inbound requests routed by ``msg_type`` to an
  injected handler table.
"""

from __future__ import annotations

import enum
import heapq
import math
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protocols.errors import (
    IcpBackpressureError,
    IcpDisconnectedError,
    IcpFrameTooLargeError,
    IcpHandlerError,
    IcpHandshakeTimeoutError,
    IcpNotConnectedError,
    IcpNotFoundError,
    IcpProtocolError,
    IcpRemoteError,
    IcpTimeoutError,
)
from protocols.generated import ICP_pb2, SBP_pb2, pbRPC_pb2
from protocols.loglimit import LogLimiter
from protocols.transport import TurnBatchedWriter, read_with_recv

RPCBase = pbRPC_pb2.RPCBase
VersionInfo = pbRPC_pb2.VersionInfo
SUCCESS = RPCBase.SUCCESS
FAILED = RPCBase.FAILED
NOTFOUND = RPCBase.NOTFOUND

HANDSHAKE_MSG_TYPE = 0xFFFFFFFF
PROTOCOL_VERSION = (1, 1)
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: The largest frame sent to the peer. ogon's RDP server reads a body with one
#: read() that must return all of it; on Linux a send of up to 32 KiB on a
#: UNIX stream socket is queued whole, so frames up to this size always
#: arrive in one piece (bigger ones break the connection now and then).
DEFAULT_MAX_SEND_FRAME = 32 * 1024
DEFAULT_CALL_TIMEOUT = 10.0
#: A peer that connects must finish the handshake this soon (it holds the
#: only RDP server slot meanwhile).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Bounds on what is queued toward a peer that stops reading: calls waiting
#: for an answer, and bytes not yet taken by the socket. Past either, new
#: calls fail at once instead of growing memory.
DEFAULT_MAX_PENDING = 50_000
DEFAULT_MAX_QUEUED = 16 * 1024 * 1024
_TAG_MASK = 0xFFFFFFFF
_LENGTH = struct.Struct("!I")
# errorDescription is for humans; keep a buggy handler's text from growing frames.
_MAX_ERROR_DESCRIPTION = 200
# Room for the length prefix and RPCBase fields around a request's payload
# (tag, flags, msgType and the payload's own key and length: under 32 bytes).
_ENVELOPE_ALLOWANCE = 32


@dataclass(frozen=True, slots=True)
class IcpMethod:
    """One ICP message type: its number, name and message classes."""

    msg_type: int
    name: str
    request: type[Message]
    response: type[Message]


def _method_table() -> dict[int, IcpMethod]:
    table = {}
    # ICP's own types, and the greeter's SBP types the RDP server forwards.
    for module in (ICP_pb2, SBP_pb2):
        for name, msg_type in module.MSGTYPE.items():
            table[msg_type] = IcpMethod(msg_type, name, getattr(module, f"{name}Request"),
                                        getattr(module, f"{name}Response"))
    return table


#: Every message type of WIRE.md (sections 1 and 4), by msgType value.
ICP_METHODS: Mapping[int, IcpMethod] = _method_table()
MSG_IS_CHANNEL_ALLOWED = ICP_pb2.IsChannelAllowed
MSG_PING = ICP_pb2.Ping
MSG_DISCONNECT_USER_SESSION = ICP_pb2.DisconnectUserSession
MSG_LOGOFF_USER_SESSION = ICP_pb2.LogoffUserSession
MSG_VIRTUAL_CHANNEL_OPEN = ICP_pb2.OtsApiVirtualChannelOpen
MSG_LOGON_USER = ICP_pb2.LogonUser
MSG_SWITCH_TO = ICP_pb2.SwitchTo
MSG_PROPERTY_BOOL = ICP_pb2.PropertyBool
MSG_PROPERTY_NUMBER = ICP_pb2.PropertyNumber
MSG_PROPERTY_STRING = ICP_pb2.PropertyString
MSG_VIRTUAL_CHANNEL_CLOSE = ICP_pb2.OtsApiVirtualChannelClose
MSG_START_REMOTE_CONTROL = ICP_pb2.OtsApiStartRemoteControl
MSG_STOP_REMOTE_CONTROL = ICP_pb2.OtsApiStopRemoteControl
MSG_REMOTE_CONTROL_ENDED = ICP_pb2.RemoteControlEnded
MSG_MESSAGE = ICP_pb2.Message
MSG_PROPERTY_BULK = ICP_pb2.PropertyBulk
MSG_SBP_AUTHENTICATE_USER = SBP_pb2.AuthenticateUser
MSG_SBP_END_SESSION = SBP_pb2.EndSession
MSG_SBP_VERSION_INFO = SBP_pb2.VersionInfo

#: A request handler: takes the decoded request, returns the response message
#: or a Deferred firing with it. Raising IcpHandlerError answers FAILED with
#: its text; any other exception answers FAILED generically and is logged.
Handler: TypeAlias = Callable[[Any], "Message | Deferred[Message]"]


def parse(message_type: type[Message], data: bytes) -> Any:
    """Decode ``data`` strictly: proto2 required fields must all be present
    and strings must be UTF-8 (the Python runtime checks neither: it hands
    out bytes for a string that is not valid UTF-8)."""
    message = message_type.FromString(data)
    if not message.IsInitialized():
        missing = ", ".join(message.FindInitializationErrors())
        raise DecodeError(f"{message_type.__name__} is missing required fields: {missing}")
    if not data.isascii():  # ASCII bytes hold no invalid UTF-8 (checked in C)
        _check_strings(message)
    return message


def parse_envelope(frame: bytes) -> Any:
    """parse(RPCBase, frame), quicker: errorDescription is its only string."""
    rpc = RPCBase.FromString(frame)
    if not rpc.IsInitialized():
        missing = ", ".join(rpc.FindInitializationErrors())
        raise DecodeError(f"RPCBase is missing required fields: {missing}")
    if type(rpc.errorDescription) is bytes:
        raise DecodeError("RPCBase.errorDescription is not valid UTF-8")
    return rpc


# Per message type: its string fields and its message fields, each as
# (name, repeated). Looked up once: walking ListFields and descriptors per
# message was a visible share of a bridged call.
_StringPlan: TypeAlias = tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]]
_STRING_PLANS: dict[type, _StringPlan] = {}


def _string_plan(message_type: type[Message]) -> _StringPlan:
    plan = _STRING_PLANS.get(message_type)
    if plan is None:
        fields = message_type.DESCRIPTOR.fields
        plan = _STRING_PLANS[message_type] = (
            tuple((f.name, f.is_repeated) for f in fields
                  if f.type == FieldDescriptor.TYPE_STRING),
            tuple((f.name, f.is_repeated) for f in fields
                  if f.type == FieldDescriptor.TYPE_MESSAGE))
    return plan


def _check_strings(message: Message) -> None:
    strings, messages = _string_plan(type(message))
    for name, repeated in strings:
        value = getattr(message, name)
        if type(value) is bytes or (repeated and any(type(v) is bytes for v in value)):
            raise DecodeError(f"{type(message).__name__}.{name} is not valid UTF-8")
    for name, repeated in messages:
        if repeated:
            for item in getattr(message, name):
                _check_strings(item)
        elif message.HasField(name):
            _check_strings(getattr(message, name))


_ONE_BYTE_VARINTS = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _request_fields(msg_type: int) -> bytes:
    """RPCBase fields 2-4 of a request (isResponse=false, status=SUCCESS,
    msgType) and the key of field 5 (payload)."""
    return b"\x10\x00\x18\x00\x20" + _varint(msg_type) + b"\x2a"


def request_frame(tag: int, request_fields: bytes, payload: bytes) -> bytes:
    """A framed RPCBase request, byte for byte what ``RPCBase(tag=tag,
    isResponse=False, status=SUCCESS, msgType=..., payload=payload)
    .SerializeToString()`` gives (fields in number order; tests check it),
    without building a message object for every outbound call."""
    body = b"".join((b"\x08", _varint(tag), request_fields, _varint(len(payload)), payload))
    return _LENGTH.pack(len(body)) + body


# What follows the tag in a request of each message type.
_REQUEST_FIELDS = {msg_type: _request_fields(msg_type) for msg_type in ICP_METHODS}


def method_name(msg_type: int) -> str:
    method = ICP_METHODS.get(msg_type)
    if method is not None:
        return method.name
    return "Handshake" if msg_type == HANDSHAKE_MSG_TYPE else f"unknown({msg_type})"


class IcpState(enum.Enum):
    """Where a connection is in its life.

    CONNECTING: the protocol exists, the transport is not there yet.
    HANDSHAKING: connected; only the VersionInfo exchange is accepted.
    READY: calls flow both ways.
    CLOSED: nothing flows; every call fails with the recorded reason.
    """

    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    READY = "ready"
    CLOSED = "closed"


_TRANSITIONS: dict[IcpState, frozenset[IcpState]] = {
    IcpState.CONNECTING: frozenset({IcpState.HANDSHAKING, IcpState.CLOSED}),
    IcpState.HANDSHAKING: frozenset({IcpState.READY, IcpState.CLOSED}),
    IcpState.READY: frozenset({IcpState.CLOSED}),
    IcpState.CLOSED: frozenset(),
}


@implementer(IPushProducer)
class _ReadPauser:
    """Pauses reading from a transport while what we write to it backs up."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _Outstanding:
    """One outbound call waiting for its answer, until ``deadline``."""

    __slots__ = ("deadline", "deferred", "method", "raw", "started", "timeout")

    def __init__(
        self, deferred: Deferred[Any], method: IcpMethod, timeout: float, deadline: float,
        started: float, raw: bool = False,
    ) -> None:
        self.deferred = deferred
        self.method = method
        self.timeout = timeout
        self.started = started
        # The answer is handed on as its payload bytes, not parsed.
        self.raw = raw
        self.deadline = deadline


class IcpProtocol(Protocol):
    """One ICP connection, either end.

    The bridge is the responder (it waits for the RDP server's handshake);
    the stand-in RDP server is the initiator (``initiator=True``).

    Invariants: every tag in ``_pending`` belongs to a call whose Deferred has
    not fired, and has an entry in ``_deadlines``; while ``_pending`` is not
    empty one sweep timer is armed for no later than the earliest deadline;
    once the state is CLOSED ``_pending`` is empty and ``_closed_reason`` is
    set.

    Timeouts: one timer per connection rather than one per call (a
    DelayedCall per call showed in profiles). ``_deadlines`` is a heap of
    (deadline, sequence, tag); entries of calls already answered are
    skipped when they come up.
    """

    log = Logger()
    #: The message types this protocol speaks, and what follows the tag in
    #: a request of each (subclasses for other pbRPC channels replace both).
    methods: Mapping[int, IcpMethod] = ICP_METHODS
    request_fields: Mapping[int, bytes] = _REQUEST_FIELDS
    #: Whether a connection starts with the VersionInfo exchange.
    handshake = True
    #: The first tag this side gives its requests.
    first_tag = 1

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        *,
        clock: IReactorTime | None = None,
        initiator: bool = False,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_send_frame: int = DEFAULT_MAX_SEND_FRAME,
        version: tuple[int, int] = PROTOCOL_VERSION,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_queued: int = DEFAULT_MAX_QUEUED,
        request_counts: Counter[tuple[str, str]] | None = None,
        call_counts: Counter[tuple[str, str]] | None = None,
        observe_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        """For the metrics: ``request_counts`` counts the peer's requests by
        (method, how they were answered: ok, failed, notfound, malformed,
        too_large), ``call_counts`` our calls by (method, outcome: ok,
        failed, notfound, timeout, disconnected, backpressure, too_large,
        not_connected, protocol_error, cancelled, error) and
        ``observe_latency`` gets each answered or failed call's seconds."""
        if clock is None:
            from twisted.internet import reactor as clock  # the global one only as default
        unknown = set(handlers) - set(self.methods)
        if unknown:
            raise ValueError(f"handlers for unknown message types: {sorted(unknown)}")
        self.max_frame_size = max_frame_size
        self.max_send_frame = max_send_frame
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.max_queued = max_queued
        self._handshake_call: IDelayedCall | None = None
        self._backpressure_logged_at = -math.inf
        # The start of a frame whose end has not arrived yet.
        self._partial = bytearray()
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        # For what a peer can cause by the thousand (bad requests, answers
        # too large): one line per kind per 10 s, with a count.
        self.log_limit = LogLimiter(self.clock)
        self.request_counts: Counter[tuple[str, str]] = (
            request_counts if request_counts is not None else Counter())
        self.call_counts: Counter[tuple[str, str]] = (
            call_counts if call_counts is not None else Counter())
        self.observe_latency = observe_latency
        self.handlers = handlers
        self.initiator = initiator
        self.call_timeout = call_timeout
        self.version = version
        self.state = IcpState.CONNECTING
        self.peer_version: tuple[int, int] | None = None
        self._pending: dict[int, _Outstanding] = {}
        self._deadlines: list[tuple[float, int, int]] = []
        self._deadline_sequence = 0
        self._sweep_call: IDelayedCall | None = None
        # When the armed sweep fires (inf: none armed); saves asking the timer.
        self._sweep_at = math.inf
        self._next_tag = self.first_tag
        self._handshake_tag: int | None = None
        self._writer: TurnBatchedWriter | None = None
        self._closed_reason: Exception | None = None
        self._drop_reason: IcpProtocolError | None = None
        self._ready_waiters: list[Deferred[tuple[int, int]]] = []
        self._closed_waiters: list[Deferred[Exception]] = []

    # -- lifecycle -----------------------------------------------------------

    def _enter(self, new: IcpState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"ICP connection cannot go from {self.state.value} to {new.value}")
        self.state = new

    def when_ready(self) -> Deferred[tuple[int, int]]:
        """A new Deferred that fires with the peer's (major, minor) version
        once the handshake is done; fails with the close reason if the
        connection closes first."""
        if self.state is IcpState.READY:
            assert self.peer_version is not None
            return succeed(self.peer_version)
        if self.state is IcpState.CLOSED:
            assert self._closed_reason is not None
            return fail(self._closed_reason)
        d: Deferred[tuple[int, int]] = Deferred()
        self._ready_waiters.append(d)
        return d

    def when_closed(self) -> Deferred[Exception]:
        """A new Deferred that fires with the close reason (an exception
        instance, never a failure) once the connection is gone."""
        if self.state is IcpState.CLOSED and self.transport is None:
            assert self._closed_reason is not None
            return succeed(self._closed_reason)
        d: Deferred[Exception] = Deferred()
        self._closed_waiters.append(d)
        return d

    @property
    def pending_calls(self) -> int:
        return len(self._pending)

    def connectionMade(self) -> None:
        read_with_recv(self.transport)
        self._writer = TurnBatchedWriter(self.transport, frame_limit=self.max_send_frame)
        # While the peer does not take what we send, Twisted pauses our
        # reading of its requests (whose answers would pile up).
        self.transport.registerProducer(_ReadPauser(self.transport), True)
        self._enter(IcpState.HANDSHAKING)
        if not self.handshake:
            self._become_ready(self.version)
            return
        if self.handshake_timeout and not self.initiator:
            self._handshake_call = self.clock.callLater(self.handshake_timeout,
                                                        self._handshake_expired)
        if self.initiator:
            self._handshake_tag = self._allocate_tag()
            self._send(
                RPCBase(
                    tag=self._handshake_tag,
                    isResponse=False,
                    status=SUCCESS,
                    msgType=HANDSHAKE_MSG_TYPE,
                    versionInfo=VersionInfo(vmajor=self.version[0], vminor=self.version[1]),
                )
            )

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        if self.state is IcpState.HANDSHAKING:
            self.drop(IcpHandshakeTimeoutError(
                f"no handshake within {self.handshake_timeout:g} s of connecting"))

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def _become_ready(self, peer_version: tuple[int, int]) -> None:
        self._cancel_handshake_timer()
        self.peer_version = peer_version
        self._enter(IcpState.READY)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(peer_version)

    def _close(self, reason: Exception) -> None:
        """Enter CLOSED and fail everything waiting, at once."""
        if self.state is IcpState.CLOSED:
            return
        self._enter(IcpState.CLOSED)
        self._closed_reason = reason
        self._deadlines.clear()
        self._cancel_sweep()
        self._cancel_handshake_timer()
        # Errbacks may start new calls; those fail at once since we are CLOSED.
        while self._pending:
            _, outstanding = self._pending.popitem()
            self._finished(outstanding, "disconnected")
            outstanding.deferred.errback(reason)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(reason)

    def drop(self, error: IcpProtocolError) -> None:
        """Close this connection because the peer broke the protocol."""
        if self.state is IcpState.CLOSED:
            return
        self.log.error("dropping ICP connection: {reason}", reason=str(error))
        self._drop_reason = error
        self._close(IcpDisconnectedError(f"connection dropped: {error}"))
        self._lose_connection()

    def close(self) -> None:
        """Close the connection on our own initiative (shutdown)."""
        self._close(IcpDisconnectedError("connection closed locally"))
        self._lose_connection()

    def _lose_connection(self) -> None:
        if self._writer is not None:
            self._writer.flush()  # e.g. the handshake answer to a too-new peer
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._writer is not None:
            self._writer.discard()
        cause = self._drop_reason or (reason.value if reason is not None else None)
        self._close(IcpDisconnectedError(f"connection lost: {cause}"))
        self.transport = None
        assert self._closed_reason is not None
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(self._closed_reason)

    # -- framing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._partial:
            partial = self._partial
            partial += data
            del partial[: self._frames(partial)]
        else:
            # The usual read: whole frames, taken from ``data`` itself.
            used = self._frames(data)
            if used < len(data):
                self._partial += memoryview(data)[used:]

    def _frames(self, buffer: bytes | bytearray) -> int:
        """Handle every whole frame at the start of ``buffer``; returns how
        many bytes they took (all of them once the connection is closed:
        the rest of a read that arrived after we decided to drop)."""
        size = len(buffer)
        offset = 0
        while size - offset >= 4 and self.state is not IcpState.CLOSED:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > self.max_frame_size:
                self.drop(IcpProtocolError(
                    f"frame length {length} exceeds the limit of {self.max_frame_size} bytes"))
                break
            end = offset + 4 + length
            if end > size:
                break
            self._frame_received(bytes(buffer[offset + 4 : end]))
            offset = end
        return size if self.state is IcpState.CLOSED else offset

    def _frame_received(self, frame: bytes) -> None:
        try:
            rpc = parse_envelope(frame)
        except DecodeError as e:
            self.drop(IcpProtocolError(f"unparseable frame of {len(frame)} bytes ({e})"))
            return
        if self.state is IcpState.READY:
            if rpc.isResponse:
                self._response_received(rpc)
            else:
                self._request_received(rpc)
        else:
            self._handshake_received(rpc)

    def _send(self, rpc: RPCBase, batch: bool = True) -> None:
        if self._writer is None or self.transport is None:
            return
        body = rpc.SerializeToString()
        self._writer.write(_LENGTH.pack(len(body)) + body, batch)

    def _method_name(self, msg_type: int) -> str:
        method = self.methods.get(msg_type)
        return method.name if method is not None else method_name(msg_type)

    # -- handshake -----------------------------------------------------------

    def _handshake_received(self, rpc: RPCBase) -> None:
        if rpc.msgType != HANDSHAKE_MSG_TYPE or not rpc.HasField("versionInfo"):
            self.drop(
                IcpProtocolError(
                    f"expected a handshake, got {self._method_name(rpc.msgType)} "
                    f"({'response' if rpc.isResponse else 'request'}, tag {rpc.tag})"
                )
            )
            return
        peer = (rpc.versionInfo.vmajor, rpc.versionInfo.vminor)
        if self.initiator:
            if not rpc.isResponse or rpc.tag != self._handshake_tag:
                self.drop(IcpProtocolError(f"unexpected handshake frame (tag {rpc.tag})"))
            elif rpc.status != SUCCESS or peer[0] != self.version[0]:
                self.drop(
                    IcpProtocolError(f"peer refused or speaks ICP {peer[0]}.{peer[1]}")
                )
            else:
                self._become_ready(peer)
            return
        if rpc.isResponse:
            self.drop(IcpProtocolError("got a handshake response, but we did not ask"))
            return
        self._send(
            RPCBase(
                tag=rpc.tag,
                isResponse=True,
                status=SUCCESS,
                msgType=HANDSHAKE_MSG_TYPE,
                versionInfo=VersionInfo(vmajor=self.version[0], vminor=self.version[1]),
            )
        )
        if peer[0] > self.version[0]:
            self.drop(
                IcpProtocolError(
                    f"peer speaks ICP {peer[0]}.{peer[1]}, newer than our "
                    f"{self.version[0]}.{self.version[1]}"
                )
            )
            return
        self._become_ready(peer)

    # -- outbound calls ------------------------------------------------------

    def _allocate_tag(self) -> int:
        tag = self._next_tag
        while tag in self._pending or tag == self._handshake_tag:
            tag = (tag + 1) & _TAG_MASK
        self._next_tag = (tag + 1) & _TAG_MASK
        return tag

    def call(self, msg_type: int, request: Message, timeout: float | None = None) -> Deferred[Any]:
        """Send a request to the peer.

        Returns a Deferred that fires with the decoded response message, or
        fails with IcpTimeoutError (no answer within ``timeout``, default the
        connection's call timeout), IcpRemoteError (peer answered FAILED),
        IcpNotFoundError (peer answered NOTFOUND), IcpProtocolError (answer
        not decodable), IcpDisconnectedError (connection gone before or
        during the call), IcpNotConnectedError (handshake not done yet) or
        IcpFrameTooLargeError (not sent: too big for the peer). A timeout of
        ``math.inf`` waits for the answer or the connection's end.
        Cancelling it forgets the call; a late answer is then ignored.
        """
        method = self.methods[msg_type]
        if self.state is not IcpState.READY:
            return self._not_ready(method)
        if not isinstance(request, method.request):
            raise TypeError(f"{method.name} needs a {method.request.__name__}")
        try:
            payload = request.SerializeToString()
        except EncodeError as e:
            self.call_counts[method.name, "error"] += 1
            return fail(e)
        return self._call(method, payload, timeout, False)

    def call_payload(self, msg_type: int, payload: bytes, timeout: float | None = None
                     ) -> Deferred[bytes]:
        """``call`` for a request serialized elsewhere (an OTS API worker's):
        fires with the answer's payload bytes, unparsed (the caller parses
        it), and fails as ``call`` does."""
        method = ICP_METHODS[msg_type]
        if self.state is not IcpState.READY:
            return self._not_ready(method)
        return self._call(method, payload, timeout, True)

    def _not_ready(self, method: IcpMethod) -> Deferred[Any]:
        if self.state is IcpState.CLOSED:
            assert self._closed_reason is not None
            self.call_counts[method.name, "disconnected"] += 1
            return fail(self._closed_reason)
        self.call_counts[method.name, "not_connected"] += 1
        return fail(IcpNotConnectedError(f"ICP connection is {self.state.value}"))

    def _call(self, method: IcpMethod, payload: bytes, timeout: float | None, raw: bool
              ) -> Deferred[Any]:
        msg_type = method.msg_type
        if len(payload) + _ENVELOPE_ALLOWANCE > self.max_send_frame:
            self.call_counts[method.name, "too_large"] += 1
            self.log.error(
                "not sending {method} request of {size} bytes: over the {limit}-byte frame "
                "limit", method=method.name, size=len(payload), limit=self.max_send_frame)
            return fail(IcpFrameTooLargeError(
                f"{method.name} request of {len(payload)} bytes exceeds the "
                f"{self.max_send_frame}-byte frame limit"))
        writer = self._writer
        assert writer is not None  # READY implies connected
        if len(self._pending) >= self.max_pending or (
                writer.maybe_queued and writer.queued > self.max_queued):
            now = self.clock.seconds()
            if now - self._backpressure_logged_at >= 10:
                self.log.warn("peer is not keeping up ({pending} calls waiting, {queued} bytes "
                              "not sent): failing new calls at once", pending=len(self._pending),
                              queued=self._writer.queued)
                self._backpressure_logged_at = now
            self.call_counts[method.name, "backpressure"] += 1
            return fail(IcpBackpressureError(
                f"{len(self._pending)} calls waiting and {self._writer.queued} bytes unsent "
                f"to the peer"))
        tag = self._allocate_tag()
        # Like Nagle: a lone call goes out at once; while others are in
        # flight their answers will wake us anyway, so frames are coalesced.
        batch = bool(self._pending)
        d: Deferred[Any] = Deferred(lambda _: self._forget(tag))
        if timeout is None:
            timeout = self.call_timeout
        now = self.clock.seconds()
        deadline = now + timeout
        self._pending[tag] = _Outstanding(d, method, timeout, deadline, now, raw)
        self._deadline_sequence += 1
        heapq.heappush(self._deadlines, (deadline, self._deadline_sequence, tag))
        if deadline < self._sweep_at:
            self._arm_sweep(deadline)
        self._writer.write(request_frame(tag, self.request_fields[msg_type], payload), batch)
        return d

    def _forget(self, tag: int) -> None:
        outstanding = self._pending.pop(tag, None)
        if outstanding is not None:
            self._finished(outstanding, "cancelled")
        self._prune_deadlines()

    def _finished(self, outstanding: _Outstanding, outcome: str) -> None:
        """Count a call that ended (answered, failed, timed out, gone)."""
        name = outstanding.method.name
        self.call_counts[name, outcome] += 1
        observe = self.observe_latency
        if observe is not None:
            observe(name, self.clock.seconds() - outstanding.started)

    def _prune_deadlines(self) -> None:
        """Drop heap entries of answered calls from the front (they come in
        roughly in call order, so this keeps the heap near the number of
        calls in flight). The sweep timer stays armed even when nothing is
        left to time: cancelling and re-arming it on every call of a
        sequential client cost more than one idle wake-up per timeout."""
        deadlines, pending = self._deadlines, self._pending
        while deadlines and deadlines[0][2] not in pending:
            heapq.heappop(deadlines)

    def _arm_sweep(self, deadline: float) -> None:
        self._cancel_sweep()
        if math.isinf(deadline):
            return  # only calls without a deadline are left
        self._sweep_at = deadline
        self._sweep_call = self.clock.callLater(
            max(0.0, deadline - self.clock.seconds()), self._sweep
        )

    def _cancel_sweep(self) -> None:
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        self._sweep_at = math.inf

    def _sweep(self) -> None:
        """Fail every call whose deadline has passed; re-arm for the next."""
        self._sweep_call = None
        self._sweep_at = math.inf
        now = self.clock.seconds()
        deadlines = self._deadlines
        expired = []
        while deadlines and deadlines[0][0] <= now:
            deadline, _, tag = heapq.heappop(deadlines)
            outstanding = self._pending.get(tag)
            # A reused tag has a later deadline: that entry is still to come.
            if outstanding is not None and outstanding.deadline == deadline:
                del self._pending[tag]
                expired.append(outstanding)
        self._prune_deadlines()
        if deadlines:
            self._arm_sweep(deadlines[0][0])
        for outstanding in expired:
            self._finished(outstanding, "timeout")
            outstanding.deferred.errback(
                IcpTimeoutError(outstanding.method.msg_type, outstanding.timeout)
            )

    def _response_received(self, rpc: RPCBase) -> None:
        outstanding = self._pending.pop(rpc.tag, None)
        if outstanding is None:
            self.log_limit.warn(
                self.log, "unknown tag",
                "ignoring ICP response with unknown tag {tag} ({method})",
                tag=rpc.tag,
                method=self._method_name(rpc.msgType),
            )
            return
        method = outstanding.method
        d = outstanding.deferred
        if rpc.msgType != method.msg_type:
            self._finished(outstanding, "protocol_error")
            d.errback(
                IcpProtocolError(
                    f"answer to {method.name} (tag {rpc.tag}) came as "
                    f"{self._method_name(rpc.msgType)}"
                )
            )
        elif rpc.status == SUCCESS:
            try:
                response = rpc.payload if outstanding.raw else parse(method.response, rpc.payload)
            except DecodeError as e:
                self._finished(outstanding, "protocol_error")
                d.errback(IcpProtocolError(f"undecodable {method.name} answer: {e}"))
            else:
                name = method.name  # _finished, inline: once per answered call
                self.call_counts[name, "ok"] += 1
                observe = self.observe_latency
                if observe is not None:
                    observe(name, self.clock.seconds() - outstanding.started)
                d.callback(response)
        elif rpc.status == NOTFOUND:
            self._finished(outstanding, "notfound")
            d.errback(IcpNotFoundError(method.msg_type))
        else:
            self._finished(outstanding, "failed")
            d.errback(IcpRemoteError(method.msg_type, rpc.errorDescription))
        # Bookkeeping after the answer is on its way, not before.
        self._prune_deadlines()

    # -- inbound requests ----------------------------------------------------

    def _request_received(self, rpc: RPCBase) -> None:
        tag, msg_type = rpc.tag, rpc.msgType
        handler = self.handlers.get(msg_type)
        if handler is None:
            self.request_counts[self._method_name(msg_type), "notfound"] += 1
            self.log.info(
                "answering NOTFOUND to ICP request {method} (tag {tag})",
                method=self._method_name(msg_type),
                tag=tag,
            )
            self._send(RPCBase(tag=tag, isResponse=True, status=NOTFOUND, msgType=msg_type))
            return
        method = self.methods[msg_type]
        try:
            request = parse(method.request, rpc.payload)
        except DecodeError as e:
            self.request_counts[method.name, "malformed"] += 1
            self.log_limit.warn(
                self.log, ("malformed", msg_type),
                "malformed {method} request (tag {tag}): {error}",
                method=method.name, tag=tag, error=str(e),
            )
            self._answer_failed(tag, msg_type, f"malformed {method.name}Request")
            return
        try:
            result = handler(request)
        except Exception:
            self._handler_failed(Failure(), tag, method)
            return
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._answer, self._handler_failed, callbackArgs=(tag, method),
                errbackArgs=(tag, method),
            )
        else:
            self._answer(result, tag, method)

    def _answer(self, response: Message, tag: int, method: IcpMethod) -> None:
        if self.state is not IcpState.READY:
            self.log.debug("connection gone; dropping answer to {method}", method=method.name)
            return
        if not isinstance(response, method.response):
            self.log.error(
                "{method} handler returned {kind}, not {expected}",
                method=method.name, kind=type(response).__name__,
                expected=method.response.__name__,
            )
            self.request_counts[method.name, "failed"] += 1
            self._answer_failed(tag, method.msg_type, "internal error")
            return
        try:
            payload = response.SerializeToString()
        except EncodeError as e:
            self.log.error(
                "{method} handler returned an incomplete response: {error}",
                method=method.name, error=str(e),
            )
            self.request_counts[method.name, "failed"] += 1
            self._answer_failed(tag, method.msg_type, "internal error")
            return
        body = RPCBase(tag=tag, isResponse=True, status=SUCCESS, msgType=method.msg_type,
                       payload=payload).SerializeToString()
        if len(body) + 4 > self.max_send_frame:
            self.log_limit.error(
                self.log, ("too large", method.msg_type),
                "{method} answer (tag {tag}) is {size} bytes, over the {limit}-byte frame limit "
                "an ogon RDP server reads reliably; answering FAILED instead",
                method=method.name, tag=tag, size=len(body) + 4, limit=self.max_send_frame)
            self.request_counts[method.name, "too_large"] += 1
            self._answer_failed(tag, method.msg_type, "answer too large")
            return
        self.request_counts[method.name, "ok"] += 1
        if self._writer is not None and self.transport is not None:
            self._writer.write(_LENGTH.pack(len(body)) + body)

    def _handler_failed(self, failure: Failure, tag: int, method: IcpMethod) -> None:
        self.request_counts[method.name, "failed"] += 1
        if failure.check(IcpHandlerError):
            self.log.info(
                "{method} refused (tag {tag}): {reason}", method=method.name, tag=tag,
                reason=str(failure.value),
            )
            description = str(failure.value) if failure.value.on_wire else ""
        else:
            description = f"internal error in {method.name}"
            self.log.failure("{method} handler failed (tag {tag})", failure,
                             method=method.name, tag=tag)
        if self.state is IcpState.READY:
            self._answer_failed(tag, method.msg_type, description)

    def _answer_failed(self, tag: int, msg_type: int, description: str) -> None:
        """FAILED, no payload; errorDescription only when there is one (as
        ogon's RpcEngine::send)."""
        rpc = RPCBase(tag=tag, isResponse=True, status=FAILED, msgType=msg_type)
        if description:
            rpc.errorDescription = description[:_MAX_ERROR_DESCRIPTION]
        self._send(rpc)
