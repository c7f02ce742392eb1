"""The service tree: everything built and wired in one place."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from bridge.auth import Authenticator, PamAuthenticator, UsersFileAuthenticator
from bridge.config import Config
from bridge.endpoints import ListeningService, StartupError
from bridge.icp_handlers import PropertyTable, RdpRequestHandlers
from bridge.otsapi import OtsApiHandler
from bridge.permissions import GUEST, level_value
from bridge.rdp_server import RdpServerLink
from bridge.sessions import SessionRegistry
from bridge.state import StateStore, restore
from bridge.token_files import SessionTokenFiles
from bridge.tokens import TokenStore
from protocols.generated.otsapi import otsapi
from protocols.thrift_server import ThriftServerFactory

TOKEN_SWEEP_INTERVAL = 60.0
# How often the state database's write-ahead log is checkpointed (off the reactor).
CHECKPOINT_INTERVAL = 5.0


class BridgeService(MultiService):
    """icp-bridge: the ICP listener, the OTS API listener and their state.

    Attributes tests and tools may use: ``registry``, ``tokens``, ``link``
    (the RDP server link), ``otsapi`` (the handler), ``icp_listener`` and
    ``thrift_listener`` (ListeningService, ``.port`` once started).
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any | None = None,
                 authenticator: Authenticator | None = None, clock: Any | None = None,
                 exit_on_startup_error: bool = False) -> None:
        """``clock`` (default: the reactor) times bridged calls, tokens and
        session times; tests pass a Clock. With ``exit_on_startup_error``
        (under twistd) a failure to start is one line and exit status 1, not
        a traceback."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if clock is None:
            clock = reactor
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.exit_on_startup_error = exit_on_startup_error
        self.store = StateStore(config.state_dir / "state.sqlite3")
        self.registry = SessionRegistry(clock)
        self.tokens = TokenStore(clock)
        self.tokens.restore(restore(self.store, self.registry, clock.seconds()))
        self.tokens.listener = self.store.token_changed
        self.store.attach(self.registry)
        self.token_files = SessionTokenFiles(config.token_dir, self.tokens)
        self.token_files.attach(self.registry)
        for session in self.registry:
            self.token_files.ensure(session)

        self.authenticator = authenticator or self._make_authenticator()
        handlers = RdpRequestHandlers(self.registry, self.authenticator, config)
        self.link = RdpServerLink(
            handlers.table(), self.registry, clock, config.call_timeout,
            config.max_icp_frame, config.allowed_peer_uids,
        )
        self.otsapi = OtsApiHandler(self.registry, self.tokens, self.link, self.authenticator,
                                    config)
        self.icp_listener = ListeningService("ICP (RDP server)", config.icp_endpoint,
                                             self.link, reactor)
        self.icp_listener.setServiceParent(self)
        self.thrift_listener = ListeningService(
            "OTS API", config.thrift_endpoint,
            ThriftServerFactory(otsapi, self.otsapi, config.max_thrift_frame), reactor,
        )
        self.thrift_listener.setServiceParent(self)
        sweeper = TimerService(TOKEN_SWEEP_INTERVAL, self.tokens.expire)
        sweeper.clock = clock
        sweeper.setServiceParent(self)
        # Real time, not ``clock``: this is disk I/O, not protocol time.
        checkpointer = TimerService(CHECKPOINT_INTERVAL, self._checkpoint)
        checkpointer.clock = reactor
        checkpointer.setServiceParent(self)

    def _checkpoint(self) -> Deferred[None]:
        d = self._run_blocking(self.store.checkpoint)
        d.addErrback(lambda failure: self.log.failure("state database checkpoint failed",
                                                      failure))
        return d

    def _run_blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _make_authenticator(self) -> Authenticator:
        config = self.config
        if config.authenticator == "pam":
            properties = PropertyTable(config)

            def level_of(username: str) -> int:
                level = properties.get_string("permission.level", username)
                return level_value(level) if level else int(GUEST)

            try:
                return PamAuthenticator(level_of, run_blocking=self._run_blocking)
            except RuntimeError as e:
                raise StartupError(str(e)) from None
        if not config.users_file.exists():
            self.log.warn(
                "no users file at {path}: every logon goes to the greeter until users are "
                "added with `icp-bridge users add NAME --permission full|user|guest`",
                path=str(config.users_file),
            )
        elif config.users_file.stat().st_mode & 0o077:
            self.log.warn("users file {path} is readable by others; chmod 600 it",
                          path=str(config.users_file))
        return UsersFileAuthenticator(config.users_file, run_blocking=self._run_blocking)

    def privilegedStartService(self) -> None:
        try:
            self._privileged_start()
        except StartupError as e:
            if not self.exit_on_startup_error:
                raise
            raise SystemExit(f"icp-bridge: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            if not self.exit_on_startup_error:
                raise
            raise SystemExit(f"icp-bridge: {e}") from None

    def _privileged_start(self) -> None:
        self.log.info("icp-bridge starting (pid {pid}, {reactor}); state in {state_dir}, token "
                      "files in {token_dir}", pid=os.getpid(),
                      reactor=type(self.reactor).__name__,
                      state_dir=str(self.config.state_dir), token_dir=str(self.config.token_dir))
        if self.config.metrics_endpoint:
            self.log.warn("metrics_endpoint is reserved for a later release and not served: "
                          "{endpoint}", endpoint=self.config.metrics_endpoint)
        super().privilegedStartService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        current = self.link.current
        if current is not None:
            # Let the RDP server's disconnect reach the registry (and the
            # database) before the database closes.
            closed = current.when_closed()
            current.close()
            await closed
        await super().stopService()
        self.store.close()
