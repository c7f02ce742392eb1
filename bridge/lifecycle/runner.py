"""A session's backend from the lifecycle's side: which module it runs, what
it is started with, watching it, and what the RDP server is told to
connect to."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import (
    BackendError,
    LaunchContext,
    Module,
    SessionBackend,
    pipe_name,
)
from bridge.backends.ogon.kinds import OgonModules
from bridge.backends.ogon.properties import KindChoice, PropertyLookup, PropertyValue
from bridge.lifecycle.runtime import LogonAnswer, RdpPeer, SessionRuntime
from bridge.sessions.model import BackendRecord, Session
from bridge.sessions.properties import PropertyTable, connection_values
from bridge.sessions.registry import SessionRegistry


class BackendRunner:
    """Starts a session's greeter or desktop: the config name by the
    ``auth.greeter`` / ``module`` properties, then a ``[modules.NAME]``
    command module of that name if the configuration has one, else ogon's
    module kind that ``module.NAME.modulename`` selects (X11, Qt, Weston;
    by the bridge itself or through ogon-backend-launcher). The launch
    context comes from the session, its client, ogon's ``environment.*``
    properties and the RDP server's uid and pid. Records and watches the
    backend a session runs (in ``runtime.backends``): when it exits,
    ``on_exit`` hears of it. Answers what LogonUser and SwitchTo send: the
    backend's pipe, the session's cookies and maximum size."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, properties: PropertyTable,
                 modules: dict[str, Module], launcher: BackendLauncher,
                 runtime: SessionRuntime,
                 on_exit: Callable[[Session, SessionBackend, str], None],
                 peer: Callable[[], RdpPeer], ogon: OgonModules | None = None) -> None:
        self.registry = registry
        self.properties = properties
        self.modules = modules
        self.launcher = launcher
        self.runtime = runtime
        self.on_exit = on_exit
        self.peer = peer
        self.ogon = ogon

    def max_size(self, username: str) -> tuple[int, int]:
        return (max(0, self.properties.number_or("session.maxXRes", username, 0)),
                max(0, self.properties.number_or("session.maxYRes", username, 0)))

    def answer_for(self, session: Session, username: str | None = None) -> LogonAnswer:
        """What LogonUser or SwitchTo sends for the session: the maximum size
        is that of ``username`` (default: the session's user)."""
        max_width, max_height = self.max_size(session.username if username is None
                                              else username)
        endpoint = session.backend.endpoint if session.backend is not None else ""
        return LogonAnswer(pipe_name(endpoint), max_width, max_height,
                           session.backend_cookie, session.ogon_cookie)

    # -- which module ------------------------------------------------------------------

    def lookup_for(self, session: Session) -> PropertyLookup:
        """Properties as ogon's modules get them, by session id: that
        session's user (``session`` itself while its user is not in the
        registry yet, as during a greeter login) and its client."""
        def lookup(session_id: int, path: str) -> PropertyValue | None:
            current = self.registry.get(session_id)
            if session_id == session.session_id and (current is None or not current.username):
                current = session
            if current is None:
                return None
            return self.properties.get(path, current.username, connection_values(current))

        return lookup

    def _global(self, path: str) -> PropertyValue | None:
        return self.properties.get(path, "")

    def config_name(self, session: Session, greeter: bool, typed_user: str = "") -> str:
        if greeter:
            return self.properties.string_or("auth.greeter", typed_user, "greeter")
        return self.properties.string_or("module", session.username, "xsession")

    def _choose(self, session: Session, greeter: bool, typed_user: str = ""
                ) -> Module | KindChoice:
        """The command module of that name, else ogon's kind. Raises BackendError."""
        name = self.config_name(session, greeter, typed_user)
        module = self.modules.get(name)
        if module is not None:
            return module
        lookup = self.lookup_for(session)
        if self.ogon is not None and self.ogon.selects(lookup, session.session_id, name):
            return self.ogon.choose(lookup, self._global, session.session_id, name)
        raise BackendError(f"module {name!r} is not configured (add [modules.{name}] or "
                           f"module.{name}.modulename to the configuration)")

    def runs_own_pam_session(self, session: Session) -> bool:
        """Whether the desktop's module opens its own PAM session: ogon's
        launcher does (service ogon) for the user's module."""
        try:
            choice = self._choose(session, greeter=False)
        except BackendError:
            return False
        return isinstance(choice, KindChoice) and choice.use_launcher

    # -- starting and watching ---------------------------------------------------------------

    def _context(self, session: Session, typed_user: str = "", typed_domain: str = ""
                 ) -> LaunchContext:
        user = session.username
        max_width, max_height = self.max_size(user)
        peer = self.peer()
        return LaunchContext(
            session_id=session.session_id, username=user, domain=session.domain,
            width=session.client.width, height=session.client.height,
            bpp=session.client.color_depth, max_width=max_width, max_height=max_height,
            client_name=session.client.host_name, client_address=session.client.address,
            backend_cookie=session.backend_cookie, ogon_cookie=session.ogon_cookie,
            rdp_server_uid=peer.uid, rdp_server_pid=peer.pid,
            typed_user=typed_user, typed_domain=typed_domain,
            environment_filter=self.properties.string_or("environment.filter", user, ""),
            environment_add_text=self.properties.string_or("environment.add", user, ""),
        )

    async def start(self, session: Session, greeter: bool, typed_user: str = "",
                    typed_domain: str = "") -> SessionBackend:
        """Start the session's greeter or desktop and wait until the backend
        has made its socket. Raises BackendError (logged by the caller)."""
        choice = self._choose(session, greeter, typed_user)
        context = self._context(session, typed_user, typed_domain)
        if isinstance(choice, Module):
            return await self.launcher.start(choice, context)
        assert self.ogon is not None
        return await self.ogon.start(choice, context, self.lookup_for(session))

    def watch(self, session: Session, backend: SessionBackend) -> None:
        """A backend that exits ends its session (if it still runs that backend)."""
        backends = self.runtime.backends
        backends[session.session_id] = backend
        if hasattr(backend, "record_changed"):
            backend.record_changed = lambda: self._record_changed(session, backend)

        def exited(how: str) -> None:
            if backends.get(session.session_id) is not backend:
                return
            del backends[session.session_id]
            self.on_exit(session, backend, how)

        backend.when_exited().addCallback(exited)

    def _record_changed(self, session: Session, backend: SessionBackend) -> None:
        """A running backend started another process (startvc): stored, so
        that a restarted bridge stops it too."""
        if self.registry.get(session.session_id) is session \
                and self.runtime.backends.get(session.session_id) is backend:
            self.registry.note(session, "backend processes changed",
                               lambda s: setattr(s, "backend", backend.record))

    def record(self, session: Session, backend: SessionBackend) -> None:
        """Store the running backend with the session; raises StateWriteError."""
        self.registry.set_backend(session, backend.record)
        self.watch(session, backend)

    # -- after a restart --------------------------------------------------------------------

    async def adopt(self, session: Session) -> SessionBackend | None:
        """The backend a previous run recorded for the session, watched
        again; None when it is gone (or its module is no longer known)."""
        record = session.backend
        if record is None:
            return None
        if not record.kind or record.module in self.modules:
            module = self.modules.get(record.module)
            if module is None:
                # Removed from the configuration (or unreadable in the row):
                # the running desktop is still the user's, not an orphan.
                module = Module(name=record.module, command=(), endpoint=record.endpoint)
                self.log.warn("session {session_id}: module {module} is not configured any "
                              "more; its backend is adopted as it runs",
                              session_id=session.session_id, module=record.module)
            return self.launcher.adopt(session.session_id, module, record)
        if self.ogon is None:
            return None
        return await self.ogon.adopt(record, self._context(session), self.lookup_for(session))



def kill_recorded(launcher: BackendLauncher, record: BackendRecord, session_id: int,
                  why: str, stop_timeout: float = 5.0) -> None:
    """Stop every process recorded for a session that is gone, its other
    processes too (ogon's X11 module: the window manager), each only while
    it is still the process recorded."""
    launcher.kill_orphan(record, stop_timeout, session_id, why)
    for process in record.processes:
        launcher.kill_orphan(BackendRecord(record.module, process.pid, process.start_ticks, "",
                                           process.log_path), stop_timeout, session_id, why)
