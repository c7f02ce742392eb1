"""The configuration as an operator meets it: ogon's property types, unknown
keys with a suggestion, one line per problem naming the file, the default
path, several sources merged, ``icp-bridge config check``, and the
preflight against the machine (modules, accounts, pipe_dir, certificate,
listeners)."""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import config as config_module
from bridge.backends.modules import Module
from bridge.config import Config, ConfigError, Problem
from bridge.config_sources import ConfigSources, Flags, TomlFile, load_config
from bridge.endpoints import StartupError
from bridge.preflight import preflight
from bridge.security.tls import certificate_not_after, generate_pair, openssl_time
from bridge.tap import Options
from tests.conftest import no_ogon_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return [str(p) for p in raised.value.problems]


def test_a_number_given_as_a_string_is_an_error(tmp_path: Path) -> None:
    lines = problems_of(tmp_path, '[properties]\n"session.timeout" = "30"\n'
                                  '"session.reconnect" = "false"\n'
                                  '[user_properties.bob]\n"session.maxXRes" = 1.5\n'
                                  '"permission.level" = 1\n')
    path = tmp_path / "bridge.toml"
    assert lines == [
        f"{path}: properties.session.timeout: ogon reads session.timeout as an integer, not "
        f"the string '30' (write 30 without quotes); a value of another type is never found",
        f"{path}: properties.session.reconnect: ogon reads session.reconnect as a boolean "
        f"(true/false), not the string 'false' (write false without quotes); a value of "
        f"another type is never found",
        f"{path}: user_properties.bob.session.maxXRes: a property is a boolean, integer or "
        f"string, not float",
        f"{path}: user_properties.bob.permission.level: ogon reads permission.level as a "
        f"string, not the integer 1; a value of another type is never found",
    ]


def test_every_problem_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    lines = problems_of(tmp_path, 'call_timout = 3\nlog_level = "verbose"\n'
                                  '[modules.x]\ncommand = ["a"]\nendpoint = "e"\nenviroment = {}\n')
    path = tmp_path / "bridge.toml"
    assert lines == [
        f"{path}: unknown option 'call_timout' (did you mean call_timeout?)",
        f"{path}: log_level: 'verbose' is not one of debug, info, warn, error",
        f"{path}: modules.x.enviroment: unknown module option (did you mean environment?) "
        f"(known: command, endpoint, environment, ready_timeout, stop_timeout, user)",
    ]


def test_an_unknown_property_is_a_warning_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[properties]\n"session.timout" = 5\n"desktop.name" = "xfce"\n'
                    '"module.xsession.displayOffset" = 100\n"current.connection.xres" = 1\n')
    loaded = ConfigSources.for_service(path).load()
    assert [str(w) for w in loaded.warnings] == [
        f"{path}: properties.session.timout: not a property ogon reads (did you mean "
        f"session.timeout?); kept, and answered over ICP",
        f"{path}: properties.desktop.name: not a property ogon reads; kept, and answered "
        f"over ICP",
        f"{path}: properties.current.connection.xres: answered from the client's connection; "
        f"a configured value is never used",
    ]
    assert all(w.warning for w in loaded.warnings)
    assert loaded.config.properties["session.timout"] == 5, "a site's own property is kept"
    # An option appended below [properties] is a property: said, with where it belongs.
    path.write_text('[properties]\n"session.timeout" = 5\ncall_timeout = 3\n')
    assert [str(w) for w in ConfigSources.for_service(path).load().warnings] == [
        f"{path}: properties.call_timeout: not a property ogon reads; kept, and answered over "
        f"ICP; call_timeout is a top-level option: write it above the first [table] of the "
        f"file"]
    assert loaded.config.properties["module.xsession.displayoffset"] == 100


