"""What a backend is: a module (one ``[modules.NAME]`` table: how to run a
kind of backend), the context it is started for, the error a start ends
in, what the lifecycle holds of a running backend (SessionBackend), and
the named pipe its endpoint is."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from bridge.sessions.model import BackendRecord

PIPE_PREFIX = "\\\\.\\pipe\\"


class BackendError(Exception):
    """A backend could not be started or did not become ready; ``last_lines``
    are its last lines of output."""

    def __init__(self, message: str, last_lines: list[str] | None = None,
                 taken: bool = False) -> None:
        super().__init__(message)
        self.last_lines = last_lines or []
        # Someone else's file stood at its endpoint while it started.
        self.taken = taken

    def describe(self) -> str:
        if not self.last_lines:
            return str(self)
        return f"{self}; last output: {' | '.join(self.last_lines)}"


@dataclass(frozen=True)
class Module:
    """One ``[modules.NAME]`` table: how to run a kind of backend. The
    fields after ``environment`` are no TOML keys: ogon's Qt and Weston
    modules run through the same machinery and set them."""

    name: str
    command: tuple[str, ...]
    endpoint: str
    user: str = "session"
    ready_timeout: float = 30.0
    stop_timeout: float = 5.0
    environment: Mapping[str, str] = field(default_factory=dict)
    # ogon's module kind ("Qt", "Weston"): the WinStationName's first part;
    # "" for a command module (named by the module's name).
    kind: str = ""
    # Where it runs: None, the account's home (or /); "", the bridge's own
    # working directory (inherited, as ogon's Qt module leaves it).
    cwd: str | None = None
    # The PATH its command is looked up in; None: its environment's PATH.
    # ogon looks programs up in the session manager's own PATH.
    search_path: str | None = None


@dataclass(frozen=True)
class LaunchContext:
    """What a backend is started for: the session and its client."""

    session_id: int
    username: str  # the session's user; "" for a greeter
    domain: str
    width: int
    height: int
    bpp: int
    max_width: int
    max_height: int
    client_name: str
    client_address: str
    backend_cookie: str
    ogon_cookie: str
    rdp_server_uid: int | None = None
    rdp_server_pid: int | None = None
    # For a greeter: the user name the client typed, if any (OGON_USER).
    typed_user: str = ""
    typed_domain: str = ""
    # environment.filter / environment.add (ogon's properties), as given.
    environment_filter: str = ""
    environment_add_text: str = ""


class SessionBackend(Protocol):
    """What the lifecycle holds of a session's running backend, whatever its
    kind: a command module's process, ogon's X11 module (X server and
    window manager), a module run by ogon-backend-launcher."""

    session_id: int
    record: BackendRecord
    running: bool
    last_lines: deque[str]

    @property
    def name(self) -> str:
        """The module's name (``[modules.NAME]`` or ogon's config name)."""
        ...

    @property
    def pid(self) -> int:
        """The process the session's life hangs on (for the log)."""
        ...

    def when_exited(self) -> Deferred[str]:
        """Fires with how it ended, once it has (its session then ends)."""
        ...

    def stop(self) -> Deferred[str]:
        """Stop it; fires once it is gone."""
        ...

    def connected(self) -> None:
        """A client came (ogon's module Connect)."""
        ...

    def disconnected(self) -> None:
        """The client went (ogon's module Disconnect)."""
        ...

    def detach(self) -> None:
        """The bridge stops and leaves it running for the next start."""
        ...


def pipe_name(endpoint: str) -> str:
    """The named pipe ``endpoint`` as the RDP server wants it: ``\\\\.\\pipe\\NAME``."""
    return endpoint if endpoint.startswith(PIPE_PREFIX) else PIPE_PREFIX + endpoint


def pipe_file(pipe_dir: Path, endpoint: str) -> Path:
    """Where winpr puts the named pipe ``endpoint``: ``<pipe_dir>/NAME``."""
    name = endpoint[len(PIPE_PREFIX):] if endpoint.startswith(PIPE_PREFIX) else endpoint
    return pipe_dir / name
