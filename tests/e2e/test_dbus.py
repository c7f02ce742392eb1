"""ogon's D-Bus session notifications, heard on a real dbus-daemon that the
test starts (its own bus, not the system's), by a jeepney client of our own."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from jeepney import HeaderFields, MatchRule
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
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