def test_sources_merge_in_order_and_each_problem_names_its_source(tmp_path: Path) -> None:
    first = tmp_path / "first.toml"
    first.write_text('call_timeout = 3\n[properties]\n"session.timeout" = 5\n'
                     '[user_properties.bob]\n"session.reconnect" = false\n')
    second = tmp_path / "second.toml"
    second.write_text('[properties]\n"module" = "kde"\n'
                      '[user_properties.bob]\n"session.timeout" = 0\n')
    loaded = ConfigSources([TomlFile(first), TomlFile(second),
                            Flags({"call_timeout": 7.0})]).load()
    assert loaded.config.call_timeout == 7.0
    assert loaded.config.properties == {"session.timeout": 5, "module": "kde"}
    assert loaded.config.user_properties == {"bob": {"session.reconnect": False,
                                                     "session.timeout": 0}}
    assert loaded.origins["properties"] == str(second)
    assert loaded.origins["call_timeout"] == "command line"
    second.write_text('[properties]\n"session.timeout" = "1"\n')
    with pytest.raises(ConfigError) as raised:
        ConfigSources([TomlFile(first), TomlFile(second), Flags({"call_timeout": -1.0})]).load()
    assert [p.source for p in raised.value.problems] == [str(second), "command line"]
    with pytest.raises(ConfigError, match="command line: call_timeout: must be positive"):
        ConfigSources([TomlFile(first), Flags({"call_timeout": -1.0})]).load()


def test_the_default_file_is_read_when_present(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "etc" / "bridge.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", default)
    options = Options()
    options.parseOptions([])
    assert options.sources.files == [] and options.config.call_timeout == 10.0
    default.parent.mkdir()
    default.write_text("call_timeout = 4\n")
    options = Options()
    options.parseOptions(["--state", str(tmp_path)])
    assert options.sources.files == [str(default)]
    assert options.config.call_timeout == 4.0 and options.config.state_dir == tmp_path
    other = tmp_path / "other.toml"
    other.write_text("call_timeout = 2\n")
    options = Options()
    options.parseOptions(["--config", str(other)])
    assert options.config.call_timeout == 2.0, "--config wins over the default file"


def test_startup_errors_are_the_lines_without_usage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('nope = 1\n[properties]\n"session.timeout" = "30"\n')
    with pytest.raises(SystemExit) as raised:
        Options().parseOptions(["--config", str(bad)])
    assert str(raised.value).splitlines() == [
        f"icp-bridge: {bad}: unknown option 'nope'",
        f"icp-bridge: {bad}: properties.session.timeout: ogon reads session.timeout as an "
        f"integer, not the string '30' (write 30 without quotes); a value of another type is "
        f"never found",
    ]


# -- ogon's config.ini among the sources ----------------------------------------------------

