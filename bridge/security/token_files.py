"""Per-session token files ``<token-dir>/ogon.session.<session id>``: the
session token on the first line, for WTSAPI clients running in the session
(they read it with OGON_SID set). Written atomically, mode 0600, owned by
the session's user when the bridge runs as root.

The token directory is normally /tmp, where any local user can plant
something at the next token path: a FIFO, a huge sparse file, a symlink, a
directory. Reading opens without following links or blocking, accepts only
a small regular file of the expected owner, and anything else is cleared
away before a fresh file is written.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
from pathlib import Path

from twisted.logger import Logger

from bridge.security.auth import Identity, atomic_write
from bridge.security.tokens import TokenStore, token_digest
from bridge.sessions.model import Session, SessionChange, SessionEvent
from bridge.sessions.registry import SessionRegistry

#: A token file holds one 43-character token and a newline.
_READ_LIMIT = 256


class SessionTokenFiles:
    """Issues each logged-on session its token and keeps its file."""

    log = Logger()

    def __init__(self, directory: Path, tokens: TokenStore) -> None:
        self.directory = directory
        self.tokens = tokens

    def path_for(self, session_id: int) -> Path:
        return self.directory / f"ogon.session.{session_id}"

    def attach(self, registry: SessionRegistry) -> None:
        registry.observe(self._session_changed)

    def _session_changed(self, change: SessionChange) -> None:
        if change.event is SessionEvent.ENDED:
            self.tokens.revoke_session(change.session.session_id)
            self.remove(change.session.session_id)

    def issue(self, session: Session) -> str:
        """A fresh session token, written to the session's file. Raises
        StateWriteError when the token cannot be stored."""
        token = self.tokens.issue(
            Identity(session.username, session.domain, session.permission),
            session_id=session.session_id,
        )
        self.tokens.revoke_session(session.session_id, keep=token_digest(token))
        self._write(session, token)
        return token

    def ensure(self, session: Session) -> None:
        """After a restart: keep the file if it still holds a live token of
        this session, else issue and write a new one."""
        owner = self._owner(session.username)
        token = self._read(self.path_for(session.session_id),
                           {os.geteuid(), *(() if owner is None else (owner[0],))})
        record = self.tokens.lookup(token) if token else None
        if record is None or record.session_id != session.session_id:
            self.issue(session)

    def _read(self, path: Path, owners: set[int]) -> str:
        """The token in ``path`` if it is a small regular file of one of
        ``owners``; otherwise "" (and whatever is there is cleared away)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return ""
        except OSError as e:
            # ELOOP: a symlink; EISDIR cannot happen for O_RDONLY on Linux.
            self._clear(path, f"cannot be opened safely ({e.strerror})")
            return ""
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                reason = "is not a regular file"
            elif info.st_uid not in owners:
                reason = f"is owned by uid {info.st_uid}"
            elif info.st_size > _READ_LIMIT:
                reason = f"is {info.st_size} bytes, not a token file"
            else:
                data = os.read(fd, _READ_LIMIT)
                lines = data.decode("ascii", "replace").splitlines()
                return lines[0].strip() if lines else ""
        finally:
            os.close(fd)
        self._clear(path, reason)
        return ""

    def _clear(self, path: Path, reason: str) -> None:
        """Get whatever is at ``path`` out of the way of a fresh file:
        unlink it, or move a planted directory aside (never delete its
        contents)."""
        self.log.warn("token file {path} {reason}: replacing it", path=str(path), reason=reason)
        try:
            if stat.S_ISDIR(path.lstat().st_mode):
                try:
                    path.rmdir()
                except OSError:
                    path.rename(path.with_name(f"{path.name}.planted-{secrets.token_hex(4)}"))
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.error("cannot clear {path}: {error}", path=str(path),
                           error=e.strerror or str(e))

    def _write(self, session: Session, token: str) -> None:
        path = self.path_for(session.session_id)
        owner = self._owner(session.username)
        try:
            if path.is_dir() and not path.is_symlink():
                self._clear(path, "is a directory")
            self.directory.mkdir(parents=True, exist_ok=True)
            # Not durable: the token itself is in the state database, and
            # after a crash ensure() writes any file that lost it again. Two
            # fsyncs per logon held the reactor for milliseconds where /tmp
            # is a disk (a storm of logons queued behind them).
            atomic_write(path, (token + "\n").encode(), mode=0o600, owner=owner,
                         durable=False)
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
        except (KeyError, ValueError):
            self.log.warn("token file of user {username} stays owned by root: no such "
                          "system user", username=username[:64])
            return None
        return entry.pw_uid, entry.pw_gid

    def remove(self, session_id: int) -> None:
        path = self.path_for(session_id)
        try:
            os.unlink(path)  # unlinks a planted symlink itself, never its target
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno == errno.EISDIR:
                return
            self.log.error("cannot remove token file {path}: {error}", path=str(path),
                           error=e.strerror or str(e))
            return
        self.log.info("removed token file {path}", path=str(path))
