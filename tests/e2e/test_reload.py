"""Reloading the configuration in a running bridge (what SIGHUP does; the
signal itself is sent to a real twistd in test_operating.py): what changed
is applied and logged key by key, sessions are untouched, restart-only keys
wait for a restart, and a configuration that does not check is refused
with one line while the running one stays."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bridge.config_sources import ConfigSources
from bridge.daemon.notify import SystemdNotifier
from bridge.reload import Reloader
from bridge.security.auth import UserEntry, hash_password, write_users
from bridge.security.permissions import FULL
from bridge.service import BridgeService
from bridge.tap import DaemonService
from tests.conftest import ME, STANDIN_BACKEND, BridgeUnderTest, kill_process_groups
from tests.e2e.sse import get
from tests.e2e.test_admin import samples
from tests.e2e.test_ogon_install import ask

BACKEND = [sys.executable, str(STANDIN_BACKEND), "--socket", "{pipe_dir}/{endpoint}"]


def toml(base: Path, properties: str = '"session.timeout" = 30', desktop: str = "xsession",
         environment: str = "", **top: object) -> str:
    """A configuration for a bridge in ``base``; ``top`` replaces or adds
    top-level keys (TOML values as text)."""
    keys = {"icp_endpoint": f'"unix:{base}/icp.sock:mode=600"',
            "thrift_endpoint": '"tcp:0:interface=127.0.0.1"',
            "admin_endpoint": '"tcp:0:interface=127.0.0.1"', "dbus_address": '""',
            "state_dir": f'"{base}/state"', "users_file": f'"{base}/users"',
            "token_dir": f'"{base}/tokens"', "pipe_dir": f'"{base}/pipes"', **top}
    return "\n".join(f"{key} = {value}" for key, value in keys.items()) + f"""
