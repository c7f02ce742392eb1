"""What a real ogon RDP server and WTSAPI client need, without sockets
where possible: frames it can read, the TLS pair, ogon's property defaults."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.internet.unix import Server
from twisted.logger import capturedLogs

from bridge.config import Config
from bridge.config_sources import property_table
from bridge.endpoints import StartupError, check_directory
from bridge.security.tls import ensure_pair, uses_default_pair, with_certificate
from protocols.errors import IcpFrameTooLargeError
from protocols.generated import ICP_pb2
from protocols.icp import DEFAULT_MAX_SEND_FRAME, MSG_PROPERTY_STRING, MSG_VIRTUAL_CHANNEL_OPEN
from protocols.transport import FrameAligner
from tests.wire import answers, frame, ready_icp, request


def frames_of(sizes: list[int]) -> tuple[bytes, list[int]]:
    """Length-prefixed frames with bodies of ``sizes``; their end offsets."""
    data, ends = b"", []
    for size in sizes:
        data += struct.pack("!I", size) + bytes([size % 251]) * size
        ends.append(len(data))
    return data, ends


class RecordingTransport:
    """What FrameAligner needs of a transport; records what each send was
    asked to carry, and takes only as much as ``accept`` says (a full
    socket buffer)."""

    def __init__(self, accept: list[int | None]) -> None:
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.disconnecting = False
        self.producer = None
        self.asked: list[tuple[int, int]] = []  # (offset, length) of each send
        self.sent = b""
        self.queued: list[bytes] = []
        self._accept = accept

    def writeSomeData(self, data: Any) -> int:
        self.asked.append((len(self.sent), len(data)))
        limit = self._accept.pop(0) if self._accept else None
        taken = bytes(data)[: len(data) if limit is None else limit]
        self.sent += taken
        return len(taken)

    def write(self, data: bytes) -> None:
        self.queued.append(bytes(data))


@given(st.lists(st.integers(0, 40_000), min_size=1, max_size=12),
       st.lists(st.one_of(st.none(), st.integers(0, 50_000)), max_size=6))
def test_every_send_is_whole_frames_within_the_limit(sizes: list[int],
                                                       accept: list[int | None]) -> None:
    limit = 32 * 1024
    data, ends = frames_of(sizes)
    transport = RecordingTransport(accept)
    FrameAligner(transport, limit).send(data)
    rest = b"".join(transport.queued)  # what Twisted buffered, sent through the aligner
    while rest:
        rest = rest[transport.writeSomeData(rest):]
    assert transport.sent == data, "everything, in order"
    starts = [0, *ends[:-1]]
    for offset, length in transport.asked:
        end = offset + length
        if offset in starts:  # at a frame boundary: whole frames, within the limit
            assert end in ends
            assert length <= limit or starts.index(offset) == ends.index(end), \
                "only a single frame may be bigger than the limit"
        else:  # the rest of a frame the socket took in part: that frame alone
            assert end in ends and not any(offset < e < end for e in ends)


def test_a_real_socket_gets_whole_frames_per_send() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    server = Server(ours, Protocol(), None, None, 1, reactor)
    try:
        sizes = [30_000, 20_000, 2_000, 30_000]
        data, _ = frames_of(sizes)
        sends: list[int] = []
        original = server.writeSomeData
        server.writeSomeData = lambda d: (sends.append(len(d)), original(d))[1]
        FrameAligner(server, 32 * 1024).send(data)
        assert sends == [30_004, 22_008, 30_004], "30k | 20k+2k | 30k, never a torn frame"
        received = b""
        while len(received) < len(data):
            received += theirs.recv(1 << 20)
        assert received == data
    finally:
        server.stopReading()
        server.stopWriting()
        ours.close()
        theirs.close()


def test_an_answer_too_big_for_ogon_is_answered_failed() -> None:
    big = "x" * (DEFAULT_MAX_SEND_FRAME + 10)

    def handler(request: Any) -> Any:
        return ICP_pb2.PropertyStringResponse(value=big if request.path == "big" else "ok",
                                              success=True)

    proto, transport, _ = ready_icp({MSG_PROPERTY_STRING: handler})
    with capturedLogs() as events:
        proto.dataReceived(frame(request(5, MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest(
            connectionId=1, path="big"))))
        proto.dataReceived(frame(request(6, MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest(
            connectionId=1, path="small"))))
    refused, fine = answers(transport)
    assert (refused.tag, refused.status, refused.errorDescription) == (5, 1, "answer too large")
    assert fine.tag == 6 and fine.status == 0, "the connection goes on"
    assert any("over the 32768-byte frame limit" in e["log_format"].format(**e)
               for e in events if "log_format" in e)


def test_a_request_too_big_is_not_sent() -> None:
    proto, transport, _ = ready_icp()
    d = proto.call(MSG_VIRTUAL_CHANNEL_OPEN, ICP_pb2.OtsApiVirtualChannelOpenRequest(
        connectionId=1, virtualName="x" * 40_000, dynamicChannel=False, flags=0))
    assert isinstance(d.result.value, IcpFrameTooLargeError)
    d.addErrback(lambda f: None)
    assert transport.value() == b""


# -- TLS ----------------------------------------------------------------------

def test_the_pair_is_generated_once_and_kept(tmp_path: Path) -> None:
    from cryptography import x509

    cert, key = tmp_path / "certs" / "ogon.crt", tmp_path / "private" / "ogon.key"
    assert ensure_pair(cert, key) is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    before = cert.read_bytes()
    assert ensure_pair(cert, key) is False and cert.read_bytes() == before


def test_pair_problems_are_one_line(tmp_path: Path) -> None:
    cert, key = tmp_path / "ogon.crt", tmp_path / "ogon.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(StartupError, match=r"TLS pair incomplete: .*ogon.crt exists but"):
        ensure_pair(cert, key)
    key.mkdir()
    with pytest.raises(StartupError, match=r"ssl.key: .*ogon.key is a directory"):
        ensure_pair(cert, key)
    if os.geteuid() != 0:  # root reads any file
        key.rmdir()
        key.write_text("k")
        key.chmod(0)
        with pytest.raises(StartupError, match=r"ssl\.key: cannot read"):
            ensure_pair(cert, key)


def test_ssl_endpoints_get_the_pair() -> None:
    done = with_certificate("ssl:9091:interface=127.0.0.1", Path("/a:b/c.crt"),
                            Path("/k.key"))
    assert done == "ssl:9091:interface=127.0.0.1:privateKey=/k.key:certKey=/a\\:b/c.crt"
    assert not uses_default_pair(done)
    assert with_certificate("tcp:9091", Path("/c"), Path("/k")) == "tcp:9091"
    assert uses_default_pair(Config().thrift_endpoint), "the default is TLS with the pair"


def test_ogon_defaults_are_served_with_the_pair_paths(tmp_path: Path) -> None:
    table = property_table(Config(state_dir=tmp_path))
    expected = ("/etc/ssl/certs/ogon.crt" if os.geteuid() == 0
                else str(tmp_path / "tls" / "ogon.crt"))
    assert table.get_string("SSL.Certificate") == expected
    assert table.get_number("session.maxXRes") == 1920
    assert table.get_number("session.timeout") == 1
    assert table.get_string("permission.level") == "USER"
    assert table.get_bool("session.singleSession") is True
    overridden = property_table(Config(state_dir=tmp_path,
                                       properties={"ssl.certificate": "/mine.crt"}))
    assert overridden.get_string("ssl.certificate") == "/mine.crt"


# -- directories others could tamper with ----------------------------------------

def test_socket_directories_must_be_ours_or_sticky(tmp_path: Path) -> None:
    fresh = tmp_path / "pipes"
    check_directory(fresh, "pipe_dir", shared=True)
    expected = 0o1777 if os.geteuid() == 0 else 0o755
    assert stat.S_IMODE(fresh.stat().st_mode) == expected
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StartupError, match="writable by others without the sticky bit"):
        check_directory(open_dir, "icp_endpoint", shared=False)
    open_dir.chmod(0o1777)
    check_directory(open_dir, "icp_endpoint", shared=False)  # what winpr makes: fine
    link = tmp_path / "link"
    link.symlink_to(open_dir)
    with pytest.raises(StartupError, match="not a directory"):
        check_directory(link, "pipe_dir", shared=True)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(StartupError, match="belongs to uid 65534"):
            check_directory(theirs, "icp_endpoint", shared=False)
