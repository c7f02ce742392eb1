"""Users file, password hashing, tokens and configuration."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from bridge.config import ConfigError
from bridge.config_sources import load_config
from bridge.security.auth import (
    Identity,
    UserEntry,
    UsersFileAuthenticator,
    UsersFileError,
    atomic_write,
    hash_password,
    read_users,
    verify_password,
    write_users,
)
from bridge.security.permissions import FULL, GUEST, USER, level_value
from bridge.security.tokens import TokenStore, token_digest
from bridge.tap import Options


def test_password_hash_round_trip() -> None:
    encoded = hash_password("s3cret", n=2**10)
    assert encoded.startswith("scrypt$n=1024,r=8,p=1$")
    assert "s3cret" not in encoded
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert hash_password("s3cret", n=2**10) != encoded, "per-user salt"
    assert not verify_password("x", "garbage")
    assert not verify_password("x", "md5$a$b$c")


def test_users_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users"
    write_users(path, [UserEntry("alice", FULL, hash_password("a", n=2**10)),
                       UserEntry("bob", int(USER), hash_password("b", n=2**10))])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = read_users(path)
    assert {n: u.permission for n, u in users.items()} == {"alice": FULL, "bob": int(USER)}
    assert read_users(tmp_path / "missing") == {}
    path.write_text("alice:superuser:x\n")
    with pytest.raises(UsersFileError, match="unknown permission level"):
        read_users(path)
    path.write_text("just-a-name\n")
    with pytest.raises(UsersFileError, match=":1:"):
        read_users(path)


def test_users_file_authenticator_rereads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "users"
    auth = UsersFileAuthenticator(path)
    assert auth.authenticate("alice", "a", "").result is None
    write_users(path, [UserEntry("alice", int(GUEST), hash_password("a", n=2**10))])
    assert auth.authenticate("alice", "a", "dom").result == Identity("alice", "dom", int(GUEST))
    assert auth.authenticate("alice", "wrong", "").result is None
    assert auth.authenticate("nobody", "a", "").result is None


def test_atomic_write_replaces_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me")
    link = tmp_path / "ogon.session.1"
    link.symlink_to(target)
    atomic_write(link, b"token\n")
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "token\n"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_token_files_are_written_without_fsync_the_users_file_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A session's token file is written again from the state database after
    # a crash (SessionTokenFiles.ensure), so a logon pays no fsync for it;
    # the users file has no other copy and is synced, file and directory.
    from bridge.security.token_files import SessionTokenFiles
    from bridge.sessions.model import ConnectState, Session

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    tokens = TokenStore(Clock())
    files = SessionTokenFiles(tmp_path / "tokens", tokens)
    session = Session(session_id=7, username="nobody-such", domain="",
                      state=ConnectState.ACTIVE, permission=FULL)
    token = files.issue(session)
    assert (tmp_path / "tokens" / "ogon.session.7").read_text() == token + "\n"
    assert synced == []
    write_users(tmp_path / "users", [UserEntry("alice", FULL, hash_password("pw", n=1024))])
    assert len(synced) == 2
    # A file a crash emptied is written again at the next start.
    (tmp_path / "tokens" / "ogon.session.7").write_text("")
    files.ensure(session)
    again = (tmp_path / "tokens" / "ogon.session.7").read_text().strip()
    assert again and tokens.lookup(again) is not None


def test_levels() -> None:
    assert (level_value("FULL"), level_value("user"), level_value("guest")) == (
        0x1FF, 0x049, 0x008)
    with pytest.raises(ValueError):
        level_value("root")


def test_tokens_slide_and_expire() -> None:
    clock = Clock()
    tokens = TokenStore(clock)
    changes: list[tuple[str, object]] = []
    tokens.listener = lambda digest, record: changes.append((digest, record))
    token = tokens.issue(Identity("alice", "", FULL), lifetime=100)
    assert len(token) >= 40 and token_digest(token) == changes[0][0]
    clock.advance(90)
    assert tokens.lookup(token).permission == FULL, "used: expiry slides to 190"
    clock.advance(90)
    assert tokens.lookup(token) is not None
    clock.advance(100)
    assert tokens.lookup(token) is None
    assert changes[-1] == (token_digest(token), None)
    assert tokens.lookup("") is None and tokens.lookup("nope") is None


def test_token_use_does_not_persist_every_slide() -> None:
    clock = Clock()
    tokens = TokenStore(clock)
    writes = []
    tokens.listener = lambda digest, record: writes.append(record)
    token = tokens.issue(Identity("alice", "", FULL), lifetime=3600)
    for _ in range(100):
        clock.advance(0.1)
        tokens.lookup(token)
    assert len(writes) == 1
    clock.advance(61)
    tokens.lookup(token)
    assert len(writes) == 2


def test_session_tokens_live_with_their_session() -> None:
    clock = Clock()
    tokens = TokenStore(clock)
    token = tokens.issue(Identity("bob", "", int(USER)), session_id=4)
    other = tokens.issue(Identity("bob", "", int(USER)), lifetime=10)
    clock.advance(10**6)
    assert tokens.lookup(token).session_id == 4
    assert tokens.expire() == 1 and tokens.lookup(other) is None
    tokens.revoke_session(4)
    assert tokens.lookup(token) is None


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(
        'thrift_endpoint = "tcp:9999"\ncall_timeout = 3\nchannels_deny = ["rdpdr"]\n'
        '[properties]\n"session.timeout" = 30\n[user_properties.alice]\n"x.y" = true\n'
    )
    config = load_config(path, {"call_timeout": 5.0})
    assert config.thrift_endpoint == "tcp:9999"
    assert config.call_timeout == 5.0, "flags win"
    assert config.channels_deny == ["rdpdr"]
    assert config.user_properties == {"alice": {"x.y": True}}


@pytest.mark.parametrize(("text", "message"), [
    ("no_such = 1\n", "unknown option 'no_such'"),
    ('call_timeout = "soon"\n', "call_timeout: expected a number"),
    ("max_icp_send = true\n", "max_icp_send: expected an integer"),
    ("[modules.x]\ncommand = []\nendpoint = \"e\"\n", "modules.x.command"),
    ("[modules.x]\ncommand = [\"a\"]\n", "modules.x.endpoint: missing"),
    ("[modules.x]\ncommand = [\"a\"]\nendpoint = \"{nope}\"\n", "modules.x.endpoint: bad"),
    ("[modules.x]\ncommand = [\"a\"]\nendpoint = \"e\"\ncolour = 1\n", "modules.x.colour"),
    ("[properties]\n\"A.b\" = 1\n\"a.B\" = 2\n", "given twice"),
    ("allowed_peer_uids = [\"root\"]\n", "allowed_peer_uids"),
    ('authenticator = "ldap"\n', "authenticator"),
    ('desktop_endpoint = "x{user}"\n', "unknown option 'desktop_endpoint'"),
    ("call_timeout = [\n", "config file"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_twistd_options(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--thrift", "tcp:0", "--call-timeout", "2.5",
                          "--state", str(tmp_path), "--users", str(tmp_path / "u")])
    assert options.config.call_timeout == 2.5
    assert options.config.state_dir == tmp_path
    # One line each, no usage text (SystemExit: twistd prints just that).
    with pytest.raises(SystemExit, match=r"^icp-bridge: command line: call_timeout"):
        Options().parseOptions(["--call-timeout", "-1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("nope = 1\n")
    with pytest.raises(SystemExit, match=f"^icp-bridge: {bad}: unknown option"):
        Options().parseOptions(["--config", str(bad)])
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--no-such-flag"])
    assert os.path.exists(tmp_path)


def test_a_use_another_process_saw_slides_the_expiry_as_a_lookup_would() -> None:
    clock = Clock()
    tokens = TokenStore(clock)
    written: list[tuple[str, float | None]] = []
    tokens.listener = lambda digest, record: written.append(
        (digest, record.expires_at if record else None))
    token = tokens.issue(Identity("alice", "", 1), lifetime=100.0)
    digest = token_digest(token)
    clock.advance(90)
    tokens.touch(digest, 80.0)
    assert tokens.lookup(token) is not None  # 90 < 180: slid by the touch
    clock.advance(95)  # 185: a lookup at 90 slid it to 190
    tokens.touch(digest, 50.0)  # older than what is known: no effect
    assert tokens.lookup(token) is not None
    clock.advance(101)
    tokens.touch(digest, clock.seconds())  # at or after its expiry: stays expired
    assert tokens.lookup(token) is None
    tokens.touch("no such digest", 1.0)
