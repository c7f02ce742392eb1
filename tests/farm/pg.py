"""A throwaway PostgreSQL cluster for the farm's tests: Debian's
postgresql-15 (initdb, pg_ctl) on a UNIX socket in a temp dir, password
authentication (SCRAM) so that the bridges read their password from a file
as an operator's would. PostgreSQL refuses to run as root: as root the
cluster runs as the unprivileged test account."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ACCOUNT = "icpbtest"
ROLE = "farm"
PASSWORD = "farm-test-password"  # a throwaway cluster's
COMMAND_KEY = "0123456789abcdef0123456789abcdef-farm-test-key"  # not a secret: a test's


def available() -> bool:
    return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()


def _account() -> str | None:
    """As root: the unprivileged account PostgreSQL runs as (created if
    missing); else None (we run it ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group",
                        ACCOUNT], check=True, capture_output=True)
    return ACCOUNT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL cluster; each test takes a database of its own."""

    def __init__(self) -> None:
        self.account = _account()
        self.base = Path(tempfile.mkdtemp(prefix="ibpg-", dir="/tmp"))
        self.data = self.base / "data"
        self.port = _free_port()  # names the socket file .s.PGSQL.<port>
        self.password_file = self.base / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o600)
        # The farm's command key (bridge.farm.signing): the same on every host.
        self.command_key_file = self.base / "command-key"
        self.command_key_file.write_text(COMMAND_KEY + "\n")
        self.command_key_file.chmod(0o600)
        self._databases = 0
        if self.account is not None:
            entry = pwd.getpwnam(self.account)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
            self.base.chmod(0o755)  # the bridges (root) reach the socket

    def _argv(self, *argv: str) -> list[str]:
        if self.account is None:
            return list(argv)
        return ["runuser", "-u", self.account, "--", *argv]

    def init(self) -> None:
        pwfile = self.base / "initdb-pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.account is not None:
            entry = pwd.getpwnam(self.account)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        subprocess.run(self._argv(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", ROLE, "--pwfile", str(pwfile),
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--no-sync", "--no-instructions"), check=True, capture_output=True)
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"""
listen_addresses = ''
unix_socket_directories = '{self.base}'
port = {self.port}
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 64MB
""")
        self.start()

    def _ctl(self, action: str) -> list[str]:
        extra = ["-m", "fast"] if action == "stop" else ["-l", str(self.base / "log")]
        return self._argv(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                          *extra, action)

    def start(self) -> None:
        status = subprocess.run(self._argv(str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                                           "status"), capture_output=True)
        if status.returncode != 0:
            subprocess.run(self._ctl("start"), check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(self._ctl("stop"), check=False, capture_output=True)

    async def stop_async(self) -> None:
        """pg_ctl stop -m fast, waited for without blocking the reactor."""
        await self._run_async(self._ctl("stop"))

    async def start_async(self) -> None:
        await self._run_async(self._ctl("start"))

    async def _run_async(self, argv: list[str]) -> None:
        _, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ))
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)}: {code}: {err.decode(errors='replace')}")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def conninfo(self, dbname: str) -> str:
        return f"host={self.base} port={self.port} dbname={dbname} user={ROLE}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo(dbname), password=PASSWORD, **kwargs)

    def new_database(self) -> str:
        self._databases += 1
        name = f"farm_{os.getpid()}_{self._databases}"
        with self.connect(autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name


class FarmDatabase:
    """One test's farm database: its connection string, and queries run
    off the reactor (a psycopg connection per call, in a thread)."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.conninfo = cluster.conninfo(name)
        self.password_file = cluster.password_file
        self.command_key_file = cluster.command_key_file

    def query_blocking(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.cluster.connect(self.name) as connection:
            cursor = connection.execute(sql, args)
            return cursor.fetchall() if cursor.description is not None else []

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> Deferred[list[tuple[Any, ...]]]:
        return deferToThread(self.query_blocking, sql, args)

    async def until(self, sql: str, args: tuple[Any, ...], done: Any, timeout: float = 60.0,
                    what: str = "") -> list[tuple[Any, ...]]:
        """Poll ``sql`` until ``done(rows)`` (bounded by ``timeout``);
        returns the rows. A database that is away, or whose tables the
        first bridge has not made yet, counts as not yet."""
        import psycopg

        deadline = reactor.seconds() + timeout
        rows: list[tuple[Any, ...]] = []
        while True:
            try:
                rows = await self.query(sql, args)
                if done(rows):
                    return rows
            except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
                pass
            if reactor.seconds() > deadline:
                raise AssertionError(f"not within {timeout} s: {what or sql}; last: {rows!r}")
            await deferLater(reactor, 0.05, lambda: None)
