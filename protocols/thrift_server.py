"""A Thrift server protocol on Twisted: binary protocol, framed transport,
handlers that may return Deferreds.

Compared with thrift's own ``TTwisted.ThriftServerProtocol`` it also:
names a transport mismatch instead of closing silently (an unframed binary
client's first word 0x8001.... is served, unframed; TLS, HTTP and compact
protocol clients get a log line naming the client setting to change); logs
handler failures through twisted.logger and answers that one call with
TApplicationException(INTERNAL_ERROR); and encodes with the C accelerated
binary protocol when thrift's ``fastbinary`` extension is present.

It defends itself (``ConnectionLimits``): a cap on connections (refused at
once, not queued, and never taking the descriptors kept in reserve), a
frame that must complete once begun, a first call and a TLS handshake that
must come in time, an idle limit, no more calls in flight per connection
than a cap, reading paused while a client does not read its replies (and
the connection closed if their backlog still grows), and strings, method
names and containers far shorter than a frame. Every close says why.
"""

from __future__ import annotations

import contextvars
import fcntl
import struct
import termios
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from operator import attrgetter
from types import ModuleType
from typing import Any
from typing import Protocol as Protocol_

from thrift.protocol import TBinaryProtocol
from thrift.protocol.TProtocol import TProtocolException
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer, TTransportException
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protocols.localpeer import is_loopback, tcp_owner_uid
from protocols.loglimit import LogLimiter
from protocols.transport import is_plain_socket, write_now

try:  # the C extension; without it the pure-Python codec is used.
    from thrift.protocol import fastbinary
except ImportError:  # pragma: no cover - depends on how thrift was built
    fastbinary = None

DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024
# OTS API strings are tokens, names, paths and message texts: far below a frame.
DEFAULT_STRING_LIMIT = 64 * 1024
DEFAULT_CONTAINER_LIMIT = 4096
# A method name longer than any in the IDL is not a call.
MAX_METHOD_NAME = 64
_VERSION_1 = TBinaryProtocol.TBinaryProtocol.VERSION_1
_VERSION_MASK = TBinaryProtocol.TBinaryProtocol.VERSION_MASK
_HEADER = struct.Struct("!i")
_TWO_INTS = struct.Struct("!iI")
_BYTE = struct.Struct("!b")


class _BadMessageError(Exception):
    """A message header that does not decode."""


class ForwardCall(Exception):  # noqa: N818 - a request, not an error
    """Raised by a handler method of a process that forwards calls: this
    call is to be answered by the process the calls are forwarded to (the
    handler would refuse it, or does not know enough to answer it)."""


class CallForwarder(Protocol_):
    """Where a connection of a worker process sends the calls it does not
    answer itself (see ThriftServerFactory.forwarder)."""

    #: Methods answered in this process; every other one is forwarded.
    local: frozenset[str]

    def behind(self) -> bool:
        """Whether this process's state may be older than what a client
        has seen: then every call is forwarded."""

    def forward(self, proto: ThriftServerProtocol, message: bytes, host: str,
                source: str) -> None:
        """Send ``message`` (one whole Thrift message) on, with the client's
        ``host`` and ``source`` (current_peer's and current_source's values,
        "" for a method that reads neither); its reply comes back through
        ``proto.forwarded_reply``."""


class ReplyGate(Protocol_):
    """What replies wait for before they leave (see ThriftServerFactory.gate)."""

    #: False while replies must wait; then ``hold`` them.
    open: bool

    def hold(self, send: Callable[[], None]) -> None:
        """Call ``send`` once replies may leave again, in the order held."""


class ConnectionCount(Protocol_):
    """The count of open connections against ``max_connections``, kept
    across processes when several share a listening socket."""

    def take(self, limit: int) -> bool:
        """Count one more connection if fewer than ``limit`` are open."""

    def give(self) -> None:
        """One connection closed."""


#: While a handler method runs: the client's address ("host" of TCP/TLS,
#: "" when unknown), for per-address policies and for saying who did what.
current_peer: contextvars.ContextVar[str] = contextvars.ContextVar("current_peer", default="")
#: Alongside: who the client is, for per-client policies such as logon
#: throttling: its address, but for a client on this host's loopback
#: ``uid:N`` of the local user who opened the connection (every local
#: client shares the address), or UNKNOWN_LOCAL_SOURCE; "" when unknown
#: (a UNIX socket endpoint).
current_source: contextvars.ContextVar[str] = contextvars.ContextVar("current_source",
                                                                    default="")
