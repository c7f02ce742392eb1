"""Authentication: the Authenticator interface, the users file with scrypt
hashes, and an in-memory authenticator for tests and demos (PAM:
bridge.security.pam_auth)."""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import stat
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from bridge.security.accounts import SHADOW, account_problem
from bridge.security.file_trust import untrusted
from bridge.security.permissions import USER, level_name, level_value

if TYPE_CHECKING:
    from bridge.sessions.properties import PropertyTable


@dataclass(frozen=True)
class Identity:
    """Who authenticated, with the permission flags of their level.
    ``pam`` holds a live PAM handle (PAM authenticator only) with which a
    PAM session can be opened for the user's desktop."""

    username: str
    domain: str
    permission: int
    pam: Any = field(default=None, compare=False, repr=False)


def user_groups(username: str) -> list[str] | None:
    """Names of the system groups of ``username``; None if there is no such
    system user."""
    try:
        entry = pwd.getpwnam(username)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return None
    names = []
    for gid in os.getgrouplist(username, entry.pw_gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names


#: Unicode categories no user name holds: controls (C0, DEL, C1), format
#: characters (bidi overrides, zero-width ones), line and paragraph
#: separators. They could break a log line or hide what a name says.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def is_user_name(name: str) -> bool:
    """Whether ``name`` can be a user name at all (checked before any
    password is): at most 256 characters, none of them a control, format or
    line/paragraph separator character (Unicode categories Cc, Cf, Zl, Zp)."""
    return len(name) <= 256 and not any(
        unicodedata.category(c) in _NOT_IN_NAMES for c in name)


def logon_allowed(properties: PropertyTable, username: str,
                  groups_of: Callable[[str], list[str] | None] = user_groups) -> bool:
    """ogon's group rule (PermissionManager::isLogonAllowedForUser): a user
    in a group of ``permission.groups.blackList`` may not log on; else one
    in a group of ``permission.groups.whiteList`` may; anyone else only if
    the white list holds ``*`` (ogon's default). A user with no system
    account has no groups."""
    white = properties.split_list("permission.groups.whiteList")
    black = properties.split_list("permission.groups.blackList")
    decided: dict[str, bool] = {name: True for name in white if name != "*"}
    decided.update({name: False for name in black if name != "*"})
    unknown_allowed = "*" in white and "*" not in black
    allowed = False
    for group in groups_of(username) or []:
        verdict = decided.get(group)
        if verdict is False:
            return False
        if verdict is True:
            allowed = True
    return allowed or unknown_allowed


class Authenticator(Protocol):
    def authenticate(self, username: str, password: str, domain: str) -> Deferred[Identity | None]:
        """Fires with the Identity, or None when the credentials are wrong.
        Never logs or keeps the password."""
        ...


#: Runs a blocking function off the reactor thread, returning a Deferred.
BlockingRunner = Callable[..., "Deferred[Any]"]


def _run_here(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args)


class InMemoryAuthenticator:
    """Users and passwords held in memory (tests, demos)."""

    def __init__(self, users: dict[str, tuple[str, int]]) -> None:
        self._users = users

    def authenticate(self, username: str, password: str, domain: str) -> Deferred[Identity | None]:
        entry = self._users.get(username)
        if entry is None or not hmac.compare_digest(entry[0].encode(), password.encode()):
            return succeed(None)
        return succeed(Identity(username, domain, entry[1]))


# -- users file ---------------------------------------------------------------

# scrypt cost: n=2**15, r=8 takes ~32 MiB and tens of ms, done off the reactor.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1


class UsersFileError(Exception):
    pass


@dataclass(frozen=True)
class UserEntry:
    name: str
    permission: int
    password_hash: str


def hash_password(password: str, n: int = SCRYPT_N) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P)
    return "$".join(
        ["scrypt", f"n={n},r={SCRYPT_R},p={SCRYPT_P}", _b64(salt), _b64(digest)]
    )


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a hash_password() string."""
    try:
        scheme, params, salt_text, digest_text = encoded.split("$")
        if scheme != "scrypt":
            return False
        cost = dict(item.split("=") for item in params.split(","))
        salt = base64.b64decode(salt_text)
        expected = base64.b64decode(digest_text)
        actual = _scrypt(password, salt, int(cost["n"]), int(cost["r"]), int(cost["p"]))
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


def dummy_hash(n: int) -> str:
    """A hash of the given cost that no password matches, checked for
    unknown users so that they take as long as known ones. Random salt and
    digest: making it costs no scrypt run."""
    return "$".join(["scrypt", f"n={n},r={SCRYPT_R},p={SCRYPT_P}",
                     _b64(secrets.token_bytes(16)), _b64(secrets.token_bytes(32))])


def _cost(encoded: str) -> int:
    try:
        params = dict(item.split("=") for item in encoded.split("$")[1].split(","))
        return int(params["n"])
    except (IndexError, KeyError, ValueError):
        return SCRYPT_N


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * 1024 * 1024
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hash_problem(encoded: str) -> str | None:
    """What is wrong with a stored hash, or None (a hash that cannot be
    checked would refuse its user as if the password were wrong)."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        return "the hash is not scrypt$n=..,r=..,p=..$salt$digest"
    try:
        cost = dict(item.split("=") for item in parts[1].split(","))
        n, r, p = int(cost["n"]), int(cost["r"]), int(cost["p"])
        base64.b64decode(parts[2], validate=True)
        base64.b64decode(parts[3], validate=True)
    except (ValueError, KeyError):
        return "the hash's parameters, salt or digest do not parse"
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        return "the hash's scrypt cost is not usable"
    return None


