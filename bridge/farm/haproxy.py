"""Reconnect routing with HAProxy: users go back to the host of their session.

An RDP client's first packet (the X.224 Connection Request) may carry
``Cookie: mstshash=NAME``; HAProxy reads it with ``req.rdp_cookie(mstshash)``
and looks NAME up in a map of user -> host that the farm keeps: found, the
connection goes to that host's backend; not found (no session, or no
cookie), the default balance picks a host. See contrib/haproxy/ and the
README's "A farm" for what clients send.

The map holds, for each user with a session on a host that is not stale,
the host of the user's disconnected session (the one to reconnect to; the
most recently disconnected if several), else of the active one. Keys are
lower case (the lookup lowercases the cookie), under the full name and,
for names longer than nine characters, under the first nine as well: what
mstsc sends (MS-RDPBCGR: "the login name of the user truncated to nine
characters"); a truncated key two users share with different hosts is
left out (they go by the balance). Names HAProxy's runtime API cannot
carry (spaces, ``;``, ``\\``, ``#``, quotes, control characters) are left
out, logged once; so is a host that is not a host name (the farm store
skips such rows already: every farm member can write them).

No text reaches HAProxy unchecked: every runtime API line and every map
file line is built by ``_line``, which refuses ``;``, whitespace inside a
word, ``\\``, ``#``, quotes and control characters (``;`` would start an
admin command of the writer's choice, a newline another map entry).

Changes are pushed over HAProxy's runtime API on its stats socket (``set
map`` / ``add map`` / ``del map``; a full replacement as one version with
``prepare map`` / ``add map @V`` / ``commit map @V``, so a lookup never
sees a half-written map) and written as the map file, atomically, which
HAProxy reads when it (re)starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.sessions.model import ConnectState
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import HOST_NAME, FarmStore

#: mstsc sends the login name truncated to this many characters.
MSTSHASH_LENGTH = 9
#: Characters no word of a runtime API line or map file line may hold: the
#: runtime API splits commands on ';' and words on whitespace and escapes
#: with '\\'; '#' starts a comment in the map file; quotes; control
#: characters (a newline ends a line).
_UNSAFE = re.compile(r"[\s;\\#\"'\x00-\x1f\x7f-\x9f]")


class UnsafeLineError(ValueError):
    """A word for HAProxy holds what its runtime API or map file obeys."""


def _line(*words: str) -> str:
    """The one place lines for HAProxy (runtime API commands, map file
    entries) are built: each word checked, joined by single spaces."""
    for word in words:
        if not word or _UNSAFE.search(word):
            raise UnsafeLineError(f"not sent to HAProxy: {word[:80]!r}")
    return " ".join(words)


#: Runtime API commands per line (one connection each); HAProxy's buffer is 16 KiB.
_LINE_LIMIT = 8000


def route_map(sessions: Iterable[dict[str, Any]], fresh_hosts: set[str]
              ) -> tuple[dict[str, str], list[str]]:
    """(key -> host, user names left out) for the farm's sessions."""
    best: dict[str, tuple[tuple[int, float], str]] = {}
    for row in sessions:
        if not row["logged_on"] or row["host"] not in fresh_hosts:
            continue
        disconnected = row["state"] == int(ConnectState.DISCONNECTED)
        rank = (1 if disconnected else 0,
                (row["disconnect_time"] if disconnected else row["logon_time"]) or 0.0)
        user = row["username"].lower()
        if user not in best or rank > best[user][0]:
            best[user] = (rank, row["host"])
    routes: dict[str, str] = {}
    truncated: dict[str, set[str]] = {}
    unsafe = []
    for user, (_, host) in best.items():
        if not user or _UNSAFE.search(user) or not HOST_NAME.fullmatch(host):
            unsafe.append(user)
            continue
        routes[user] = host
        if len(user) > MSTSHASH_LENGTH:
            truncated.setdefault(user[:MSTSHASH_LENGTH], set()).add(host)
    for key, hosts in truncated.items():
        # A user of exactly that name keeps their own key; a prefix two
        # users share on different hosts routes neither.
        if key not in routes and len(hosts) == 1:
            routes[key] = next(iter(hosts))
    return routes, sorted(unsafe)


def write_map_file(path: Path, routes: dict[str, str], who: str) -> None:
    """The map file, replaced atomically (temp file, fsync, rename, dir fsync)."""
    lines = [f"# user -> host of the user's session, written by icp-bridge ({who})\n"]
    lines += [_line(key, host) + "\n" for key, host in sorted(routes.items())]
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _Answer(Protocol):
    def __init__(self, line: bytes) -> None:
        self.line = line
        self.data = b""
        self.done: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.line)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data.decode("utf-8", "replace"))


