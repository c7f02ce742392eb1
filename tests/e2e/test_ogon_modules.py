"""ogon's module kinds end to end, with stand-ins for ogon's programs
(tests/ogon_standins) and the stand-in RDP server: the Qt greeter, a
greeter login into an X11 desktop (display, xauth, startwm as the user),
its logoff in ogon's order; the same through ogon-backend-launcher; a
restart with the desktop alive."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from bridge.backends.ogon import xauth
from bridge.rdp.standin import StandInRdpServer
from tests.conftest import BridgeUnderTest, alive, kill_process_groups, start_bridge
from tests.e2e.ogon_site import PYTHON, OgonSite, desktop_account
from tests.e2e.test_ogon_install import DEBIAN
from tests.e2e.test_twistd import _kill_leftover_twistd, cli, free_port, start_twistd

__all__ = ["_kill_leftover_twistd"]  # the twistd children a test started, killed after it
pytestmark = pytest.mark.skipif(not os.path.exists(PYTHON),
                                reason=f"the stand-ins for ogon's programs run with {PYTHON}")

GREETER_ENV = ["PATH", "OGON_COOKIE", "OGON_BACKEND_COOKIE", "OGON_USER", "OGON_SID",
               "OGON_SESSION_CLIENT_NAME", "OGON_SESSION_CLIENT_ADDRESS", "OGON_SMAX",
               "OGON_UID", "OGON_PID", "OGON_CONNECTION_BPP", "OGON_PIPE_PATH"]
DESKTOP_ENV = ["PATH", "UID", "SHELL", "USER", "HOME", "OGON_COOKIE", "OGON_BACKEND_COOKIE",
               "OGON_SID", "OGON_SESSION_CLIENT_NAME", "OGON_SESSION_CLIENT_ADDRESS",
               "OGON_SMAX", "OGON_UID", "OGON_CONNECTION_BPP", "XAUTHORITY"]


@pytest.fixture
def site() -> Iterator[OgonSite]:
    """A short temp dir others may traverse, with the stand-in installation."""
    base = Path(tempfile.mkdtemp(prefix="ib-ogon-", dir="/tmp"))
    base.chmod(0o755)
    made = OgonSite(base)
    yield made
    made.kill_all()
    if not os.environ.get("ICPB_KEEP_OGON_SITE"):  # to read the records after a failure
        shutil.rmtree(base, ignore_errors=True)


async def ogon_bridge(site: OgonSite, **properties: Any) -> BridgeUnderTest:
    """A bridge with no command module: ogon's kinds from ogon's defaults
    and ``properties``; ogon's bin directory is the stand-ins'."""
    account = desktop_account()
    bridge = await start_bridge(
        site.base, modules={}, ogon_bin_dirs=[str(site.bin)],
        properties={"session.timeout": 30, **properties}, user_properties={},
        users={account: ("pw", 0x49), "alice": ("alice-pw", 0x1FF)})
    bridge.account = account  # type: ignore[attr-defined]
    return bridge


@pytest_twisted.async_yield_fixture
async def local(site: OgonSite) -> AsyncIterator[BridgeUnderTest]:
    bridge = await ogon_bridge(site, **{"module.xsession.uselauncher": False,
                                        "module.xsession.stopwm": f"{site.bin}/stopwm"})
    yield bridge
    await bridge.stop()


@pytest_twisted.async_yield_fixture
async def launched(site: OgonSite) -> AsyncIterator[BridgeUnderTest]:
    # ogon's default: X11 through the launcher.
    bridge = await ogon_bridge(site, **{"module.xsession.stopwm": f"{site.bin}/stopwm"})
    yield bridge
    await bridge.stop()


def home_of(account: str) -> str:
    return pwd.getpwnam(account).pw_dir


def xauth_entries(path: str) -> list[tuple[int, bytes, bytes, bytes, int]]:
    return [(f, a, n, name, len(data)) for f, a, n, name, data in
            xauth.parse(Path(path).read_bytes())]


@pytest_twisted.ensureDeferred
async def test_the_qt_greeter_as_ogon_starts_it(site: OgonSite, local: BridgeUnderTest
                                                ) -> None:
    peer = await local.peer()
    answer = await peer.logon(1, "nosuchuser", "")
    session = local.service.registry.by_connection(1)
    sid = session.session_id
    assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{sid}_Qt"
    assert peer.connections[1].backend_session == sid, "the RDP server got its one connection"
    greeter = site.record("ogon-qt-greeter")
    assert greeter["argv"] == [f"{site.bin}/ogon-qt-greeter", "-platform", "ogon"]
    assert greeter["uid"] == os.geteuid(), "as the bridge's user: a greeter has no account"
    assert greeter["cwd"] == os.getcwd(), "ogon's Qt module leaves the directory as it is"
    assert greeter["pid"] == greeter["pgid"] == greeter["sid"]
    assert greeter["env_order"] == GREETER_ENV, "ogon's names, in ogon's order"
    env = greeter["env"]
    assert env["OGON_USER"] == "nosuchuser", "what the client typed"
    assert env["OGON_PIPE_PATH"] == f"{site.pipes}/ogon_{sid}_Qt"
    assert env["OGON_SMAX"] == "1920x1200" and env["OGON_CONNECTION_BPP"] == "32"
    assert env["OGON_PID"] == str(os.getpid()) and env["OGON_UID"] == str(os.getuid())
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert sorted(greeter["fds"]) == ["0", "1", "2"], "nothing else inherited"
    assert session.win_station_name == f"Qt:{greeter['pid']}"
    await site.when_recorded("ogon-qt-greeter", lambda r: any(
        e["what"] == "accepted the one connection" for e in r["events"]))


async def greeter_login_to_x11(bridge: BridgeUnderTest, site: OgonSite) -> int:
    account = bridge.account  # type: ignore[attr-defined]
    peer = await bridge.peer()
    await peer.logon(1, "", "", width=1600, height=900)
    sid = bridge.service.registry.by_connection(1).session_id
    assert await peer.greeter_login(1, account, "pw") == 0
    await site.when_recorded("ogonXsession", lambda r: "x_socket" in r)
    [switch] = peer.seen("SwitchToRequest")
    display = site.record("ogon-backend-x")["display"]
    assert switch.serviceEndpoint == f"\\\\.\\pipe\\ogon_{display}_X11"
    assert peer.connections[1].backend_session == sid, "connected to the X server's pipe"
    return sid


def check_x11_desktop(site: OgonSite, account: str, sid: int) -> dict[str, Any]:
    entry = pwd.getpwnam(account)
    home = entry.pw_dir
    x = site.record("ogon-backend-x")
    display = x["display"]
    assert display >= 10, "the first free display from ogon's displayOffset"
    xauthority = f"{home}/.Xauthority.ogon"
    fd = x["opts"]["-displayfd"].split(":")[0]
    assert x["argv"][1:] == ["-displayfd", f"{fd}:10", "-geometry", "1600x900", "-depth", "24",
                             "-dpi", "96", "-auth", xauthority]
    # (A script's argv[0] is its path: the kernel's #! handling puts it there.)
    assert x["argv"][0] == f"{site.bin}/ogon-backend-x", "looked up in ogon's bin dir"
    assert (x["uid"], x["gid"]) == (entry.pw_uid, entry.pw_gid), "the X server runs as the user"
    assert sorted(os.getgrouplist(account, entry.pw_gid)) == x["groups"]
    assert x["cwd"] == home
    assert x["env"]["XAUTHORITY"] == xauthority and "DISPLAY" not in x["env"]
    assert x["env_order"] == DESKTOP_ENV
    assert "LOGNAME" not in x["env"] and "OGON_USER" not in x["env"]
    assert x["env"]["OGON_SID"] == str(sid)
    assert x["auth_at_start"]["uid"] == entry.pw_uid and x["auth_at_start"]["mode"] == 0o600
    [(family, address, number, name, size)] = xauth_entries(xauthority)
    assert (family, address, number, name, size) == (
        256, socket.gethostname().encode(), b"", b"MIT-MAGIC-COOKIE-1", 16)
    wm = site.record("ogonXsession")
    assert wm["argv"] == [f"{site.bin}/ogonXsession"], "ogon's default startwm, found on PATH"
    assert (wm["uid"], wm["gid"], wm["cwd"]) == (entry.pw_uid, entry.pw_gid, home)
    assert wm["env"]["DISPLAY"] == f":{display}" and wm["env"]["XAUTHORITY"] == xauthority
    assert wm["env_order"] == [*DESKTOP_ENV, "DISPLAY"]
    assert wm["x_socket"] == "connected"
    return x


@pytest_twisted.ensureDeferred
async def test_greeter_login_into_an_x11_desktop_and_logoff(site: OgonSite,
                                                            local: BridgeUnderTest) -> None:
    account = local.account  # type: ignore[attr-defined]
    sid = await greeter_login_to_x11(local, site)
    x = check_x11_desktop(site, account, sid)
    wm = site.record("ogonXsession")
    assert x["pid"] == x["pgid"] == x["sid"], "started by the bridge: its own session"
    session = local.service.registry.get(sid)
    assert session.win_station_name == f"X11:{x['display']}"
    assert session.backend.processes[0].pid == wm["pid"], "the window manager is recorded"
    greeter = site.record("ogon-qt-greeter")
    assert greeter["ended"] == {"signal": "SIGTERM"}, "the greeter stopped after the switch"

    module_pids = [x["pid"], wm["pid"]]
    exited = local.service.lifecycle.backends[sid].when_exited()
    assert await local.service.lifecycle.logoff(session, True)
    assert await exited == "stopped"
    running = [b.pid for b in local.service.launcher.running()]
    assert all(pid not in running for pid in module_pids)
    stopwm = site.record("stopwm")
    x, wm = site.record("ogon-backend-x"), site.record("ogonXsession")
    assert stopwm["uid"] == pwd.getpwnam(account).pw_uid and stopwm["x_socket"] == "connected"
    assert wm["ended"] == {"signal": "SIGTERM"} and x["ended"] == {"signal": "SIGTERM"}
    order = [stopwm["started"], site.event_time("ogonXsession", "ended"),
             site.event_time("ogon-backend-x", "ended")]
    assert order == sorted(order), "stopwm, then the window manager, then the X server"
    assert not (site.pipes / f"ogon_{x['display']}_X11").exists()
    assert (Path(home_of(account)) / ".Xauthority.ogon").exists(), "never deleted, as ogon"


@pytest_twisted.ensureDeferred
async def test_the_same_through_ogon_backend_launcher(site: OgonSite,
                                                      launched: BridgeUnderTest) -> None:
    account = launched.account  # type: ignore[attr-defined]
    sid = await greeter_login_to_x11(launched, site)
    x = check_x11_desktop(site, account, sid)
    launcher = site.record("ogon-backend-launcher")
    assert launcher["argv"] == [f"{site.bin}/ogon-backend-launcher", str(sid)]
    assert launcher["uid"] == os.geteuid(), "the launcher runs as root, as ogon's"
    assert launcher["pid"] == launcher["sid"], "it made its own session"
    assert x["ppid"] == launcher["pid"] and x["sid"] == launcher["pid"]
    keeper = [b for b in launched.service.launcher.running() if b.name == "launcher-keeper"]
    assert [k.pid for k in keeper] == [launcher["ppid"]], "the keeper is its parent"
    assert launcher["env"]["PATH"].split(":")[0] == str(site.bin), \
        "the session manager's own environment, ogon's bin dir first"
    start = launcher["start"]
    assert start["moduleFileName"] == f"{site.modules}/libogon-mod-x11.so"
    assert (start["sessionId"], start["userName"], start["baseConfigPath"]) == (
        sid, account, "module.xsession")
    assert start["remoteIp"] == "192.0.2.10"
    names = [item.split("=", 1)[0] for item in start["envBlock"].split("\0") if item]
    assert names == DESKTOP_ENV[:-1], "the session's block, XAUTHORITY is the module's own"
    assert start["envBlock"].endswith("\0\0")
    assert [m["type"] for m in launcher["messages"]][:2] == [300, 302]
    assert [m["tag"] for m in launcher["messages"]][:2] == [2, 3], "tags from 2"
    asked = [(p["kind"], p["path"]) for p in launcher["properties"]]
    assert asked[:5] == [("string", "module.xsession.xauthoritypath"),
                         ("number", "module.xsession.displayOffset"),
                         ("number", "module.xsession.dpi"),
                         ("string", "module.xsession.fontPath"),
                         ("bool", "module.xsession.noKPCursor")]
    assert ("string", "module.xsession.startwm") in asked
    found = {p["path"]: p["value"] for p in launcher["properties"] if p["found"]}
    assert found["current.connection.initialxres"] == 1600
    assert found["module.xsession.startwm"] == "ogonXsession"
    session = launched.service.registry.get(sid)
    assert session.win_station_name == f"X11:{x['display']}"
    assert session.backend.launcher and session.backend.pid == launcher["pid"]
    assert launcher["pam_session"], "the launcher opens the PAM session for the user"

    exited = launched.service.lifecycle.backends[sid].when_exited()
    assert await launched.service.lifecycle.logoff(session, True)
    assert await exited == "(ogon-backend-launcher) exited with status 0"
    launcher = site.record("ogon-backend-launcher")
    assert [m["type"] for m in launcher["messages"]][-2:] == [301, 308], "Stop, then Exit"
    x, wm, stopwm = (site.record("ogon-backend-x"), site.record("ogonXsession"),
                     site.record("stopwm"))
    assert wm["ended"] == {"signal": "SIGTERM"} and x["ended"] == {"signal": "SIGTERM"}
    order = [stopwm["started"], site.event_time("ogonXsession", "ended"),
             site.event_time("ogon-backend-x", "ended")]
    assert order == sorted(order)
    assert any(e["what"] == "exit requested" for e in launcher["events"])


@pytest.mark.parametrize("through_launcher", [False, True], ids=["local", "launcher"])
@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_the_x11_desktop(site: OgonSite, through_launcher: bool) -> None:
    properties = {"module.xsession.uselauncher": through_launcher,
                  "module.xsession.stopwm": f"{site.bin}/stopwm",
                  "module.xsession.startvc": f"{site.bin}/startvc"}
    first = await ogon_bridge(site, **properties)
    keepers = [b.pid for b in first.service.launcher.running()]
    account = first.account  # type: ignore[attr-defined]
    second = None
    try:
        peer = await first.peer()
        await peer.logon(1, account, "pw", width=1280, height=1024)
        sid = first.service.registry.by_connection(1).session_id
        await site.when_recorded("startvc")  # ogon's Connect: the client arrived
        x = site.record("ogon-backend-x")
        assert x["opts"]["-geometry"] == "1280x1024"
        wm = await site.when_recorded("ogonXsession")
        keepers = [b.pid for b in first.service.launcher.running() if b.name == "launcher-keeper"]
        await first.stop(kill_backends=False)  # as if the bridge went away
        assert alive(x["pid"]) and alive(wm["pid"]), "the desktop outlives the bridge"

        second = await ogon_bridge(site, **properties)
        await second.service.lifecycle.adopted
        registry = second.service.registry
        session = registry.get(sid)
        assert session is not None and session.win_station_name == f"X11:{x['display']}"
        backend = second.service.lifecycle.backends[sid]
        if through_launcher:
            assert backend.protocol is not None, "the channel, back from the keeper"
        peer = await second.peer()
        answer = await peer.logon(2, account, "pw")
        assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{x['display']}_X11", "reconnected"
        await site.when_recorded("startvc", lambda r: r["pid"] != site.records_of("startvc")[0][
            "pid"])  # ogon's Connect again, after the restart
        assert [r["prog"] for r in site.records_of("ogon-backend-x")] == ["ogon-backend-x"], \
            "nothing started twice"

        exited = backend.when_exited()
        assert await second.service.lifecycle.logoff(registry.get(sid), True)
        await exited
        x, wm = site.record("ogon-backend-x"), site.record("ogonXsession")
        assert wm["ended"] == {"signal": "SIGTERM"} and x["ended"] == {"signal": "SIGTERM"}
        order = [site.record("stopwm")["started"], site.event_time("ogonXsession", "ended"),
                 site.event_time("ogon-backend-x", "ended")]
        assert order == sorted(order), "stopped in ogon's order after the restart too"
        if through_launcher:
            launcher = site.record("ogon-backend-launcher")
            assert [m["type"] for m in launcher["messages"]] == [300, 302, 303, 303, 301, 308]
            assert [m["tag"] for m in launcher["messages"]][-3:] == [2, 3, 4], \
                "the restarted bridge numbers its requests from 2 again"
        else:
            assert site.records_of("startvc")[-1]["ended"] == {"signal": "SIGTERM"}
    finally:
        if second is not None:
            await second.stop()
        kill_process_groups(keepers)


@pytest.mark.parametrize("through_launcher", [False, True], ids=["local", "launcher"])
@pytest_twisted.ensureDeferred
async def test_a_weston_desktop(site: OgonSite, through_launcher: bool) -> None:
    bridge = await ogon_bridge(site, **{
        "module": "weston", "module.weston.modulename": "Weston",
        "module.weston.cmd": f"{site.bin}/ogon-backend-weston",
        "module.weston.uselauncher": through_launcher})
    keepers: list[int] = []
    try:
        account = bridge.account  # type: ignore[attr-defined]
        entry = pwd.getpwnam(account)
        peer = await bridge.peer()
        answer = await peer.logon(1, account, "pw", width=3000, height=1000)
        sid = bridge.service.registry.by_connection(1).session_id
        assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{sid}_Weston"
        assert peer.connections[1].backend_session == sid
        weston = site.record("ogon-backend-weston")
        assert weston["argv"] == [f"{site.bin}/ogon-backend-weston", "--backend=ogon-backend.so",
                                  f"--session-id={sid}", "--width=1920", "--height=1000"], \
            "the client's size capped by session.maxXRes"
        assert (weston["uid"], weston["cwd"]) == (entry.pw_uid, entry.pw_dir)
        assert weston["env_order"] == DESKTOP_ENV[:-1], "the session's block, nothing added"
        session = bridge.service.registry.get(sid)
        assert session.win_station_name == f"Weston:{weston['pid']}"
        if through_launcher:
            keepers = [b.pid for b in bridge.service.launcher.running()
                       if b.name == "launcher-keeper"]
            launcher = site.record("ogon-backend-launcher")
            assert weston["ppid"] == launcher["pid"]
            assert launcher["start"]["moduleFileName"].endswith("/libogon-mod-weston.so")
        exited = bridge.service.lifecycle.backends[sid].when_exited()
        assert await bridge.service.lifecycle.logoff(session, True)
        await exited
        assert site.record("ogon-backend-weston")["ended"] == {"signal": "SIGTERM"}
    finally:
        await bridge.stop()
        kill_process_groups(keepers)


@pytest_twisted.ensureDeferred
async def test_a_greeter_module_that_needs_a_user_is_refused(site: OgonSite) -> None:
    """ogon's X11 and Weston modules fail without a user (getpwnam): as a
    greeter they do not start, and LogonUser answers FAILED."""
    bridge = await ogon_bridge(site, **{"auth.greeter": "xsession",
                                        "module.xsession.uselauncher": False})
    try:
        peer = await bridge.peer()
        with pytest.raises(Exception, match="the greeter could not be started"):
            await peer.logon(1, "", "")
        assert site.records_of("ogon-backend-x") == []
    finally:
        await bridge.stop()


@pytest.mark.parametrize("through_launcher", [False, True], ids=["local", "launcher"])
@pytest_twisted.ensureDeferred
async def test_kill_9_keeps_the_x11_desktop(site: OgonSite, through_launcher: bool) -> None:
    """``twistd -n icp-bridge`` killed with SIGKILL while an X11 desktop runs
    (by the bridge, or by ogon-backend-launcher under the keeper); the next
    start adopts it, and a logoff stops it in ogon's order."""
    account = desktop_account()
    base = site.base
    _, err, code = await cli("users", "add", account, "--permission", "user", "--users",
                             str(base / "users"), "--scrypt-n", "1024", stdin="pw\n")
    assert code == 0, err
    port = free_port()
    config = base / "bridge.toml"
    config.write_text(f"""
icp_endpoint = "unix:{base}/icp.sock:mode=600"
thrift_endpoint = "ssl:{port}:interface=127.0.0.1"
admin_endpoint = ""
dbus_address = ""
state_dir = "{base}/state"
users_file = "{base}/users"
token_dir = "{base}/tokens"
pipe_dir = "{site.pipes}"
ogon_bin_dirs = ["{site.bin}"]

[properties]
"ssl.certificate" = "{base}/tls/ogon.crt"
"ssl.key" = "{base}/tls/ogon.key"
"module.xsession.uselauncher" = {"true" if through_launcher else "false"}
"module.xsession.stopwm" = "{site.bin}/stopwm"
""")
    proc, transport = await start_twistd(base, config)
    keeper = None
    try:
        peer = StandInRdpServer(reactor, pipe_dir=site.pipes)
        await peer.connect(f"unix:{base}/icp.sock")
        answer = await peer.logon(1, account, "pw")
        wm = await site.when_recorded("ogonXsession")
        x = site.record("ogon-backend-x")
        assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{x['display']}_X11"
        if through_launcher:
            keeper = site.record("ogon-backend-launcher")["ppid"]
        closed = peer.protocol.when_closed()
        transport.signalProcess(signal.SIGKILL)
        await proc.ended
        await closed
        assert alive(x["pid"]) and alive(wm["pid"]), "the desktop outlives kill -9"

        proc, transport = await start_twistd(base, config)
        adopted = ("adopted xsession in ogon-backend-launcher" if through_launcher
                   else f"adopted xsession-x backend (pid {x['pid']})")
        await proc.wait_for(adopted).addTimeout(60, reactor)  # a clean failure, not a hang
        certificate = base / "tls" / "ogon.crt"
        ctl = ("ctl", "--port", str(port), "--cafile", str(certificate))
        out, err, code = await cli(*ctl, "logon", account, stdin="pw\n")
        assert code == 0 and out.strip(), (out, err)
        # --token=: a token may begin with "-" (URL-safe base64).
        out, err, code = await cli(*ctl, f"--token={out.strip()}", "logoff", "1")
        assert code == 0, err
        await proc.wait_for("session 1 ended").addTimeout(60, reactor)
        await site.when_recorded("ogon-backend-x", lambda r: "ended" in r)
        x, wm = site.record("ogon-backend-x"), site.record("ogonXsession")
        assert wm["ended"] == {"signal": "SIGTERM"} and x["ended"] == {"signal": "SIGTERM"}
        order = [site.record("stopwm")["started"], site.event_time("ogonXsession", "ended"),
                 site.event_time("ogon-backend-x", "ended")]
        assert order == sorted(order), "stopwm, the window manager, the X server"
        if through_launcher:
            launcher = await site.when_recorded("ogon-backend-launcher", lambda r: any(
                e["what"] == "exit requested" for e in r["events"]))
            assert [m["type"] for m in launcher["messages"]][-2:] == [301, 308]
        transport.signalProcess(signal.SIGTERM)
        await proc.ended
    finally:
        if keeper is not None:
            kill_process_groups([keeper])


