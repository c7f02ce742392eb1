"""Per-session token files ``<token-dir>/ogon.session.<session id>``: the
session token on the first line, for WTSAPI clients running in the session
(they read it with OGON_SID set). Written atomically, mode 0600, owned by
the session's user when the bridge runs as root."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from twisted.logger import Logger

from bridge.auth import Identity, atomic_write
from bridge.sessions import Session, SessionEvent, SessionRegistry
from bridge.tokens import TokenStore, token_digest


class SessionTokenFiles:
    """Issues each logged-on session its token and keeps its file."""

    log = Logger()

    def __init__(self, directory: Path, tokens: TokenStore) -> None:
        self.directory = directory
        self.tokens = tokens

    def path_for(self, session_id: int) -> Path:
        return self.directory / f"ogon.session.{session_id}"

    def attach(self, registry: SessionRegistry) -> None:
        registry.observe(self._session_event)

    def _session_event(self, event: SessionEvent, session: Session) -> None:
        if event is SessionEvent.LOGGED_ON:
            self.issue(session)
        elif event is SessionEvent.ENDED:
            self.tokens.revoke_session(session.session_id)
            self.remove(session.session_id)

    def issue(self, session: Session) -> str:
        """A fresh session token, written to the session's file."""
        self.tokens.revoke_session(session.session_id)
        token = self.tokens.issue(
            Identity(session.username, session.domain, session.permission),
            session_id=session.session_id,
        )
        self._write(session, token)
        return token

    def ensure(self, session: Session) -> None:
        """After a restart: keep the file if it still holds a live token of
        this session, else issue and write a new one."""
        try:
            token = self.path_for(session.session_id).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            token = ""
        record = self.tokens.lookup(token) if token else None
        if record is None or record.session_id != session.session_id \
                or record.digest != token_digest(token):
            self.issue(session)

    def _write(self, session: Session, token: str) -> None:
        path = self.path_for(session.session_id)
        owner = self._owner(session.username)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(path, (token + "\n").encode(), mode=0o600, owner=owner)
        except OSError as e:
            self.log.error("cannot write token file {path}: {error}", path=str(path),
                           error=e.strerror or str(e))
            return
        self.log.info("wrote token file {path}", path=str(path))

    def _owner(self, username: str) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(username)
        except KeyError:
            self.log.warn("token file of user {username} stays owned by root: no such "
                          "system user", username=username)
            return None
        return entry.pw_uid, entry.pw_gid

    def remove(self, session_id: int) -> None:
        path = self.path_for(session_id)
        try:
            os.unlink(path)  # unlinks a planted symlink itself, never its target
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.error("cannot remove token file {path}: {error}", path=str(path),
                           error=e.strerror or str(e))
            return
        self.log.info("removed token file {path}", path=str(path))
