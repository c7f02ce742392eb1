"""The status page's farm view in a real browser (Debian's headless
Chromium): every host with a host column, a host that stops is marked
stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from bridge.security.auth import Identity
from bridge.security.permissions import FULL
from tests.e2e.chromium import Chromium, find_chromium
from tests.e2e.test_status_page import save
from tests.farm.pg import FarmDatabase
from tests.farm.test_shipping import farm_bridge

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium not installed (Debian: chromium)")


@pytest_twisted.ensureDeferred
async def test_the_farm_view_shows_hosts_and_marks_a_stale_one(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    assert CHROMIUM is not None
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    browser = None
    a_running = True
    try:
        peer = await a.peer()
        await peer.logon(1, "alice", "alice-pw")
        token = c.service.tokens.issue(Identity("admin", "", FULL))
        browser = await deferToThread(Chromium, CHROMIUM)
        await deferToThread(browser.navigate, f"http://127.0.0.1:{c.admin_port}/#token={token}")
        host_a = "document.querySelector('#farm-hosts tr[data-host=\"host-a\"]')"
        alice = "document.querySelector('#farm-sessions tr[data-host=\"host-a\"]')"
        text = await deferToThread(
            browser.wait_until,
            f"!document.getElementById('farm').hidden && {host_a} && "
            f"{host_a}.dataset.stale === 'false' && {alice} && "
            f"{alice}.innerText.includes('alice')")
        assert "FARM" in text.upper() and "host-c" in text
        await a.stop()
        a_running = False
        text = await deferToThread(
            browser.wait_until,
            f"{host_a} && {host_a}.dataset.stale === 'true' && "
            f"{alice}.innerText.includes('host-a (stale)') && "
            f"{alice}.innerText.includes('Disconnected')")
        assert "stale" in text
        save(await deferToThread(browser.screenshot), "status-page-farm.png", short_dir)
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        if a_running:
            await a.stop()
        await c.stop()