@pytest_twisted.ensureDeferred
async def test_debians_config_ini_runs_the_greeter_and_the_x11_desktop_as_ogon(
        site: OgonSite) -> None:
    """The issue's first "done when": ogon's misc/config.ini.debian.in as Debian
    installs it, its paths pointing at the stand-ins, and a users setup: the
    Qt greeter, a greeter login, the X11 desktop through ogon-backend-launcher
    (display from 100, xauth, startwm as the user), its logoff."""
    text = DEBIAN.read_text()
    for installed, standin in (("/usr/bin/ogon-qt-greeter", "ogon-qt-greeter"),
                               ("/etc/ogon/ogonXsession", "ogonXsession"),
                               ("/usr/sbin/ogon-backend-launcher", "ogon-backend-launcher"),
                               ("/usr/bin/ogon-backend-weston", "ogon-backend-weston")):
        assert installed in text
        text = text.replace(installed, f"{site.bin}/{standin}")
    text = text.replace("/etc/ssl/certs/ssl-cert-snakeoil.pem", f"{site.base}/tls/ogon.crt")
    text = text.replace("/etc/ssl/private/ssl-cert-snakeoil.key", f"{site.base}/tls/ogon.key")
    config_ini = site.base / "config.ini"
    config_ini.write_text(text)
    account = desktop_account()
    # ogon's programs are in the stand-ins' bin directory, not in /usr/bin.
    bridge = await start_bridge(site.base, modules={}, properties={}, user_properties={},
                                ogon_config=config_ini, ogon_bin_dirs=[str(site.bin)],
                                users={account: ("pw", 0x49)})
    keepers: list[int] = []
    try:
        peer = await bridge.peer()
        await peer.logon(1, "", "")
        sid = bridge.service.registry.by_connection(1).session_id
        greeter = site.record("ogon-qt-greeter")
        assert greeter["argv"] == [f"{site.bin}/ogon-qt-greeter", "--noeffects", "-platform",
                                   "ogon"]
        assert greeter["env"]["WTSAPI_LIBRARY"] == \
            "/usr/lib/x86_64-linux-gnu/ogon1/libogon-otsapi.so", "environment_add_string"
        assert greeter["env"]["OGON_SMAX"] == "4096x2048"
        assert await peer.greeter_login(1, account, "pw") == 0
        wm = await site.when_recorded("ogonXsession", lambda r: "x_socket" in r)
        keepers = [b.pid for b in bridge.service.launcher.running()
                   if b.name == "launcher-keeper"]
        x = site.record("ogon-backend-x")
        launcher = site.record("ogon-backend-launcher")
        entry = pwd.getpwnam(account)
        assert launcher["argv"] == [f"{site.bin}/ogon-backend-launcher", str(sid)]
        assert x["display"] >= 100 and x["opts"]["-displayfd"].endswith(":100")
        assert x["opts"]["-auth"] == f"{entry.pw_dir}/.Xauthority.ogon"
        assert (x["uid"], wm["uid"]) == (entry.pw_uid, entry.pw_uid)
        assert x["ppid"] == wm["ppid"] == launcher["pid"]
        assert wm["argv"] == [f"{site.bin}/ogonXsession"] and wm["x_socket"] == "connected"
        assert wm["env"]["DISPLAY"] == f":{x['display']}"
        start = launcher["start"]
        assert start["envBlock"].startswith(
            "WTSAPI_LIBRARY=/usr/lib/x86_64-linux-gnu/ogon1/libogon-otsapi.so\0PATH=")
        assert bridge.service.registry.get(sid).win_station_name == f"X11:{x['display']}"
        [switch] = peer.seen("SwitchToRequest")
        assert switch.serviceEndpoint == f"\\\\.\\pipe\\ogon_{x['display']}_X11"
        assert (switch.maxWidth, switch.maxHeight) == (4096, 2048)

        session = bridge.service.registry.get(sid)
        exited = bridge.service.lifecycle.backends[sid].when_exited()
        assert await bridge.service.lifecycle.logoff(session, True)
        await exited
        x, wm = site.record("ogon-backend-x"), site.record("ogonXsession")
        assert wm["ended"] == {"signal": "SIGTERM"} and x["ended"] == {"signal": "SIGTERM"}
        assert site.event_time("ogonXsession", "ended") < site.event_time("ogon-backend-x",
                                                                          "ended")
        assert [m["type"] for m in site.record("ogon-backend-launcher")["messages"]] == [
            300, 302, 301, 308]
    finally:
        await bridge.stop()
        kill_process_groups(keepers)


