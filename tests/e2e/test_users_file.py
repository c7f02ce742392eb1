"""The users file as an operator edits it: validated at startup (one line per
bad entry, file:line; the good entries serve), a bad edit later keeps the
last good version loudly (log, metric, /healthz), an entry that is bad is
no failed guess of its user's (no lockout), owner and mode warnings, and
``icp-bridge users`` reading the configuration's users_file and state_dir."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bridge.security.auth import (
    AuthenticationUnavailable,
    UserEntry,
    UsersFileAuthenticator,
    hash_password,
    parse_users,
    users_file_untrusted,
    users_file_warnings,
    write_users,
)
from bridge.security.permissions import FULL, USER
from bridge.security.throttle import LogonGuard, ThrottlePolicy, user_key
from bridge.service import BridgeService
from tests.conftest import make_config
from tests.e2e.sse import get
from tests.e2e.test_admin import samples

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def entry(name: str, password: str, level: int = FULL) -> str:
    return f"{name}:{'full' if level == FULL else 'user'}:{hash_password(password, n=1024)}"


def result_of(d: object) -> object:
    out: list[object] = []
    d.addBoth(out.append)  # type: ignore[attr-defined]
    return out[0]


def test_each_bad_entry_is_one_line_and_spoils_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "users"
    text = "\n".join(["# comment", entry("alice", "a"), "bob:superuser:x", "just-a-name",
                      entry("carol", "c"), "dave:full:scrypt$n=3,r=8,p=1$AAAA$AAAA",
                      entry("carol", "c2"), "eve:user:scrypt$n=1024,r=8,p=1$!!$AAAA", ""])
    parsed = parse_users(text, path)
    assert parsed.problems == [
        f"{path}:3: unknown permission level 'superuser' (full, user or guest)",
        f"{path}:4: expected name:level:hash",
        f"{path}:6: the hash's scrypt cost is not usable",
        f"{path}:7: carol is already on line 5",
        f"{path}:8: the hash's parameters, salt or digest do not parse",
    ]
    assert set(parsed.users) == {"alice"}, "carol twice: neither line is trusted"
    assert parsed.bad_names == {"bob", "just-a-name", "dave", "carol", "eve"}


def test_at_startup_the_good_entries_serve_and_bad_ones_are_no_failures(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(entry("alice", "a") + "\nbob:user:garbage\n")
    path.chmod(0o600)
    with capturedLogs() as events:
        auth = UsersFileAuthenticator(path)
        auth.users()
    errors = [e for e in events if e["log_level"].name == "error"]
    assert [e.get("problem") for e in errors[1:]] == [
        f"{path}:2: the hash is not scrypt$n=..,r=..,p=..$salt$digest"]
    assert "1 bad entries" in errors[0]["log_format"].format(**errors[0])
    assert result_of(auth.authenticate("alice", "a", "")).username == "alice"  # type: ignore[attr-defined]
    failure = result_of(auth.authenticate("bob", "anything", ""))
    assert failure.check(AuthenticationUnavailable)  # type: ignore[attr-defined]
    # Through the guard: refused, and not counted toward bob's lockout.
    clock = Clock()
    guard = LogonGuard(auth, clock, ThrottlePolicy(lockout_failures=2))
    for _ in range(5):
        assert result_of(ensureDeferred(guard.authenticate("bob", "x", "", "10.0.0.1",
                                                           "rdp"))) is None
    assert guard.locked(user_key("bob")) == 0 and guard.outcomes["rdp", "unavailable"] == 5
    assert guard.outcomes["rdp", "failed"] == 0
    assert auth.health() == [f"users file {path}: 1 bad entries ({path}:2: the hash is not "
                             f"scrypt$n=..,r=..,p=..$salt$digest)"]


def test_a_bad_edit_keeps_the_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_users(path, [UserEntry("alice", FULL, hash_password("old", n=1024))])
    auth = UsersFileAuthenticator(path)
    assert set(auth.users()) == {"alice"} and not auth.stale
    # An editor's slip: alice's line broken, a new user added.
    path.write_text("alice:full\n" + entry("mallory", "m") + "\n")
    with capturedLogs() as events:
        assert set(auth.users()) == {"alice"}, "the last good version stays"
    assert auth.stale and auth.problems == [f"{path}:1: expected name:level:hash"]
    assert any("not used" in e["log_format"] for e in events)
    assert result_of(auth.authenticate("alice", "old", "")) is not None
    assert result_of(auth.authenticate("mallory", "m", "")) is None
    assert "the version read before serves" in auth.health()[0]
    path.write_text(entry("alice", "new") + "\n")  # fixed
    assert set(auth.users()) == {"alice"} and not auth.stale and auth.health() == []
    assert result_of(auth.authenticate("alice", "new", "")) is not None


def test_owner_and_mode_warnings_and_refusals(tmp_path: Path) -> None:
    # Readable by others: a warning. Changeable by others (review finding
    # 14; before: only a warning): refused (users_file_untrusted, which
    # preflight makes a startup and reload error).
    path = tmp_path / "users"
    path.write_text("")
    path.chmod(0o600)
    assert users_file_warnings(path) == [] and users_file_untrusted(path) is None
    path.chmod(0o644)
    assert users_file_warnings(path) == [
        f"users file {path} is readable by others (mode 0644); chmod 600 it"]
    assert users_file_untrusted(path) is None
    path.chmod(0o666)
    assert users_file_untrusted(path) == (
        f"users file {path} is writable by others (mode 0666), and it hands out logons with "
        f"FULL rights: chmod go-w {path}")
    path.chmod(0o620)
    assert "is writable by its group (mode 0620)" in (users_file_untrusted(path) or "")
    path.chmod(0o600)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody").pw_uid
        os.chown(path, nobody, -1)
        assert users_file_untrusted(path) == (
            f"users file {path} is owned by uid {nobody} (nobody), not root or the bridge's "
            f"user, and it hands out logons with FULL rights: chown root {path}")
    else:
        assert users_file_untrusted(path, own_uid=os.geteuid() + 1) is not None


def test_a_running_bridge_keeps_its_users_when_others_can_change_the_file(
        tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_users(path, [UserEntry("alice", FULL, hash_password("old", n=1024))])
    auth = UsersFileAuthenticator(path)
    assert set(auth.users()) == {"alice"}
    path.chmod(0o666)  # and someone adds an admin of their own
    path.write_text(path.read_text() + f"mallory:full:{hash_password('m', n=1024)}\n")
    with capturedLogs() as events:
        assert set(auth.users()) == {"alice"}, "the version it trusted stays"
    assert auth.stale
    assert any("others can change it" in e["log_format"].format(**e) for e in events)
    assert result_of(auth.authenticate("mallory", "m", "")) is None
    path.chmod(0o600)
    path.write_text(path.read_text())  # touched again, now trusted
    assert set(auth.users()) == {"alice", "mallory"} and not auth.stale


@pytest_twisted.ensureDeferred
async def test_metrics_and_healthz_say_when_a_bad_edit_is_not_used(short_dir: Path) -> None:
    users = short_dir / "users"
    write_users(users, [UserEntry("alice", FULL, hash_password("a", n=1024))])
    service = BridgeService(make_config(short_dir), reactor)  # the users-file authenticator
    service.startService()
    try:
        port = service.admin_listener.port.getHost().port  # type: ignore[union-attr]
        code, body, _ = await get(port, "/healthz")
        assert code == 200 and json.loads(body)["degraded"] == []
        metrics = samples((await get(port, "/metrics"))[1].decode())
        assert metrics["icp_bridge_users_file_stale", ()] == 0
        users.write_text("alice:full:\n")  # no logon, no reload: the next look sees it
        code, body, _ = await get(port, "/healthz")
        health = json.loads(body)
        assert code == 200 and health["ok"], "degraded, still serving"
        assert health["degraded"][0].startswith(
            f"users file {users} on disk is not used ({users}:1: ")
        metrics = samples((await get(port, "/metrics"))[1].decode())
        assert metrics["icp_bridge_users_file_stale", ()] == 1
        assert metrics["icp_bridge_users_file_bad_entries", ()] == 1
        write_users(users, [UserEntry("alice", FULL, hash_password("a", n=1024))])
        metrics = samples((await get(port, "/metrics"))[1].decode())  # a scrape sees the fix
        assert metrics["icp_bridge_users_file_stale", ()] == 0
    finally:
        await service.stopService()


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], input=stdin,
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)


def test_users_tool_reads_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(f'users_file = "{tmp_path}/etc/users"\nstate_dir = "{tmp_path}/state"\n'
                      'call_timeout = "a mistake elsewhere does not matter here"\n')
    result = cli("users", "add", "alice", "--permission", "user", "--scrypt-n", "1024",
                 "--config", str(config), stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert f"saved in {tmp_path}/etc/users" in result.stdout
    result = cli("users", "list", "--config", str(config))
    assert result.stdout.split() == ["alice", "user"]
    assert parse_users((tmp_path / "etc" / "users").read_text(), "x").users["alice"] \
        .permission == int(USER)
    result = cli("users", "lockouts", "--config", str(config))
    assert result.returncode == 1 and f"no state database at {tmp_path}/state" in result.stderr
    result = cli("users", "list", "--config", str(config), "--users", str(tmp_path / "other"))
    assert "no users in" in result.stdout, "--users wins over the configuration"


def test_users_tool_says_when_the_service_does_not_read_the_users_file(tmp_path: Path
                                                                      ) -> None:
    """On an ogon host (config.ini read) the service authenticates with PAM
    as ogon does: a user added to the users file would never log on."""
    ini = ROOT / "tests" / "data" / "ogon-config.ini.debian"
    config = tmp_path / "bridge.toml"
    base = f'users_file = "{tmp_path}/users"\n'
    add = ("users", "add", "alice", "--permission", "full", "--scrypt-n", "1024",
           "--config", str(config))
    config.write_text(base + f'ogon_config = "{ini}"\n')
    result = cli(*add, stdin="pw\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"note: the service authenticates with PAM (ogon's {ini} is read, so it "
        f"authenticates as ogon does): it does not read {tmp_path}/users; users log on with "
        f"their system password at the permission.level property (USER by default)\n")
    config.write_text(base + f'ogon_config = "{ini}"\nauthenticator = "users-file"\n')
    assert cli(*add, stdin="pw\n").stderr == ""
    config.write_text(base + 'ogon_config = ""\n')
    assert cli(*add, stdin="pw\n").stderr == ""
    config.write_text(base + 'ogon_config = ""\nauthenticator = "pam"\n')
    assert f"(authenticator = 'pam' in {config})" in cli("users", "list", "--config",
                                                          str(config)).stderr


@pytest.mark.parametrize("action", ["add", "list", "remove", "lockouts", "unlock"])
def test_users_actions_take_config(action: str) -> None:
    result = cli("users", action, "--help")
    assert result.returncode == 0 and "--config" in result.stdout


def test_users_list_shows_the_good_entries_and_names_the_bad(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(entry("alice", "a") + "\nbob:root:x\n")
    result = cli("users", "list", "--users", str(path))
    assert result.returncode == 1 and result.stdout.split() == ["alice", "full"]
    assert result.stderr == (f"bad entry: {path}:2: unknown permission level 'root' (full, "
                             f"user or guest) (that user cannot log on)\n")
    refused = cli("users", "remove", "alice", "--users", str(path))
    assert refused.returncode == 1 and f"{path}:2" in refused.stderr, \
        "not rewritten: the bad line would be lost"
