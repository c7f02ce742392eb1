"""ogon's D-Bus session notifications, heard on a real dbus-daemon that the
test starts (its own bus, not the system's), by a jeepney client of our own."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jeepney
import pytest
import pytest_twisted
from jeepney import HeaderFields, MatchRule
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs

from bridge.watch import dbus
from tests.conftest import start_bridge
from tests.e2e.otsapi_client import BlockingClient

DBUS_DAEMON = shutil.which("dbus-daemon")
CONFIG = Path(__file__).with_name("dbus-test.conf")
pytestmark = pytest.mark.skipif(DBUS_DAEMON is None,
                                reason="dbus-daemon not installed (Debian: dbus-daemon)")


@pytest.fixture
def bus(short_dir: Path) -> Iterator[str]:
    """A private bus; yields its address."""
    assert DBUS_DAEMON is not None
    daemon = subprocess.Popen(
        [DBUS_DAEMON, "--config-file", str(CONFIG), "--address", f"unix:path={short_dir}/bus",
         "--nofork", "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert daemon.stdout is not None
        address = daemon.stdout.readline().decode().strip()  # printed once it listens
        assert address.startswith("unix:path="), address
        yield address
    finally:
        daemon.terminate()
        daemon.wait(10)


class Listener:
    """Subscribed to the notification signals before anything happens."""

    def __init__(self, address: str) -> None:
        self.connection = open_dbus_connection(address)
        rule = MatchRule(type="signal", interface=dbus.INTERFACE, path=dbus.OBJECT_PATH)
        self.connection.send_and_get_reply(message_bus.AddMatch(rule), timeout=10)

    def collect(self, count: int, timeout: float = 30) -> list[tuple[int, int]]:
        heard: list[tuple[int, int]] = []
        while len(heard) < count:
            message = self.connection.receive(timeout=timeout)
            if message.header.fields.get(HeaderFields.member) == dbus.SIGNAL:
                heard.append(tuple(message.body))  # type: ignore[arg-type]
        return heard

    def owner(self) -> Any:
        reply = self.connection.send_and_get_reply(message_bus.GetNameOwner(dbus.BUS_NAME),
                                                   timeout=10)
        return reply.body[0]

    def close(self) -> None:
        self.connection.close()


@pytest_twisted.ensureDeferred
async def test_the_signals_ogon_sends_in_order(short_dir: Path, bus: str) -> None:
    listener = await deferToThread(Listener, bus)
    bridge = await start_bridge(short_dir, dbus_address=bus)
    try:
        await bridge.service.dbus.when_connected()
        assert (await deferToThread(listener.owner)).startswith(":"), "it owns ogon's name"
        heard = deferToThread(listener.collect, 6)
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")  # a desktop: connected, logged on
        session_id = bridge.service.registry.by_connection(1).session_id
        await peer.client_disconnected(1)
        await peer.logon(2, "alice", "alice-pw")  # back to the disconnected session
        assert bridge.service.registry.by_connection(2).session_id == session_id
        client = BlockingClient(bridge.thrift_port)
        token = (await client.call("logonConnection", "alice", "alice-pw", "")).authToken
        # A failed logon is a journal event of session 0, and no notification.
        assert not (await client.call("logonConnection", "alice", "wrong", "")).success
        assert bridge.service.store.events_after(0, 1000)[-1].event == "logon-failed"
        assert await client.call("logoffSession", token, session_id, True)
        client.close()
        assert await heard == [
            (dbus.WTS_REMOTE_CONNECT, session_id), (dbus.WTS_SESSION_LOGON, session_id),
            (dbus.WTS_REMOTE_DISCONNECT, session_id), (dbus.WTS_REMOTE_CONNECT, session_id),
            # An OTS API logoff of an active session: ogon's TaskShutdown
            # takes it to Disconnected, then Down.
            (dbus.WTS_REMOTE_DISCONNECT, session_id), (dbus.WTS_SESSION_LOGOFF, session_id)]
        assert bridge.service.dbus.sent == 6, "what /metrics counts"
    finally:
        await bridge.stop()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_without_a_bus_one_line_and_the_rest_works(short_dir: Path) -> None:
    with capturedLogs() as events:
        bridge = await start_bridge(short_dir, dbus_address=f"unix:path={short_dir}/no-bus")
        try:
            peer = await bridge.peer()
            await peer.logon(1, "alice", "alice-pw")
            assert bridge.service.registry.by_connection(1).logged_on
        finally:
            await bridge.stop()
    lines = [e for e in events if "D-Bus" in e.get("log_format", "")]
    assert len(lines) == 1 and "keeps trying" in lines[0]["log_format"]
    assert not bridge.service.dbus.connected


# -- the shipped policy ---------------------------------------------------------------

POLICY = Path(__file__).resolve().parents[2] / "contrib" / "dbus" / "icp-bridge.conf"

#: Sends a SessionNotification as if from the session manager, then asks the
#: bus for its id (so that the signal was dealt with before this ends).
#: Runs with Debian's python3 as the test account, with a copy of jeepney.
FORGER = """
import sys
from jeepney import DBusAddress, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
connection = open_dbus_connection(sys.argv[1])
connection.send(new_signal(DBusAddress(sys.argv[2], interface=sys.argv[3]), sys.argv[4], "uu",
                           (5, 4242)))
