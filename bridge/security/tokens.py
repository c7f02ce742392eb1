"""Auth tokens: unguessable, carrying a permission level, expiring.

Two kinds: a *logon token* from ``logonConnection`` (sliding lifetime) and a
*session token* bound to a session (written to its token file, valid while
the session exists). Only a SHA-256 of each token is kept, in memory and on
disk, so the state database does not hold usable secrets.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.security.auth import Identity
from bridge.sessions.model import StateWriteError

#: Bytes of randomness in a token; as text (URL-safe base64) it is TOKEN_LENGTH long.
TOKEN_BYTES = 32
TOKEN_LENGTH = 43
_TOKEN_SHAPE = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def well_formed(token: str) -> bool:
    """Could this be a token the bridge issued (length and alphabet)?"""
    return len(token) == TOKEN_LENGTH and _TOKEN_SHAPE.fullmatch(token) is not None


# Every OTS API call presents its token; hashing it each time showed in
# profiles. Digests of recently seen tokens are kept in memory (the tokens
# themselves are in this process's memory anyway, only never on disk). Only
# tokens of the issued shape are kept, so that what a client sends cannot
# grow this beyond 4096 x 43 characters.
_DIGEST_CACHE_SIZE = 4096


class DigestCache:
    """The digests of the well-formed tokens callers present, so that a
    token used again is not hashed again (bounded: see above)."""

    def __init__(self) -> None:
        self._digests: dict[str, str] = {}

    def digest(self, token: str) -> str | None:
        """``token``'s digest; None for what is not of the issued shape."""
        digest = self._digests.get(token)
        if digest is None:
            if not well_formed(token):
                return None
            digest = token_digest(token)
            if len(self._digests) >= _DIGEST_CACHE_SIZE:
                self._digests.clear()
            self._digests[token] = digest
        return digest


@dataclass
class TokenRecord:
    digest: str
    username: str
    domain: str
    permission: int
    session_id: int | None  # set for session tokens
    expires_at: float | None  # None: lives as long as its session
    lifetime: float | None


TokenListener = Callable[[str, "TokenRecord | None"], None]


class TokenStore:
    """Issued tokens by digest. ``listener(digest, record)`` hears of every
    change (record None on removal) so the state store can persist it."""

    # Persist a slid expiry only when it moved this much, so that using a
    # token (every OTS API call) does not mean a database write.
    PERSIST_SLIDE = 60.0
    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._records: dict[str, TokenRecord] = {}
        self._digests = DigestCache()
        self._persisted_expiry: dict[str, float | None] = {}
        self._unremoved: set[str] = set()
        self.listener: TokenListener | None = None

    def _changed(self, record: TokenRecord) -> None:
        """Store a record; raises StateWriteError."""
        if self.listener is not None:
            self.listener(record.digest, record)
        self._persisted_expiry[record.digest] = record.expires_at

    def _slid(self, record: TokenRecord) -> None:
        """Best effort: a slid expiry not stored now is stored with the next slide."""
        try:
            self._changed(record)
        except StateWriteError as e:
            self.log.warn("token expiry not stored yet: {error}", error=str(e))

    def _removed(self, digest: str) -> None:
        """The token is gone from memory; its row goes too, now or (disk
        refusing) at the next flush()."""
        self._persisted_expiry.pop(digest, None)
        self._unremoved.add(digest)
        self.flush()

    def flush(self) -> bool:
        """Delete rows of removed tokens that could not be deleted before."""
        while self._unremoved:
            digest = next(iter(self._unremoved))
            try:
                if self.listener is not None:
                    self.listener(digest, None)
            except StateWriteError as e:
                self.log.warn("{count} revoked tokens still wait for the disk: {error}",
                              count=len(self._unremoved), error=str(e))
                return False
            self._unremoved.discard(digest)
        return True

    def restore(self, records: Iterable[TokenRecord]) -> None:
        for record in records:
            self._records[record.digest] = record
            self._persisted_expiry[record.digest] = record.expires_at

    def issue(self, identity: Identity, lifetime: float | None = None,
              session_id: int | None = None) -> str:
        """A new token for ``identity``: a logon token expiring ``lifetime``
        seconds after its last use, or (``session_id`` given) a session
        token that lives as long as the session. Raises StateWriteError
        (and issues nothing) when it cannot be stored."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        record = TokenRecord(
            digest=token_digest(token),
            username=identity.username,
            domain=identity.domain,
            permission=identity.permission,
            session_id=session_id,
            expires_at=None if lifetime is None else self.clock.seconds() + lifetime,
            lifetime=lifetime,
        )
        self._changed(record)
        self._records[record.digest] = record
        return token

    def lookup(self, token: str) -> TokenRecord | None:
        """The live record of ``token`` (sliding its expiry), else None."""
        digest = self._digests.digest(token)
        if digest is None:
            return None
        record = self._records.get(digest)
        if record is None:
            return None
        if record.expires_at is not None and record.lifetime is not None:
            now = self.clock.seconds()
            if now >= record.expires_at:
                del self._records[digest]
                self._removed(digest)
                return None
            record.expires_at = now + record.lifetime
            persisted = self._persisted_expiry.get(digest)
            if persisted is None or record.expires_at - persisted >= self.PERSIST_SLIDE:
                self._slid(record)
        return record

    def touch(self, digest: str, when: float) -> None:
        """A use of the token with ``digest`` at ``when`` that another
        process answered (an OTS API worker): its expiry slides as if this
        process had looked it up then. A token already expired at ``when``
        stays expired."""
        record = self._records.get(digest)
        if record is None or record.expires_at is None or record.lifetime is None:
            return
        if when >= record.expires_at or when + record.lifetime <= record.expires_at:
            return
        record.expires_at = when + record.lifetime
        persisted = self._persisted_expiry.get(digest)
        if persisted is None or record.expires_at - persisted >= self.PERSIST_SLIDE:
            self._slid(record)

    def revoke(self, token: str) -> bool:
        """Forget a token; False if it was not known. Raises StateWriteError
        (keeping the token) when its removal cannot be stored."""
        if not well_formed(token):
            return False
        digest = token_digest(token)
        if digest not in self._records:
            return False
        if self.listener is not None:
            self.listener(digest, None)
        del self._records[digest]
        self._persisted_expiry.pop(digest, None)
        return True

    def revoke_session(self, session_id: int, keep: str | None = None) -> None:
        """Forget the tokens of a session (but the one with digest ``keep``)."""
        for digest, record in list(self._records.items()):
            if record.session_id == session_id and digest != keep:
                del self._records[digest]
                self._removed(digest)

    def expire(self) -> int:
        """Drop every expired token; returns how many."""
        now = self.clock.seconds()
        dead = [d for d, r in self._records.items()
                if r.expires_at is not None and now >= r.expires_at]
        for digest in dead:
            del self._records[digest]
            self._removed(digest)
        return len(dead)

    def snapshot(self) -> dict[str, TokenRecord]:
        """The live records by digest (a copy of the mapping)."""
        return dict(self._records)

    def __len__(self) -> int:
        return len(self._records)
