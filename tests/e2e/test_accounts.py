"""Whose desktop a logon starts (issue 18, item 8): never root's unless the
operator allows it, never a locked or expired system account's, and a
name no account can have (a NUL in it, 200 KB of it) never reaches an
exec, also not as the greeter's OGON_USER."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from thrift.Thrift import TApplicationException
from twisted.internet import reactor
from twisted.logger import capturedLogs

from bench.attacks import SYSTEM_PASSWORD as PASSWORD
from bench.attacks import ensure_account
from bridge.security.auth import UserEntry, UsersFileAuthenticator, hash_password, write_users
from bridge.security.permissions import FULL, USER
from bridge.service import BridgeService
from tests.conftest import ME, BridgeUnderTest, make_config, start_bridge
from tests.e2e.test_backends import module, open_dir

__all__ = ["open_dir"]  # the fixture, used below

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: system accounts and /etc/shadow")

#: Test accounts with a password, as ``usermod`` leaves them (created once, like icpbtest).
LOCKED = "icpblocked"  # usermod -L: a '!' before the password hash
EXPIRED = "icpbexpired"  # usermod -e 1: the account expired on 2 January 1970


def failures(events: list[dict[str, Any]]) -> list[str]:
    """Tracebacks the bridge logged."""
    return [e["log_failure"].getTraceback() for e in events if e.get("log_failure")]


@pytest_twisted.async_yield_fixture
async def bridge_at(open_dir: Path) -> AsyncIterator[Any]:
    started: list[BridgeUnderTest] = []

    async def start(**kwargs: Any) -> BridgeUnderTest:
        running = await start_bridge(open_dir, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


def desktops(base: Path, report: Path, **kwargs: Any) -> dict[str, Any]:
    """A greeter that reports its environment, a desktop run as the
    session's user that reports whom it runs as."""
    return {"greeter": module(base, "greeter", "--report", str(report), user=ME),
            "xsession": module(base, "xsession", "--report", str(report), **kwargs)}


def reports(tmp: Path) -> Path:
    directory = tmp / "reports"
    directory.mkdir(mode=0o1777)
    directory.chmod(0o1777)  # the backend, as another user, writes its report here
    return directory / "report.json"


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_user_whose_account_is_uid_0_gets_the_greeter(bridge_at: Any,
                                                              open_dir: Path) -> None:
    """The review's ``toor``: a users-file user whose system account has uid
    0 (root itself here) got a desktop running as root."""
    report = reports(open_dir)
    running = await bridge_at(modules=desktops(open_dir, report),
                              users={"root": ("root-pw", FULL)})
    peer = await running.peer()
    with capturedLogs() as events:
        answer = await peer.logon(1, "root", "root-pw")
    session = running.service.registry.by_connection(1)
    assert answer.serviceEndpoint.endswith("_greeter"), "the greeter, not a desktop"
    assert not session.logged_on
    assert json.loads(report.read_text())["uid"] == os.geteuid(), "only the greeter ran"
    lines = [e.get("error", "") for e in events if "did not start" in e.get("log_format", "")]
    assert any("uid 0" in line and "allow_root_desktops" in line for line in lines), lines
    assert failures(events) == []


@needs_root
@pytest_twisted.ensureDeferred
async def test_root_desktops_when_the_operator_allows_them(bridge_at: Any,
                                                           open_dir: Path) -> None:
    report = reports(open_dir)
    running = await bridge_at(modules=desktops(open_dir, report),
                              users={"root": ("root-pw", FULL)}, allow_root_desktops=True)
    peer = await running.peer()
    answer = await peer.logon(1, "root", "root-pw")
    assert answer.serviceEndpoint.endswith("_xsession")
    assert json.loads(report.read_text())["uid"] == 0


