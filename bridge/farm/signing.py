"""Farm commands are signed: a row of ``farm_commands`` runs only if it
carries the signature of a holder of the farm's command key.

Why: every host of a farm writes to the same PostgreSQL tables with the
same role; a row in ``farm_commands`` used to be run by the host it names
as it was, so whoever could write to the farm database (a host's
``farm_password_file``, a database administrator, a backup restored
elsewhere) could log off, disconnect or message any session, in anyone's
name (``requested_by``). The command key (``farm_command_key_file``) is a
second secret, never sent to PostgreSQL: the hosts that issue commands
(``ctl farm`` through any host's admin endpoint, ``session.farm.singleSession``)
sign with it, the host that runs a command checks the signature first.

HMAC-SHA256 with one key shared by the farm's hosts, not a key pair per
host: every host issues commands (any host's admin endpoint, the
single-session policy on every host), so every host would be a trusted
issuer anyway, and a host's root can issue any command through its own
admin endpoint. A per-host key would only say which host signed, at the
price of a public key list on every host. See the README's "A farm" for
the trust model.

What is signed: the command's id (given by PostgreSQL, so a signed row
copied to a new row does not verify), host, session id, action, args,
``requested_by`` and expiry (µs since the epoch, PostgreSQL's clock), with
a label saying what it is. A replay of the same row after it ran is
stopped by the runner's record of what it ran (``farm_commands_run``), and
after that record is pruned by the expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from bridge.state.farm_store import FarmCommand

#: The least key length (characters of its file's first line): 32 random
#: bytes, hex or base64, as ``openssl rand -hex 32`` writes them.
MIN_KEY_LENGTH = 32
_LABEL = b"icp-bridge farm command v1\n"


def read_command_key(path: Path | None) -> bytes | None:
    """The command key from its file (first line), or None (no file: this
    host neither issues nor runs farm commands). Raises OSError or
    ValueError (a file others may read, a key too short)."""
    if path is None:
        return None
    if path.stat().st_mode & 0o077:
        raise ValueError(f"farm_command_key_file {path} may be read by others: chmod 600 it")
    key = path.read_text().split("\n", 1)[0].strip()
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"farm_command_key_file {path}: the key is shorter than "
                         f"{MIN_KEY_LENGTH} characters (openssl rand -hex 32)")
    return key.encode()


def _message(command: FarmCommand) -> bytes:
    fields = [command.id, command.host, command.session_id, command.action, command.args,
              command.requested_by, command.expires_us]
    return _LABEL + json.dumps(fields, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=True).encode()


class CommandKey:
    """Signs and checks farm commands with the farm's command key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, command: FarmCommand) -> str:
        return hmac.new(self._key, _message(command), hashlib.sha256).hexdigest()

    def verify(self, command: FarmCommand) -> bool:
        return hmac.compare_digest(self.sign(command).encode(),
                                   command.signature.encode("utf-8", "replace"))

    def __repr__(self) -> str:
        return "CommandKey(...)"  # never the key, in a log or a traceback