def test_both_default_files_are_read_and_config_ini_brings_pam(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml, ini = tmp_path / "bridge.toml", tmp_path / "config.ini"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", toml)
    monkeypatch.setattr(config_module, "DEFAULT_OGON_CONFIG", ini)
    toml.write_text("call_timeout = 4\n")
    ini.write_text("[global]\nsession_timeout_number=60\n")
    options = Options()
    options.parseOptions(["--state", str(tmp_path)])
    assert options.sources.files == [str(toml)]
    assert (options.config.ogon_config, options.config.authenticator) == (ini, "pam")
    assert options.loaded.read_properties().global_values["session.timeout"] == 60
    assert options.loaded.files == [str(toml), str(ini)]
    toml.write_text('authenticator = "users-file"\n')
    assert ConfigSources.for_service(toml).load().config.authenticator == "users-file"
    toml.write_text('ogon_config = ""\n')
    loaded = ConfigSources.for_service(toml).load()
    assert (loaded.config.ogon_config, loaded.config.authenticator) == (None, "users-file")
    assert loaded.files == [str(toml)]


def test_config_ini_of_another_type_or_unknown_is_a_warning_with_its_line(
        tmp_path: Path) -> None:
    """config.ini's suffix types an entry, as in ogon: one of another type
    than ogon reads is kept and served as ogon serves it (not found under
    ogon's type), and said with its line; so is a property ogon does not
    read. A user's entry that hides the global one is said once."""
    ini = tmp_path / "config.ini"
    ini.write_text("[global]\nsession_timeout_string=30\nsession_timout_number=5\n"
                   "module_weston_uselauncher_string=true\nsession_reconnect_bool=false\n"
                   "[user_bob]\nsession_maxXRes_string=2560\nsession_remotecontrol_ask_number=1\n")
    toml = tmp_path / "bridge.toml"
    toml.write_text(f'ogon_config = "{ini}"\n')
    loaded = ConfigSources.for_service(toml).load()
    assert loaded.warnings == []
    assert loaded.properties is not None
    assert list(loaded.properties.problems) == [
        "property session.maxxres for user bob is a string, the global one a number: asked "
        "for a number, bob's sessions find none (as in ogon)",
        f"{ini}:2: session.timeout is a string here, but ogon reads it as a number: asked for "
        f"a number, it is not found and its reader falls back to its own value (as in ogon; "
        f"use the _number suffix)",
        f"{ini}:3: session.timout: not a property ogon reads (did you mean session.timeout?); "
        f"kept, and answered over ICP",
        f"{ini}:4: module.weston.uselauncher is a string here, but ogon reads it as a "
        f"boolean: asked for a boolean, it is not found and its reader falls back to its own "
        f"value (as in ogon; use the _bool suffix)",
        f"{ini}:8: session.remotecontrol.ask is a number here, but ogon reads it as a "
        f"boolean: asked for a boolean, it is not found and its reader falls back to its own "
        f"value (as in ogon; use the _bool suffix)",
    ]
    table = loaded.properties.table()
    assert table.get_number("session.timeout") is None, "served as ogon serves it"
    assert table.get_string("session.timeout") == "30"
    # The same mistake in the TOML file is an error: there a quoted number is never meant.
    toml.write_text(f'ogon_config = "{ini}"\n[properties]\n"session.timeout" = "30"\n')
    with pytest.raises(ConfigError, match=r"ogon reads session\.timeout as an integer"):
        ConfigSources.for_service(toml).load()


def test_a_module_config_ini_names_is_a_warning_one_the_toml_names_an_error(
        tmp_path: Path) -> None:
    ini = tmp_path / "config.ini"
    ini.write_text("[global]\nmodule_string=xsession\n[user_bob]\nmodule_string=kde\n")
    config = config_with(tmp_path, ogon_config=ini)
    found = preflight(config, {"properties": "/etc/b.toml"}, as_root=False)
    assert found.errors == []
    # xsession is ogon's X11 kind (module_xsession_modulename_string, ogon's default).
    assert [str(p) for p in found.warnings if "names module" in p.text] == [
        f"{ini}:4: module: names module 'kde', which is not defined (no [modules.kde], no "
        f"module_kde_modulename_string naming X11, Qt or Weston): those logons get the greeter "
        f"until one is configured",
    ]
    config = config_with(tmp_path, ogon_config=ini, user_properties={"bob": {"module": "kde"}})
    assert lines(preflight(config, {"user_properties": "/etc/b.toml"}, as_root=False).errors) \
        == ["/etc/b.toml: user_properties.bob.module: names module 'kde', which is not defined "
            "(add [modules.kde] or module.kde.modulename, or name one of: greeter, xsession)"]
    # A user's own module.kde.modulename selects the kind for that user.
    config = config_with(tmp_path, ogon_config=ini, user_properties={
        "bob": {"module": "kde", "module.kde.modulename": "X11"}})
    assert preflight(config, {"user_properties": "/etc/b.toml"}, as_root=False).errors == []


def test_config_check_checks_config_ini_and_names_its_line(tmp_path: Path) -> None:
    ini = tmp_path / "config.ini"
    ini.write_text("[global]\nsession_timeout_number=60\nsession_timeout_number=30\n")
    path = good_config(tmp_path, extra=f'ogon_config = "{ini}"')
    result = run_check(str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{ini}:3: session_timeout_number given twice in [global] (first on line 2); ogon "
        f"then ignores the whole file"]
    ini.write_text("[global]\nsession_timeout_number=60\nsession_timout_number=30\n")
    result = run_check(str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"warning: {ini}:3: session.timout: not a property ogon reads (did you mean " \
           f"session.timeout?); kept, and answered over ICP" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1].startswith(f"{path}, {ini}: ok (")


def test_config_check_without_arguments_checks_what_a_start_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.cli.config import cmd_check

    ini = tmp_path / "config.ini"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", good_config(tmp_path))
    monkeypatch.setattr(config_module, "DEFAULT_OGON_CONFIG", ini)
    ini.write_text("[global]\nsession_maxXRes_number=wide\n")
    assert cmd_check(argparse.Namespace(file=None, ogon_config=None)) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{ini}:2: session_maxXRes_number=wide: not a decimal number (ogon would log it and "
        f"ignore the line)"]
    ini.write_text("[global]\nsession_maxXRes_number=4096\n")
    assert cmd_check(argparse.Namespace(file=None, ogon_config=None)) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"{tmp_path}/bridge.toml, {ini}: ok")


