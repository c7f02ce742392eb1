"""Lockouts that cannot be aimed at others, over real sockets (issue 18,
item 4): junk OTS API logons from one local user (a real unprivileged
process, ``icpbtest``) lock out that user's connections, not every local
caller, though all of them dial 127.0.0.1. And lockouts that cannot be
escaped: a local client that resets its connection right after its frame
is still counted (redteam finding 8)."""

from __future__ import annotations

import os
import pwd
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from protocols.thrift_server import UNKNOWN_LOCAL_SOURCE
from tests.conftest import start_bridge
from tests.e2e.otsapi_client import BlockingClient
from tests.e2e.test_backends import TEST_USER, ensure_test_account
from tests.test_thrift_server import call_bytes, decode_replies, framed

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: the attacker runs as another user")

#: Sends the frames given in hex from the source address given, reads the
#: replies; runs with Debian's python3 as the test account.
ATTACKER = """
import socket, struct, sys
port, source, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[4])
frames = bytes.fromhex(sys.argv[3])
s = socket.socket()
s.bind((source, 0))
s.connect(("127.0.0.1", port))
s.settimeout(30)
s.sendall(frames)
data = b""
replies = 0
while replies < count:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
    replies, offset = 0, 0
    while offset + 4 <= len(data):
        (length,) = struct.unpack_from("!i", data, offset)
        if offset + 4 + length > len(data):
            break
        offset += 4 + length
        replies += 1
sys.stdout.write(data.hex())
"""


def attack(port: int, source: str, calls: int) -> bytes:
    frames = b"".join(framed(call_bytes("logonConnection", n, username=f"junk{n}",
                                        password="guess", domain="")) for n in range(calls))
    account = pwd.getpwnam(TEST_USER)
    done = subprocess.run(["/usr/bin/python3", "-c", ATTACKER, str(port), source, frames.hex(),
                           str(calls)], user=account.pw_uid, group=account.pw_gid,
                          extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60,
                          check=True)
    return bytes.fromhex(done.stdout)


@needs_root
@pytest_twisted.ensureDeferred
async def test_junk_logons_of_one_local_user_do_not_lock_out_the_others(short_dir: Path
                                                                          ) -> None:
    ensure_test_account()
    bridge = await start_bridge(short_dir)
    try:
        # The review: 10 junk logons with made-up names from 127.0.0.1 locked
        # every local OTS API logon (ogon's WTSAPI provider dials localhost)
        # for 900 s, while an attacker on 127.0.0.2 was not affected.
        for source in ("127.0.0.1", "127.0.0.2"):
            replies = await deferToThread(attack, bridge.thrift_port, source, 12)
            assert [r.success for _, r in decode_replies(replies, "logonConnection")] == \
                [False] * 12
        client = BlockingClient(bridge.thrift_port)
        try:
            result = await client.call("logonConnection", "alice", "alice-pw", "")
        finally:
            client.close()
        assert result.success, "root, dialling 127.0.0.1 too, is not locked out"
        from bridge.security.throttle import source_key

        attacker = f"uid:{pwd.getpwnam(TEST_USER).pw_uid}"
        assert bridge.service.guard.locked(source_key(attacker)) > 0, \
            "the local user who sent the junk is"
    finally:
        await bridge.stop()


class FailuresSeen:
    """A LogonGuard observer: (username, source) of each failed logon;
    ``until(n)`` fires once n were seen."""

    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def until(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((count, d))
        self._fire()
        return d

    def logon_failed(self, username: str, source: str, kind: str, failures: int) -> None:
        self.failed.append((username, source))
        self._fire()

    def locked_out(self, *args: Any) -> None:
        pass

    def _fire(self) -> None:
        for entry in [e for e in self._waiting if len(self.failed) >= e[0]]:
            self._waiting.remove(entry)
            entry[1].callback(None)


def junk_logons(count: int, password: str = "guess") -> bytes:
    return b"".join(framed(call_bytes("logonConnection", n, username=f"junk{n}",
                                      password=password, domain="")) for n in range(count))


def send_and_reset(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` and reset the connection at once (SO_LINGER {1, 0}):
    the client's socket is gone before the bridge reads the frame."""
    sock.sendall(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def answered_ping(port: int) -> socket.socket:
    """A connection the bridge has surely accepted: its ping was answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(framed(call_bytes("ping", 1, input=1)))
    reply = b""
    while len(reply) < 4 or len(reply) < 4 + struct.unpack_from("!i", reply)[0]:
        chunk = sock.recv(4096)
        assert chunk, "the bridge closed before answering the ping"
        reply += chunk
    return sock


@pytest_twisted.ensureDeferred
async def test_a_client_resetting_right_after_its_logon_is_still_its_local_user(
        short_dir: Path) -> None:
    """The owner of a loopback client's socket is asked of the kernel when
    the connection is accepted: a failed logon whose connection was reset
    before its frame was read still counts against the local user (uid:N),
    never against no source."""
    bridge = await start_bridge(short_dir)
    try:
        seen = FailuresSeen()
        bridge.service.guard.observers.append(seen)
        sock = await deferToThread(answered_ping, bridge.thrift_port)
        (server_side,) = bridge.service.thrift_factory.connections
        # The bridge reads nothing until the client's socket is gone.
        server_side.transport.stopReading()
        try:
            await deferToThread(send_and_reset, sock, junk_logons(1, password="wrong"))
        finally:
            server_side.transport.startReading()
        await seen.until(1)
        assert seen.failed == [("junk0", f"uid:{os.geteuid()}")]
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_loopback_clients_of_unknown_owner_share_one_source_that_locks(
        short_dir: Path) -> None:
    """A client whose socket is gone before the bridge even accepts the
    connection (sent its logons and reset while the listener was not
    reading) has no owner the kernel can name: it counts as the one shared
    source uid:unknown, which locks out after lockout_failures like any
    other, instead of escaping per-source counting."""
    from bridge.security.throttle import source_key

    bridge = await start_bridge(short_dir)
    try:
        seen = FailuresSeen()
        bridge.service.guard.observers.append(seen)
        port = bridge.service.thrift_listener.port
        assert port is not None
        limit = bridge.service.guard.policy.lockout_failures

        def vanish() -> None:
            sock = socket.create_connection(("127.0.0.1", bridge.thrift_port), timeout=30)
            send_and_reset(sock, junk_logons(limit))

        port.stopReading()  # the kernel completes the connection; no one accepts it yet
        try:
            await deferToThread(vanish)
        finally:
            port.startReading()
        await seen.until(limit)
        assert {source for _, source in seen.failed} == {UNKNOWN_LOCAL_SOURCE}
        assert bridge.service.guard.locked(source_key(UNKNOWN_LOCAL_SOURCE)) > 0
        # An attributed local client is not caught by that lock.
        client = BlockingClient(bridge.thrift_port)
        try:
            result = await client.call("logonConnection", "alice", "alice-pw", "")
        finally:
            client.close()
        assert result.success
    finally:
        await bridge.stop()
