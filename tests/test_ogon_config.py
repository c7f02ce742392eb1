"""ogon's config.ini, read rule by rule as ogon reads it (Boost's read_ini,
then ogon's PropertyManager::parsePropertyGlobal), the one-line errors
where ogon would ignore the whole file, and the merge with the TOML file's
properties.

``tests/data/ogon-config.ini.debian`` is ogon's ``misc/config.ini.debian.in``
(ogon 24301079) unchanged but for the @...@ paths, filled in as Debian's
package builds it (prefix /usr, /etc/ogon, multiarch lib, major version 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config as config_module
from bridge.config_sources import load_config
from bridge.security.pam_auth import PamAuthenticator, ogon_pam_service
from bridge.security.permissions import FULL, GUEST, USER, ogon_level
from bridge.sessions.ogon_config import (
    OgonConfig,
    OgonConfigError,
    merge_properties,
    parse_ogon_config,
    read_ogon_config,
)
from bridge.sessions.properties import OGON_DEFAULTS, PropertyTable
from bridge.tap import Options, makeService

DEBIAN = Path(__file__).with_name("data") / "ogon-config.ini.debian"


def parse(text: str | bytes) -> OgonConfig:
    return parse_ogon_config(text.encode() if isinstance(text, str) else text, "config.ini")


def refused(text: str | bytes) -> str:
    with pytest.raises(OgonConfigError) as caught:
        parse(text)
    return str(caught.value)


def table(ini: OgonConfig) -> PropertyTable:
    merged = merge_properties(ini, {}, {}, OGON_DEFAULTS)
    return PropertyTable(merged.global_values, merged.per_user, merged.defaults)


# -- the INI layer: lines, comments, sections, keys ---------------------------------------

def test_comments_blank_lines_and_crlf() -> None:
    ini = parse("# a comment\r\n; another\r\n\r\n   \t\r\n[global]\r\n"
                "   session_xres_number = 800 \r\n\t# indented comment\r\n")
    assert ini.global_values == {"session.xres": 800}
    assert ini.problems == ()


def test_keys_and_values_are_trimmed_and_kept_verbatim() -> None:
    ini = parse("[global]\n"
                "a_string=  x ; not a comment  \n"        # no comments after a value
                "b_string=\"quoted\"\n"                   # no quoting: quotes are kept
                "c_string=PATH:/bin:/usr/bin=x\n"         # split at the first '=' only
                "d_string=two  words\n")
    assert ini.global_values == {"a": "x ; not a comment", "b": '"quoted"',
                                 "c": "PATH:/bin:/usr/bin=x", "d": "two  words"}


def test_text_after_the_closing_bracket_is_ignored_and_the_name_trimmed() -> None:
    ini = parse("[  user_bob  ] whatever\nsession_timeout_number=5\n")
    assert ini.user_values == {"bob": {"session.timeout": 5}}


@pytest.mark.parametrize(("text", "message"), [
    ("[global\nx_string=1\n", "config.ini:1: unmatched '['"),
    ("[global]\nno equals sign here\n", "config.ini:2: '=' character not found in line"),
    ("[global]\n=value\n", "config.ini:2: key expected before '='"),
])
def test_syntax_errors_name_file_and_line(text: str, message: str) -> None:
    assert refused(text) == message


def test_a_key_twice_in_a_section_makes_the_file_invalid() -> None:
    """doc/config.md: "the ini file is considered invalid" - ogon then runs on
    its defaults; the bridge says where."""
    text = "[global]\nsession_xres_number=1024\n#invalid\nsession_xres_number=1024\n"
    assert refused(text) == ("config.ini:4: session_xres_number given twice in [global] "
                             "(first on line 2); ogon then ignores the whole file")
    assert "before the first section" in refused("a_string=1\na_string=2\n")


def test_the_same_key_in_two_sections_is_fine() -> None:
    ini = parse("[global]\nsession_timeout_number=1\n[user_bob]\nsession_timeout_number=2\n")
    assert ini.global_values == {"session.timeout": 1}
    assert ini.user_values == {"bob": {"session.timeout": 2}}


def test_a_section_twice_is_invalid_unless_the_first_was_empty() -> None:
    assert refused("[global]\na_string=1\n[global]\nb_string=2\n") == (
        "config.ini:3: section [global] given twice (ogon then ignores the whole file)")
    ini = parse("[global]\n# nothing yet\n[global]\na_string=1\n")
    assert ini.global_values == {"a": "1"}


def test_a_section_named_like_a_key_before_it_is_a_duplicate() -> None:
    assert "section [x_string] given twice" in refused("x_string=1\n[x_string]\ny_string=2\n")


def test_keys_differing_in_case_or_suffix_are_not_duplicates_the_later_wins() -> None:
    ini = parse("[global]\nsession_timeout_number=5\nSESSION_timeout_string=five\n")
    assert ini.global_values == {"session.timeout": "five"}, "type and all"
    assert ini.problems == ("config.ini:3: property SESSION.timeout is also set on line 2; "
                            "the later one wins, as in ogon",)
    # ... and then the number is not found, as in ogon (a string hides it).
    assert table(ini).get_number("session.timeout") is None


def test_a_byte_order_mark_or_bytes_not_utf8_are_refused() -> None:
    assert refused(b"\xef\xbb\xbf[global]\na_string=1\n").startswith(
        "config.ini:1: the file starts with a UTF-8 byte-order mark")
    assert refused(b"[global]\na_string=caf\xe9\n").startswith("config.ini:2: not UTF-8")


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(OgonConfigError) as caught:
        read_ogon_config(tmp_path / "config.ini")
    assert str(caught.value) == (f"{tmp_path}/config.ini: cannot read ogon's config file: "
                                 "No such file or directory")


# -- sections: global, users, others --------------------------------------------------------

def test_keys_before_the_first_section_and_global_sections_are_global() -> None:
    ini = parse("module_string=kde\n[globalstuff]\nauth_greeter_string=g2\n")
    assert ini.global_values == {"module": "kde", "auth.greeter": "g2"}


def test_user_sections_drop_five_characters_and_keep_the_case() -> None:
    ini = parse("[user_Bob]\nsession_timeout_number=3\n[userbob]\nsession_timeout_number=4\n")
    assert ini.user_values == {"Bob": {"session.timeout": 3}, "ob": {"session.timeout": 4}}
    assert ini.problems == ("config.ini:3: section [userbob] is for user 'ob': ogon drops the "
                            "first five characters of a [user...] name",)
    properties = table(ini)
    assert properties.get_number("session.timeout", "Bob") == 3
    assert properties.get_number("session.timeout", "bob") == 1, "user names keep their case"


def test_a_user_section_naming_nobody_is_ignored() -> None:
    ini = parse("[users]\nsession_timeout_number=3\n")
    assert ini.user_values == {} and ini.global_values == {}
    assert ini.problems == ("config.ini:1: section [users] names no user (ogon takes the name "
                            "after the first five characters); its entries are ignored, as ogon "
                            "ignores them",)


def test_other_sections_prefix_their_keys() -> None:
    """doc/config.md says other blocks are ignored; ogon's code prefixes them
    (the RDP server asks for ogon.showDebugInfo)."""
    ini = parse("[ogon]\nshowDebugInfo_bool=true\n[Global]\nx_number=1\n[my_app]\ny_string=z\n")
    assert ini.global_values == {"ogon.showdebuginfo": True, "global.x": 1, "my.app.y": "z"}
    assert table(ini).get_bool("ogon.showDebugInfo") is True


# -- entries: types, names, values -----------------------------------------------------------

def test_underscores_become_dots_and_names_ignore_case() -> None:
    ini = parse("[global]\nsession_reconnect_fromSameClient_bool=true\n")
    assert ini.global_values == {"session.reconnect.fromsameclient": True}
    assert table(ini).get_bool("SESSION.Reconnect.FromSameClient") is True


def test_an_empty_value_is_ignored_and_the_default_stays() -> None:
    ini = parse("[global]\nsession_timeout_number=\nenvironment_filter_string=   \n")
    assert ini.global_values == {} and ini.problems == ()
    assert table(ini).get_number("session.timeout") == 1


@pytest.mark.parametrize("key", ["module=xsession", "auth=PAM", "timeout_STRING=5",
                                 "session_timeout=5", "x_str=1"])
def test_a_key_without_a_known_suffix_is_ignored_with_a_problem(key: str) -> None:
    """Also the 4- and 6-character keys ogon's suffix test takes for _bool /
    _number (its rfind quirk): nobody means ``module=x`` as a number."""
    ini = parse(f"[global]\n{key}\n")
    assert ini.global_values == {}
    assert ini.problems == (f"config.ini:2: {key.split('=')[0]} has no _string, _number or "
                            "_bool suffix; ignored, as ogon ignores it",)


@pytest.mark.parametrize(("value", "expected"), [
    ("60", 60), ("+5", 5), ("-1", -1), ("007", 7), ("-9223372036854775808", -(1 << 63)),
    ("9223372036854775807", (1 << 63) - 1),
])
def test_numbers_are_decimal_longs(value: str, expected: int) -> None:
    assert parse(f"[global]\nsession_timeout_number={value}\n").global_values == {
        "session.timeout": expected}


@pytest.mark.parametrize("value", ["0x10", "1.5", "12abc", "abc", "1 2", "- 1", "+",
                                   "9223372036854775808", "٣"])
def test_a_number_that_is_not_one_refuses_the_file(value: str) -> None:
    """ogon logs "Could not cast" and drops the line; the bridge says where."""
    assert refused(f"[global]\n\nsession_timeout_number={value}\n") == (
        f"config.ini:3: session_timeout_number={value}: not a decimal number (ogon would log "
        "it and ignore the line)")


@pytest.mark.parametrize(("value", "expected", "problem"), [
    ("true", True, False), ("false", False, False), ("truex", True, True),
    ("True", False, True), ("TRUE", False, True), ("1", False, True), ("yes", False, True),
    ("on", False, True), ("tru", False, True),
])
def test_booleans_are_true_only_when_the_value_starts_with_true(
        value: str, expected: bool, problem: bool) -> None:
    ini = parse(f"[global]\nsession_reconnect_bool={value}\n")
    assert ini.global_values == {"session.reconnect": expected}
    assert bool(ini.problems) is problem
    if problem:
        assert ini.problems[0] == (f"config.ini:2: session_reconnect_bool={value} is read as "
                                   f"{str(expected).lower()}: ogon takes only a value starting "
                                   "with 'true' as true")


def test_a_permission_level_ogon_does_not_know_is_guest_with_a_problem() -> None:
    ini = parse("[user_bob]\npermission_level_string=admin\n")
    assert "is neither FULL, USER nor GUEST: the level is GUEST" in ini.problems[0]


# -- lookups and the merge with the TOML file ------------------------------------------------

def test_a_users_entry_wins_whatever_its_type() -> None:
    """ogon's getPropertyInternal returns the user's entry of whatever type:
    a string there hides the global number (kept, and said at load)."""
    ini = parse("[global]\nsession_maxXRes_number=4096\n"
                "[user_bob]\nsession_maxXRes_string=2560\n[user_eve]\nsession_maxXRes_number=800\n")
    merged = merge_properties(ini, {}, {}, OGON_DEFAULTS)
    properties = PropertyTable(merged.global_values, merged.per_user, merged.defaults)
    assert properties.get_number("session.maxXRes", "eve") == 800
    assert properties.get_number("session.maxXRes", "alice") == 4096
    assert properties.get_number("session.maxXRes", "bob") is None
    assert properties.get_string("session.maxXRes", "bob") == "2560"
    assert merged.problems == ("property session.maxxres for user bob is a string, the global "
                               "one a number: asked for a number, bob's sessions find none (as "
                               "in ogon)",)


def test_the_toml_file_overrides_config_ini_in_each_level_and_says_so() -> None:
    ini = parse("[global]\nsession_timeout_number=60\nsession_maxXRes_number=4096\n"
                "[user_bob]\nsession_timeout_number=5\npermission_level_string=FULL\n")
    merged = merge_properties(
        ini, {"session.timeout": 30, "Session.MaxYRes": 900},
        {"bob": {"session.timeout": 0}, "carol": {"module": "kde"}}, OGON_DEFAULTS)
    properties = PropertyTable(merged.global_values, merged.per_user, merged.defaults)
    assert properties.get_number("session.timeout") == 30
    assert properties.get_number("session.timeout", "bob") == 0
    assert properties.get_number("session.maxXRes") == 4096, "config.ini where the TOML is silent"
    assert properties.get_number("session.maxYRes") == 900
    assert properties.get_string("permission.level", "bob") == "FULL"
    assert properties.get_string("module", "carol") == "kde"
    assert properties.get_number("session.xres") == 1024, "ogon's default under both"
    assert merged.overrides == (
        "property session.timeout: the TOML file's [properties] overrides config.ini:2",
        "property session.timeout for user bob: the TOML file's [user_properties.bob] "
        "overrides config.ini:5",
    )


def test_a_users_config_ini_entry_beats_the_tomls_global_one() -> None:
    """Per user first, then global: the level decides before the file."""
    ini = parse("[user_bob]\nsession_timeout_number=5\n")
    merged = merge_properties(ini, {"session.timeout": 30}, {}, OGON_DEFAULTS)
    properties = PropertyTable(merged.global_values, merged.per_user, merged.defaults)
    assert properties.get_number("session.timeout", "bob") == 5
    assert properties.get_number("session.timeout", "alice") == 30
    assert merged.overrides == ()


def test_without_config_ini_the_toml_properties_are_all() -> None:
    merged = merge_properties(None, {"a.b": "c"}, {"bob": {"a.b": "d"}}, OGON_DEFAULTS)
    assert merged.global_values == {"a.b": "c"} and merged.per_user == {"bob": {"a.b": "d"}}
    assert merged.ini is None and merged.overrides == () and merged.problems == ()


# -- ogon's own file, as Debian installs it ---------------------------------------------------

def test_debians_config_ini_reads_cleanly_with_ogons_values() -> None:
    ini = read_ogon_config(DEBIAN)
    assert ini.problems == ()
    properties = table(ini)
    expected = {
        "ssl.certificate": "/etc/ssl/certs/ssl-cert-snakeoil.pem",
        "module.greeter.modulename": "Qt",
        "module.greeter.cmd": "/usr/bin/ogon-qt-greeter --noeffects",
        "module.xsession.modulename": "X11",
        "module.xsession.startwm": "/etc/ogon/ogonXsession",
        "module.xsession.launcherexecutable": "/usr/sbin/ogon-backend-launcher",
        "module.weston.cmd": "/usr/bin/ogon-backend-weston",
        "environment.add": "WTSAPI_LIBRARY:/usr/lib/x86_64-linux-gnu/ogon1/libogon-otsapi.so",
        "auth.greeter": "greeter", "auth.module": "PAM", "module": "xsession",
    }
    for path, value in expected.items():
        assert properties.get_string(path) == value, path
    assert properties.get_number("module.xsession.displayOffset") == 100
    assert properties.get_number("module.greeter.colordepth") == 24
    assert properties.get_bool("module.xsession.uselauncher") is True
    assert properties.get_bool("module.weston.uselauncher") is True
    assert properties.get_bool("session.singleSession") is True
    assert properties.get_bool("session.reconnect") is True
    assert [properties.get_number(f"session.{p}") for p in
            ("timeout", "maxXRes", "maxYRes", "xres", "yres")] == [60, 4096, 2048, 1024, 768]
    assert properties.get_string("permission.level", "root") == "FULL"
    assert properties.get_string("permission.level", "alice") == "USER", "ogon's default"
    assert ini.lines["root", "permission.level"] == 54


# -- where the file comes from: the TOML key, the flag, the default ---------------------------

@pytest.fixture
def default_ini(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/etc/ogon/config.ini, as the bridge looks for it, in a temp dir (absent
    until a test writes it)."""
    path = tmp_path / "etc-ogon-config.ini"
    monkeypatch.setattr(config_module, "DEFAULT_OGON_CONFIG", path)
    return path