def test_config_check_takes_another_config_ini_or_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--ogon-config`` as twistd's: another file than /etc/ogon/config.ini
    (checked before it is put in place), or "" for none."""
    from bridge.cli.config import cmd_check

    default, other = tmp_path / "default.ini", tmp_path / "other.ini"
    default.write_text("[global]\nsession_maxXRes_number=wide\n")
    other.write_text("[global]\nsession_maxXRes_number=4096\n")
    monkeypatch.setattr(config_module, "DEFAULT_OGON_CONFIG", default)
    toml = str(good_config(tmp_path))
    assert cmd_check(argparse.Namespace(file=toml, ogon_config=None)) == 1
    capsys.readouterr()
    assert cmd_check(argparse.Namespace(file=toml, ogon_config="")) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{toml}: ok")
    assert cmd_check(argparse.Namespace(file=toml, ogon_config=str(other))) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{toml}, {other}: ok")


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    """``config check FILE`` in a child, never reading this machine's config.ini."""
    return subprocess.run([sys.executable, "-m", "bridge.cli", "config", "check", *args,
                           *no_ogon_config(Path(args[0]))],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)


def good_config(tmp_path: Path, extra: str = "") -> Path:
    """A configuration whose modules exist (the stand-in backend) and whose
    files are in ``tmp_path``."""
    (tmp_path / "users").write_text("")
    (tmp_path / "users").chmod(0o600)
    path = tmp_path / "bridge.toml"
    me = pwd.getpwuid(os.geteuid()).pw_name
    path.write_text(f'''thrift_endpoint = "ssl:9091:interface=127.0.0.1"
state_dir = "{tmp_path}/state"
users_file = "{tmp_path}/users"
pipe_dir = "{tmp_path}/pipes"
{extra}
[modules.greeter]
command = ["{sys.executable}", "-V"]
endpoint = "ogon_{{session_id}}_Qt"
user = "{me}"
[modules.xsession]
command = ["{sys.executable}", "-V"]
endpoint = "ogon_{{session_id}}_X11"
user = "{me}"
[properties]
"ssl.certificate" = "{tmp_path}/tls/c.crt"
"ssl.key" = "{tmp_path}/tls/c.key"
''')
    return path