@pytest_twisted.ensureDeferred
async def test_a_greeter_through_the_launcher_ends_with_the_bridge(site: OgonSite) -> None:
    """Greeter sessions do not survive a stop: one run by ogon-backend-launcher
    is stopped (ModuleStop, ModuleExit) before the bridge is gone, or the
    keeper would keep it running."""
    bridge = await ogon_bridge(site, **{"module.greeter.uselauncher": True})
    keepers = [b.pid for b in bridge.service.launcher.running()]
    try:
        peer = await bridge.peer()
        answer = await peer.logon(1, "", "")
        sid = bridge.service.registry.by_connection(1).session_id
        assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{sid}_Qt"
        keepers = [b.pid for b in bridge.service.launcher.running()
                   if b.name == "launcher-keeper"]
        greeter = site.record("ogon-qt-greeter")
        launcher = site.record("ogon-backend-launcher")
        assert greeter["ppid"] == launcher["pid"] and greeter["uid"] == os.geteuid(), \
            "a greeter's module runs as the launcher's user, root"
        assert launcher["start"]["userName"] == "" and not launcher["pam_session"]
        assert bridge.service.registry.get(sid).win_station_name == f"Qt:{greeter['pid']}"
        await bridge.stop()
        launcher = site.record("ogon-backend-launcher")
        assert [m["type"] for m in launcher["messages"]] == [300, 302, 303, 301, 308]
        assert not alive(launcher["pid"]) and not alive(greeter["pid"])
    finally:
        kill_process_groups(keepers)