def test_the_flag_and_the_key_name_the_file_and_bring_pam(
        tmp_path: Path, default_ini: Path) -> None:
    options = Options()
    options.parseOptions(["--ogon-config", str(DEBIAN), "--state", str(tmp_path)])
    assert options.config.ogon_config == DEBIAN
    assert options.config.authenticator == "pam", "ogon authenticates with PAM"
    toml = tmp_path / "bridge.toml"
    toml.write_text(f'ogon_config = "{DEBIAN}"\nauthenticator = "users-file"\n')
    config = load_config(toml)
    assert (config.ogon_config, config.authenticator) == (DEBIAN, "users-file")
    assert load_config(toml, {"ogon_config": ""}).ogon_config is None, "'' for none"


def test_etc_ogon_config_ini_is_read_when_it_exists(default_ini: Path) -> None:
    assert load_config(None).ogon_config is None
    assert load_config(None).authenticator == "users-file"
    default_ini.write_text("[global]\n")
    assert load_config(None).ogon_config == default_ini
    assert load_config(None).authenticator == "pam"
    assert load_config(None, {"ogon_config": ""}).ogon_config is None


def test_under_twistd_a_broken_file_is_one_line_and_exit(
        tmp_path: Path, default_ini: Path) -> None:
    bad = tmp_path / "config.ini"
    bad.write_text("[global]\nsession_timeout_number=1\n[global]\nx_string=y\n")
    options = Options()
    options.parseOptions(["--ogon-config", str(bad), "--state", str(tmp_path / "state"),
                          "--users", str(tmp_path / "users"), "--icp",
                          f"unix:{tmp_path}/icp.sock", "--thrift", "tcp:0", "--admin", "",
                          "--dbus", ""])
    with pytest.raises(SystemExit) as caught:
        makeService(options)
    assert str(caught.value) == (f"icp-bridge: {bad}:3: section [global] given twice (ogon "
                                 "then ignores the whole file)")