#: The source of every loopback client whose socket's owner the kernel
#: could not name (its socket was gone by the time the connection was
#: accepted): one shared source that locks out like any other, so that
#: vanishing cannot escape counting.
UNKNOWN_LOCAL_SOURCE = "uid:unknown"


def _protocol_factory(string_limit: int = DEFAULT_STRING_LIMIT,
                      container_limit: int = DEFAULT_CONTAINER_LIMIT) -> Any:
    if fastbinary is not None:
        return TBinaryProtocol.TBinaryProtocolAcceleratedFactory(
            string_length_limit=string_limit, container_length_limit=container_limit)
    return TBinaryProtocol.TBinaryProtocolFactory(
        string_length_limit=string_limit, container_length_limit=container_limit)


def shown(text: str | bytes, limit: int = MAX_METHOD_NAME) -> str:
    """A client's string as it may appear in a log line or an error reply:
    at most ``limit`` characters, with its real length when cut."""
    if isinstance(text, bytes):
        cut = text[:limit].decode("utf-8", "replace")
    else:
        cut = text[:limit]
    return cut if len(text) <= limit else f"{cut}... ({len(text)} bytes)"


@dataclass
class ConnectionLimits:
    """What one OTS API listener tolerates (0 disables a timeout)."""

    max_connections: int = 16384
    # Descriptors kept free for the RDP server, state, backends: a new
    # connection whose descriptor lands in this reserve is refused.
    fd_reserve: int = 256
    fd_limit: int | None = None
    frame_timeout: float = 10.0
    first_call_timeout: float = 30.0
    tls_handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_calls_in_flight: int = 1000
    # TLS handshakes in progress at once. Later connections are accepted but
    # not read until one finishes (first come, first served), instead of
    # spreading the CPU over every handshake so that none finishes in time.
    max_handshakes: int = 64
    # Connections waiting for their handshake. Past this the listener stops
    # accepting: further clients wait in the kernel's backlog, costing no
    # memory here (a TLS connection costs ~50 KB before it is used).
    max_handshake_queue: int = 2048
    # A connection closed with more than abort_output waiting is aborted (it
    # does not read: its replies would never drain). Reading pauses at
    # Twisted's own write buffer size; above max_pending_output the client
    # is dropped.
    abort_output: int = 256 * 1024
    max_pending_output: int = 16 * 1024 * 1024
    string_limit: int = DEFAULT_STRING_LIMIT
    container_limit: int = DEFAULT_CONTAINER_LIMIT
    clock: IReactorTime | None = field(default=None, repr=False)

    def sweep_interval(self) -> float:
        """How often the timeouts are checked: a quarter of the shortest."""
        timeouts = [t for t in (self.frame_timeout, self.first_call_timeout,
                                self.tls_handshake_timeout, self.idle_timeout) if t > 0]
        return max(0.25, min(timeouts, default=4.0) / 4)


@dataclass(frozen=True)
class ThriftMethod:
    """One service method, from the generated ``<name>_args``/``_result``."""

    name: str
    args_type: type
    result_type: type
    oneway: bool
    # A REPLY's message header up to its seqid (strict binary), built once.
    reply_prefix: bytes
    # args struct -> the handler's positional arguments, in IDL order.
    arguments: Callable[[Any], tuple[Any, ...]]


def _argument_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """Reads every argument in one C call (attrgetter), where a generator of
    getattr calls showed in profiles. attrgetter returns a bare value for a
    single name and needs at least one."""
    if not names:
        return lambda args: ()
    if len(names) == 1:
        get_one = attrgetter(names[0])
        return lambda args: (get_one(args),)
    return attrgetter(*names)


def service_methods(service_module: ModuleType) -> dict[str, ThriftMethod]:
    """Every method of a generated service module, by wire name."""
    methods = {}
    names = [attr[: -len("_args")] for attr in vars(service_module) if attr.endswith("_args")]
    for name in names:
        args_type = getattr(service_module, f"{name}_args")
        result_type = getattr(service_module, f"{name}_result", None)
        arg_names = tuple(spec[2] for spec in args_type.thrift_spec if spec is not None)
        encoded = name.encode()
        methods[name] = ThriftMethod(
            name, args_type, result_type, oneway=result_type is None,
            reply_prefix=_TWO_INTS.pack(_VERSION_1 | TMessageType.REPLY, len(encoded)) + encoded,
            arguments=_argument_getter(arg_names),
        )
    return methods


