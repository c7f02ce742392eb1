"""What a backend is: a module (one ``[modules.NAME]`` table: how to run a
kind of backend), the context it is started for, the error a start ends
in, and the named pipe its endpoint is."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PIPE_PREFIX = "\\\\.\\pipe\\"


class BackendError(Exception):
    """A backend could not be started or did not become ready; ``last_lines``
    are its last lines of output."""

    def __init__(self, message: str, last_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.last_lines = last_lines or []

    def describe(self) -> str:
        if not self.last_lines:
            return str(self)
        return f"{self}; last output: {' | '.join(self.last_lines)}"


@dataclass(frozen=True)
class Module:
    """One ``[modules.NAME]`` table: how to run a kind of backend."""

    name: str
    command: tuple[str, ...]
    endpoint: str
    user: str = "session"
    ready_timeout: float = 30.0
    stop_timeout: float = 5.0
    environment: Mapping[str, str] = field(default_factory=dict)


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
    # environment.add / environment.filter (ogon's properties), already split.
    environment_add: tuple[tuple[str, str], ...] = ()
    environment_pass: tuple[str, ...] = ()


def pipe_name(endpoint: str) -> str:
    """The named pipe ``endpoint`` as the RDP server wants it: ``\\\\.\\pipe\\NAME``."""
    return endpoint if endpoint.startswith(PIPE_PREFIX) else PIPE_PREFIX + endpoint


def pipe_file(pipe_dir: Path, endpoint: str) -> Path:
    """Where winpr puts the named pipe ``endpoint``: ``<pipe_dir>/NAME``."""
    name = endpoint[len(PIPE_PREFIX):] if endpoint.startswith(PIPE_PREFIX) else endpoint
    return pipe_dir / name