@pytest_twisted.async_yield_fixture
async def users_file_bridge(open_dir: Path) -> AsyncIterator[Any]:
    """A bridge with the users-file authenticator (the one with the account
    check), its users each with the password ``pw``."""
    started: list[BridgeUnderTest] = []

    async def start(names: list[str], **kwargs: Any) -> BridgeUnderTest:
        users = open_dir / "users"
        write_users(users, [UserEntry(name, int(USER), hash_password("pw", n=1024))
                            for name in names])
        service = BridgeService(make_config(open_dir, users_file=users, **kwargs), reactor)
        service.startService()
        running = BridgeUnderTest(service, open_dir)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


@needs_root
@pytest_twisted.ensureDeferred
async def test_locked_and_expired_accounts_get_no_desktop(users_file_bridge: Any,
                                                          open_dir: Path) -> None:
    """The users file has its own password; the system account it runs as
    was locked (``usermod -L``) or has expired (``usermod -e``): PAM's
    account stage would refuse both, and so does the users file now."""
    locked = ensure_account(LOCKED, "-L")
    expired = ensure_account(EXPIRED, "-e", "1")
    report = reports(open_dir)
    running = await users_file_bridge([locked, expired], modules=desktops(open_dir, report))
    peer = await running.peer()
    with capturedLogs() as events:
        for connection_id, name in ((1, locked), (2, expired)):
            answer = await peer.logon(connection_id, name, "pw")
            assert answer.serviceEndpoint.endswith("_greeter"), name
            assert not running.service.registry.by_connection(connection_id).logged_on
    assert json.loads(report.read_text())["uid"] == os.geteuid(), "no desktop ran"
    said = " ".join(e.get("why", "") for e in events if e.get("username") in (locked, expired))
    assert "locked" in said and "expired" in said, said
    assert failures(events) == []


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_usable_account_still_logs_on(users_file_bridge: Any,
                                              open_dir: Path) -> None:
    """An account created without a password (``useradd``'s bare ``!``) is
    usable: the users file is its password."""
    from tests.e2e.test_backends import ensure_test_account

    account = ensure_test_account()
    report = reports(open_dir)
    running = await users_file_bridge([account], modules=desktops(open_dir, report))
    peer = await running.peer()
    answer = await peer.logon(1, account, "pw")
    assert answer.serviceEndpoint.endswith("_xsession")
    assert json.loads(report.read_text())["uid"] == pwd.getpwnam(account).pw_uid


@pytest.mark.parametrize("typed", ["alice\0root", "x" * 200_000], ids=["nul", "200kb"])
@pytest_twisted.ensureDeferred
async def test_a_typed_name_that_is_no_name_never_reaches_the_greeter(
        bridge_at: Any, open_dir: Path, typed: str) -> None:
    """LogonUser without a good password gives the greeter, with the name
    the client typed as OGON_USER: a name with a NUL, or of 200 KB, made
    the exec fail with a traceback."""
    report = reports(open_dir)
    running = await bridge_at(modules=desktops(open_dir, report, user=ME))
    peer = await running.peer(max_send_frame=1 << 20)  # the bridge reads up to 16 MiB
    with capturedLogs() as events:
        answer = await peer.logon(1, typed, "whatever", domain=typed)
        greeter_login = await peer.greeter_login(1, typed, "whatever")
    assert answer.serviceEndpoint.endswith("_greeter"), "the client still gets the greeter"
    env = json.loads(report.read_text())["env"]
    assert "OGON_USER" not in env and "OGON_DOMAIN" not in env
    assert greeter_login == 1, "AUTH_BAD_CREDENTIALS"
    assert failures(events) == []
    said = [e for e in events if "not a name" in e.get("log_format", "")]
    assert said, "a clear log line says why"
    assert all(len(e["log_format"]) < 300 for e in said)


@pytest_twisted.ensureDeferred
async def test_otsapi_logon_with_a_name_that_is_no_name(bridge_at: Any) -> None:
    from tests.e2e.otsapi_client import BlockingClient

    running = await bridge_at()
    client = BlockingClient(running.thrift_port)
    try:
        with capturedLogs() as events:
            result = await client.call("logonConnection", "alice\0", "alice-pw", "")
            assert (result.success, result.authToken) == (False, "")
            # Over the 64 KiB a Thrift string may have: refused as it is read.
            with pytest.raises(TApplicationException, match="bad arguments"):
                await client.call("logonConnection", "a" * 200_000, "alice-pw", "")
    finally:
        client.close()
    assert failures(events) == []


