"""A Thrift server protocol on Twisted: binary protocol, framed transport,
handlers that may return Deferreds.

Compared with thrift's own ``TTwisted.ThriftServerProtocol`` it also:
names a transport mismatch instead of closing silently (an unframed binary
client's first word 0x8001.... is served, unframed; TLS, HTTP and compact
protocol clients get a log line naming the client setting to change); logs
handler failures through twisted.logger and answers that one call with
TApplicationException(INTERNAL_ERROR); and encodes with the C accelerated
binary protocol when thrift's ``fastbinary`` extension is present.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from operator import attrgetter
from types import ModuleType
from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.protocol.TProtocol import TProtocolException
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer, TTransportException
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocols.transport import is_plain_socket, write_now

try:  # the C extension; without it the pure-Python codec is used.
    from thrift.protocol import fastbinary
except ImportError:  # pragma: no cover - depends on how thrift was built
    fastbinary = None

DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024
_VERSION_1 = TBinaryProtocol.TBinaryProtocol.VERSION_1
_VERSION_MASK = TBinaryProtocol.TBinaryProtocol.VERSION_MASK
_HEADER = struct.Struct("!i")
_TWO_INTS = struct.Struct("!iI")
_BYTE = struct.Struct("!b")


class _BadMessageError(Exception):
    """A message header that does not decode."""


def _protocol_factory() -> Any:
    if fastbinary is not None:
        return TBinaryProtocol.TBinaryProtocolAcceleratedFactory()
    return TBinaryProtocol.TBinaryProtocolFactory()


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


class ThriftServerProtocol(Protocol):
    """Serves one Thrift client connection.

    ``_mode`` is None until the first four bytes say what the client
    speaks, then "framed" or "unframed" for the connection's life.
    """

    log = Logger()

    def __init__(self, methods: Mapping[str, ThriftMethod], handler: Any,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.methods = methods
        self.handler = handler
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._mode: str | None = None
        # Set once the connection is closing: no further requests are served.
        self._closing = False
        self._protocol_factory = _protocol_factory()
        # One decoding protocol per connection, pointed at each message in
        # turn: allocating a protocol and buffer per call showed in profiles.
        self._input = TMemoryBuffer()
        self._iprot = self._protocol_factory.getProtocol(self._input)
        self._by_name = {name.encode(): method for name, method in methods.items()}

    def connectionMade(self) -> None:
        self._plain = is_plain_socket(self.transport)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Replies to calls still running are dropped from now on.
        self.connected = False
        self._closing = True
        self._buffer.clear()

    # -- bytes in -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == "framed" and not self._buffer:
            # The usual read: whole frames and nothing held back, so they are
            # taken from ``data`` itself; only an incomplete tail is kept.
            used = self._framed_messages(data)
            if used < len(data):
                self._buffer += memoryview(data)[used:]
            return
        self._buffer += data
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
            self.log.warn(
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
            self._message(bytes(buffer[offset + 4 : end]), framed=True)
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
            self._message(data[:end], framed=False)

    def _reject(self, reason: str) -> None:
        self.log.warn("closing OTS API connection from {peer}: {reason}",
                      peer=self._peer(), reason=reason)
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()

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
                name_end = 8 + length
                (seqid,) = _HEADER.unpack_from(data, name_end)
                return data[8:name_end], word & 0xFF, seqid, name_end + 4
            name_end = 4 + word
            (message_type,) = _BYTE.unpack_from(data, name_end)
            (seqid,) = _HEADER.unpack_from(data, name_end + 1)
            return data[4:name_end], message_type, seqid, name_end + 5
        except struct.error:
            raise _BadMessageError("truncated message header") from None

    def _message(self, data: bytes, framed: bool) -> None:
        try:
            name, message_type, seqid, offset = self._header(data)
        except _BadMessageError as e:
            self._reject(describe_mismatch(data[:4]) or f"undecodable Thrift message ({e})")
            return
        method = self._by_name.get(name)
        if method is None or message_type not in (TMessageType.CALL, TMessageType.ONEWAY):
            text = name.decode("utf-8", "replace")
            self.log.warn("OTS API client {peer} called unknown method {method}",
                          peer=self._peer(), method=text)
            self._send_exception(
                text, seqid, framed,
                TApplicationException(TApplicationException.UNKNOWN_METHOD,
                                      f"unknown method {text}"),
            )
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
            self.log.warn("bad arguments to {method} from {peer}: {error}",
                          method=method.name, peer=self._peer(), error=str(e))
            self._send_exception(
                method.name, seqid, framed,
                TApplicationException(TApplicationException.PROTOCOL_ERROR,
                                      f"bad arguments to {method.name}"),
            )
            return
        try:
            result = getattr(self.handler, method.name)(*method.arguments(args))
        except Exception:
            self._failed(Failure(), method, seqid, framed)
            return
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._reply, self._failed,
                callbackArgs=(method, seqid, framed), errbackArgs=(method, seqid, framed),
            )
        else:
            self._reply(result, method, seqid, framed)

    # -- bytes out ------------------------------------------------------------

    def _reply(self, value: Any, method: ThriftMethod, seqid: int, framed: bool) -> None:
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
            self._failed(Failure(), method, seqid, framed)
            return
        self._write(payload, framed)

    def _failed(self, failure: Failure, method: ThriftMethod, seqid: int, framed: bool) -> None:
        if failure.check(TApplicationException):
            error = failure.value
        else:
            self.log.failure("OTS API handler {method} failed", failure, method=method.name)
            error = TApplicationException(TApplicationException.INTERNAL_ERROR,
                                          f"internal error in {method.name}")
        if not method.oneway and self.connected:
            self._send_exception(method.name, seqid, framed, error)

    def _send_exception(self, name: str, seqid: int, framed: bool,
                        error: TApplicationException) -> None:
        self._write(self._encode(name, TMessageType.EXCEPTION, seqid, error), framed)

    def _encode(self, name: str, message_type: int, seqid: int, body: Any) -> bytes:
        buffer = TMemoryBuffer()
        oprot = self._protocol_factory.getProtocol(buffer)
        oprot.writeMessageBegin(name, message_type, seqid)
        body.write(oprot)
        oprot.writeMessageEnd()
        return buffer.getvalue()

    def _write(self, payload: bytes, framed: bool) -> None:
        if framed:
            payload = _HEADER.pack(len(payload)) + payload
        write_now(self.transport, payload, self._plain)


class ThriftServerFactory(Factory):
    """Builds a ThriftServerProtocol per connection around one handler."""

    noisy = False

    def __init__(self, service_module: ModuleType, handler: Any,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.methods = service_methods(service_module)
        self.handler = handler
        self.max_frame_size = max_frame_size

    def buildProtocol(self, addr: IAddress) -> ThriftServerProtocol:
        proto = ThriftServerProtocol(self.methods, self.handler, self.max_frame_size)
        proto.factory = self
        return proto