def test_pam_service_as_ogon_chooses_it(tmp_path: Path) -> None:
    """ogon's pam module asks for service ogon when /etc/pam.d/ogon exists,
    else gdm (pam_auth.c get_service_name), at each logon."""
    asked: list[str] = []

    class Handle:
        def authenticate(self, username: str, password: str, service: str,
                         call_end: bool) -> bool:
            asked.append(service)
            return True

    fake = type("pam", (), {"pam": lambda _=None: Handle()})
    authenticator = PamAuthenticator(lambda user: FULL, pam_module=fake, pam_dir=tmp_path)
    assert ogon_pam_service(tmp_path) == "gdm"
    authenticator.authenticate("alice", "pw", "")
    (tmp_path / "ogon").write_text("auth include common-auth\n")
    assert ogon_pam_service(tmp_path) == "ogon"
    authenticator.authenticate("alice", "pw", "")
    assert asked == ["gdm", "ogon"]


def test_ogons_permission_levels() -> None:
    """Session::initPermissions: FULL or USER in any case, anything else GUEST."""
    assert [ogon_level(v) for v in ("FULL", "full", "User", "GUEST", "admin", "", None)] == [
        FULL, FULL, int(USER), int(GUEST), int(GUEST), int(GUEST), int(GUEST)]