[properties]
{properties}
[modules.greeter]
command = {json.dumps(BACKEND)}
endpoint = "ogon_{{session_id}}_Qt"
user = "{ME}"
[modules.{desktop}]
command = {json.dumps(BACKEND)}
endpoint = "ogon_{{session_id}}_{desktop}"
user = "{ME}"
{environment}
"""


async def start(base: Path, text: str) -> tuple[BridgeUnderTest, Reloader, Path]:
    write_users(base / "users", [UserEntry("alice", FULL, hash_password("alice-pw", n=1024))])
    path = base / "bridge.toml"
    path.write_text(text)
    sources = ConfigSources.for_service(path)
    service = BridgeService(sources.load().config, reactor)
    service.startService()
    levels: list[str] = []
    reloader = Reloader(service, sources, levels.append)
    reloader.levels = levels  # type: ignore[attr-defined]
    return BridgeUnderTest(service, base), reloader, path


def said(events: list[dict[str, Any]]) -> list[str]:
    return [e["log_format"].format(**e) for e in events if e["log_namespace"] == "bridge.reload"
            or e.get("log_namespace", "").startswith("bridge.reload.")]


@pytest_twisted.ensureDeferred
async def test_a_reload_applies_what_changed_and_leaves_sessions_alone(short_dir: Path) -> None:
    bridge, reloader, path = await start(short_dir, toml(short_dir))
    pids: list[int] = []
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        session = bridge.service.registry.by_connection(1)
        backend_pid = session.backend.pid
        pids = bridge.backend_pids()
        service = bridge.service
        assert service.channels.allowed("cliprdr", "alice")  # parsed and cached
        path.write_text(toml(
            short_dir, properties='"session.timeout" = 5\n"virtualChannel.whiteList" = "rdpsnd"\n'
                                  '"site.secret" = "hunter2"\n',
            idle_timeout=60, lockout_failures=4, token_lifetime=600, log_level='"debug"',
            call_timeout=3, icp_endpoint=f'"unix:{short_dir}/other.sock"', desktop="kde",
            environment='environment = { TOKEN = "s3cret" }\n'
                        '[user_properties.alice]\n"module" = "kde"\n'))
        with capturedLogs() as events:
            def set_level(level: str) -> None:  # where the level changes among the lines
                reloader.levels.append(level)  # type: ignore[attr-defined]
                events.append({"log_format": f"(level {level})", "log_namespace": "bridge.reload"})
            reloader.set_log_level = set_level
            assert reloader.reload()
        lines = said(events)
        # Set before the change lines: a more verbose level shows its own change.
        assert lines.index("(level debug)") < lines.index("reload: log_level: 'info' -> 'debug'")
        assert "reload: properties.session.timeout: 30 -> 5" in lines
        assert "reload: properties.site.secret: added" in lines, "no value of a site's own"
        assert "reload: modules.kde: added" in lines and "reload: modules.xsession: removed" \
            in lines
        assert "reload: idle_timeout: 3600.0 -> 60.0" in lines
        assert "reload: log_level: 'info' -> 'debug'" in lines
        assert any(line.startswith(f"reload: call_timeout: 10.0 -> 3.0 in {path}: takes "
                                   f"effect at the next restart") for line in lines)
        assert any(line.startswith("reload: icp_endpoint:") and "next restart" in line
                   for line in lines)
        assert not any("hunter2" in line or "s3cret" in line for line in lines)
        # Applied:
        assert service.properties.get_number("session.timeout", "bob") == 5
        assert not service.channels.allowed("cliprdr", "alice"), "the whiteList read again"
        assert service.thrift_limits.idle_timeout == 60.0
        assert service.guard.policy.lockout_failures == 4
        assert service.otsapi.token_lifetime == 600.0
        assert reloader.levels == ["debug"]  # type: ignore[attr-defined]
        assert set(service.lifecycle.modules) == {"greeter", "kde"}
        # Kept until a restart:
        assert service.config.call_timeout == 10.0
        assert service.config.icp_endpoint == f"unix:{short_dir}/icp.sock:mode=600"
        # Sessions untouched; the next logon uses the new module.
        assert service.registry.by_connection(1) is session
        assert session.backend.pid == backend_pid and bridge.backend_pids()[0] == backend_pid
        await peer.logon(2, "alice", "alice-pw")  # single session: takes the first over
        await peer.logon(3, "", "")  # a greeter, from the greeter module
        pids = bridge.backend_pids()
        assert service.operations.reloads["applied"] == 1
    finally:
        await bridge.stop()
        kill_process_groups(pids)


@pytest_twisted.ensureDeferred
async def test_a_configuration_that_does_not_check_is_refused(short_dir: Path) -> None:
    bridge, reloader, path = await start(short_dir, toml(short_dir))
    try:
        service = bridge.service
        before = service.config
        path.write_text(toml(short_dir, properties='"session.timeout" = "5"\n',
                             frame_timeout=1, no_such_key=1))
        with capturedLogs() as events:
            assert not reloader.reload()
        [line] = said(events)
        assert line == (f"configuration not reloaded, the running one stays: {path}: "
                        f"unknown option 'no_such_key' (and 1 more: `icp-bridge config check` "
                        f"lists them)")
        assert service.config is before and service.thrift_limits.frame_timeout == 10.0
        assert service.properties.get_number("session.timeout") == 30
        # A preflight error refuses it too.
        path.write_text(toml(short_dir, properties='"module" = "nowhere"\n'))
        with capturedLogs() as events:
            assert not reloader.reload()
        assert "names module 'nowhere', which is not defined" in said(events)[0]
        port = bridge.admin_port
        health = json.loads((await get(port, "/healthz"))[1])
        assert health["degraded"][0].startswith("the configuration on disk was refused")
        metrics = samples((await get(port, "/metrics"))[1].decode())
        assert metrics["icp_bridge_config_reloads_total", (("outcome", "refused"),)] == 2
        assert metrics["icp_bridge_config_reload_refused", ()] == 1
        path.write_text(toml(short_dir))
        assert reloader.reload()
        assert json.loads((await get(port, "/healthz"))[1])["degraded"] == []
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_config_ini_again_in_one_step_with_the_toml(
        short_dir: Path) -> None:
    """ogon's config.ini is read again at a reload, as ogon reads it on
    SIGHUP, together with the TOML file: its changes are logged line by line
    and served over ICP; one that cannot be used refuses the whole reload
    with its line (the TOML file's changes wait with it)."""
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_maxXRes_number=1600\n"
                   "[user_alice]\npermission_level_string=FULL\n")
    ogon = {"ogon_config": f'"{ini}"', "authenticator": '"users-file"'}
    bridge, reloader, path = await start(short_dir, toml(short_dir, **ogon))
    try:
        service = bridge.service
        peer = await bridge.peer()
        assert await ask(peer, "number", "session.maxXRes") == (True, 1600)
        assert await peer.is_channel_allowed("rdpsnd")
        ini.write_text("[global]\nsession_maxXRes_number=2048\nsession_timeout_string=5\n"
                       "virtualChannel_whiteList_string=cliprdr\n")
        path.write_text(toml(short_dir, properties='"session.timeout" = 40', **ogon))
        with capturedLogs() as events:
            assert reloader.reload()
        lines = said(events)
        assert "reload: properties.session.timeout: 30 -> 40" in lines
        assert f"reload: {ini}: session.maxXRes: 1600 -> 2048" in lines
        assert f"reload: {ini}: session.timeout: (unset) -> '5'" in lines
        assert f"reload: {ini}: virtualChannel.whiteList: (unset) -> 'cliprdr'" in lines
        assert f"reload: {ini} [user_alice]: permission.level: 'FULL' -> (unset)" in lines
        assert f"configuration reloaded from {path}, {ini}: 5 changes" in lines
        logged = [e["log_format"].format(**e) for e in events]
        assert f"property session.timeout: the TOML file's [properties] overrides {ini}:3" \
            in logged
        assert (f"{ini}:3: session.timeout is a string here, but ogon reads it as a number: "
                f"asked for a number, it is not found and its reader falls back to its own "
                f"value (as in ogon; use the _number suffix)") in logged
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)
        assert await ask(peer, "number", "session.timeout") == (True, 40), "the TOML wins"
        assert not await peer.is_channel_allowed("rdpsnd"), "the whiteList is read again"
        assert service.properties.get_string("permission.level", "alice") == "USER"

        ini.write_text("[global]\nsession_maxXRes_number=4096\n[global]\nx_string=y\n")
        path.write_text(toml(short_dir, properties='"session.timeout" = 50', **ogon))
        with capturedLogs() as events:
            assert not reloader.reload()
        assert said(events) == [
            f"configuration not reloaded, the running one stays: {ini}:3: section [global] "
            f"given twice (ogon then ignores the whole file)"]
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)
        assert await ask(peer, "number", "session.timeout") == (True, 40)
        assert service.config.properties["session.timeout"] == 40
        assert service.operations.reloads == {"applied": 1, "refused": 1}
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_the_users_file_again_and_follows_a_new_path(
        short_dir: Path) -> None:
    bridge, reloader, path = await start(short_dir, toml(short_dir))
    try:
        users = bridge.service.operations.users
        assert users is not None and set(users.users()) == {"alice"}
        write_users(short_dir / "users2", [UserEntry("bob", FULL, hash_password("b", n=1024))])
        path.write_text(toml(short_dir, users_file=f'"{short_dir}/users2"'))
        with capturedLogs() as events:
            assert reloader.reload()
        assert users.path == short_dir / "users2" and set(users.users()) == {"bob"}
        assert any("users file" in e["log_format"] and e.get("users") == 1 for e in events)
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_daily_line_while_the_certificate_nears_its_end(short_dir: Path) -> None:
    bridge, _, path = await start(short_dir, toml(short_dir))
    try:
        daemon = DaemonService(bridge.service, ConfigSources.for_service(path), None,
                               SystemdNotifier({}))
        operations = bridge.service.operations
        operations.certificate_path = "/etc/ssl/certs/ogon.crt"
        for left, level in ((90 * 86400, None), (5 * 86400, "warn"), (-60, "error")):
            operations.certificate_not_after = time.time() + left
            with capturedLogs() as events:
                daemon.certificate_reminder()
            assert [e["log_level"].name for e in events] == ([level] if level else [])
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_systemds_status_follows_the_sessions(short_dir: Path) -> None:
    """STATUS= (what `systemctl status` shows) is the sessions by state, kept
    current at most once a second; not only what it was at READY=1."""
    bridge, _, path = await start(short_dir, toml(short_dir))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(short_dir / "notify"))
    listener.setblocking(False)

    def received() -> list[str]:
        messages = []
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except BlockingIOError:
                return messages

    pids: list[int] = []
    try:
        daemon = DaemonService(bridge.service, ConfigSources.for_service(path), None,
                               SystemdNotifier({"NOTIFY_SOCKET": str(short_dir / "notify")}))
        daemon.clock = clock = Clock()
        daemon.follow_sessions()
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "", "")  # the greeter
        pids = bridge.backend_pids()
        assert received() == [], "not at every change"
        clock.advance(1)
        assert received() == ["STATUS=2 sessions (1 Active, 1 Connected)"]
        await peer.client_disconnected(1)
        clock.advance(1)
        assert received() == ["STATUS=2 sessions (1 Connected, 1 Disconnected)"]
    finally:
        listener.close()
        await bridge.stop()
        kill_process_groups(pids)
