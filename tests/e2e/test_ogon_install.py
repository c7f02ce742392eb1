"""An ogon host as it is: ogon's own config.ini (Debian's, unchanged but for
its paths) read by the real service, answered over ICP to the stand-in RDP
server as ogon's session manager answers, reloaded, refused with one line
when broken; and what ogon's differential run found (issue 20, item 6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from bridge.endpoints import StartupError
from bridge.rdp.standin import StandInRdpServer
from bridge.security.permissions import FULL, USER
from bridge.service import BridgeService
from protocols import icp
from protocols.errors import IcpRemoteError
from protocols.generated import ICP_pb2, SBP_pb2
from tests.conftest import USERS, BridgeUnderTest, make_config, standin_module, start_bridge
from tests.e2e.otsapi_client import BlockingClient

DEBIAN = Path(__file__).parent.parent / "data" / "ogon-config.ini.debian"


async def ask(peer: StandInRdpServer, kind: str, path: str, connection_id: int = 0
              ) -> tuple[bool, Any]:
    """ICP PropertyBool/Number/String for ``path``: (success, value)."""
    msg_type, request = {
        "bool": (icp.MSG_PROPERTY_BOOL, ICP_pb2.PropertyBoolRequest),
        "number": (icp.MSG_PROPERTY_NUMBER, ICP_pb2.PropertyNumberRequest),
        "string": (icp.MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest),
    }[kind]
    answer = await peer.protocol.call(msg_type, request(connectionId=connection_id, path=path))
    return answer.success, answer.value


async def failed_bare(peer: StandInRdpServer, msg_type: int, request: Any) -> bool:
    """True when the bridge answered FAILED without a description."""
    with pytest.raises(IcpRemoteError) as caught:
        await peer.protocol.call(msg_type, request)
    return caught.value.description == ""


@pytest_twisted.ensureDeferred
async def test_debians_config_ini_is_answered_over_icp_as_ogon_answers(
        short_dir: Path) -> None:
    users = {**USERS, "root": ("root-pw", int(USER))}
    bridge = await start_bridge(short_dir, users=users, ogon_config=DEBIAN,
                                authenticator="pam")
    try:
        peer = await bridge.peer()
        # An unknown connection: the global values (config.ini over ogon's defaults).
        assert await ask(peer, "string", "module.greeter.modulename") == (True, "Qt")
        assert await ask(peer, "string", "module.greeter.cmd") == (
            True, "/usr/bin/ogon-qt-greeter --noeffects")
        assert await ask(peer, "string", "module.xsession.launcherexecutable") == (
            True, "/usr/sbin/ogon-backend-launcher")
        assert await ask(peer, "number", "module.xsession.displayOffset") == (True, 100)
        assert await ask(peer, "bool", "module.weston.uselauncher") == (True, True)
        assert await ask(peer, "string", "environment.add") == (
            True, "WTSAPI_LIBRARY:/usr/lib/x86_64-linux-gnu/ogon1/libogon-otsapi.so")
        assert await ask(peer, "number", "session.maxXRes") == (True, 4096)
        assert await ask(peer, "number", "session.timeout") == (True, 30), "the TOML wins"
        assert await ask(peer, "string", "ssl.key") == (
            True, "/etc/ssl/private/ssl-cert-snakeoil.key")
        assert await ask(peer, "string", "permission.level") == (True, "USER")
        # A connection bound to root's session: [user_root] applies.
        await peer.logon(1, "root", "root-pw")
        assert await ask(peer, "string", "permission.level", 1) == (True, "FULL")
        bulk = await peer.protocol.call(icp.MSG_PROPERTY_BULK, ICP_pb2.PropertyBulkRequest(
            connectionId=1, properties=[
                ICP_pb2.PropertyReq(propertyPath="session.singleSession",
                                    propertyType=ICP_pb2.PropertyReq.PROP_BOOL),
                ICP_pb2.PropertyReq(propertyPath="session.maxYRes",
                                    propertyType=ICP_pb2.PropertyReq.PROP_NUMBER),
                ICP_pb2.PropertyReq(propertyPath="module",
                                    propertyType=ICP_pb2.PropertyReq.PROP_STRING)]))
        assert [(r.success, r.boolValue, r.intValue, r.stringValue) for r in bulk.results] == [
            (True, True, 0, ""), (True, False, 2048, ""), (True, False, 0, "xsession")]
        # The OTS API: with PAM, a token's level is permission.level by user name.
        client = BlockingClient(bridge.thrift_port)
        try:
            for user, level in (("root", FULL), ("bob", int(USER))):
                token = (await client.call("logonConnection", user, users[user][0], "")).authToken
                assert await client.call("getPermissionForToken", token) == level, user
        finally:
            client.close()
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_module_properties_and_ogons_defaults_are_answered(
        bridge: BridgeUnderTest) -> None:
    """ogon's built-in module configurations are ordinary properties; what
    ogon has no default for is not found."""
    peer = await bridge.peer()
    assert await ask(peer, "string", "module.greeter.modulename") == (True, "Qt")
    assert await ask(peer, "string", "module.xsession.modulename") == (True, "X11")
    assert await ask(peer, "string", "module.xsession.startwm") == (True, "ogonXsession")
    assert await ask(peer, "bool", "module.xsession.uselauncher") == (True, True)
    assert await ask(peer, "bool", "module.greeter.uselauncher") == (True, False)
    # ogon stores this default as a boolean (its bug), so as a string: not found.
    assert await ask(peer, "string", "module.xsession.launcherexecutable") == (False, "")
    assert await ask(peer, "bool", "module.xsession.launcherexecutable") == (True, True)
    assert await ask(peer, "bool", "session.remotecontrol.ask") == (False, False)


@pytest_twisted.ensureDeferred
async def test_unknown_connections_and_sessions_answer_failed_as_ogon(
        bridge: BridgeUnderTest) -> None:
    peer = await bridge.peer()
    assert await failed_bare(peer, icp.MSG_DISCONNECT_USER_SESSION,
                             ICP_pb2.DisconnectUserSessionRequest(connectionId=42))
    assert await failed_bare(peer, icp.MSG_REMOTE_CONTROL_ENDED,
                             ICP_pb2.RemoteControlEndedRequest(spyId=42, spiedId=43))
    assert await failed_bare(peer, icp.MSG_SBP_AUTHENTICATE_USER, SBP_pb2.AuthenticateUserRequest(
        sessionId=999, username="alice", password="alice-pw", domain=""))
    assert await failed_bare(peer, icp.MSG_SBP_END_SESSION,
                             SBP_pb2.EndSessionRequest(sessionId=999))
    # SBP VersionInfo is answered whatever the session, as ogon does.
    version = await peer.protocol.call(icp.MSG_SBP_VERSION_INFO, SBP_pb2.VersionInfoRequest(
        sessionId=999, vmajor=1, vminor=1))
    assert (version.vmajor, version.vminor) == (1, 1)
    # A greeter's session ended by EndSession is unknown to a second one.
    await peer.logon(1, "", "")
    session_id = peer.connections[1].backend_session
    ended = await peer.protocol.call(icp.MSG_SBP_END_SESSION,
                                     SBP_pb2.EndSessionRequest(sessionId=session_id))
    assert ended.success
    assert await failed_bare(peer, icp.MSG_SBP_END_SESSION,
                             SBP_pb2.EndSessionRequest(sessionId=session_id))
    # The connection stays up after each, as in ogon.
    assert await peer.ping()


@pytest_twisted.ensureDeferred
async def test_switch_to_after_a_greeter_login_carries_the_users_maximum(
        short_dir: Path) -> None:
    """ogon computes the maximum with the user's name before SwitchTo
    (TaskAuthenticateUser); the greeter's own LogonUser answer is global."""
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_maxXRes_number=1920\n"
                   "[user_alice]\nsession_maxXRes_number=2560\n")
    bridge = await start_bridge(short_dir, ogon_config=ini)
    try:
        peer = await bridge.peer()
        greeter = await peer.logon(1, "", "")
        assert (greeter.maxWidth, greeter.maxHeight) == (1920, 1200)
        assert await peer.greeter_login(1, "alice", "alice-pw") == 0
        [switch] = peer.seen("SwitchToRequest")
        assert (switch.maxWidth, switch.maxHeight) == (2560, 1200)
        direct = await peer.logon(2, "alice", "alice-pw")
        assert (direct.maxWidth, direct.maxHeight) == (2560, 1200)
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_reload_serves_the_new_file_and_keeps_the_old_one_when_broken(
        short_dir: Path) -> None:
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_maxXRes_number=1600\nvirtualChannel_whiteList_string=*\n")
    bridge = await start_bridge(short_dir, ogon_config=ini)
    try:
        peer = await bridge.peer()
        assert await ask(peer, "number", "session.maxXRes") == (True, 1600)
        assert await peer.is_channel_allowed("rdpdr")
        ini.write_text("[global]\nsession_maxXRes_number=2048\n"
                       "virtualChannel_whiteList_string=cliprdr\n")
        assert bridge.service.reload_properties()
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)
        assert not await peer.is_channel_allowed("rdpdr"), "the channel list is read again"
        ini.write_text("[global]\nsession_maxXRes_number=4096\nsession_maxXRes_number=1\n")
        with capturedLogs() as events:
            assert not bridge.service.reload_properties()
        [line] = [e for e in events if e.get("log_level").name == "error"]
        assert line["error"] == (f"{ini}:3: session_maxXRes_number given twice in [global] "
                                 "(first on line 2); ogon then ignores the whole file")
        assert "keeping the running configuration" in line["log_format"]
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)
    finally:
        await bridge.stop()