# -- PAM: its account stage runs ---------------------------------------------------

#: One per test process: several runs of the suite on one machine would
#: otherwise remove each other's file.
PAM_SERVICE = f"icp-bridge-test-{os.getpid()}"


@pytest.fixture
def pam_service() -> Any:
    """A PAM service with pam_unix's auth and account stages."""
    path = Path("/etc/pam.d") / PAM_SERVICE
    path.write_text("auth required pam_unix.so\naccount required pam_unix.so\n")
    yield PAM_SERVICE
    path.unlink(missing_ok=True)


@needs_root
@pytest_twisted.ensureDeferred
async def test_pam_refuses_an_expired_account(pam_service: str) -> None:
    """pam_acct_mgmt runs after pam_authenticate: the right password of an
    expired account is not enough."""
    pytest.importorskip("pam")
    from bridge.security.pam_auth import PamAuthenticator

    expired = ensure_account(EXPIRED, "-e", "1")
    usable = ensure_account("icpbpamok")
    authenticator = PamAuthenticator(lambda name: int(USER), service=pam_service)
    assert await authenticator.authenticate(usable, PASSWORD, "") is not None
    assert await authenticator.authenticate(usable, "wrong", "") is None
    assert await authenticator.authenticate(expired, PASSWORD, "") is None


@needs_root
def test_users_file_account_check_reads_shadow(tmp_path: Path) -> None:
    """The users file's account check, on a shadow file of each kind."""
    from bridge.security.accounts import account_problem

    today = 20000
    shadow = tmp_path / "shadow"
    shadow.write_text("\n".join([
        "fresh:!:19000:0:99999:7:::",  # useradd without a password: usable
        "nopw:*:19000:0:99999:7:::",
        "rhel:!!:19000:0:99999:7:::",
        "locked:!$6$salt$hash:19000:0:99999:7:::",
        "lockedstar:*LK*$6$salt$hash:19000:0:99999:7:::",
        "expired:$6$salt$hash:19000:0:99999:7::19999:",
        "expires_today:$6$salt$hash:19000:0:99999:7::20000:",
        "later:$6$salt$hash:19000:0:99999:7::20001:",
        "inactive:$6$salt$hash:19000:0:30:7:10::",  # password 1000 days old, 10 days grace
        "aging_ok:$6$salt$hash:19990:0:30:7:10::",
        "garbage",
    ]) + "\n")
    problems = {name: account_problem(name, shadow, today) for name in (
        "fresh", "nopw", "rhel", "locked", "lockedstar", "expired", "expires_today", "later",
        "inactive", "aging_ok", "nobody-here")}
    assert {name for name, problem in problems.items() if problem is None} == {
        "fresh", "nopw", "rhel", "later", "aging_ok", "nobody-here"}
    assert "locked" in problems["locked"] and "locked" in problems["lockedstar"]
    assert "expired" in problems["expired"] and "expired" in problems["expires_today"]
    assert "inactive" in problems["inactive"]


def test_users_file_authenticator_checks_the_account(tmp_path: Path) -> None:
    """Only after the right password (no oracle for others), and without
    /etc/shadow (not root) nothing is refused for it."""
    users = tmp_path / "users"
    write_users(users, [UserEntry("ann", int(USER), hash_password("pw", n=1024))])
    shadow = tmp_path / "shadow"
    shadow.write_text("ann:!$6$salt$hash:19000:0:99999:7:::\n")
    authenticator = UsersFileAuthenticator(users, shadow=shadow)
    with capturedLogs() as events:
        assert authenticator.authenticate("ann", "pw", "").result is None
        assert authenticator.authenticate("ann", "nope", "").result is None
    assert [e["why"] for e in events if "why" in e] == ["its system account is locked"]
    assert UsersFileAuthenticator(users, shadow=tmp_path / "absent").authenticate(
        "ann", "pw", "").result is not None
