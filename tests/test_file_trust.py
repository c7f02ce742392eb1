"""Files the bridge trusts with root's power (review finding 14): the TOML
file and ogon's config.ini (they name the commands run as root), the users
file (FULL tokens) and the module programs run as root. One that someone
besides root and the bridge's user can change stops startup, refuses a
reload (the last good configuration stays) and makes ``config check``
exit 1, with one line naming the file and the fix. The review's
config_perms.sh is re-run as test_config_check_refuses_the_reviews_files."""

from __future__ import annotations

import grp
import os
import pwd
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from bridge.config_sources import ConfigSources
from bridge.preflight import preflight
from bridge.security.file_trust import untrusted
from bridge.tap import Options, makeService
from tests.e2e.test_reload import start, toml
from tests.test_config_check import good_config, run_check

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="chown to another user needs root")


def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def test_a_file_only_root_and_the_bridge_can_change_is_trusted(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text("")
    path.chmod(0o644)
    assert untrusted(path, "ogon's config.ini") is None
    assert untrusted(tmp_path / "missing", "ogon's config.ini") is None, "said elsewhere"


@pytest.mark.parametrize(("mode", "who"), [(0o666, "others"), (0o646, "others"),
                                           (0o664, "its group")])
def test_a_file_others_may_write_is_not(tmp_path: Path, mode: int, who: str) -> None:
    path = tmp_path / "config.ini"
    path.write_text("")
    path.chmod(mode)
    assert untrusted(path, "ogon's config.ini") == (
        f"ogon's config.ini {path} is writable by {who} (mode {mode:04o}), and it names the "
        f"commands the bridge runs as root: chmod go-w {path}")


@needs_root
def test_a_file_another_user_owns_is_not(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text("")
    os.chown(path, nobody(), -1)
    assert untrusted(path, "configuration file") == (
        f"configuration file {path} is owned by uid {nobody()} (nobody), not root or the "
        f"bridge's user, and it names the commands the bridge runs as root: chown root {path}")


def test_a_directory_above_that_others_may_write_is_not(tmp_path: Path) -> None:
    open_dir = tmp_path / "open" / "deeper"
    open_dir.mkdir(parents=True)
    path = open_dir / "users"
    path.write_text("")
    path.chmod(0o600)
    (tmp_path / "open").chmod(0o777)
    assert untrusted(path, "users file") == (
        f"users file {path}: the directory {tmp_path / 'open'} above it is writable by others "
        f"without the sticky bit (mode 0777), so anyone can replace it, and it hands out "
        f"logons with FULL rights: chmod o-w {tmp_path / 'open'}")
    # Sticky, as /tmp: others may add names, not replace a file that is not
    # theirs: fine when the file is the bridge's (or root's).
    (tmp_path / "open").chmod(0o1777)
    assert untrusted(path, "users file") is None


@needs_root
def test_a_directory_above_that_its_group_may_write_is_not(tmp_path: Path) -> None:
    """Its group's members could rename another file over it (the review of
    the security round); a group of root's own (root, Debian's staff) may."""
    shared = tmp_path / "conf"
    shared.mkdir()
    path = shared / "icp-bridge.toml"
    path.write_text("")
    path.chmod(0o644)
    users = grp.getgrnam("users").gr_gid
    os.chown(shared, 0, users)
    shared.chmod(0o775)
    assert untrusted(path, "configuration file") == (
        f"configuration file {path}: the directory {shared} above it is writable by its group "
        f"users (mode 0775), whose members can replace it, and it names the commands the "
        f"bridge runs as root: chmod g-w {shared}")
    os.chown(shared, 0, 0)
    assert untrusted(path, "configuration file") is None
    os.chown(shared, 0, users)
    shared.chmod(0o755)
    assert untrusted(path, "configuration file") is None


@needs_root
def test_in_a_sticky_directory_only_the_bridges_own_file_is_trusted(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    path = sticky / "config.ini"
    path.write_text("")
    os.chown(path, nobody(), -1)
    assert "is owned by uid" in (untrusted(path, "ogon's config.ini") or "")
    theirs = sticky / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody(), -1)
    inside = theirs / "config.ini"
    inside.write_text("")
    assert untrusted(inside, "ogon's config.ini") == (
        f"ogon's config.ini {inside}: the directory {theirs} above it is owned by uid "
        f"{nobody()} (nobody), who can replace it, and it names the commands the bridge runs "
        f"as root: move it, or chown root {theirs}")


def test_a_link_is_followed_and_where_it_leads_is_checked(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    target = tmp_path / "open" / "config.ini"
    target.write_text("")
    (tmp_path / "open").chmod(0o777)
    link = tmp_path / "config.ini"
    link.symlink_to(target)
    assert f"the directory {tmp_path / 'open'} above it" in (
        untrusted(link, "ogon's config.ini") or "")


# -- where it is enforced: config check, preflight (startup, reload) ------------------------

def test_the_suites_own_temporary_configurations_pass(tmp_path: Path) -> None:
    result = run_check(str(good_config(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr


def reviews_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """As config_perms.sh: a config.ini naming an evil greeter, world-writable,
    with a world-writable users file."""
    evil = tmp_path / "evil-greeter"
    evil.write_text("#!/bin/sh\n")
    evil.chmod(0o755)
    ini = tmp_path / "config.ini"
    ini.write_text(f"[global]\nmodule_greeter_cmd_string={evil}\n")
    path = good_config(tmp_path, extra=f'ogon_config = "{ini}"\nauthenticator = "users-file"')
    return path, ini, tmp_path / "users"


def test_config_check_refuses_the_reviews_files(tmp_path: Path) -> None:
    path, ini, users = reviews_files(tmp_path)
    ini.chmod(0o666)
    users.chmod(0o666)
    result = run_check(str(path))
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[:2] == [
        f"ogon's config.ini {ini} is writable by others (mode 0666), and it names the "
        f"commands the bridge runs as root: chmod go-w {ini}",
        f"users file {users} is writable by others (mode 0666), and it hands out logons with "
        f"FULL rights: chmod go-w {users}"]
    ini.chmod(0o644)
    users.chmod(0o600)
    path.chmod(0o666)
    result = run_check(str(path))
    assert result.returncode == 1 and result.stdout.splitlines()[0] == (
        f"configuration file {path} is writable by others (mode 0666), and it names the "
        f"commands the bridge runs as root: chmod go-w {path}")
    path.chmod(0o644)
    assert run_check(str(path)).returncode == 0


@pytest.mark.skipif(not AS_ROOT, reason="modules run as root only when the bridge is root")
def test_a_module_program_run_as_root_that_others_may_change_is_refused(tmp_path: Path) -> None:
    path, _, _ = reviews_files(tmp_path)
    evil = tmp_path / "evil-greeter"
    evil.chmod(0o777)  # config.ini's greeter cmd: ogon's Qt greeter, run as root
    loaded = ConfigSources.for_service(path).load()
    assert loaded.properties is not None
    errors = [str(p) for p in preflight(loaded.config, loaded.origins, as_root=True,
                                        properties=loaded.properties,
                                        files=loaded.files).errors]
    assert errors == [f"module.greeter.cmd: module program {evil} is writable by others (mode "
                      f"0777), and the bridge runs it as root: chmod go-w {evil}"]
    # A [modules.*] command that runs as root, the same.
    script = tmp_path / "greeter.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o757)
    me = pwd.getpwuid(os.geteuid()).pw_name
    path.write_text(path.read_text().replace(f'command = ["{sys.executable}", "-V"]',
                                             f'command = ["{script}"]', 1))
    assert f'user = "{me}"' in path.read_text()
    loaded = ConfigSources.for_service(path).load()
    errors = [str(p) for p in preflight(loaded.config, loaded.origins, as_root=True,
                                        properties=loaded.properties,
                                        files=loaded.files).errors]
    assert f"{path}: modules.greeter.command: module program {script} is writable by others " \
           f"(mode 0757), and the bridge runs it as root: chmod go-w {script}" in errors


def test_startup_stops_with_the_one_line(tmp_path: Path) -> None:
    path, ini, _ = reviews_files(tmp_path)
    ini.chmod(0o666)
    options = Options()
    options.parseOptions(["--config", str(path)])
    with pytest.raises(SystemExit) as raised:
        makeService(options)
    assert str(raised.value) == (f"icp-bridge: ogon's config.ini {ini} is writable by others "
                                 f"(mode 0666), and it names the commands the bridge runs as "
                                 f"root: chmod go-w {ini}")


@pytest_twisted.ensureDeferred
async def test_a_reload_is_refused_and_the_last_good_configuration_stays(
        short_dir: Path) -> None:
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_timeout_number=30\n")
    bridge, reloader, _ = await start(short_dir, toml(
        short_dir, properties="", ogon_config=f'"{ini}"', authenticator='"users-file"'))
    service = bridge.service
    try:
        assert service.properties.get_number("session.timeout", "bob") == 30
        ini.write_text(ini.read_text().replace("=30", "=5"))
        ini.chmod(0o666)
        with capturedLogs() as events:
            assert not reloader.reload()
        said = [e["log_format"].format(**e) for e in events]
        assert any(f"configuration not reloaded, the running one stays: ogon's config.ini "
                   f"{ini} is writable by others" in line for line in said), said
        assert service.properties.get_number("session.timeout", "bob") == 30
        ini.chmod(0o644)
        (short_dir / "users").chmod(0o606)
        with capturedLogs() as events:
            assert not reloader.reload(), "nor with a users file others can write"
        assert any(f"users file {short_dir / 'users'} is writable by others" in
                   e["log_format"].format(**e) for e in events)
        (short_dir / "users").chmod(0o600)
        assert reloader.reload()
        assert service.properties.get_number("session.timeout", "bob") == 5
    finally:
        await bridge.stop()
