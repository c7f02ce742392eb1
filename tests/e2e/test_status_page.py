"""The status page in a real browser (Debian's headless Chromium): it shows
the session the stand-in RDP server logs on, live, and drops it at logoff.
Screenshots go to $ICP_BRIDGE_SCREENSHOTS when set (the README's comes from
there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import start_bridge
from tests.e2e.chromium import Chromium, find_chromium
from tests.e2e.otsapi_client import BlockingClient

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium not installed (Debian: chromium)")


def save(png: bytes, name: str, fallback: Path) -> Path:
    directory = Path(os.environ.get("ICP_BRIDGE_SCREENSHOTS", fallback))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(png)
    return path


@pytest_twisted.ensureDeferred
async def test_the_page_follows_a_logon_and_a_logoff(short_dir: Path) -> None:
    assert CHROMIUM is not None
    bridge = await start_bridge(short_dir)
    browser = None
    try:
        client = BlockingClient(bridge.thrift_port)
        token = (await client.call("logonConnection", "alice", "alice-pw", "")).authToken
        browser = await deferToThread(Chromium, CHROMIUM)
        await deferToThread(browser.navigate,
                            f"http://127.0.0.1:{bridge.admin_port}/#token={token}")
        text = await deferToThread(browser.wait_until,
                                   "!document.getElementById('no-sessions').hidden && "
                                   "document.getElementById('stream').textContent === 'live'")
        assert "No sessions." in text
        assert await deferToThread(browser.evaluate, "location.hash") == "", \
            "the token is taken out of the address"

        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        session_id = bridge.service.registry.by_connection(1).session_id
        row = f"document.querySelector('#sessions tr[data-session-id=\"{session_id}\"]')"
        text = await deferToThread(
            browser.wait_until,
            f"{row} && {row}.innerText.includes('alice') && {row}.innerText.includes('Active')"
            " && document.getElementById('health-rdpserver').dataset.ok === 'true'")
        assert "logged-on" in text
        first = save(await deferToThread(browser.screenshot), "status-page.png", short_dir)
        assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        assert await client.call("logoffSession", token, session_id, True)
        client.close()
        text = await deferToThread(
            browser.wait_until,
            f"!{row} && document.getElementById('events').innerText.includes("
            f"'session {session_id} ended')")
        assert "No sessions." in text
        save(await deferToThread(browser.screenshot), "status-page-after-logoff.png",
             short_dir)
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await bridge.stop()
