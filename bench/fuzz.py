"""Fuzzing the bridge's two wire protocols with valid-then-mutated input.

Strategies build valid ICP frames (every message type, as requests to the
bridge and as answers to the bridge's own calls, and as requests to the
stand-in RDP server) and valid OTS API calls (every method), then mutate
them: flipped bytes, truncation, junk, a wrong length prefix, another
message type, the response flag turned. Each case runs against the real
protocol objects and handlers on StringTransports and a Clock. A case
passes when no exception escapes, nothing is logged as a bug (a handler
failure with a traceback), the connection either still serves or was
closed, and the session registry's invariants hold.

The test suite runs these with a small number of examples
(tests/test_fuzz.py); before a release run many:

usage: python -m bench.fuzz [--examples N] [--seed S]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport.TTransport import TMemoryBuffer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from bridge.backends.modules import LaunchContext, Module
from bridge.config import Config
from bridge.lifecycle.facade import SessionLifecycle
from bridge.otsapi.handler import OtsApiHandler
from bridge.rdp.handlers import RdpRequestHandlers
from bridge.rdp.link import RdpServerLink
from bridge.rdp.standin import StandInRdpServer
from bridge.security.auth import InMemoryAuthenticator
from bridge.security.permissions import FULL
from bridge.security.token_files import SessionTokenFiles
from bridge.security.tokens import TokenStore
from bridge.sessions.model import BackendRecord
from bridge.sessions.properties import ChannelPolicy, PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.generated import ICP_pb2, pbRPC_pb2
from protocols.generated.otsapi import otsapi as twisted_otsapi
from protocols.generated.otsapi_blocking import otsapi
from protocols.thrift_server import ConnectionLimits, ThriftServerFactory

RPCBase = pbRPC_pb2.RPCBase

# -- protobuf messages from their descriptors ---------------------------------

_SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=40),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
}


def message_strategy(message_type: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Valid instances of a proto2 message class (required fields set)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in message_type.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = message_strategy(field.message_type._concrete_class, depth + 1) \
                if depth < 2 else st.just(field.message_type._concrete_class())
        elif field.type == FieldDescriptor.TYPE_ENUM:
            inner = st.sampled_from([v.number for v in field.enum_type.values])
        else:
            inner = _SCALARS[field.type]
        if field.is_repeated:
            optional[field.name] = st.lists(inner, max_size=4)
        elif field.is_required:
            fields[field.name] = inner
        else:
            optional[field.name] = inner

    def build(values: dict[str, Any]) -> Any:
        message = message_type()
        for name, value in values.items():
            field = message_type.DESCRIPTOR.fields_by_name[name]
            if field.is_repeated:
                target = getattr(message, name)
                for item in value:
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields, optional=optional).map(build)


def _frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


MUTATIONS = ("none", "flip", "truncate", "junk", "length", "type", "response", "double")


@st.composite
def mutated(draw: Any, body: bytes) -> bytes:
    """A framed body, mutated one way (or not at all)."""
    kind = draw(st.sampled_from(MUTATIONS))
    data = bytearray(body)
    if kind == "flip" and data:
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
    elif kind == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "junk":
        data += draw(st.binary(min_size=1, max_size=30))
    elif kind == "length":
        return struct.pack("!I", draw(st.integers(0, 2**32 - 1))) + bytes(data)
    elif kind == "double":
        return _frame(bytes(data)) * 2
    return _frame(bytes(data))


@st.composite
def icp_request_frame(draw: Any, msg_types: list[int]) -> bytes:
    msg_type = draw(st.sampled_from(msg_types))
    method = icp.ICP_METHODS[msg_type]
    payload = draw(message_strategy(method.request)).SerializePartialToString()
    kind = draw(st.sampled_from(("request", "wrong type", "response")))
    rpc = RPCBase(tag=draw(st.integers(0, 2**32 - 1)), isResponse=kind == "response",
                  status=draw(st.sampled_from([0, 0, 0, 1, 2])),
                  msgType=msg_type if kind != "wrong type" else draw(st.integers(0, 2**32 - 1)),
                  payload=payload)
    return draw(mutated(rpc.SerializePartialToString()))


@st.composite
def icp_answer_frame(draw: Any, tags: list[int], msg_types: list[int]) -> bytes:
    """An answer to one of the bridge's own calls (right or wrong tag/type)."""
    msg_type = draw(st.sampled_from(msg_types))
    method = icp.ICP_METHODS[msg_type]
    payload = draw(message_strategy(method.response)).SerializePartialToString()
    rpc = RPCBase(tag=draw(st.sampled_from(tags)) if tags and draw(st.booleans())
                  else draw(st.integers(0, 2**32 - 1)),
                  isResponse=True, status=draw(st.sampled_from([0, 0, 1, 2])),
                  msgType=msg_type, payload=payload,
                  errorDescription=draw(st.text(max_size=20)))
    return draw(mutated(rpc.SerializePartialToString()))


# -- Thrift calls from the generated specs -------------------------------------