def test_a_broken_config_ini_stops_startup_with_one_line(short_dir: Path) -> None:
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_timeout_number=sixty\n")
    with pytest.raises(StartupError) as caught:
        BridgeService(make_config(short_dir, ogon_config=ini))
    assert str(caught.value) == (f"{ini}:2: session_timeout_number=sixty: not a decimal "
                                 "number (ogon would log it and ignore the line)")
    with pytest.raises(StartupError, match="cannot read ogon's config file"):
        BridgeService(make_config(short_dir, ogon_config=short_dir / "missing.ini"))


@pytest_twisted.ensureDeferred
async def test_environment_filter_and_add_from_config_ini_reach_the_backend(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICPB_FROM_BRIDGE", "passed")
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nenvironment_filter_string=ICPB_FROM_BRIDGE\n"
                   "environment_add_string=WTSAPI_LIBRARY:/usr/lib/ogon1/libogon-otsapi.so\n"
                   "[user_alice]\nenvironment_add_string=OGON_X11_DESKTOP:fvwm;A:b:c\n")
    report = short_dir / "report.json"
    bridge = await start_bridge(short_dir, ogon_config=ini, modules={
        "greeter": standin_module("greeter"),
        "xsession": standin_module("xsession", "--report", str(report))})
    try:
        peer = await bridge.peer()
        await peer.logon(1, "bob", "bob-pw")
        env = json.loads(report.read_text())["env"]
        assert env["ICPB_FROM_BRIDGE"] == "passed"
        assert env["WTSAPI_LIBRARY"] == "/usr/lib/ogon1/libogon-otsapi.so"
        await peer.logon(2, "alice", "alice-pw")
        env = json.loads(report.read_text())["env"]
        assert (env["OGON_X11_DESKTOP"], env["A"]) == ("fvwm", "b:c"), "alice's own"
        assert "WTSAPI_LIBRARY" not in env, "a user's environment.add replaces the global one"
    finally:
        await bridge.stop()
