"""Farm mode's configuration: opt-in, never a password in the connection
string, the password file only for its owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, config_from_mapping
from bridge.farm.service import read_password


def test_without_farm_database_nothing_changes() -> None:
    config = config_from_mapping({})
    assert config.farm_database == "" and config.host_name


@pytest.mark.parametrize("conninfo", [
    "host=db dbname=farm user=icp password=secret",
    "postgresql://icp:secret@db/farm",
])
def test_a_password_in_the_connection_string_is_refused(conninfo: str) -> None:
    with pytest.raises(ConfigError, match="farm_database: holds a password"):
        config_from_mapping({"farm_database": conninfo})


def test_what_else_is_checked(tmp_path: Path) -> None:
    ok = {"farm_database": "host=db dbname=farm user=icp sslmode=verify-full"}
    assert config_from_mapping(ok).farm_database.endswith("verify-full")
    for values, message in [
        ({"farm_database": "host=db =x"}, "not a libpq connection string"),
        ({**ok, "host_name": "a b"}, "host_name"),
        ({**ok, "farm_heartbeat": 5, "farm_stale_after": 5}, "farm_stale_after"),
        ({"haproxy_map": "/etc/haproxy/u.map"}, "needs farm_database"),
        ({**ok, "haproxy_socket": "unix:/run/h.sock"}, "needs haproxy_map"),
        ({**ok, "haproxy_map": "u.map"}, "absolute path"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_mapping(values)


def test_the_password_file_is_read_only_when_private(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("s3cret\nignored\n")
    path.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        read_password(path)
    path.chmod(0o600)
    assert read_password(path) == "s3cret"
    assert read_password(None) is None


def test_the_command_key_file_is_read_only_when_private_and_long_enough(tmp_path: Path
                                                                        ) -> None:
    from bridge.farm.signing import read_command_key

    path = tmp_path / "command-key"
    assert config_from_mapping({"farm_command_key_file": str(path)}).farm_command_key_file \
        == path
    path.write_text("a" * 64 + "\n")
    path.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        read_command_key(path)
    path.chmod(0o600)
    assert read_command_key(path) == b"a" * 64
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 32"):
        read_command_key(path)
    assert read_command_key(None) is None


def test_a_signature_covers_every_field_of_a_command() -> None:
    from dataclasses import replace

    from bridge.farm.signing import CommandKey
    from bridge.state.farm_store import FarmCommand

    key = CommandKey(b"k" * 32)
    command = FarmCommand(7, "host-a", 3, "message", {"title": "t", "text": "x"}, "root on c",
                          expires_us=1_700_000_000_000_000)
    signed = replace(command, signature=key.sign(command))
    assert key.verify(signed)
    assert not CommandKey(b"j" * 32).verify(signed), "another key"
    for change in ({"id": 8}, {"host": "host-b"}, {"session_id": 4}, {"action": "logoff"},
                   {"args": {"title": "t", "text": "y"}}, {"requested_by": "root on d"},
                   {"expires_us": 1_700_000_000_000_001}, {"signature": ""},
                   {"signature": "\u00e9" * 64}):
        assert not key.verify(replace(signed, **change)), change
    assert "k" not in repr(key)