def describe_mismatch(first: bytes) -> str | None:
    """If the first bytes of a connection show a client that is not
    framed-binary Thrift, say what it is and what to change; else None."""
    if first[:2] == b"\x16\x03":
        return ("client started a TLS handshake on a plain-TCP endpoint: "
                "listen with an ssl: endpoint, or connect without TLS")
    if first[:1] == b"\x82":
        return ("client speaks the compact protocol: this server speaks the binary "
                "protocol (use TBinaryProtocol)")
    if first[:1] in (b"[", b"{"):
        return "client speaks the JSON protocol: use TBinaryProtocol with TFramedTransport"
    if first[:4] in (b"POST", b"GET ", b"PUT ", b"HEAD"):
        return "client speaks HTTP: use a socket transport with TFramedTransport"
    return None


class Outcome:
    """A handler's answer that did not do what was asked, for the metrics:
    ``Outcome(value, REFUSED)`` (the caller may not: token, permission, no
    such session) or ``Outcome(value, FAILED)`` (it could not be done: no
    RDP server, no answer in time, nothing stored). The client gets
    ``value`` as usual; a plain value counts as ``ANSWERED``."""

    __slots__ = ("outcome", "value")

    def __init__(self, value: Any, outcome: str) -> None:
        self.value = value
        self.outcome = outcome


#: How calls end, the ``outcome`` label of the call counts: answered (the
#: handler did it), refused and failed (an Outcome), error (the handler
#: raised), bad_request (unknown method, undecodable arguments).
ANSWERED, REFUSED, FAILED = "answered", "refused", "failed"


def refused(value: Any) -> Outcome:
    return Outcome(value, REFUSED)


def failed(value: Any) -> Outcome:
    return Outcome(value, FAILED)


#: The method label of calls to methods the service does not have (the
#: client's name is not used: it would let clients invent label values).
UNKNOWN_METHOD = "(unknown)"