connection.send_and_get_reply(message_bus.GetId(), timeout=10)
"""


@pytest.fixture
def policed_bus(short_dir: Path) -> Iterator[str]:
    """A private bus that any local user may reach, with the shipped policy
    included after the test bus's allow-everything default (the system
    bus reads its system.d after its own default policy, too)."""
    assert DBUS_DAEMON is not None
    short_dir.chmod(0o755)
    config = short_dir / "bus.conf"
    config.write_text(CONFIG.read_text().replace(
        "</busconfig>", f"  <include>{POLICY}</include>\n</busconfig>"))
    daemon = subprocess.Popen(
        [DBUS_DAEMON, "--config-file", str(config), "--address",
         f"unix:path={short_dir}/bus", "--nofork", "--print-address"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert daemon.stdout is not None
        address = daemon.stdout.readline().decode().strip()
        assert address.startswith("unix:path="), address
        (short_dir / "bus").chmod(0o777)
        yield address
    finally:
        daemon.terminate()
        daemon.wait(10)


def forge_as_another_user(address: str, base: Path) -> None:
    """Run FORGER as the unprivileged test account."""
    import pwd

    from tests.e2e.test_backends import TEST_USER, ensure_test_account

    ensure_test_account()
    account = pwd.getpwnam(TEST_USER)
    library = base / "lib"
    shutil.copytree(Path(jeepney.__file__).parent, library / "jeepney")
    library.chmod(0o755)
    done = subprocess.run(
        ["/usr/bin/python3", "-c", FORGER, address, dbus.OBJECT_PATH, dbus.INTERFACE,
         dbus.SIGNAL], user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/",
        env={"PYTHONPATH": str(library)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the forger runs as another user")
@pytest_twisted.ensureDeferred
async def test_other_users_cannot_send_ogons_notifications(short_dir: Path, policed_bus: str
                                                           ) -> None:
    # The review: any local process could broadcast a fake SessionNotification
    # on ogon's interface; the shipped policy did not deny it.
    listener = await deferToThread(Listener, policed_bus)
    bridge = None
    try:
        # The bus answers a refused signal with no error (a signal expects no
        # reply); what counts is that no listener hears it.
        await deferToThread(forge_as_another_user, policed_bus, short_dir)
        bridge = await start_bridge(short_dir, dbus_address=policed_bus)
        await bridge.service.dbus.when_connected()
        heard = deferToThread(listener.collect, 1)
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        session_id = bridge.service.registry.by_connection(1).session_id
        assert await heard == [(dbus.WTS_REMOTE_CONNECT, session_id)], \
            "the bridge's own signal is the first the listener hears"
    finally:
        if bridge is not None:
            await bridge.stop()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_bus_that_never_answers_is_said_and_tried_again(short_dir: Path) -> None:
    """A bus socket that accepts and then says nothing (a hung dbus-daemon):
    one line after the handshake timeout, the connection dropped, and a
    retry later; before, the bridge waited on it forever, silently."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock

    from bridge.sessions.registry import SessionRegistry

    accepted: list[Protocol] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    path = short_dir / "silent-bus"
    port = await UNIXServerEndpoint(reactor, str(path)).listen(Factory.forProtocol(Silent))
    clock = Clock()
    notifier = dbus.SessionNotifier(reactor, clock, SessionRegistry(clock), f"unix:path={path}")
    try:
        with capturedLogs() as events:
            notifier.start()
            while not (accepted and clock.getDelayedCalls()):  # connected: the timer runs
                await deferLater(reactor, 0, lambda: None)
            assert [e for e in events if "D-Bus" in e.get("log_format", "")] == []
            clock.advance(dbus.HANDSHAKE_TIMEOUT)
            lines = [e["log_format"].format(**e) for e in events
                     if "D-Bus" in e.get("log_format", "")]
        assert lines == [f"D-Bus session notifications are off for now: the bus did not answer "
                         f"within {dbus.HANDSHAKE_TIMEOUT:g} s; everything else works, and the "
                         f"bridge keeps trying"]
        assert not notifier.connected
        assert any(call.getTime() > clock.seconds() for call in clock.getDelayedCalls()), \
            "a retry is scheduled"
    finally:
        notifier.stop()
        await port.stopListening()