class RuntimeApi:
    """HAProxy's runtime API on its stats socket: one line of commands
    per connection (non-interactive mode: HAProxy answers and closes)."""

    def __init__(self, reactor: Any, endpoint: str) -> None:
        self.reactor = reactor
        self.endpoint = endpoint

    async def send(self, commands: list[str]) -> str:
        """Run ``commands`` (several per line, ``;``-separated); returns
        HAProxy's answers. Raises on a connection failure."""
        answers = []
        for line in _lines([_line(*command.split(" ")) for command in commands]):
            answer = _Answer(line.encode() + b"\n")
            await connectProtocol(clientFromString(self.reactor, self.endpoint), answer)
            answers.append(await answer.done.addTimeout(10, self.reactor))
        return "".join(answers)


def _lines(commands: list[str]) -> Iterable[str]:
    """Commands (each from ``_line``) joined by ';' into lines HAProxy takes."""
    line: list[str] = []
    size = 0
    for command in commands:
        if line and size + len(command) + 1 > _LINE_LIMIT:
            yield ";".join(line)
            line, size = [], 0
        line.append(command)
        size += len(command) + 1
    if line:
        yield ";".join(line)


_ERRORS = re.compile(r"(?im)^(unknown|not found|.*\bnot\b.*|.*error.*|.*denied.*|.*"
                     r"require.*)$")


class HaproxyMapFeeder:
    """Keeps HAProxy's user -> host map (and the map file) as the farm's
    sessions are. ``map_path`` is both the file and the map's name in
    HAProxy (the path its configuration loads)."""

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, farm: FarmStore, socket: str,
                 map_path: Path, stale_after: float, who: str) -> None:
        self.clock = clock
        self.farm = farm
        self.api = RuntimeApi(reactor, socket) if socket else None
        self.map_path = map_path
        self.stale_after = stale_after
        self.who = who
        self.pushed: dict[str, str] | None = None  # what HAProxy holds, when known
        self.written: dict[str, str] | None = None
        self.updates = 0
        self._busy = False
        self._again = False
        self._unsafe_logged: set[str] = set()
        self._tick = LoopingCall(self.update)
        self._tick.clock = clock

    def start(self) -> None:
        # Staleness changes without a notification: look every so often.
        self._tick.start(max(0.2, self.stale_after / 2), now=True)

    def stop(self) -> None:
        if self._tick.running:
            self._tick.stop()

    def update(self) -> None:
        """Bring the map up to date with the farm (coalesced)."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        Deferred.fromCoroutine(self._update()).addErrback(self._failed).addBoth(self._done)

    def resync(self) -> None:
        """HAProxy's map is unknown (after an error): replace it whole."""
        self.pushed = None
        self.update()

    def _done(self, _: object) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self.update()

    def _failed(self, failure: Failure) -> None:
        if failure.check(DatabaseUnavailableError):
            return  # the map stays as it is until the farm is back
        self.log.failure("farm: updating the HAProxy map failed", failure)

    async def _update(self) -> None:
        hosts = await self.farm.hosts()
        fresh = {h.host for h in hosts if h.age <= self.stale_after}
        routes, unsafe = route_map(await self.farm.sessions(), fresh)
        for user in unsafe:
            if user not in self._unsafe_logged:
                if len(self._unsafe_logged) > 1000:  # names a farm member chose: bounded
                    self._unsafe_logged.clear()
                self._unsafe_logged.add(user)
                self.log.warn("farm: user {username!r} is not routed by HAProxy (the name, "
                              "or its host's, holds characters its map cannot)",
                              username=user[:80])
        if routes != self.written:
            write_map_file(self.map_path, routes, self.who)
            self.written = routes
        if self.api is not None and routes != self.pushed:
            try:
                await self._push(routes)
            except Exception as e:
                self.log.warn("farm: HAProxy's runtime API at {endpoint} failed ({error}); "
                              "its map is replaced whole when it answers again",
                              endpoint=self.api.endpoint, error=str(e) or type(e).__name__)
                self.pushed = None
                return
            self.pushed = routes
            self.updates += 1

    async def _push(self, routes: dict[str, str]) -> None:
        assert self.api is not None
        name = str(self.map_path)
        if self.pushed is None:
            answer = await self.api.send([f"prepare map {name}"])
            found = re.search(r"version[^0-9]*(\d+)", answer)
            if found is None:
                raise RuntimeError(f"prepare map: {answer.strip()[:200]}")
            version = found.group(1)
            adds = [f"add map @{version} {name} {key} {host}"
                    for key, host in sorted(routes.items())]
            self._check(await self.api.send([*adds, f"commit map @{version} {name}"]))
            return
        before = self.pushed
        commands = [f"del map {name} {key}" for key in sorted(before) if key not in routes]
        commands += [f"set map {name} {key} {host}" for key, host in sorted(routes.items())
                     if key in before and before[key] != host]
        commands += [f"add map {name} {key} {host}" for key, host in sorted(routes.items())
                     if key not in before]
        if commands:
            self._check(await self.api.send(commands))

    @staticmethod
    def _check(answer: str) -> None:
        problems = [line for line in answer.splitlines() if line.strip()
                    and _ERRORS.match(line)]
        if problems:
            raise RuntimeError("; ".join(problems)[:300])
