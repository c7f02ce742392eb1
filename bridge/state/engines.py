"""The engine seam: what differs between the databases the bridge keeps
state in, and nothing else (Synapse's storage/engines habit).

The host's own state is SQLite (``bridge.state.store``): a local file,
written on the reactor in microseconds, the truth for the host's sessions.
The farm's is PostgreSQL (``bridge.state.farm_store``): across the
network, so every statement runs off the reactor, the server may be away
for minutes, and it can wake listeners (LISTEN/NOTIFY). An Engine says
how to run a unit of work on it (a transaction, off the reactor), which
errors mean "the database is away" rather than "a bug", and how to be
woken by it. The farm store's SQL is written against an Engine and never
asks which one it has.

PostgreSQL through psycopg 3: each of the engine's threads (a thread pool
of its own, never the reactor's, which checks passwords, so a database
that hangs cannot starve logons) keeps one connection, opened on first
use and opened again on the next use after it broke. No pool with its own
back-off (psycopg_pool waits 1 s doubling between attempts): after an
outage the next shipment connects at once and the host catches up.
Notifications arrive on a dedicated thread with its own connection,
re-LISTENing after every outage.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: A notification: (channel, payload). Only a wake-up: the rows are the truth.
NotifyCallback = Callable[[str, str], None]


class DatabaseUnavailableError(Exception):
    """The database cannot be reached (down, restarting, network, pool
    exhausted): the work was not done, and may be tried again later."""


class Engine(ABC):
    """How to run work on one database, off the reactor."""

    @abstractmethod
    def run(self, work: Callable[[Any], T]) -> Deferred[T]:
        """Run ``work(connection)`` in one transaction, off the reactor:
        committed when it returns, rolled back when it raises. Fires with
        its result; fails with DatabaseUnavailableError when the database
        is away, with the error itself otherwise."""

    @abstractmethod
    def listen(self, channels: list[str], on_notify: NotifyCallback,
               on_connected: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        """Call ``on_notify(channel, payload)`` on the reactor for each
        notification; ``on_connected()`` each time listening (re)starts
        (notifications in between are lost: read the rows again), and
        ``on_lost(reason)`` each time it stops."""

    @abstractmethod
    def close(self) -> Deferred[None]:
        """Stop listening, finish running work, close connections."""


class PostgresEngine(Engine):
    """PostgreSQL through psycopg 3, one connection per engine thread.

    ``conninfo`` is a libpq connection string (host, port, dbname, user,
    sslmode, ...); ``password`` is passed apart from it (read from a file,
    never on a command line); without one libpq's own PGPASSWORD /
    PGPASSFILE / ~/.pgpass apply."""

    log = Logger()

    def __init__(self, reactor: Any, conninfo: str, password: str | None = None,
                 application_name: str = "icp-bridge", threads: int = 2,
                 connect_timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.kwargs: dict[str, Any] = {
            "application_name": application_name,
            "connect_timeout": max(1, int(connect_timeout)),
            # A server that vanished without a word is noticed, not waited on.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "options": "-c statement_timeout=30000",
        }
        if password is not None:
            self.kwargs["password"] = password
        self.conninfo = conninfo
        self.threads = ThreadPool(threads, threads, name="farm-database")
        self.threads.start()
        self._local = threading.local()
        self._connections: set[Any] = set()
        self._lock = threading.Lock()
        self._listener: _Listener | None = None

    def run(self, work: Callable[[Any], T]) -> Deferred[T]:
        d = deferToThreadPool(self.reactor, self.threads, self._run, work)
        return d.addErrback(self._classify)

    def _connection(self) -> Any:
        """This thread's connection, opened if it has none."""
        import psycopg

        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            connection = psycopg.connect(self.conninfo, **self.kwargs)
            self._local.connection = connection
            with self._lock:
                self._connections.add(connection)
        return connection

    def _run(self, work: Callable[[Any], T]) -> T:
        import psycopg

        connection = self._connection()
        try:
            with connection.transaction():
                return work(connection)
        except psycopg.OperationalError:
            # Broken (or in doubt): the next use of this thread opens another.
            self._local.connection = None
            with self._lock:
                self._connections.discard(connection)
            connection.close()
            raise

    @staticmethod
    def _classify(failure: Failure) -> Failure:
        import psycopg

        if failure.check(psycopg.OperationalError):
            raise DatabaseUnavailableError(_first_line(failure.value))
        return failure

    def listen(self, channels: list[str], on_notify: NotifyCallback,
               on_connected: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        self._listener = _Listener(self, channels, on_notify, on_connected, on_lost)
        self._listener.start()

    def close(self) -> Deferred[None]:
        listener, self._listener = self._listener, None

        def closing() -> None:
            if listener is not None:
                listener.stop()
            with self._lock:
                connections, self._connections = self._connections, set()
            for connection in connections:
                connection.close()

        d = deferToThreadPool(self.reactor, self.threads, closing)
        d.addBoth(lambda result: self.threads.stop() or result)
        return d


class _Listener(threading.Thread):
    """LISTEN on a connection of its own, in a thread of its own: each
    notification is handed to the reactor; after an outage it connects
    again (backing off to 2 s) and says so, since notifications sent
    meanwhile never arrive."""

    def __init__(self, engine: PostgresEngine, channels: list[str],
                 on_notify: NotifyCallback, on_connected: Callable[[], None],
                 on_lost: Callable[[str], None]) -> None:
        super().__init__(name="farm-listen", daemon=True)
        self.engine = engine
        self.channels = channels
        self.on_notify = on_notify
        self.on_connected = on_connected
        self.on_lost = on_lost
        self._stopping = threading.Event()
        self._connection: Any = None

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5.0)

    def run(self) -> None:
        import psycopg

        reactor = self.engine.reactor
        delay = 0.1
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.engine.conninfo, autocommit=True,
                                     **self.engine.kwargs) as connection:
                    for channel in self.channels:
                        connection.execute(f"LISTEN {channel}")
                    delay = 0.1
                    reactor.callFromThread(self.on_connected)
                    while not self._stopping.is_set():
                        for notify in connection.notifies(timeout=0.5):
                            reactor.callFromThread(self.on_notify, notify.channel,
                                                   notify.payload)
            except psycopg.Error as e:
                if self._stopping.is_set():
                    return
                reactor.callFromThread(self.on_lost, _first_line(e))
                self._stopping.wait(delay)
                delay = min(2.0, delay * 2)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def conninfo_problem(conninfo: str) -> str | None:
    """What is wrong with a libpq connection string for the farm, or None.
    A password in it is refused: it would show in ``ps``, in the config
    file others may read, and in every log line that names the string."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        values: Mapping[str, Any] = conninfo_to_dict(conninfo)
    except ProgrammingError as e:
        return f"not a libpq connection string ({_first_line(e)})"
    if "password" in values:
        return ("holds a password: put it in farm_password_file (or libpq's PGPASSWORD / "
                "~/.pgpass) instead")
    return None
