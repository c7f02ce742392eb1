"""A session's backend from the lifecycle's side: which module it runs, what
it is started with, watching it, and what the RDP server is told to
connect to."""

from __future__ import annotations

from collections.abc import Callable

from bridge.backends.launcher import Backend, BackendLauncher
from bridge.backends.modules import BackendError, LaunchContext, Module, pipe_name
from bridge.lifecycle.runtime import LogonAnswer, RdpPeer, SessionRuntime
from bridge.sessions.model import Session
from bridge.sessions.properties import PropertyTable
from bridge.sessions.registry import SessionRegistry


class BackendRunner:
    """Starts a session's greeter or desktop through the launcher: the
    module by the ``auth.greeter`` / ``module`` properties, the launch
    context from the session, its client, ogon's ``environment.*``
    properties and the RDP server's uid and pid. Records and watches the
    backend a session runs (in ``runtime.backends``): when it exits,
    ``on_exit`` hears of it. Answers what LogonUser and SwitchTo send: the
    backend's pipe, the session's cookies and maximum size."""

    def __init__(self, registry: SessionRegistry, properties: PropertyTable,
                 modules: dict[str, Module], launcher: BackendLauncher,
                 runtime: SessionRuntime, on_exit: Callable[[Session, Backend, str], None],
                 peer: Callable[[], RdpPeer]) -> None:
        self.registry = registry
        self.properties = properties
        self.modules = modules
        self.launcher = launcher
        self.runtime = runtime
        self.on_exit = on_exit
        self.peer = peer

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

    def _module(self, session: Session, greeter: bool, typed_user: str = "") -> Module:
        if greeter:
            name = self.properties.string_or("auth.greeter", typed_user, "greeter")
        else:
            name = self.properties.string_or("module", session.username, "xsession")
        module = self.modules.get(name)
        if module is None:
            raise BackendError(f"module {name!r} is not configured (add [modules.{name}] "
                               f"to the configuration)")
        return module

    def _context(self, session: Session, typed_user: str = "", typed_domain: str = ""
                 ) -> LaunchContext:
        user = session.username
        max_width, max_height = self.max_size(user)
        add = []
        for item in self.properties.split_list("environment.add", user):
            name, sep, value = item.partition(":")
            if sep and name:
                add.append((name, value))
        peer = self.peer()
        return LaunchContext(
            session_id=session.session_id, username=user, domain=session.domain,
            width=session.client.width, height=session.client.height,
            bpp=session.client.color_depth, max_width=max_width, max_height=max_height,
            client_name=session.client.host_name, client_address=session.client.address,
            backend_cookie=session.backend_cookie, ogon_cookie=session.ogon_cookie,
            rdp_server_uid=peer.uid, rdp_server_pid=peer.pid,
            typed_user=typed_user, typed_domain=typed_domain,
            environment_add=tuple(add),
            environment_pass=tuple(self.properties.split_list("environment.filter", user)),
        )

    async def start(self, session: Session, greeter: bool, typed_user: str = "",
                    typed_domain: str = "") -> Backend:
        """Start the session's greeter or desktop and wait until the backend
        has made its socket. Raises BackendError (logged by the caller)."""
        module = self._module(session, greeter, typed_user)
        return await self.launcher.start(module, self._context(session, typed_user,
                                                               typed_domain))

    def watch(self, session: Session, backend: Backend) -> None:
        """A backend that exits ends its session (if it still runs that backend)."""
        backends = self.runtime.backends
        backends[session.session_id] = backend

        def exited(how: str) -> None:
            if backends.get(session.session_id) is not backend:
                return
            del backends[session.session_id]
            self.on_exit(session, backend, how)

        backend.when_exited().addCallback(exited)

    def record(self, session: Session, backend: Backend) -> None:
        """Store the running backend with the session; raises StateWriteError."""
        self.registry.set_backend(session, backend.record)
        self.watch(session, backend)