def test_config_check_exits_0_for_a_sound_configuration(tmp_path: Path) -> None:
    result = run_check(str(good_config(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"{tmp_path}/bridge.toml: ok")


def test_config_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[properties]\n"session.timeout" = "30"\n"session.timout" = 1\n'
                    "[modules.xsession]\ncommand = [\"x\"]\nendpoint = \"e\"\ncolour = 1\n")
    result = run_check(str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{path}: properties.session.timeout: ogon reads session.timeout as an integer, not "
        f"the string '30' (write 30 without quotes); a value of another type is never found",
        f"{path}: modules.xsession.colour: unknown module option (known: command, endpoint, "
        f"environment, ready_timeout, stop_timeout, user)",
    ]
    assert "Traceback" not in result.stderr


def test_config_check_runs_the_preflight(tmp_path: Path) -> None:
    path = good_config(tmp_path, extra='[user_properties.bob]\n"module" = "kde"\n')
    (tmp_path / "users").write_text("alice:full:not-a-hash\n")
    result = run_check(str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == [
        f"{path}: user_properties.bob.module: names module 'kde', which is not defined (add "
        f"[modules.kde] or module.kde.modulename, or name one of: greeter, xsession)",
        f"error: {tmp_path}/users:1: the hash is not scrypt$n=..,r=..,p=..$salt$digest",
    ]


# -- preflight ---------------------------------------------------------------------------

def config_with(tmp_path: Path, **values: object) -> Config:
    fields = {"state_dir": tmp_path / "state", "users_file": tmp_path / "users",
              "pipe_dir": tmp_path / "pipes", "thrift_endpoint": "ssl:9091:interface=127.0.0.1",
              "properties": {"ssl.certificate": str(tmp_path / "c.crt"),
                             "ssl.key": str(tmp_path / "c.key")}}
    fields.update(values)
    return Config(**fields)  # type: ignore[arg-type]


def lines(found: list[Problem]) -> list[str]:
    return [str(p) for p in found]


def test_preflight_modules_commands_and_accounts(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    modules = {
        "greeter": Module("greeter", ("no-such-greeter-here",), "g", user="root"),
        "xsession": Module("xsession", (str(script),), "x", user="session"),
        "kde": Module("kde", (sys.executable,), "k", user="no-such-account-here"),
        "chosen": Module("chosen", ("{user}-desktop",), "c"),
    }
    config = config_with(tmp_path, modules=modules,
                         properties={"auth.greeter": "greeter"},
                         user_properties={"bob": {"module": "gnome"}, "eve": {"module": "kde"}})
    found = preflight(config, {"modules": "/etc/b.toml", "user_properties": "/etc/b.toml",
                               "properties": "/etc/b.toml"}, as_root=True)
    assert lines(found.errors) == [
        "/etc/b.toml: user_properties.bob.module: names module 'gnome', which is not defined "
        "(add [modules.gnome] or module.gnome.modulename, or name one of: chosen, greeter, kde, "
        "xsession)"]
    # (Whether backend_log_dir has a filesystem of its own depends on the
    # machine: tests/test_backend_log_filesystem.py.)
    assert [w for w in lines(found.warnings) if not w.startswith("backend_log_dir")] == [
        "/etc/b.toml: modules.xsession.command: "
        f"{script} is not an executable file; xsession backends cannot start (logons get the "
        "greeter instead of their desktop)",
        "/etc/b.toml: modules.kde.user: no account 'no-such-account-here'; kde backends cannot "
        "start",
        "/etc/b.toml: modules.greeter.command: 'no-such-greeter-here' not found in PATH "
        "(/usr/local/bin:/usr/bin:/bin); greeter backends cannot start (clients without a "
        "password get FAILED instead of a greeter)",
    ]
    assert found.alerts == []
    # Not root: backends run as the bridge's own user, so module accounts do not matter.
    assert not any("no account" in p.text for p in preflight(config, as_root=False).warnings)


def test_preflight_says_when_no_desktop_module_is_configured(tmp_path: Path) -> None:
    assert not [p for p in preflight(config_with(tmp_path), as_root=False).warnings
                if "not defined" in p.text]  # ogon's X11 kind by default
    config = config_with(tmp_path, properties={"module.xsession.modulename": "KDE"})
    found = preflight(config, as_root=False)
    assert any(p.text.startswith("modules.xsession: not defined, and the module property "
                                 "names it by default") for p in found.warnings)
    assert found.errors == []


def test_preflight_pipe_dir_must_take_the_session_users_sockets(short_dir: Path) -> None:
    tmp_path = short_dir  # under /tmp: every directory above it may be searched
    pipes = tmp_path / "pipes"
    pipes.mkdir(mode=0o755)
    pipes.chmod(0o755)
    tmp_path.chmod(0o755)
    desktop = {"xsession": Module("xsession", (sys.executable,), "x", user="session")}
    found = preflight(config_with(tmp_path, modules=desktop), as_root=True)
    assert lines(found.errors) == [
        f"pipe_dir: the session's users cannot create sockets in {pipes} (owner uid "
        f"{os.geteuid()}, mode 0755), so xsession backends cannot start (chmod 1777 {pipes}, "
        f"as winpr makes it)"]
    pipes.chmod(0o1777)
    assert preflight(config_with(tmp_path, modules=desktop), as_root=True).errors == []
    tmp_path.chmod(0o700)  # a directory above it that they cannot reach
    assert "cannot reach" in str(preflight(config_with(tmp_path, modules=desktop),
                                           as_root=True).errors[0])
    tmp_path.chmod(0o755)
    # Backends that run as the bridge's own user need nothing more; nor does
    # a greeter (no session user yet: it runs as the bridge's, as in ogon).
    pipes.chmod(0o755)
    own = {"xsession": Module("xsession", (sys.executable,), "x", user="root"),
           "greeter": Module("greeter", (sys.executable,), "g", user="session")}
    assert preflight(config_with(tmp_path, modules=own), as_root=True).errors == []


def test_preflight_certificate_expiry(tmp_path: Path) -> None:
    generate_pair(tmp_path / "c.crt", tmp_path / "c.key")  # valid ten years
    config = config_with(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    assert preflight(config, as_root=False).alerts == []
    soon = preflight(config, as_root=False,
                     now=lambda: now + datetime.timedelta(days=10 * 365 - 10))
    assert [p.text.split(" expires on ")[0] for p in soon.warnings
            if "certificate" in p.text] == [
        f"properties.ssl.certificate: the certificate {tmp_path}/c.crt"]
    expired = preflight(config, as_root=False,
                        now=lambda: now + datetime.timedelta(days=10 * 365 + 1))
    assert len(expired.alerts) == 1 and " EXPIRED on " in expired.alerts[0].text
    assert expired.errors == [], "an expired certificate is said loudly, not refused"


def test_certificate_time_is_read_as_the_ssl_module_reads_it(tmp_path: Path) -> None:
    """openssl_time (the start's reading, without time.strptime) answers what
    ssl.cert_time_to_seconds answers, and refuses what it refuses."""
    for text in ("Dec  2 05:51:55 2027 GMT", "Jan 31 23:59:59 2049 GMT",
                 "Feb 29 00:00:00 2028 GMT", "jan  1 00:00:00 1970 GMT"):
        assert openssl_time(text) == datetime.datetime.fromtimestamp(
            ssl.cert_time_to_seconds(text), datetime.UTC), text
    for text in ("Foo  2 05:51:55 2027 GMT", "Dec  2 05:51:55 2027 UTC",
                 "Dec 32 05:51:55 2027 GMT", "Dec  2 05:51 2027 GMT", ""):
        with pytest.raises(ValueError):
            ssl.cert_time_to_seconds(text)
        with pytest.raises(ValueError):
            openssl_time(text)
    generate_pair(tmp_path / "c.crt", tmp_path / "c.key")
    decoded = ssl._ssl._test_decode_cert(str(tmp_path / "c.crt"))  # type: ignore[attr-defined]
    assert certificate_not_after(tmp_path / "c.crt") == datetime.datetime.fromtimestamp(
        ssl.cert_time_to_seconds(decoded["notAfter"]), datetime.UTC)


def test_preflight_plaintext_and_off_loopback_listeners(tmp_path: Path) -> None:
    found = preflight(config_with(tmp_path, thrift_endpoint="tcp:9091",
                                  admin_endpoint="tcp:9092:interface=10.0.0.5"), as_root=False)
    texts = [p.text for p in found.warnings]
    assert "thrift_endpoint: 'tcp:9091' is not TLS: logonConnection passwords and tokens " \
           "cross it unencrypted and ogon's WTSAPI clients, which dial TLS, cannot connect" \
           in texts
    assert "thrift_endpoint: listens on every interface, reachable from the network (add " \
           ":interface=127.0.0.1 to keep it local)" in texts
    assert any(t.startswith("admin_endpoint: 'tcp:9092:interface=10.0.0.5' is not TLS")
               for t in texts)
    assert any(t.startswith("admin_endpoint: listens on 10.0.0.5") for t in texts)
    quiet = preflight(config_with(tmp_path), as_root=False)
    assert not any("endpoint" in p.text for p in quiet.warnings), "the defaults are local"


def test_pam_that_cannot_run_is_said_before_anything_is_written(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """authenticator = "pam" (the default with a config.ini) without
    python-pam: config check says so as the start does, and the start says
    it before it has made a TLS pair or the state directory."""
    from bridge.service import BridgeService

    monkeypatch.setitem(sys.modules, "pam", None)  # import pam fails, as when not installed
    ini = short_dir / "config.ini"
    ini.write_text("[global]\n")
    toml = good_config(short_dir, extra=f'ogon_config = "{ini}"')
    loaded = ConfigSources.for_service(toml).load()
    assert loaded.config.authenticator == "pam"
    refused = preflight(loaded.config, loaded.origins, properties=loaded.properties)
    assert lines(refused.errors) == [
        "authenticator = 'pam' needs the python-pam package, a dependency of icp-bridge: "
        "reinstall icp-bridge with pip (or set authenticator = \"users-file\")"]
    with pytest.raises(StartupError, match="needs the python-pam package"):
        BridgeService(loaded.config, properties=loaded.properties)
    assert not (short_dir / "tls").exists(), "no TLS pair made by a start that is refused"
    assert not (short_dir / "state").exists()
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    monkeypatch.delitem(sys.modules, "pam")
    assert "needs libpam" in lines(preflight(loaded.config, properties=loaded.properties
                                             ).errors)[0]
