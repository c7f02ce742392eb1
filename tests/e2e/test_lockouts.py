"""Lockouts that cannot be aimed at others, over real sockets (issue 18,
item 4): junk OTS API logons from one local user (a real unprivileged
process, ``icpbtest``) lock out that user's connections, not every local
caller, though all of them dial 127.0.0.1."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

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