@dataclass
class UsersFile:
    """A users file as read: its good entries, one line per bad entry
    (``path:line: what``), and the names whose entry is bad (they cannot log
    on until it is fixed, and that is not their failure)."""

    users: dict[str, UserEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bad_names: set[str] = field(default_factory=set)


def parse_users(text: str, path: Path | str) -> UsersFile:
    """Parse users-file text: ``name:level:hash`` per line, ``#`` comments.
    A bad line spoils only its own entry."""
    parsed = UsersFile()
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        name = parts[0]
        if len(parts) != 3:
            problem = "expected name:level:hash"
        elif name in seen:
            problem = f"{name} is already on line {seen[name]}"
        else:
            try:
                check_username(name)
                level_value(parts[1])
                problem = _hash_problem(parts[2]) or ""
            except (UsersFileError, ValueError) as e:
                problem = str(e)
        if problem:
            parsed.problems.append(f"{path}:{number}: {problem}")
            if name and len(name) <= 256:
                parsed.bad_names.add(name)
            continue
        seen[name] = number
        parsed.users[name] = UserEntry(name, level_value(parts[1]), parts[2])
    for name in parsed.bad_names & set(parsed.users):  # a duplicate: neither line is trusted
        del parsed.users[name]
    return parsed


def read_users(path: Path) -> dict[str, UserEntry]:
    """Parse a users file; UsersFileError naming ``path:line`` at the first
    bad entry (tools refuse to rewrite a file they would lose lines of)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    parsed = parse_users(text, path)
    if parsed.problems:
        raise UsersFileError(parsed.problems[0])
    return parsed.users


def users_file_warnings(path: Path, own_uid: int | None = None) -> list[str]:
    """What about the users file's mode an operator should hear but that
    does not stop the bridge: others may read the hashes. (One that others
    can change is refused: users_file_untrusted.)"""
    try:
        info = path.stat()
    except OSError:
        return []
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o044 and not mode & 0o022:
        return [f"users file {path} is readable by others (mode {mode:04o}); chmod 600 it"]
    return []


def users_file_untrusted(path: Path, own_uid: int | None = None) -> str | None:
    """The line saying why the users file is not used, when someone besides
    root and the bridge's user can change it (its owner, its group or
    others, or a directory above it): they could add an admin."""
    return untrusted(path, "users file", own_uid)


def write_users(path: Path, users: Iterable[UserEntry]) -> None:
    """Replace the users file atomically, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# icp-bridge users: name:level:scrypt hash (managed by `icp-bridge users`)"]
    lines += [f"{u.name}:{level_name(u.permission)}:{u.password_hash}" for u in users]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def check_username(name: str) -> None:
    if not name or ":" in name or any(c.isspace() for c in name) or name.startswith("#"):
        raise UsersFileError(f"bad user name {name!r}: no spaces, ':' or leading '#'")


