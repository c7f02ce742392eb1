"""The ``icp-bridge`` command's parser: every subcommand answers ``--help``
(found by walking the parser, so a new one cannot be forgotten),
``--version`` is the installed package's, and what ``ctl`` decodes."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from bridge.cli import build_parser, main
from bridge.cli.decode import duration, iso, message_result, message_style, unix_time

ROOT = Path(__file__).resolve().parent.parent


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                  ) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand, as the words that name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from command_paths(sub, (*prefix, name))


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


PATHS = list(command_paths(build_parser()))


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(path) for path in PATHS}
    assert {"users add", "ctl sessions", "ctl logoff", "ctl message", "ctl shadow",
            "ctl unshadow", "ctl events", "peer", "backend", "state check"} <= names
    assert len(PATHS) >= 25


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_every_subcommand_has_help(path: tuple[str, ...]) -> None:
    code, out, err = run([*path, "--help"])
    assert code == 0, err
    assert out.startswith("usage: icp-bridge " + " ".join(path)), out
    assert err == ""


def test_backend_help_lists_the_stand_in_backends_options() -> None:
    code, out, _ = run(["backend", "--help"])
    assert code == 0 and "--socket" in out and "--exit-after" in out


def test_version_is_the_installed_package() -> None:
    # As the console script runs: a process of its own.
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "--version"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"icp-bridge {version('icp-bridge')}"


def test_decoded_values() -> None:
    assert [message_result(n) for n in (1, 2, 3, 4, 5, 6, 7, 32000, 32001, 0, 99)] == [
        "IDOK", "IDCANCEL", "IDABORT", "IDRETRY", "IDIGNORE", "IDYES", "IDNO", "IDTIMEOUT",
        "IDASYNC", "failed", "99"]
    assert [message_style(s) for s in ("yesno", "MB_OKCANCEL", "4", "0x24")] == [4, 1, 4, 0x24]
    with pytest.raises(ValueError, match="not a message style"):
        message_style("maybe")
    assert unix_time(0) is None
    assert unix_time(116444736000000000 + 15 * 10_000_000) == 15
    text = iso(0)
    assert text is not None and text[:4] in ("1970", "1969") and text[-6] in "+-"
    assert [duration(s) for s in (None, 5, 59, 60, 125 * 60, 7200, 90000, 86400)] == [
        None, "5 s", "59 s", "1 min", "2 h 5 min", "2 h", "1 d 1 h", "1 d"]


def test_a_token_that_begins_with_a_dash_is_a_value() -> None:
    args = build_parser().parse_args(["ctl", "--token=-abc", "ping"])
    assert args.token == "-abc"
    # As an operator types it: --token, then the token.
    code, _, err = run(["ctl", "--plain", "--port", "1", "--token", "-abc", "--timeout",
                        "1", "ping"])
    assert "expected one argument" not in err and code == 3, err
