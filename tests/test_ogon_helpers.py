"""What ogon's modules rest on: WinPR's command-line splitting, the X11
module's xauth file, and the environment block as ogon's session manager
builds it (greeter and desktop)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from bridge.backends.environment import (
    Account,
    environment,
    environment_block,
    search_path,
    session_environment,
    set_variable,
)
from bridge.backends.modules import LaunchContext, Module
from bridge.backends.ogon import xauth
from bridge.backends.ogon.commandline import command_line_to_argv


@pytest.mark.parametrize(("line", "argv"), [
    ("ogon-backend-x -displayfd 7:100", ["ogon-backend-x", "-displayfd", "7:100"]),
    ("a  b\t c ", ["a", "b", "c"]),
    (' a', ["", "a"]),  # WinPR: a leading blank makes an empty argument
    ('a "b c" d', ["a", "b c", "d"]),
    ("x 'a b'", ["x", "'a", "b'"]),  # single quotes are ordinary characters
    ('a\\"b c', ['a"b', "c"]),  # \" outside quotes: a literal quote
    ('x "a\\"b" c', ["x", "ab", "c"]),  # inside quotes WinPR drops every quote
    ("a\\\\b", ["a\\\\b"]),  # backslashes not before a quote stay
    ('"unterminated x', ["unterminated x"]),
    ("", []),
])
def test_command_lines_split_as_winpr_splits_them(line: str, argv: list[str]) -> None:
    assert command_line_to_argv(line) == argv


# -- xauth -------------------------------------------------------------------------------

def entries(path: Path) -> list[tuple[int, bytes, bytes, bytes, int]]:
    return [(f, a, n, name, len(data)) for f, a, n, name, data in
            xauth.parse(path.read_bytes())]


def test_a_new_cookie_then_the_same_one(tmp_path: Path) -> None:
    path = tmp_path / ".Xauthority.ogon"
    assert not xauth.ensure_cookie(path, os.getuid(), os.getgid(), b"host1")
    assert entries(path) == [(256, b"host1", b"", b"MIT-MAGIC-COOKIE-1", 16)]
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_bytes()
    assert xauth.ensure_cookie(path, os.getuid(), os.getgid(), b"host1"), "reused"
    assert path.read_bytes() == first, "left as it is"
    # Layout, checked by hand: family, then address, number, name, data.
    assert first[:2] == struct.pack(">H", 256)
    assert first[2:9] == struct.pack(">H", 5) + b"host1"
    assert first[9:11] == b"\0\0"


def test_an_entry_for_another_host_is_kept_behind_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / ".Xauthority.ogon"
    path.write_bytes(xauth.entry(256, b"oldhost", b"", b"MIT-MAGIC-COOKIE-1", b"x" * 16))
    path.chmod(0o644)
    assert not xauth.ensure_cookie(path, os.getuid(), os.getgid(), b"newhost")
    assert [e[1] for e in entries(path)] == [b"newhost", b"oldhost"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_link_or_a_file_of_someone_else_is_never_used(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"do not touch")
    path = tmp_path / ".Xauthority.ogon"
    path.symlink_to(target)
    assert not xauth.ensure_cookie(path, os.getuid(), os.getgid(), b"h")
    assert target.read_bytes() == b"do not touch" and not path.is_symlink()
    other = tmp_path / ".Xauthority.ogon.5"
    other.write_bytes(xauth.entry(256, b"h", b"", b"MIT-MAGIC-COOKIE-1", b"k" * 16))
    before = other.read_bytes()
    assert not xauth.ensure_cookie(other, os.getuid() + 1, os.getgid(), b"h"), \
        "a cookie in a file the user does not own is not reused (someone else knows it)"
    assert other.read_bytes()[:-16] == before[:-16] and other.read_bytes() != before


# -- environment blocks --------------------------------------------------------------------

def context(username: str = "", **extra: object) -> LaunchContext:
    values: dict[str, object] = dict(
        session_id=4, username=username, domain="", width=1024, height=768, bpp=16,
        max_width=1920, max_height=1200, client_name="host", client_address="192.0.2.4",
        backend_cookie="B" * 50, ogon_cookie="O" * 50, rdp_server_uid=0, rdp_server_pid=77)
    values.update(extra)
    return LaunchContext(**values)  # type: ignore[arg-type]


ALICE = Account("alice", 1001, 1001, "/home/alice", "/bin/bash")


def test_a_greeters_block() -> None:
    env = session_environment(context(typed_user="bob", typed_domain="EXAMPLE"), {}, None)
    assert list(env) == ["PATH", "OGON_COOKIE", "OGON_BACKEND_COOKIE", "OGON_USER",
                         "OGON_DOMAIN", "OGON_SID", "OGON_SESSION_CLIENT_NAME",
                         "OGON_SESSION_CLIENT_ADDRESS", "OGON_SMAX", "OGON_UID", "OGON_PID",
                         "OGON_CONNECTION_BPP"]
    assert (env["OGON_USER"], env["OGON_DOMAIN"], env["OGON_PID"]) == ("bob", "EXAMPLE", "77")
    assert env["OGON_CONNECTION_BPP"] == "16" and env["OGON_SMAX"] == "1920x1200"


def test_a_desktops_block() -> None:
    env = session_environment(context("alice", typed_user="ignored"), {}, ALICE)
    assert list(env) == ["PATH", "UID", "SHELL", "USER", "HOME", "OGON_COOKIE",
                         "OGON_BACKEND_COOKIE", "OGON_SID", "OGON_SESSION_CLIENT_NAME",
                         "OGON_SESSION_CLIENT_ADDRESS", "OGON_SMAX", "OGON_UID",
                         "OGON_CONNECTION_BPP"]
    assert (env["UID"], env["SHELL"], env["USER"], env["HOME"]) == (
        "1001", "/bin/bash", "alice", "/home/alice")
    assert "LOGNAME" not in env and "OGON_USER" not in env and "OGON_PID" not in env


def test_no_smax_without_both_maxima_and_no_empty_client_names() -> None:
    env = session_environment(context("alice", max_height=0, client_name="",
                                      client_address=""), {}, ALICE)
    assert "OGON_SMAX" not in env
    assert "OGON_SESSION_CLIENT_NAME" not in env and "OGON_SESSION_CLIENT_ADDRESS" not in env


def test_environment_filter_and_add_by_ogons_rules() -> None:
    manager = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SECRET": "s", " LANG": "spaced"}
    env = session_environment(context("alice", environment_filter=" LANG;;PATH ",
                                      environment_add_text="A:1;B:x:y=z;noColon;:v;PATH:/mine"),
                              manager, ALICE)
    assert env["LANG"] == "C.UTF-8", "the filter is trimmed of blanks as a whole"
    assert env["PATH"] == "/mine", "an added PATH replaces the copied one in place"
    assert list(env)[:4] == ["LANG", "PATH", "A", "B"]
    assert (env["A"], env["B"]) == ("1", "x:y=z"), "split at the first colon only"
    assert "SECRET" not in env and "noColon" not in env and "" not in env
    everything = session_environment(context("alice", environment_filter="*"), manager, ALICE)
    assert everything["SECRET"] == "s" and everything["PATH"] == "/usr/bin:/bin"


def test_winpr_set_semantics_and_the_block_bytes() -> None:
    env = {"A": "1", "B": "2"}
    set_variable(env, "A", "3")
    assert list(env.items()) == [("A", "3"), ("B", "2")], "replaced in place"
    set_variable(env, "A", "")
    assert list(env) == ["B", "A"], "an empty value moves it to the end"
    assert environment_block({"A": "1", "B": "x y"}) == b"A=1\0B=x y\0\0"


def test_ogons_directories_go_in_front_of_path() -> None:
    assert search_path(["/usr/bin", "/etc/ogon"], {"PATH": "/usr/local/bin:/usr/bin"}) == \
        "/etc/ogon:/usr/local/bin:/usr/bin"
    assert search_path(["/opt/ogon/bin"], {}) is None, "no PATH: ogon leaves it unset"


def test_a_command_module_on_a_qt_endpoint_gets_ogon_pipe_path() -> None:
    greeter = Module("greeter", ("g",), "ogon_{session_id}_Qt")
    desktop = Module("xsession", ("d",), "ogon_{session_id}_X11", environment={"X": "{user}"})
    values = {"endpoint": "ogon_4_Qt", "pipe_dir": "/tmp/.pipe", "user": ""}
    env = environment(greeter, context(), ALICE, values, {})
    assert env["OGON_PIPE_PATH"] == "/tmp/.pipe/ogon_4_Qt"
    assert "HOME" not in env, "a greeter has no account variables, whoever it runs as"
    env = environment(desktop, context("alice"), ALICE,
                      {"endpoint": "ogon_4_X11", "pipe_dir": "/tmp/.pipe", "user": "alice"}, {})
    assert "OGON_PIPE_PATH" not in env and env["X"] == "alice" and env["USER"] == "alice"
