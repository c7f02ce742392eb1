"""ogon's module protocol, frame by frame: the session manager's end
(protocols/module.py) on a StringTransport; expected bytes are built with
struct and the generated classes (tests/wire.py), never with the code
under test."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bridge.backends.ogon.remote import LauncherBackend
from protocols import module as mp
from protocols.errors import IcpRemoteError, IcpTimeoutError
from protocols.generated import Module_pb2, pbRPC_pb2
from tests.wire import answers, frame, request, response

RPCBase = pbRPC_pb2.RPCBase


def channel(handlers: dict[int, Any] | None = None) -> tuple[mp.ModuleProtocol, StringTransport,
                                                              Clock]:
    clock = Clock()
    proto = mp.ModuleProtocol(handlers or {}, clock=clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def start_request() -> Module_pb2.ModuleStartRequest:
    return Module_pb2.ModuleStartRequest(
        sessionId=5, userName="alice", userDomain="", baseConfigPath="module.xsession",
        envBlock=b"PATH=/usr/bin\0OGON_SID=5\0\0",
        moduleFileName="/usr/lib/x86_64-linux-gnu/ogon1/modules/libogon-mod-x11.so",
        remoteIp="192.0.2.10")


def test_the_message_types_are_ogons() -> None:
    assert {m.msg_type: m.name for m in mp.MODULE_METHODS.values()} == {
        300: "ModuleStart", 301: "ModuleStop", 302: "ModuleGetCustomInfo",
        303: "ModuleConnect", 304: "ModuleDisconnect", 305: "PropertyBool",
        306: "PropertyNumber", 307: "PropertyString", 308: "ModuleExit"}


def test_no_handshake_and_the_first_request_is_tag_2_byte_for_byte() -> None:
    proto, transport, _ = channel()
    assert transport.value() == b"", "nothing is sent on connecting (no VersionInfo)"
    d = proto.call(mp.MSG_MODULE_START, start_request())
    payload = start_request().SerializeToString()
    # RPCBase: tag=2, isResponse=false, status=SUCCESS, msgType=300, payload.
    assert 128 <= len(payload) < 16384
    length = bytes([len(payload) & 0x7F | 0x80, len(payload) >> 7])  # a two-byte varint
    body = (b"\x08\x02" + b"\x10\x00" + b"\x18\x00" + b"\x20\xac\x02"
            + b"\x2a" + length + payload)
    assert transport.value() == struct.pack("!I", len(body)) + body
    transport.clear()
    proto.dataReceived(frame(response(2, 300, Module_pb2.ModuleStartResponse(
        pipeName="\\\\.\\pipe\\ogon_10_X11"))))
    result: list[Any] = []
    d.addCallback(result.append)
    assert result[0].pipeName == "\\\\.\\pipe\\ogon_10_X11"
    proto.call(mp.MSG_MODULE_GET_CUSTOM_INFO, Module_pb2.ModuleGetCustomInfoRequest())
    [sent] = answers(transport)
    assert (sent.tag, sent.msgType, sent.isResponse, sent.payload) == (3, 302, False, b"")


def test_property_requests_are_answered_while_a_start_waits() -> None:
    values: dict[str, Any] = {"module.xsession.displayOffset": -1,
                              "module.xsession.startwm": "/usr/bin/startwm",
                              "module.xsession.noKPCursor": True}
    asked: list[tuple[int, str]] = []

    def lookup(session_id: int, path: str) -> Any:
        asked.append((session_id, path))
        return values.get(path)

    backend = LauncherBackend.__new__(LauncherBackend)
    backend.lookup = lookup
    proto, transport, _ = channel(backend._handlers())
    d = proto.call(mp.MSG_MODULE_START, start_request())
    transport.clear()
    # The launcher numbers its own requests from 2 as well.
    proto.dataReceived(
        frame(request(2, 306, Module_pb2.PropertyNumberRequest(
            sessionId=5, path="module.xsession.displayOffset")))
        + frame(request(3, 307, Module_pb2.PropertyStringRequest(
            sessionId=5, path="module.xsession.startwm")))
        + frame(request(4, 305, Module_pb2.PropertyBoolRequest(
            sessionId=5, path="module.xsession.noKPCursor")))
        + frame(request(5, 307, Module_pb2.PropertyStringRequest(
            sessionId=5, path="module.xsession.fontPath")))
        + frame(request(6, 307, Module_pb2.PropertyStringRequest(
            sessionId=5, path="module.xsession.displayOffset"))))
    got = answers(transport)
    assert [(a.tag, a.msgType, a.isResponse, a.status) for a in got] == [
        (2, 306, True, 0), (3, 307, True, 0), (4, 305, True, 0), (5, 307, True, 0),
        (6, 307, True, 0)]
    number = Module_pb2.PropertyNumberResponse.FromString(got[0].payload)
    assert (number.success, number.value) == (True, 0xFFFFFFFF), "a long's low 32 bits"
    string = Module_pb2.PropertyStringResponse.FromString(got[1].payload)
    assert (string.success, string.value) == (True, "/usr/bin/startwm")
    boolean = Module_pb2.PropertyBoolResponse.FromString(got[2].payload)
    assert (boolean.success, boolean.value) == (True, True)
    missing = Module_pb2.PropertyStringResponse.FromString(got[3].payload)
    assert not missing.success and not missing.HasField("value"), "not found: SUCCESS, false"
    mistyped = Module_pb2.PropertyStringResponse.FromString(got[4].payload)
    assert not mistyped.success, "a property is only found under its own type"
    assert asked == [(5, "module.xsession.displayOffset"), (5, "module.xsession.startwm"),
                     (5, "module.xsession.noKPCursor"), (5, "module.xsession.fontPath"),
                     (5, "module.xsession.displayOffset")]
    assert not d.called, "still waiting for the start's own answer"


def test_a_failed_answer_and_a_timeout() -> None:
    proto, _, clock = channel()
    d = proto.call(mp.MSG_MODULE_STOP, Module_pb2.ModuleStopRequest(), 15.0)
    proto.dataReceived(frame(response(2, 301, status=RPCBase.FAILED)))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures[0].check(IcpRemoteError)
    d = proto.call(mp.MSG_MODULE_EXIT, Module_pb2.ModuleExitRequest(), 15.0)
    d.addErrback(failures.append)
    clock.advance(15)
    assert failures[1].check(IcpTimeoutError)


def test_frames_over_ogons_64_kib_drop_the_channel() -> None:
    proto, transport, _ = channel()
    proto.dataReceived(struct.pack("!I", 0x10000) + b"x")
    assert transport.disconnecting
    proto2, transport2, _ = channel()
    big = frame(request(2, 307, Module_pb2.PropertyStringRequest(sessionId=1, path="a" * 65000)))
    proto2.dataReceived(big)
    assert not transport2.disconnecting, "up to 65535 bytes is a frame"


def test_an_unknown_message_type_is_answered_notfound() -> None:
    proto, transport, _ = channel()
    proto.dataReceived(frame(request(2, 999)))
    [answer] = answers(transport)
    assert (answer.tag, answer.msgType, answer.status) == (2, 999, RPCBase.NOTFOUND)