def atomic_write(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None,
                 durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file,
    never a torn one, and a crash leaves no partial file: a temp file in the
    same directory (O_EXCL, mode set before any byte), fsync, rename over
    the target (which replaces a planted symlink rather than following
    it), then fsync the directory. ``durable=False`` leaves out both
    fsyncs, for files the bridge writes again after a crash anyway (their
    readers still never see a torn file)."""
    directory = path.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp_name)
        raise
    os.close(fd)
    try:
        os.rename(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AuthenticationUnavailable(Exception):  # noqa: N818 - not an error of the caller's
    """The user cannot be checked now (their users-file entry is bad): a
    refused logon that is no failed guess of theirs."""


class UsersFileAuthenticator:
    """Checks passwords against the users file, re-read when it changes
    (and on ``reload``). scrypt runs through ``run_blocking`` (a thread pool
    in the service) so the reactor never waits on it.

    The first read uses the good entries of the file and names each bad one.
    A later edit with a bad entry is not used: the last good version stays
    (``stale``), loudly, until the file is fixed. A user whose entry is bad
    is refused with AuthenticationUnavailable, which does not count toward
    their lockout."""

    log = Logger()

    def __init__(self, path: Path, run_blocking: BlockingRunner = _run_here,
                 shadow: Path = SHADOW) -> None:
        self.path = path
        self._run_blocking = run_blocking
        self._current = UsersFile()
        self._stamp: tuple[int, int, int] | None = None
        self._loaded = False
        self._dummy_hash = dummy_hash(SCRYPT_N)
        self.shadow = shadow
        self._warned_shadow = False
        #: True while the file on disk has a bad entry and an older version is used.
        self.stale = False
        #: The problems of the file on disk (``path:line: what``), if any.
        self.problems: list[str] = []
        #: When the version in use was read (unix time; 0 before).
        self.loaded_at = 0.0

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, path: Path | None = None) -> None:
        """Read the file again now (a configuration reload), at a new path
        if given."""
        if path is not None and path != self.path:
            self.path = path
            self._loaded = False
        self._stamp = None
        self.users()

    def users(self) -> dict[str, UserEntry]:
        stamp = self._read_stamp()
        if stamp != self._stamp or not self._loaded:
            self._stamp = stamp
            self._load(stamp)
        return self._current.users

    def _load(self, stamp: tuple[int, int, int] | None) -> None:
        try:
            text = self.path.read_text(encoding="utf-8") if stamp is not None else ""
        except (OSError, UnicodeDecodeError) as e:
            self._refuse([f"{self.path}: cannot be read: {getattr(e, 'strerror', None) or e}"])
            return
        distrust = users_file_untrusted(self.path) if stamp is not None else None
        if distrust is not None:
            # Startup and a reload refuse it too (preflight); this keeps a
            # running bridge on the version it trusted.
            self._refuse([distrust], "others can change it")
            return
        parsed = parse_users(text, self.path)
        self.problems = parsed.problems
        for warning in users_file_warnings(self.path):
            self.log.warn("{warning}", warning=warning)
        if parsed.problems and self._loaded:
            self._refuse(parsed.problems)
            return
        first = not self._loaded
        self._use(parsed)
        if parsed.problems:
            # The first read: nothing older to keep; the good entries serve.
            self.log.error("users file {path}: {count} bad entries; those users cannot log on "
                           "until they are fixed (the other {users} can):", path=str(self.path),
                           count=len(parsed.problems), users=len(parsed.users))
            for problem in parsed.problems:
                self.log.error("{problem}", problem=problem)
        elif not first or stamp is not None:
            self.log.info("users file {path}: {users} users", path=str(self.path),
                          users=len(parsed.users))

    def _use(self, parsed: UsersFile) -> None:
        self._current = parsed
        self._loaded = True
        self.stale = False
        self.loaded_at = time.time()
        # Unknown users cost what known ones do: no timing tells them apart.
        costs = [_cost(entry.password_hash) for entry in parsed.users.values()]
        self._dummy_hash = dummy_hash(max(costs, default=SCRYPT_N))

    def _refuse(self, problems: list[str], why: str = "") -> None:
        """The file on disk is not used; the version read before stays."""
        self.problems = problems
        self.stale = True
        self.log.error("users file {path} not used: {why}; the version "
                       "read {ago:.0f} s ago ({users} users) stays until it is fixed:",
                       path=str(self.path), why=why or f"it has {len(problems)} bad entries",
                       ago=max(0.0, time.time() - self.loaded_at) if self.loaded_at else 0.0,
                       users=len(self._current.users))
        for problem in problems:
            self.log.error("{problem}", problem=problem)

    def health(self) -> list[str]:
        """What /healthz calls degraded about the users file ([] when fine),
        for the file on disk now: an edit is seen at the next look, not only
        at the next logon."""
        self.users()
        if self.stale:
            return [f"users file {self.path} on disk is not used "
                    f"({self.problems[0] if self.problems else ''}); the version read before "
                    f"serves"]
        if self._current.problems:
            return [f"users file {self.path}: {len(self._current.problems)} bad entries "
                    f"({self._current.problems[0]})"]
        return []

    def authenticate(self, username: str, password: str, domain: str) -> Deferred[Identity | None]:
        """Fires with the Identity when the password is right and the user's
        system account (if there is one) may log on, as PAM's account stage
        would decide: not locked, not expired (``bridge.security.accounts``).
        A user whose entry in the users file is bad fails with
        AuthenticationUnavailable (not counted toward a lockout)."""
        entry = self.users().get(username)
        encoded = entry.password_hash if entry is not None else self._dummy_hash
        unavailable = entry is None and username in self._current.bad_names

        def checked(outcome: tuple[bool, str | None, str | None]) -> Identity | None:
            ok, problem, unreadable = outcome
            if unavailable:
                raise AuthenticationUnavailable(f"the users file's entry for {username} is bad")
            if unreadable is not None and not self._warned_shadow:
                self._warned_shadow = True
                self.log.warn("cannot read {path} ({error}): users-file logons of locked or "
                              "expired system accounts are not refused (the bridge must run "
                              "as root to read it)", path=str(self.shadow), error=unreadable)
            if not ok or entry is None:
                return None
            if problem is not None:
                self.log.warn("logon of user {username} refused: {why}", username=username,
                              why=problem)
                return None
            return Identity(username, domain, entry.permission)

        return self._run_blocking(self._check, username, password, encoded,
                                  entry is not None).addCallback(checked)

    def _check(self, username: str, password: str, encoded: str, known: bool
               ) -> tuple[bool, str | None, str | None]:
        """In a thread: the password, then (only for a right one: no oracle
        for guessers) the system account. Returns (password right, why the
        account may not log on, why the shadow file could not be read)."""
        if not verify_password(password, encoded) or not known:
            return False, None, None
        try:
            return True, account_problem(username, self.shadow), None
        except OSError as e:
            return True, None, e.strerror or str(e)


DEFAULT_PAM_LEVEL = int(USER)
