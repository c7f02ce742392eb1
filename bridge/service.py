"""The service tree: everything built and wired in one place."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from bridge.backends.launcher import BackendLauncher
from bridge.backends.logs import BackendLogs
from bridge.backends.ogon.kinds import OgonModules, OgonSettings
from bridge.config import Config, backend_log_directory, default_lock_dir
from bridge.config_sources import load_properties
from bridge.endpoints import (
    LazyFactory,
    ListeningService,
    StartupError,
    check_directory,
    raise_fd_limit,
    split_endpoint,
    unix_socket_path,
    validate_endpoint,
    with_backlog,
)
from bridge.lifecycle.facade import SessionLifecycle
from bridge.lifecycle.runtime import RdpPeer
from bridge.otsapi.actions import SessionActions
from bridge.otsapi.handler import OtsApiHandler
from bridge.otsapi.workers import Accepting, worker_pool
from bridge.rdp.handlers import RdpRequestHandlers
from bridge.rdp.link import RdpServerLink
from bridge.security.auth import Authenticator, UsersFileAuthenticator
from bridge.security.pam_auth import PAM_DIR, PamAuthenticator, ogon_pam_service, pam_unavailable
from bridge.security.permissions import ogon_level
from bridge.security.throttle import LockoutStore, LogonGuard, ThrottlePolicy
from bridge.security.tls import (
    certificate_not_after,
    check_endpoint_options,
    endpoint_certificate,
    ensure_pair,
    uses_default_pair,
    with_certificate,
)
from bridge.security.token_files import SessionTokenFiles
from bridge.security.tokens import TokenStore
from bridge.sessions.model import StateWriteError
from bridge.sessions.ogon_config import MergedProperties, OgonConfigError
from bridge.sessions.properties import ChannelPolicy, PropertyTable
from bridge.sessions.registry import SessionRegistry
from bridge.state.journal import EventHub, LogonEvents
from bridge.state.lock import StateDirectoryLock
from bridge.state.store import SpawnRecords, StateStore, restore, state_database
from bridge.watch import lazy
from bridge.watch.dbus import SessionNotifier
from bridge.watch.metrics import Metrics
from bridge.watch.operations import OperationsState
from protocols.endpoint_strings import parse_stream_endpoint
from protocols.generated.otsapi_blocking import otsapi
from protocols.thrift_server import ConnectionLimits, ThriftServerFactory

if TYPE_CHECKING:
    from bridge.farm.service import FarmService
    from bridge.watch.admin import EventsResource

TOKEN_SWEEP_INTERVAL = 60.0
# How often the state database's write-ahead log is checkpointed (off the reactor).
CHECKPOINT_INTERVAL = 5.0
# How often writes the disk refused are tried again.
STATE_RETRY_INTERVAL = 5.0
# How often the event journal drops what is older than events_keep.
PRUNE_INTERVAL = 3600.0
# How often failed-logon records that are history are forgotten.
FAILURE_EXPIRY_INTERVAL = 60.0


def make_farm(config: Config, secrets: tuple[str | None, bytes | None], reactor: Any,
              clock: IReactorTime, store: StateStore, registry: SessionRegistry,
              properties: PropertyTable, actions: SessionActions) -> FarmService:
    """The farm's part of a bridge (config.farm_database is set; imported
    only then), with the secrets read_farm_secrets read."""
    from bridge.farm.commands import SharedActions
    from bridge.farm.service import FarmService, FarmSettings

    password, command_key = secrets
    settings = FarmSettings(
        database=config.farm_database, password=password, host=config.host_name,
        heartbeat=config.farm_heartbeat, stale_after=config.farm_stale_after,
        command_timeout=config.call_timeout, events_keep=config.events_keep,
        haproxy_socket=config.haproxy_socket, haproxy_map=config.haproxy_map,
        command_key=command_key)
    return FarmService(settings, reactor, clock, store, state_database(config.state_dir),
                       registry, properties, SharedActions(actions),
                       admin_url=config.admin_endpoint)


def check_before_writing(config: Config, reactor: Any, pam: bool) -> None:
    """The checks that cost nothing, made before the service writes
    anything: a start refused by one of them has made no TLS pair and no
    state directory. ``pam``: whether the configured authenticator is
    used (tests hand in their own)."""
    validate_endpoint(reactor, config.icp_endpoint, "icp_endpoint")
    check_endpoint_options(config.thrift_endpoint, "thrift_endpoint")
    if config.admin_endpoint:
        validate_endpoint(reactor, config.admin_endpoint, "admin_endpoint")
    problem = pam_unavailable() if pam and config.authenticator == "pam" else None
    if problem is not None:
        raise StartupError(problem)


def read_farm_secrets(config: Config) -> tuple[str | None, bytes | None]:
    """farm_password_file's password and farm_command_key_file's key, when
    the bridge is in a farm."""
    if not config.farm_database:
        return None, None
    from bridge.farm.service import read_password
    from bridge.farm.signing import read_command_key

    secrets: list[Any] = []
    for key, read in (("farm_password_file", read_password),
                      ("farm_command_key_file", read_command_key)):
        try:
            secrets.append(read(getattr(config, key)))
        except (OSError, ValueError) as e:
            raise StartupError(f"{key}: {getattr(e, 'strerror', None) or e}") from None
    return secrets[0], secrets[1]


def report_properties(log: Logger, merged: MergedProperties, properties: PropertyTable,
                      authenticator: str) -> None:
    """Where the served properties come from, and what the operator should
    know of them (at startup and at each reload)."""
    ini = merged.ini
    if ini is not None:
        log.info("ogon config {path}: {count} global properties, {users} users",
                 path=ini.source, count=len(ini.global_values), users=len(ini.user_values))
    for line in merged.problems:
        log.warn("{problem}", problem=line)
    for line in merged.overrides:
        log.info("{override}", override=line)
    auth_module = properties.get_string("auth.module")
    if ini is not None and auth_module != "PAM":
        log.warn("auth.module is {value!r}; icp-bridge authenticates with its authenticator "
                 "({authenticator}), not an ogon auth module", value=auth_module,
                 authenticator=authenticator)


def throttle_policy(config: Config) -> ThrottlePolicy:
    """The failed-logon throttle's policy from the configuration's keys."""
    return ThrottlePolicy(
        failures_before_delay=config.logon_failures_before_delay,
        delay_max=config.logon_delay_max, lockout_failures=config.lockout_failures,
        lockout_time=config.lockout_time, queue_limit=config.password_check_queue,
        account_failure_limit=config.account_failure_limit,
        records_max=config.failure_records_max,
        rdp_failures_per_minute=config.rdp_failures_per_minute)


class _Every(Service):
    """Runs ``work`` every ``interval`` seconds of ``clock`` while running,
    and once at the start; a failure is logged and the next run comes as
    planned. (Twisted's TimerService does the same, but importing it
    brings twisted.application.internet and automat into every start.)"""

    log = Logger()

    def __init__(self, interval: float, work: Callable[[], object], clock: IReactorTime) -> None:
        self.interval = interval
        self.work = work
        self.clock = clock
        self._loop: LoopingCall | None = None
        self._done: Deferred[Any] | None = None

    def _run(self) -> Any:
        d = maybeDeferred(self.work)
        d.addErrback(lambda failure: self.log.failure("{work} failed", failure,
                                                      work=getattr(self.work, "__name__", "")))
        return d

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._run)
        self._loop.clock = self.clock
        self._done = self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        loop, done = self._loop, self._done
        self._loop = self._done = None
        if loop is not None and loop.running:
            loop.stop()
        return done if done is not None else succeed(None)


class BridgeService(MultiService):
    """icp-bridge: the ICP listener, the OTS API listener and their state.

    Attributes tests and tools may use: ``registry``, ``tokens``, ``link``
    (the RDP server link), ``lifecycle``, ``otsapi`` (the handler),
    ``icp_listener`` and ``thrift_listener`` (ListeningService, ``.port``
    once started).
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any | None = None,
                 authenticator: Authenticator | None = None, clock: Any | None = None,
                 exit_on_startup_error: bool = False,
                 launcher: BackendLauncher | None = None,
                 properties: MergedProperties | None = None, pam_checked: bool = False) -> None:
        """``clock`` (default: the reactor) times bridged calls, tokens and
        session times; tests pass a Clock. With ``exit_on_startup_error``
        (under twistd) a failure to start is one line and exit status 1, not
        a traceback. ``properties``: what load_properties(config) says, when
        the caller has read it already (twistd's makeService).
        ``pam_checked``: the caller's preflight found PAM usable (twistd's
        makeService), so it is not looked for again (each look runs
        ldconfig)."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if clock is None:
            clock = reactor
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.exit_on_startup_error = exit_on_startup_error
        try:
            merged = properties if properties is not None else load_properties(config)
        except OgonConfigError as e:
            raise StartupError(str(e)) from None
        self.properties = merged.table()
        #: Where the served properties came from (a reload compares with it).
        self.served_properties = merged
        report_properties(self.log, merged, self.properties, self.config.authenticator)
        self.channels = ChannelPolicy(self.properties, config.channels_allow,
                                      config.channels_deny)
        check_before_writing(config, reactor, pam=authenticator is None and not pam_checked)
        farm_secrets = read_farm_secrets(config)
        # One bridge per state directory (a second one would take this one's
        # sessions for a restart's); released when the service stops.
        self.state_lock = StateDirectoryLock.claim(config.state_dir)

        self.store = StateStore(state_database(config.state_dir))
        self.registry = SessionRegistry(clock, persister=self.store)
        self.tokens = TokenStore(clock)
        self.tokens.listener = self.store.token_changed
        self.token_files = SessionTokenFiles(config.token_dir, self.tokens)
        self.token_files.attach(self.registry)
        try:
            self._kept, self._dropped, live = restore(self.store, self.registry,
                                                      clock.seconds())
        except StateWriteError as e:
            raise StartupError(f"state database cannot be written: {e}") from None
        self.tokens.restore(live)
        self.thrift_description = with_backlog(self._thrift_endpoint(), config.listen_backlog)
        # tcp: and ssl: are served by protocols.listening (TLS by the ssl
        # module); other endpoint types by Twisted's endpoints.
        self.thrift_stream = parse_stream_endpoint(split_endpoint(self.thrift_description))
        if self.thrift_stream is None:
            validate_endpoint(reactor, self.thrift_description, "thrift_endpoint")
        # After the restore: its changes are journaled, not announced.
        self.events = EventHub(self.store, self.registry, clock)
        self.dbus = SessionNotifier(reactor, reactor, self.registry, config.dbus_address) \
            if config.dbus_address else None

        self.authenticator = authenticator or self._make_authenticator()
        self.operations = OperationsState(
            users=self.authenticator if isinstance(self.authenticator, UsersFileAuthenticator)
            else None)
        self._served_certificate()
        self.lockouts = LockoutStore(state_database(config.state_dir))
        self.guard = LogonGuard(self.authenticator, clock, throttle_policy(config),
                                self.lockouts)
        # Failed logons and lockouts: journal events of session 0, and counts.
        self.logon_events = LogonEvents(self.events)
        self.guard.observers.append(self.logon_events)
        # Real time, not ``clock``: readiness and stop timeouts wait on processes.
        self.launcher = launcher or BackendLauncher(
            reactor, reactor, config.pipe_dir,
            BackendLogs(reactor, reactor, backend_log_directory(config),
                        config.backend_log_max_per_session, config.backend_log_max_total),
            ledger=SpawnRecords(self.store), allow_root=config.allow_root_desktops,
            bin_dirs=tuple(config.ogon_bin_dirs))
        self.ogon_modules = OgonModules(reactor, self.launcher, OgonSettings(
            config.ogon_keeper_socket or config.state_dir / "launcher-keeper.sock",
            tuple(config.ogon_bin_dirs), config.ogon_module_dir))
        self.link = RdpServerLink(
            {}, clock, config.call_timeout, config.max_icp_frame, config.allowed_peer_uids,
            max_send_frame=config.max_icp_send, handshake_timeout=config.icp_handshake_timeout,
            max_pending=config.max_icp_pending, max_queued=config.max_icp_queued)
        self.lifecycle = SessionLifecycle(
            self.registry, self.link, self.guard, self.properties, config.modules,
            self.launcher, self.token_files, clock, config.call_timeout,
            peer=self._rdp_peer, ogon=self.ogon_modules)
        self.link.on_lost = self.lifecycle.rdp_server_lost
        handlers = RdpRequestHandlers(self.registry, self.lifecycle, self.properties,
                                      self.channels)
        self.link.handlers = handlers.table()
        # Logoff, disconnect and message: the OTS API's and the admin endpoint's.
        self.actions = SessionActions(self.lifecycle, self.link, clock)
        self.otsapi = OtsApiHandler(self.registry, self.tokens, self.link, self.guard,
                                    self.lifecycle, self.properties, self.channels,
                                    token_lifetime=config.token_lifetime,
                                    pam_levels=config.authenticator == "pam",
                                    actions=self.actions)
        lock_dir = config.lock_dir or default_lock_dir(config.state_dir)
        self.icp_listener = ListeningService("ICP (RDP server)", config.icp_endpoint,
                                             self.link, reactor, lock_dir)
        self.icp_listener.setServiceParent(self)
        self.thrift_limits = ConnectionLimits(
            max_connections=config.max_connections, frame_timeout=config.frame_timeout,
            first_call_timeout=config.first_call_timeout,
            tls_handshake_timeout=config.tls_handshake_timeout,
            idle_timeout=config.idle_timeout,
            max_calls_in_flight=config.max_calls_per_connection,
            max_pending_output=config.max_output_buffer, clock=clock)
        self.thrift_factory = ThriftServerFactory(otsapi, self.otsapi, config.max_thrift_frame,
                                                  self.thrift_limits)
        self.thrift_listener = ListeningService("OTS API", self.thrift_description,
                                                self.thrift_factory, reactor, lock_dir,
                                                stream=self.thrift_stream)
        self.accepting = Accepting(self.thrift_listener)
        self.thrift_factory.pause_accepting = lambda: self.accepting.handshakes_allow(False)
        self.thrift_factory.resume_accepting = lambda: self.accepting.handshakes_allow(True)

        self.thrift_listener.setServiceParent(self)
        self.workers = worker_pool(
            config.otsapi_workers, self.thrift_stream is not None, self.thrift_listener,
            self.thrift_factory, self.registry, self.tokens, self.store.token_changed, reactor,
            otsapi, keep=self, accepting=self.accepting, rdp=self.link, channels=self.channels)
        if self.workers is not None:
            self.workers.setServiceParent(self)
        self._every(TOKEN_SWEEP_INTERVAL, self._expire_tokens, clock)
        self._every(STATE_RETRY_INTERVAL, self._retry_writes, reactor)
        # Real time, not ``clock``: this is disk I/O, not protocol time.
        self._every(CHECKPOINT_INTERVAL, self._checkpoint, reactor)
        self._every(PRUNE_INTERVAL, self._prune_events, clock)
        self._every(FAILURE_EXPIRY_INTERVAL, self.guard.expire, clock)

        self.farm: FarmService | None = None
        if config.farm_database:
            self.farm = make_farm(config, farm_secrets, reactor, clock, self.store,
                                  self.registry, self.properties, self.actions)
            self.farm.setServiceParent(self)
            self.lifecycle.policies.before_logon = self.farm.single_session.before_logon
            self.guard.farm = self.farm.budget

        self.metrics = Metrics(self.registry, self.link, self.thrift_factory, self.store,
                               self.events, self.guard, self.launcher, self.dbus,
                               self.logon_events, self.workers)
        self.metrics.collectors.append(lambda: lazy.operations_collector(self))
        if self.farm is not None:
            self.metrics.collectors.append(lambda: lazy.farm_collector(self))
        self.admin_listener: ListeningService | None = None
        self.admin_events: EventsResource | None = None
        if config.admin_endpoint:
            # The site (twisted.web, prometheus-client) is built for the first
            # client: a start does not need it.
            # The OTS API's backlog too: Twisted's 50 drops a burst's SYNs.
            self.admin_listener = ListeningService(
                "admin (HTTP)", with_backlog(config.admin_endpoint, config.listen_backlog),
                LazyFactory(lambda: lazy.admin_site_factory(self)), reactor, lock_dir)
            self.admin_listener.setServiceParent(self)

    def reload_properties(self) -> bool:
        """Read ogon's config.ini again, as ogon does on SIGHUP, and serve
        what it says now, under the running configuration's TOML
        properties: the part of a reload the service can do alone (SIGHUP
        reads every source again, through bridge.reload). A file that cannot
        be used is logged with its file and line and the running properties
        stay (ogon would fall back to its defaults). Returns whether the new
        ones are served."""
        try:
            merged = load_properties(self.config)
        except OgonConfigError as e:
            self.log.error("{error}; keeping the running configuration", error=str(e))
            return False
        self.serve_properties(merged)
        return True

    def serve_properties(self, merged: MergedProperties) -> None:
        """Serve ``merged`` from the next lookup on (a reload). ogon's
        defaults and the TLS pair's default paths stay as started: they
        follow state_dir and the user the bridge runs as, which only a
        restart changes."""
        self.properties.replace(merged.global_values, merged.per_user)
        if self.workers is not None:  # their virtual channel checks read them too
            self.workers.policy_changed(properties=(merged.global_values, merged.per_user))
        self.served_properties = merged
        report_properties(self.log, merged, self.properties, self.config.authenticator)

    def _every(self, interval: float, work: Callable[[], object], clock: IReactorTime) -> None:
        """Run ``work`` every ``interval`` seconds of ``clock`` while the
        service runs (and once when it starts, as TimerService does)."""
        _Every(interval, work, clock).setServiceParent(self)

    def _thrift_endpoint(self) -> str:
        """The OTS API endpoint, completed with the ssl.certificate/ssl.key
        pair (generated when missing) when it is ssl: without its own."""
        description = self.config.thrift_endpoint
        if not uses_default_pair(description):
            return description
        certificate = Path(self.properties.get_string("ssl.certificate") or "")
        key = Path(self.properties.get_string("ssl.key") or "")
        ensure_pair(certificate, key)
        return with_certificate(description, certificate, key)

    def _served_certificate(self) -> None:
        """When the OTS API's certificate expires (for /metrics, /healthz)."""
        path = endpoint_certificate(self.thrift_description)
        not_after = certificate_not_after(path) if path is not None else None
        if path is not None and not_after is not None:
            self.operations.certificate_path = str(path)
            self.operations.certificate_not_after = not_after.timestamp()

    def _expire_tokens(self) -> Deferred[None] | None:
        """Drop expired tokens, once the workers have said which they used."""
        if self.workers is None:
            self.tokens.expire()
            return None
        return self.workers.sync().addCallback(lambda _: self.tokens.expire() and None)

    def _rdp_peer(self) -> RdpPeer:
        creds = self.link.credentials
        return RdpPeer(uid=creds.uid, pid=creds.pid) if creds is not None else RdpPeer()

    def _checkpoint(self) -> Deferred[None]:
        d = self._run_blocking(self.store.checkpoint)
        d.addErrback(lambda failure: self.log.failure("state database checkpoint failed",
                                                      failure))
        return d

    def _retry_writes(self) -> None:
        if self.registry.unwritten and self.registry.flush():
            self.events.poll()  # what waited for the disk is in the journal now
        self.tokens.flush()

    def _prune_events(self) -> None:
        try:
            removed = self.store.prune_events(
                self.clock.seconds() - self.config.events_keep, self.config.events_keep_count,
                keep_after=self.farm.prune_floor() if self.farm is not None else None)
        except StateWriteError as e:
            self.log.warn("event journal not pruned: {error}", error=str(e))
            return
        if removed:
            self.log.info("event journal: {count} events older than events_keep pruned",
                          count=removed)

    def _run_blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _make_authenticator(self) -> Authenticator:
        config = self.config
        if config.authenticator == "pam":
            properties = self.properties

            def level_of(username: str) -> int:
                return ogon_level(properties.get_string("permission.level", username))

            # PAM was found usable before anything was written (by
            # check_before_writing, or by the caller's preflight): python-pam
            # is handed in rather than looked for a third time.
            import pam  # type: ignore[import-not-found]

            authenticator = PamAuthenticator(level_of, run_blocking=self._run_blocking,
                                             pam_module=pam)
            if ogon_pam_service() == "ogon":
                self.log.info("PAM service ogon ({path})", path=str(PAM_DIR / "ogon"))
            else:
                self.log.warn("no {path}: PAM service gdm, as ogon's session manager asks for "
                              "then; install ogon's (or contrib/pam.d/ogon) for service ogon",
                              path=str(PAM_DIR / "ogon"))
            return authenticator
        if not config.users_file.exists():
            self.log.warn(
                "no users file at {path}: every logon goes to the greeter until users are "
                "added with `icp-bridge users add NAME --permission full|user|guest`",
                path=str(config.users_file),
            )
        users = UsersFileAuthenticator(config.users_file, run_blocking=self._run_blocking)
        users.users()  # read now: its bad entries and its owner and mode are said at startup
        return users

    def privilegedStartService(self) -> None:
        try:
            self._privileged_start()
        except StartupError as e:
            if not self.exit_on_startup_error:
                raise
            raise SystemExit(f"icp-bridge: {e}") from None

    def startService(self) -> None:
        try:
            if not self.running:
                self._check_directories()
                if self.thrift_limits.fd_limit is None:
                    self._fd_limits()
            super().startService()
        except StartupError as e:
            if not self.exit_on_startup_error:
                raise
            raise SystemExit(f"icp-bridge: {e}") from None
        if self.dbus is not None:
            self.dbus.start()
        if self.admin_events is not None:
            self.admin_events.start()
        self._announce_backend_logs()
        self.lifecycle.adopt(self._kept, self._dropped)
        for session in self._kept:
            if self.registry.get(session.session_id) is session:
                try:
                    self.token_files.ensure(session)
                except StateWriteError as e:
                    self.log.error("session {session_id}: token not stored: {error}",
                                   session_id=session.session_id, error=str(e))
        self._kept, self._dropped = [], []
        self.reactor.callWhenRunning(lazy.warm_up, self)
        # What startup built lives as long as the process: out of the
        # collector's way, so that collections during calls scan less.
        gc.freeze()

    def _check_directories(self) -> None:
        """The ICP socket's directory and the backends' pipe directory must
        not let another user swap what is in them (a swapped ICP socket
        would receive the next LogonUser, password included)."""
        path = unix_socket_path(self.config.icp_endpoint)
        if path is not None:
            check_directory(path.parent, "icp_endpoint", shared=path.parent == self.config.pipe_dir)
        check_directory(self.config.pipe_dir, "pipe_dir", shared=True)
        self.launcher.logs.prepare()

    def _announce_backend_logs(self) -> None:
        logs = self.launcher.logs
        shared = os.stat(logs.directory).st_dev == os.stat(self.config.state_dir).st_dev
        self.log.info("backends' output in {directory}, at most {per_session} bytes each and "
                      "{total} in all{shared}", directory=str(logs.directory),
                      per_session=logs.per_session, total=logs.total,
                      shared=" (on the state's filesystem: set backend_log_dir to another)"
                      if shared else "")

    def _fd_limits(self) -> None:
        """Raise the descriptor limit, and keep max_connections below it with
        a reserve for the RDP server, the state and the backends."""
        before, after = raise_fd_limit()
        limits = self.thrift_limits
        limits.fd_limit = after
        usable = max(16, after - limits.fd_reserve)
        if limits.max_connections > usable:
            self.log.warn("max_connections {wanted} lowered to {usable}: the descriptor limit "
                          "is {limit} (raise it with ulimit -Hn / LimitNOFILE=)",
                          wanted=limits.max_connections, usable=usable, limit=after)
            limits.max_connections = usable
        self.log.info("descriptor limit {before} -> {after}; at most {connections} OTS API "
                      "connections", before=before, after=after,
                      connections=limits.max_connections)

    def _privileged_start(self) -> None:
        self.log.info("icp-bridge starting (pid {pid}, {reactor}); state in {state_dir}, token "
                      "files in {token_dir}", pid=os.getpid(),
                      reactor=type(self.reactor).__name__,
                      state_dir=str(self.config.state_dir), token_dir=str(self.config.token_dir))
        self.state_lock.write_pid()  # twistd may have forked (daemonized) since
        self._fd_limits()
        self._check_directories()
        super().privilegedStartService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.lifecycle.shutdown()
        current = self.link.current
        if current is not None:
            # Let the RDP server's disconnect reach the registry (and the
            # database) before the database closes.
            closed = current.when_closed()
            current.close()
            await closed
        if self.admin_events is not None:
            self.admin_events.stop()
        if self.dbus is not None:
            self.dbus.stop()
        await super().stopService()
        self.store.close()
        self.lockouts.close()
        self.state_lock.release()