@implementer(IHandshakeListener)
class ThriftServerProtocol(Protocol):
    """Serves one Thrift client connection.

    ``_mode`` is None until the first four bytes say what the client
    speaks, then "framed" or "unframed" for the connection's life.
    """

    log = Logger()

    def __init__(self, methods: Mapping[str, ThriftMethod], handler: Any,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 limits: ConnectionLimits | None = None) -> None:
        self.methods = methods
        self.handler = handler
        self.max_frame_size = max_frame_size
        self.limits = limits or ConnectionLimits()
        self._buffer = bytearray()
        self._mode: str | None = None
        # Set once the connection is closing: no further requests are served.
        self._closing = False
        # Shared by the factory's connections: what clients can cause by the
        # thousand is logged once per kind per 10 s, with a count.
        self.log_limit: LogLimiter | None = None
        # Counts for the metrics (the factory's, shared, once built by it):
        # calls by (method, outcome), connections closed by limit.
        self.call_counts: Counter[tuple[str, str]] = Counter()
        self.dropped: Counter[str] = Counter()
        # Bookkeeping for the limits (times on the factory's clock).
        self.connected_at = 0.0
        self.last_activity = 0.0
        self.calls_in_flight = 0
        self.calls_served = 0
        self.frame_started_at: float | None = None
        self._handshaking = False
        self._clock: IReactorTime | None = None  # the factory's, once admitted
        self._paused_for: set[str] = set()
        self._host: str | None = None
        self._source: str | None = None
        self._protocol_factory = _protocol_factory(self.limits.string_limit,
                                                   self.limits.container_limit)
        # One decoding protocol per connection, pointed at each message in
        # turn: allocating a protocol and buffer per call showed in profiles.
        self._input = TMemoryBuffer()
        self._iprot = self._protocol_factory.getProtocol(self._input)
        self._by_name = {name.encode(): method for name, method in methods.items()}
        # Methods that read current_peer (None: all); setting it costs per call.
        self._peer_methods: frozenset[str] | None = getattr(handler, "methods_wanting_peer",
                                                            None)
        self._max_in_flight = self.limits.max_calls_in_flight
        # Set by the factory: where calls not answered here go, and what
        # replies wait for (see ThriftServerFactory).
        self.forwarder: CallForwarder | None = None
        self.gate: ReplyGate | None = None
        # Forwarded calls not answered yet: while there are any, later calls
        # are forwarded too, so that they are answered in the order of the
        # connection, as by a single process.
        self.forwarded_in_flight = 0

    def connectionMade(self) -> None:
        self._plain = is_plain_socket(self.transport)
        factory = getattr(self, "factory", None)
        if factory is not None and not factory.admit(self):
            self._closing = True
            self.transport.abortConnection()
            return
        # Who the client is, asked now, before any frame is read: the
        # kernel names a loopback client's owner only while the client's
        # socket exists, and a client that sends a call and resets at once
        # has none by the time its frame is handled.
        self._source = self._identify()
        self._handshaking = self.tls_pending
        if self._handshaking and factory is not None:
            factory.handshake_started(self)
        # Twisted pauses us (stops our reading) while our replies back up.
        self.transport.registerProducer(_ReadPauser(self), True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Replies to calls still running are dropped from now on.
        self.connected = False
        self._closing = True
        self._buffer.clear()
        factory = getattr(self, "factory", None)
        if factory is not None:
            if self._handshaking:
                self._handshaking = False
                factory.handshake_ended(self)
            factory.forget(self)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        factory = getattr(self, "factory", None)
        if self._handshaking and factory is not None:
            self._handshaking = False
            factory.handshake_ended(self)

    @property
    def tls_pending(self) -> bool:
        """A TLS connection whose handshake has not finished (Twisted's TLS
        wrapper is our transport then)."""
        return getattr(self.transport, "_handshakeDone", True) is False

    def pending_output(self) -> int:
        """Bytes of replies Twisted holds for a client that does not read."""
        transport = self.transport
        raw = getattr(transport, "transport", None)  # under TLS: the socket's own buffer
        total = 0
        for t in (transport, raw):
            if t is not None:
                total += len(getattr(t, "dataBuffer", b"")) - getattr(t, "offset", 0)
                total += getattr(t, "_tempDataLen", 0)
        return max(0, total)

    def pause(self, why: str) -> None:
        if not self._paused_for and self.transport is not None:
            self.transport.pauseProducing()
        self._paused_for.add(why)

    def resume(self, why: str) -> None:
        if why not in self._paused_for:
            return
        self._paused_for.discard(why)
        if not self._paused_for and self.transport is not None and not self._closing:
            self.transport.resumeProducing()
            if self._buffer and self._clock is not None:
                # The rest of a frame could not come while we were not
                # reading: its time starts again now.
                self.frame_started_at = self._clock.seconds()

    def drop(self, reason: str, kind: str) -> None:
        """Close the connection because a limit was reached (``kind`` names
        the limit, for the counts)."""
        if self._closing:
            return
        self._reject(reason, kind)

    # -- bytes in -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._clock is not None:
            self.last_activity = self._clock.seconds()
        if self._mode == "framed" and not self._buffer:
            # The usual read: whole frames and nothing held back, so they are
            # taken from ``data`` itself; only an incomplete tail is kept.
            used = self._framed_messages(data)
            if used < len(data):
                self._buffer += memoryview(data)[used:]
                self.frame_started_at = self.last_activity
            return
        self._buffer += data
        try:
            self._buffered()
        finally:
            # A frame begun and not finished is timed from its first byte.
            if not self._buffer:
                self.frame_started_at = None
            elif self.frame_started_at is None:
                self.frame_started_at = self.last_activity

    def _buffered(self) -> None:
        if self._mode is None:
            if len(self._buffer) < 4:
                return
            if not self._detect_mode():
                return
        if self._mode == "framed":
            del self._buffer[: self._framed_messages(self._buffer)]
        else:
            self._unframed_messages()

    def _detect_mode(self) -> bool:
        first = bytes(self._buffer[:4])
        mismatch = describe_mismatch(first)
        if mismatch is not None:
            self._reject(mismatch)
            return False
        if first[:2] == b"\x80\x01":
            self._mode = "unframed"
            self._warn(
                "unframed",
                "OTS API client {peer} uses the unframed (buffered) transport; serving it, "
                "but configure the client with TFramedTransport",
                peer=self._peer(),
            )
        else:
            self._mode = "framed"
        return True

    def _framed_messages(self, buffer: bytes | bytearray) -> int:
        """Serve every whole frame at the start of ``buffer``; returns how
        many bytes they took (all of them once the connection is closing)."""
        size = len(buffer)
        offset = 0
        while size - offset >= 4 and not self._closing:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length < 0 or length > self.max_frame_size:
                self._reject(
                    f"frame length {length} is outside 0..{self.max_frame_size} bytes"
                )
                break
            end = offset + 4 + length
            if end > size:
                break
            self._message(bytes(buffer[offset + 4 : end]), True)
            offset = end
        return size if self._closing else offset

    def _unframed_messages(self) -> None:
        # No length prefix: find where one message ends by skipping over it.
        while self._buffer and not self._closing:
            data = bytes(self._buffer)
            transport = TMemoryBuffer(data)
            iprot = TBinaryProtocol.TBinaryProtocol(transport)
            try:
                iprot.readMessageBegin()
                iprot.skip(TType.STRUCT)
                iprot.readMessageEnd()
            except (EOFError, TTransportException, struct.error):
                if len(data) > self.max_frame_size:
                    self._reject(f"unframed message over {self.max_frame_size} bytes")
                return
            except TProtocolException as e:
                self._reject(f"undecodable Thrift message: {e}")
                return
            end = transport._buffer.tell()
            del self._buffer[:end]
            self._message(data[:end], False)

    def _warn(self, kind: str, format: str, **kwargs: Any) -> None:
        if self.log_limit is None:
            self.log.warn(format, **kwargs)
        else:
            self.log_limit.warn(self.log, kind, format, **kwargs)

    def _reject(self, reason: str, kind: str = "bad_data") -> None:
        self.dropped[kind] += 1
        self._warn("close " + kind, "closing OTS API connection from {peer}: {reason}",
                   peer=self._peer(), reason=reason)
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()
        if self.pending_output() > self.limits.abort_output:
            # It does not read: do not wait for it to take what is queued.
            self.transport.abortConnection()

    def _peer_host(self) -> str:
        host = self._host
        if host is None:  # asked per call: getPeer builds a new address object
            try:
                host = str(getattr(self.transport.getPeer(), "host", ""))
            except Exception:
                host = ""
            self._host = host
        return host

    def _peer_source(self) -> str:
        """current_source's value for this connection (found when it was
        accepted)."""
        source = self._source
        if source is None:  # a protocol never connected through connectionMade
            source = self._source = self._identify()
        return source

    def _identify(self) -> str:
        """Who the client is: its address, or for a loopback client the
        uid owning its socket (asked of the kernel), UNKNOWN_LOCAL_SOURCE
        when the kernel cannot name one."""
        source = self._peer_host()
        if source and is_loopback(source):
            try:
                peer, local = self.transport.getPeer(), self.transport.getHost()
                uid = tcp_owner_uid((peer.host, peer.port), (local.host, local.port))
            except Exception:
                uid = None
            source = f"uid:{uid}" if uid is not None else UNKNOWN_LOCAL_SOURCE
        return source

    def _peer(self) -> str:
        try:
            address = self.transport.getPeer()
        except Exception:
            return "unknown peer"
        host = getattr(address, "host", None)
        return f"{host}:{address.port}" if host is not None else str(address)

    # -- one call ---------------------------------------------------------------

    @staticmethod
    def _header(data: bytes) -> tuple[bytes, int, int, int]:
        """(name, message type, seqid, offset of the arguments) of a strict
        or old-style (non-strict) binary message."""
        try:
            (word,) = _HEADER.unpack_from(data, 0)
            if word < 0:
                if word & _VERSION_MASK != _VERSION_1:
                    raise _BadMessageError(f"bad binary protocol version 0x{word & 0xFFFFFFFF:08x}")
                (length,) = _HEADER.unpack_from(data, 4)
                if not 0 <= length <= MAX_METHOD_NAME:
                    raise _BadMessageError(f"method name of {length} bytes")
                name_end = 8 + length
                (seqid,) = _HEADER.unpack_from(data, name_end)
                return data[8:name_end], word & 0xFF, seqid, name_end + 4
            if word > MAX_METHOD_NAME:
                raise _BadMessageError(f"method name of {word} bytes")
            name_end = 4 + word
            (message_type,) = _BYTE.unpack_from(data, name_end)
            (seqid,) = _HEADER.unpack_from(data, name_end + 1)
            return data[4:name_end], message_type, seqid, name_end + 5
        except struct.error:
            raise _BadMessageError("truncated message header") from None

    def _message(self, data: bytes, route: Any) -> None:
        try:
            name, message_type, seqid, offset = self._header(data)
        except _BadMessageError as e:
            self._reject(describe_mismatch(data[:4]) or f"undecodable Thrift message ({e})")
            return
        method = self._by_name.get(name)
        self.calls_served += 1
        if method is None or message_type not in (TMessageType.CALL, TMessageType.ONEWAY):
            text = shown(name)
            self.call_counts[UNKNOWN_METHOD, "bad_request"] += 1
            self._warn("unknown method", "OTS API client {peer} called unknown method {method}",
                       peer=self._peer(), method=text)
            self._send_exception(
                text, seqid, route,
                TApplicationException(TApplicationException.UNKNOWN_METHOD,
                                      f"unknown method {text}"),
            )
            return
        forwarder = self.forwarder
        if forwarder is not None and (self.forwarded_in_flight
                                      or method.name not in forwarder.local
                                      or forwarder.behind()):
            self._forward(data, method)
            return
        args = method.args_type()
        stream = BytesIO(data)
        stream.seek(offset)
        self._input._buffer = stream
        try:
            if fastbinary is not None:
                # What the generated read() does, minus its per-call ABC
                # isinstance check of the transport.
                fastbinary.decode_binary(args, self._iprot,
                                         [method.args_type, method.args_type.thrift_spec])
            else:
                args.read(self._iprot)
        except Exception as e:
            self.call_counts[method.name, "bad_request"] += 1
            self._warn(f"bad arguments {method.name}",
                       "bad arguments to {method} from {peer}: {error}",
                       method=method.name, peer=self._peer(), error=shown(str(e), 200))
            self._send_exception(
                method.name, seqid, route,
                TApplicationException(TApplicationException.PROTOCOL_ERROR,
                                      f"bad arguments to {method.name}"),
            )
            return
        wants_peer = self._peer_methods is None or method.name in self._peer_methods
        if wants_peer:
            token = current_peer.set(self._peer_host())
            source_token = current_source.set(self._peer_source())
        try:
            result = getattr(self.handler, method.name)(*method.arguments(args))
        except ForwardCall:
            self._forward(data, method)
            return
        except Exception:
            self._failed(Failure(), method, seqid, route)
            return
        finally:
            if wants_peer:
                current_peer.reset(token)
                current_source.reset(source_token)
        if isinstance(result, Deferred):
            self.calls_in_flight += 1
            if self.calls_in_flight >= self._max_in_flight:
                self.pause("calls in flight")
            # One callback pair (each one more costs a bridged call ~1 us).
            result.addCallbacks(
                self._reply_later, self._failed_later,
                callbackArgs=(method, seqid, route), errbackArgs=(method, seqid, route),
            )
        else:
            self._reply(result, method, seqid, route)

    def _forward(self, data: bytes, method: ThriftMethod) -> None:
        """Hand the call to the forwarder; its reply comes back through
        forwarded_reply (in the order forwarded)."""
        assert self.forwarder is not None
        if not method.oneway:
            self.forwarded_in_flight += 1
            self.calls_in_flight += 1
            if self.calls_in_flight >= self._max_in_flight:
                self.pause("calls in flight")
        wants_peer = self._peer_methods is None or method.name in self._peer_methods
        if wants_peer:
            self.forwarder.forward(self, data, self._peer_host(), self._peer_source())
        else:
            self.forwarder.forward(self, data, "", "")

    def forwarded_reply(self, payload: bytes) -> None:
        """The reply (a whole Thrift message) to the oldest forwarded call."""
        self.forwarded_in_flight -= 1
        self.calls_in_flight -= 1
        if self._clock is not None:
            self.last_activity = self._clock.seconds()
        if self._paused_for:
            self.resume("calls in flight")
        if self.connected:
            self._write(payload, self._mode == "framed")

    def _reply_later(self, value: Any, method: ThriftMethod, seqid: int, route: Any) -> None:
        # _call_done, inline: this runs once per bridged call.
        self.calls_in_flight -= 1
        if self._clock is not None:
            self.last_activity = self._clock.seconds()
        if self._paused_for:
            self.resume("calls in flight")
        self._reply(value, method, seqid, route)

    def _failed_later(self, failure: Failure, method: ThriftMethod, seqid: int,
                      route: Any) -> None:
        self._call_done()
        self._failed(failure, method, seqid, route)

    def _call_done(self) -> None:
        self.calls_in_flight -= 1
        if self._clock is not None:  # waiting for an answer is not idleness
            self.last_activity = self._clock.seconds()
        if self.calls_in_flight < self.limits.max_calls_in_flight:
            self.resume("calls in flight")

    # -- bytes out ------------------------------------------------------------

    def _reply(self, value: Any, method: ThriftMethod, seqid: int, route: Any) -> None:
        if type(value) is Outcome:
            self.call_counts[method.name, value.outcome] += 1
            value = value.value
        else:
            self.call_counts[method.name, ANSWERED] += 1
        if method.oneway or not self.connected:
            return
        result = method.result_type(success=value)
        try:
            if fastbinary is not None:
                body = fastbinary.encode_binary(result, [method.result_type,
                                                         method.result_type.thrift_spec])
                payload = b"".join((method.reply_prefix, _HEADER.pack(seqid), body))
            else:
                payload = self._encode(method.name, TMessageType.REPLY, seqid, result)
        except Exception:
            self._failed(Failure(), method, seqid, route)
            return
        self._write(payload, route)

    def _failed(self, failure: Failure, method: ThriftMethod, seqid: int, route: Any) -> None:
        self.call_counts[method.name, "error"] += 1
        if failure.check(TApplicationException):
            error = failure.value
        else:
            self.log.failure("OTS API handler {method} failed", failure, method=method.name)
            error = TApplicationException(TApplicationException.INTERNAL_ERROR,
                                          f"internal error in {method.name}")
        if not method.oneway and self.connected:
            self._send_exception(method.name, seqid, route, error)

    def _send_exception(self, name: str, seqid: int, route: Any,
                        error: TApplicationException) -> None:
        self._write(self._encode(name, TMessageType.EXCEPTION, seqid, error), route)

    def _encode(self, name: str, message_type: int, seqid: int, body: Any) -> bytes:
        buffer = TMemoryBuffer()
        oprot = self._protocol_factory.getProtocol(buffer)
        oprot.writeMessageBegin(name, message_type, seqid)
        body.write(oprot)
        oprot.writeMessageEnd()
        return buffer.getvalue()

    def _write(self, payload: bytes, route: Any) -> None:
        gate = self.gate
        if gate is not None and not gate.open:
            gate.hold(lambda: self._write(payload, route))
            return
        if self._closing:
            return
        if route:
            payload = _HEADER.pack(len(payload)) + payload
        # Twisted pauses our reading (the output backlog) before much is
        # queued; only then can the backlog grow toward the cap.
        if not write_now(self.transport, payload, self._plain) \
                and "output backlog" in self._paused_for \
                and self.pending_output() > self.limits.max_pending_output:
            self.drop(f"client does not read its replies ({self.pending_output()} bytes "
                      f"waiting, over {self.limits.max_pending_output})", "not_reading")


@implementer(IPushProducer)
class _ReadPauser:
    """What Twisted pauses while a connection's replies back up: its reading."""

    def __init__(self, protocol: ThriftServerProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.pause("output backlog")

    def resumeProducing(self) -> None:
        self.protocol.resume("output backlog")

    def stopProducing(self) -> None:
        pass


class ThriftServerFactory(Factory):
    """Builds a ThriftServerProtocol per connection around one handler, and
    enforces the listener's ConnectionLimits across its connections."""

    noisy = False
    log = Logger()

    def __init__(self, service_module: ModuleType, handler: Any,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 limits: ConnectionLimits | None = None) -> None:
        self.methods = service_methods(service_module)
        self.handler = handler
        self.max_frame_size = max_frame_size
        self.limits = limits or ConnectionLimits()
        if self.limits.clock is None:
            from twisted.internet import reactor as clock  # the global one only as default
        else:
            clock = self.limits.clock
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.log_limit = LogLimiter(self.clock)
        self.connections: set[ThriftServerProtocol] = set()
        # For the metrics: calls by (method, outcome: answered, refused,
        # failed, error, bad_request)
        # and connections refused or closed by (limit or cause).
        self.call_counts: Counter[tuple[str, str]] = Counter()
        self.dropped: Counter[str] = Counter()
        # TLS handshakes running, and connections waiting for their turn.
        self.handshakes: set[ThriftServerProtocol] = set()
        self.handshake_queue: deque[ThriftServerProtocol] = deque()
        # Set by whoever listens: stop and start accepting (the port's
        # stopReading/startReading).
        self.pause_accepting: Callable[[], None] | None = None
        self.resume_accepting: Callable[[], None] | None = None
        self._accepting = True
        self.refused = 0
        self._refused_logged_at = -1e9
        self._sweep_call: IDelayedCall | None = None
        # Several processes serving one listening socket: the connections
        # all of them hold count against max_connections here (None: only
        # this factory's); calls this process does not answer go to the
        # forwarder; replies wait while the gate is closed.
        self.count: ConnectionCount | None = None
        self.forwarder: CallForwarder | None = None
        self.gate: ReplyGate | None = None

    def buildProtocol(self, addr: IAddress) -> ThriftServerProtocol:
        proto = ThriftServerProtocol(self.methods, self.handler, self.max_frame_size,
                                     self.limits)
        proto.factory = self
        proto.log_limit = self.log_limit
        proto.call_counts = self.call_counts
        proto.dropped = self.dropped
        proto.forwarder = self.forwarder
        proto.gate = self.gate
        return proto

    # -- the cap and the reserve -------------------------------------------------

    def admit(self, proto: ThriftServerProtocol) -> bool:
        limits = self.limits
        reason = None
        kind = "max_connections"
        if len(self.connections) >= limits.max_connections or (
                self.count is not None and not self.count.take(limits.max_connections)):
            reason = f"{limits.max_connections} connections already (max_connections)"
        elif limits.fd_limit is not None:
            fd = _descriptor(proto.transport)
            # Linux hands out the lowest free descriptor: one this high means
            # the table is nearly full, and the reserve is for the RDP server.
            if fd is not None and fd >= limits.fd_limit - limits.fd_reserve:
                reason = (f"descriptor {fd} is in the {limits.fd_reserve} kept in reserve "
                          f"(limit {limits.fd_limit})")
                kind = "fd_reserve"
        if reason is not None:
            if kind == "fd_reserve" and self.count is not None:
                self.count.give()
            self.refused += 1
            self.dropped[kind] += 1
            now = self.clock.seconds()
            if now - self._refused_logged_at >= 10:  # one line per 10 s under a storm
                self.log.warn("refusing OTS API connections: {reason} ({count} refused so "
                              "far)", reason=reason, count=self.refused)
                self._refused_logged_at = now
            return False
        now = self.clock.seconds()
        proto.connected_at = proto.last_activity = now
        proto._clock = self.clock
        self.connections.add(proto)
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self.limits.sweep_interval(), self._sweep)
        return True

    def forget(self, proto: ThriftServerProtocol) -> None:
        if proto in self.connections:
            self.connections.remove(proto)
            if self.count is not None:
                self.count.give()

    def handshake_started(self, proto: ThriftServerProtocol) -> None:
        if len(self.handshakes) < self.limits.max_handshakes:
            self.handshakes.add(proto)
            return
        proto.pause("waiting to handshake")
        self.handshake_queue.append(proto)
        if len(self.handshake_queue) >= self.limits.max_handshake_queue and self._accepting \
                and self.pause_accepting is not None:
            self._accepting = False
            self.pause_accepting()

    def handshake_ended(self, proto: ThriftServerProtocol) -> None:
        self.handshakes.discard(proto)
        while self.handshake_queue and len(self.handshakes) < self.limits.max_handshakes:
            waiting = self.handshake_queue.popleft()
            if waiting._closing or not waiting._handshaking:
                continue
            # Its limits count from its turn, not from the wait.
            waiting.connected_at = waiting.last_activity = self.clock.seconds()
            self.handshakes.add(waiting)
            waiting.resume("waiting to handshake")
        if not self._accepting and len(self.handshake_queue) <= \
                self.limits.max_handshake_queue // 2 and self.resume_accepting is not None:
            self._accepting = True
            self.resume_accepting()

    # -- timeouts, checked by one sweep for all connections --------------------

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self.clock.seconds()
        limits = self.limits
        for proto in list(self.connections):
            expired = self._expired(proto, now, limits)
            if expired is not None:
                proto.drop(*expired)
        if self.connections:
            self._sweep_call = self.clock.callLater(limits.sweep_interval(), self._sweep)

    @staticmethod
    def _expired(proto: ThriftServerProtocol, now: float, limits: ConnectionLimits
                 ) -> tuple[str, str] | None:
        """(why, which limit) when a limit says the connection must go."""
        age = now - proto.connected_at
        quiet = now - proto.last_activity
        if "waiting to handshake" in proto._paused_for:
            return None  # its time starts with its turn
        if limits.tls_handshake_timeout and proto.tls_pending \
                and age > limits.tls_handshake_timeout:
            return (f"TLS handshake not finished within {limits.tls_handshake_timeout:g} s",
                    "tls_handshake_timeout")
        started = proto.frame_started_at
        # While the bridge itself is not reading (calls in flight, replies
        # queued) a frame cannot finish: that is no slowloris.
        # Nor is bytes waiting in the socket that a busy reactor has not read.
        if limits.frame_timeout and started is not None and not proto._paused_for \
                and now - started > limits.frame_timeout \
                and not _unread_bytes(proto.transport):
            return (f"frame begun but not finished within {limits.frame_timeout:g} s",
                    "frame_timeout")
        if limits.first_call_timeout and not proto.calls_served \
                and age > limits.first_call_timeout:
            return (f"no call within {limits.first_call_timeout:g} s of connecting",
                    "first_call_timeout")
        if limits.idle_timeout and not proto.calls_in_flight and quiet > limits.idle_timeout:
            return f"idle for {limits.idle_timeout:g} s", "idle_timeout"
        if proto.pending_output() > limits.max_pending_output:
            return "client does not read its replies", "not_reading"
        return None

    def stopFactory(self) -> None:
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None


def _unread_bytes(transport: Any) -> int:
    """Bytes the client sent that the kernel holds and we have not read."""
    fd = _descriptor(transport)
    if fd is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _descriptor(transport: Any) -> int | None:
    raw = getattr(transport, "transport", transport)  # under TLS, the socket's transport
    try:
        return int(raw.fileno())
    except (AttributeError, OSError, TypeError, ValueError):
        return None
