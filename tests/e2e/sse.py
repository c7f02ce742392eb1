"""A Server-Sent Events client for the tests, on twisted.web's Agent: it
parses the stream itself (nothing of the bridge's code)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent
from twisted.web.http_headers import Headers


@dataclass
class Event:
    id: int | None
    kind: str
    data: Any


class SseReader(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[Event] = []
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[list[Event]], bool], Deferred[None]]] = []

    @property
    def sessions(self) -> list[Event]:
        return [e for e in self.events if e.kind == "session"]

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.sessions if e.id is not None]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.lstrip(" ")
            if "data" in fields:
                self.events.append(Event(int(fields["id"]) if "id" in fields else None,
                                         fields.get("event", "message"),
                                         json.loads(fields["data"])))
        self._check()

    def _check(self) -> None:
        for entry in list(self._waiting):
            predicate, d = entry
            if predicate(self.sessions):
                self._waiting.remove(entry)
                d.callback(None)

    def wait_for(self, predicate: Callable[[list[Event]], bool]) -> Deferred[None]:
        """Fires once the session events so far satisfy ``predicate``."""
        d: Deferred[None] = Deferred()
        self._waiting.append((predicate, d))
        self._check()
        return d

    def drop(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"stream ended while waiting: {reason}"))
        self._waiting.clear()
        self.closed.callback(None)


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def get(port: int, path: str, token: str | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    """(status, body, response headers) of GET ``path``."""
    all_headers = {**(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    response = await Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{port}{path}".encode(),
        Headers({k: [v] for k, v in all_headers.items()}))
    body = _Body()
    response.deliverBody(body)
    return response.code, await body.done, response.headers


async def open_events(port: int, token: str, query: str = "",
                      last_event_id: int | None = None) -> SseReader:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    response = await Agent(reactor).request(
        b"GET", f"http://127.0.0.1:{port}/events{query}".encode(),
        Headers({k: [v] for k, v in headers.items()}))
    assert response.code == 200, response.code
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    reader = SseReader()
    response.deliverBody(reader)
    return reader