def _thrift_value(ttype: int, spec: Any, depth: int) -> st.SearchStrategy[Any]:
    if ttype == TType.STRING:
        return st.text(max_size=60)
    if ttype == TType.BOOL:
        return st.booleans()
    if ttype == TType.BYTE:
        return st.integers(-128, 127)
    if ttype == TType.I16:
        return st.integers(-(2**15), 2**15 - 1)
    if ttype == TType.I32:
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 2]))
    if ttype == TType.I64:
        return st.integers(-(2**63), 2**63 - 1)
    if ttype == TType.STRUCT and depth < 2:
        return thrift_struct(spec[0], depth + 1)
    return st.none()


def thrift_struct(struct_type: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    specs = [spec for spec in struct_type.thrift_spec if spec is not None]
    return st.fixed_dictionaries({
        spec[2]: st.one_of(st.none(), _thrift_value(spec[1], spec[3], depth))
        for spec in specs}).map(lambda values: struct_type(**values))


OTS_METHODS = sorted(name[:-5] for name in vars(otsapi) if name.endswith("_args"))


@st.composite
def thrift_call_frame(draw: Any, tokens: list[str]) -> bytes:
    name = draw(st.sampled_from(OTS_METHODS))
    args_type = getattr(otsapi, f"{name}_args")
    args = draw(thrift_struct(args_type))
    if hasattr(args, "authToken") and tokens and draw(st.booleans()):
        args.authToken = draw(st.sampled_from(tokens))
    if hasattr(args, "sessionId") and draw(st.booleans()):
        args.sessionId = draw(st.sampled_from([-1, 1, 2, 3]))
    buffer = TMemoryBuffer()
    out = TBinaryProtocol.TBinaryProtocol(buffer)
    out.writeMessageBegin(name, draw(st.sampled_from([TMessageType.CALL] * 4 + [
        TMessageType.ONEWAY, TMessageType.REPLY])), draw(st.integers(-(2**31), 2**31 - 1)))
    args.write(out)
    out.writeMessageEnd()
    return draw(mutated(buffer.getvalue()))


# -- the bridge on StringTransports ------------------------------------------------

class _Backend:
    def __init__(self, module: Module, context: LaunchContext) -> None:
        self.module = module
        self.pid = 10_000 + context.session_id
        self.record = BackendRecord(module.name, self.pid, 1,
                                    module.endpoint.format(session_id=context.session_id))
        self.running = True

    def when_exited(self) -> Deferred[str]:
        return Deferred()

    def stop(self) -> Deferred[str]:
        self.running = False
        return Deferred()

    # ogon's module Connect/Disconnect (the lifecycle tells every backend).
    def connected(self) -> None:
        pass

    def disconnected(self) -> None:
        pass


class _Launcher:
    def start(self, module: Module, context: LaunchContext) -> Deferred[_Backend]:
        return succeed(_Backend(module, context))

    def adopt(self, *args: Any) -> None:
        return None

    def kill_orphan(self, *args: Any, **kwargs: Any) -> None:
        pass

    def stop_unowned(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Files(SessionTokenFiles):
    def _write(self, session: Any, token: str) -> None:
        self.written = token

    def remove(self, session_id: int) -> None:
        pass


class Bridge:
    """The bridge's objects wired as the service wires them, without
    sockets, processes or disk."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.registry = SessionRegistry(self.clock)
        self.tokens = TokenStore(self.clock)
        files = _Files(__import__("pathlib").Path("/nonexistent"), self.tokens)
        files.attach(self.registry)
        config = Config(channels_deny=["blocked"])
        self.properties = PropertyTable({"session.timeout": 5}, {})
        self.link = RdpServerLink({}, self.clock, 10.0, 1 << 20)
        modules = {name: Module(name, ("x",), f"ogon_{{session_id}}_{name}")
                   for name in ("greeter", "xsession")}
        auth = InMemoryAuthenticator({"alice": ("pw", FULL), "bob": ("pw", 0x49)})
        self.lifecycle = SessionLifecycle(self.registry, self.link, auth, self.properties,
                                          modules, _Launcher(), files, self.clock)
        self.link.on_lost = self.lifecycle.rdp_server_lost
        channels = ChannelPolicy(self.properties, [], ["blocked"])
        self.link.handlers = RdpRequestHandlers(self.registry, self.lifecycle, self.properties,
                                                channels).table()
        self.otsapi = OtsApiHandler(self.registry, self.tokens, self.link, auth,
                                    self.lifecycle, self.properties, channels,
                                    token_lifetime=config.token_lifetime)
        self.thrift = ThriftServerFactory(twisted_otsapi, self.otsapi,
                                          limits=ConnectionLimits(clock=self.clock))

    def rdp_connection(self) -> tuple[Any, StringTransport]:
        proto = self.link.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        hello = RPCBase(tag=1, isResponse=False, status=0, msgType=icp.HANDSHAKE_MSG_TYPE,
                        versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1))
        proto.dataReceived(_frame(hello.SerializeToString()))
        for connection_id, user in ((1, "alice"), (2, "bob")):
            logon = ICP_pb2.LogonUserRequest(
                connectionId=connection_id, username=user, password="pw", domain="",
                width=800, height=600, colorDepth=24, clientHostName="h", clientAddress="a",
                clientBuildNumber=1, clientProductId=1, clientHardwareId=0,
                clientProtocolType=2)
            proto.dataReceived(_frame(RPCBase(
                tag=connection_id + 1, isResponse=False, status=0, msgType=icp.MSG_LOGON_USER,
                payload=logon.SerializeToString()).SerializeToString()))
        transport.clear()
        return proto, transport

    def check_invariants(self) -> None:
        for session in self.registry:
            if session.connection_id is not None:
                assert self.registry.by_connection(session.connection_id) is session
        assert all(self.registry.get(s.session_id) is s for s in self.registry)


class BugWatch:
    """Collects log events that mean a bug: a traceback, an unhandled error."""

    def __init__(self) -> None:
        self.bugs: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None or event.get("isError"):
            text = event.get("log_format", "") or str(event.get("message", ""))
            self.bugs.append(f"{text}: {failure.getTraceback() if failure else ''}")

    def __enter__(self) -> BugWatch:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


# -- the cases ----------------------------------------------------------------------

BRIDGE_HANDLED = sorted(icp.ICP_METHODS)
PEER_HANDLED = sorted(StandInRdpServer(Clock()).handlers())


def bridge_side_case(frames: list[bytes]) -> None:
    """The RDP server's side sends these to the bridge (after a handshake
    and two logons), then the bridge makes a call and gets a mutated answer."""
    bridge = Bridge()
    proto, transport = bridge.rdp_connection()
    with BugWatch() as watch:
        for data in frames:
            proto.dataReceived(data)
        bridge.clock.advance(60)
        bridge.check_invariants()
    assert not watch.bugs, watch.bugs
    assert proto.state is icp.IcpState.READY or transport.disconnecting


def bridge_answers_case(frames: list[bytes]) -> None:
    bridge = Bridge()
    proto, _ = bridge.rdp_connection()
    calls = [proto.call(icp.MSG_VIRTUAL_CHANNEL_OPEN, ICP_pb2.OtsApiVirtualChannelOpenRequest(
        connectionId=1, virtualName="c", dynamicChannel=False, flags=0)) for _ in range(3)]
    results: list[Any] = []
    for d in calls:
        d.addBoth(results.append)
    with BugWatch() as watch:
        for data in frames:
            proto.dataReceived(data)
        bridge.clock.advance(60)
    assert not watch.bugs, watch.bugs
    assert len(results) == 3, "every call got an answer, a failure or a timeout"


def peer_side_case(frames: list[bytes]) -> None:
    """The bridge's side sends these to the stand-in RDP server."""
    peer = StandInRdpServer(Clock())
    proto = peer.build_protocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    sent = RPCBase.FromString(transport.value()[4:])
    proto.dataReceived(_frame(RPCBase(
        tag=sent.tag, isResponse=True, status=0, msgType=icp.HANDSHAKE_MSG_TYPE,
        versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1)).SerializeToString()))
    with BugWatch() as watch:
        for data in frames:
            proto.dataReceived(data)
    assert not watch.bugs, watch.bugs


