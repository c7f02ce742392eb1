"""The status page in a real browser (Debian's headless Chromium): it shows
the session the stand-in RDP server logs on, live, with ISO dates and how
long ago, counts by state and failed logons; drops it at logoff; says since
when the bridge is unreachable; and, for a token with the rights, logs off,
disconnects and messages through the admin endpoint. Screenshots go to
$ICP_BRIDGE_SCREENSHOTS when set (the README's comes from there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.conftest import start_bridge
from tests.e2e.chromium import Chromium, find_chromium
from tests.e2e.otsapi_client import BlockingClient

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium not installed (Debian: chromium)")
ISO = r"/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n\d+ s ago$/"


def save(png: bytes, name: str, fallback: Path) -> Path:
    directory = Path(os.environ.get("ICP_BRIDGE_SCREENSHOTS", fallback))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(png)
    return path


def drop_connections(site: object) -> None:
    """Close the HTTP connections ``site`` still serves (a stopped service
    keeps them in this process; a bridge that exits does not)."""
    for reader in reactor.getReaders():
        if getattr(getattr(reader, "protocol", None), "site", None) is site:
            reader.abortConnection()


def row(session_id: int) -> str:
    return f"document.querySelector('#sessions tr[data-session-id=\"{session_id}\"]')"


@pytest_twisted.ensureDeferred
async def test_the_page_follows_a_logon_and_a_logoff_and_says_when_the_bridge_is_gone(
        short_dir: Path) -> None:
    assert CHROMIUM is not None
    bridge = await start_bridge(short_dir)
    stopped = False
    browser = None
    try:
        client = BlockingClient(bridge.thrift_port)
        token = (await client.call("logonConnection", "bob", "bob-pw", "")).authToken
        browser = await deferToThread(Chromium, CHROMIUM)
        await deferToThread(browser.navigate,
                            f"http://127.0.0.1:{bridge.admin_port}/#token={token}")
        text = await deferToThread(browser.wait_until,
                                   "!document.getElementById('no-sessions').hidden && "
                                   "document.getElementById('stream').textContent === 'live'")
        assert "No sessions." in text and "0 sessions" in text
        assert await deferToThread(browser.evaluate, "location.hash") == "", \
            "the token is taken out of the address"

        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        await peer.client_disconnected(2)
        alice = bridge.service.registry.by_connection(1).session_id
        text = await deferToThread(
            browser.wait_until,
            f"{row(alice)} && {row(alice)}.innerText.includes('alice') && "
            f"{row(alice)}.innerText.includes('Active') && "
            "document.querySelector('#counts [data-state=\"Disconnected\"]') && "
            "document.getElementById('health-rdpserver').dataset.ok === 'true'")
        assert "logged-on" in text
        assert "2 sessions · 1 Active · 1 Disconnected" in text
        # ISO dates, and how long ago.
        assert await deferToThread(browser.evaluate,
                                   f"{ISO}.test({row(alice)}.cells[4].innerText)")
        # D-Bus is off in this configuration: no red dot for it.
        assert await deferToThread(browser.evaluate, "!document.getElementById('health-dbus') "
                                   "&& !!document.getElementById('health-otsapi')")
        # A USER token (bob's) sees no actions.
        assert await deferToThread(browser.evaluate,
                                   "document.getElementById('actions-head').hidden && "
                                   "!document.querySelector('td.actions')")

        bob = bridge.service.registry.sessions_of("bob", "")[0].session_id
        # Bob's session token (USER, as every desktop has one) sees no failed logons (the
        # page says why) and not alice's client; his own client it does.
        assert "Only a FULL token sees them" in text
        assert await deferToThread(browser.evaluate,
                                   f"{row(alice)}.cells[3].innerText.trim() === '' && "
                                   f"{row(bob)}.cells[3].innerText.includes('client2')")

        # The admin's FULL token (pasted in the form): failed logons show under Failed logons.
        admin = (await client.call("logonConnection", "alice", "alice-pw", "")).authToken
        await deferToThread(browser.evaluate, "sessionStorage.clear(), 1")
        await deferToThread(browser.navigate, f"http://127.0.0.1:{bridge.admin_port}/")
        await deferToThread(browser.wait_until, "!document.getElementById('login').hidden")
        await deferToThread(browser.evaluate,
                            f"document.getElementById('token').value = {admin!r}; "
                            "document.getElementById('login').requestSubmit(), 1")
        await deferToThread(browser.wait_until,
                            f"{row(alice)} && {row(alice)}.innerText.includes('alice') && "
                            "document.getElementById('stream').textContent === 'live' && "
                            "document.getElementById('no-failures').textContent === "
                            "'None seen.'")
        assert not (await client.call("logonConnection", "carol", "nope", "")).success
        text = await deferToThread(
            browser.wait_until,
            "document.querySelector('#failures li[data-event=\"logon-failed\"]')")
        failures = await deferToThread(browser.evaluate,
                                       "document.getElementById('failures').innerText")
        # A local OTS API client is counted, and named, by its uid (issue 18).
        assert f"logon-failed carol (failed logon through the OTS API from uid:{os.geteuid()}, " \
            "1 in a row)" in failures and "session 0" not in failures

        assert await client.call("logoffSession", admin, alice, True)
        client.close()
        text = await deferToThread(
            browser.wait_until,
            f"!{row(alice)} && document.getElementById('events').innerText.includes("
            f"'session {alice} ended')")
        assert "logged off through the OTS API by alice from 127.0.0.1" in text

        # The bridge goes away: the page says since when, and keeps what it had.
        site = bridge.service.admin_listener.factory.factory  # the site the LazyFactory built
        await bridge.stop()
        stopped = True
        drop_connections(site)  # as the process's exit would
        text = await deferToThread(browser.wait_until,
                                   "!document.getElementById('stale').hidden")
        banner = await deferToThread(browser.evaluate,
                                     "document.getElementById('stale').innerText")
        assert banner.startswith("The bridge is unreachable since ")
        assert "showing what it said last" in banner
        assert "1 session · 1 Disconnected" in text
        save(await deferToThread(browser.screenshot), "status-page-unreachable.png",
             short_dir)
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        if not stopped:
            await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_token_logs_off_disconnects_and_messages_from_the_page(
        short_dir: Path) -> None:
    assert CHROMIUM is not None
    bridge = await start_bridge(short_dir)
    browser = None
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        registry = bridge.service.registry
        alice = registry.by_connection(1).session_id
        bob = registry.by_connection(2).session_id
        client = BlockingClient(bridge.thrift_port)
        assert not (await client.call("logonConnection", "bob", "wrong", "")).success
        token = (await client.call("logonConnection", "alice", "alice-pw", "")).authToken
        client.close()
        browser = await deferToThread(Chromium, CHROMIUM)
        await deferToThread(browser.navigate,
                            f"http://127.0.0.1:{bridge.admin_port}/#token={token}")
        button = f"{row(bob)}.querySelector('button[data-action=\"%s\"]')"
        await deferToThread(browser.wait_until,
                            f"{row(bob)} && {button % 'logoff'} && "
                            "document.getElementById('stream').textContent === 'live' && "
                            "document.querySelector('#failures li') && "
                            "document.getElementById('health-rdpserver').dataset.ok === 'true'")
        assert await deferToThread(browser.evaluate,
                                   "!document.getElementById('actions-head').hidden")
        shot = save(await deferToThread(browser.screenshot), "status-page.png", short_dir)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # A message: the form, then the box in bob's session.
        await deferToThread(browser.evaluate, f"{button % 'message'}.click()")
        await deferToThread(browser.evaluate, """(() => {
            document.getElementById('message-title').value = 'Maintenance';
            document.getElementById('message-text').value = 'at noon';
            document.querySelector('#message-form button').click(); })()""")
        await deferToThread(browser.wait_until,
                            "document.getElementById('action-result').innerText === "
                            f"'session {bob}: message sent'")
        sent = peer.seen("MessageRequest")[-1]
        assert (sent.parameter1, sent.parameter2) == ("Maintenance", "at noon")

        # Disconnect: two clicks (the first asks).
        await deferToThread(browser.evaluate, f"{button % 'disconnect'}.click()")
        assert registry.get(bob).connection_id is not None, "one click only asks"
        await deferToThread(browser.evaluate, f"{button % 'disconnect'}.click()")
        await deferToThread(browser.wait_until,
                            f"{row(bob)} && {row(bob)}.innerText.includes('Disconnected')")
        assert registry.get(bob).connection_id is None

        # Log off ends the session.
        logoff = f"{row(alice)}.querySelector('button[data-action=\"logoff\"]')"
        await deferToThread(browser.evaluate, f"{logoff}.click(); {logoff}.click()")
        text = await deferToThread(browser.wait_until, f"!{row(alice)}")
        assert registry.get(alice) is None
        assert f"session {alice}: logged off" in text
        reasons = [e.reason for e in bridge.service.store.events_after(0, 1000)
                   if e.session_id == alice and e.event == "ended"]
        assert reasons == ["logged off through the admin endpoint by alice from 127.0.0.1"]
        save(await deferToThread(browser.screenshot), "status-page-after-logoff.png",
             short_dir)
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await bridge.stop()