def thrift_case(frames: list[bytes]) -> None:
    bridge = Bridge()
    bridge.rdp_connection()
    proto = bridge.thrift.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    proto.makeConnection(transport)
    with BugWatch() as watch:
        for data in frames:
            proto.dataReceived(data)
        bridge.clock.advance(20)
        bridge.check_invariants()
    assert not watch.bugs, watch.bugs


TOKENS = ["A" * 43, "bogus", ""]

CASES: dict[str, tuple[Callable[[list[bytes]], None], st.SearchStrategy[list[bytes]]]] = {
    "ICP requests to the bridge": (
        bridge_side_case, st.lists(icp_request_frame(BRIDGE_HANDLED), min_size=1, max_size=6)),
    "ICP answers to the bridge's calls": (
        bridge_answers_case,
        st.lists(icp_answer_frame([4, 5, 6], [icp.MSG_VIRTUAL_CHANNEL_OPEN, icp.MSG_PING]),
                 min_size=1, max_size=6)),
    "ICP requests to the stand-in RDP server": (
        peer_side_case, st.lists(icp_request_frame(PEER_HANDLED), min_size=1, max_size=6)),
    "OTS API calls": (
        thrift_case, st.lists(thrift_call_frame(TOKENS), min_size=1, max_size=6)),
}


def run_case(name: str, examples: int, seed: int | None = None) -> float:
    """Run one case for ``examples`` examples; returns the seconds it took."""
    check, strategy = CASES[name]
    started = time.monotonic()
    test = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), derandomize=seed is None)(
        given(strategy)(check))
    if seed is not None:
        test = __import__("hypothesis").seed(seed)(test)
    test()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="per case")
    parser.add_argument("--seed", type=int, help="a random seed (default: derandomized)")
    args = parser.parse_args()
    for name in CASES:
        seconds = run_case(name, args.examples, args.seed)
        print(f"{name}: {args.examples} examples, no failure ({seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
