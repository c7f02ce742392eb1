"""Authentication through PAM, as ogon's pam auth module does it: the
service it picks, python-pam over libpam in the password threads, a PAM
session for each desktop the bridge runs itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from bridge.security.auth import BlockingRunner, Identity, _run_here

#: Where ogon looks for its PAM service file.
PAM_DIR = Path("/etc/pam.d")


def ogon_pam_service(pam_dir: Path = PAM_DIR) -> str:
    """The PAM service ogon's pam module asks for (auth/pam/pam_auth.c,
    get_service_name, at each logon): ``ogon`` when ``/etc/pam.d/ogon``
    exists, else ``gdm``."""
    return "ogon" if (pam_dir / "ogon").exists() else "gdm"


def pam_unavailable() -> str | None:
    """Why ``authenticator = "pam"`` cannot work here (None: it can): no
    python-pam (a dependency: only after a --no-deps install or its removal)
    or no libpam to load. Startup, a reload and ``config check`` say alike."""
    import ctypes.util

    try:
        import pam  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return ("authenticator = 'pam' needs the python-pam package, a dependency of "
                "icp-bridge: reinstall icp-bridge with pip (or set authenticator = "
                "\"users-file\")")
    if ctypes.util.find_library("pam") is None:
        return ("authenticator = 'pam' needs libpam, which python-pam loads (Debian: "
                "apt-get install libpam0g)")
    return None


class PamAuthenticator:
    """Authenticates against PAM (python-pam, over libpam) with the
    service ogon's pam module uses (``service``, or else at each logon
    ``ogon`` when /etc/pam.d/ogon exists and ``gdm`` when not). The
    permission level comes from the ``permission.level`` property (per user
    or global; ogon's default is USER). With ``for_session`` the PAM handle
    stays open in the Identity so that a PAM session can be opened for the
    user's desktop."""

    log = Logger()

    def __init__(self, level_of: Callable[[str], int], service: str | None = None,
                 run_blocking: BlockingRunner = _run_here, pam_module: Any = None,
                 pam_dir: Path = PAM_DIR) -> None:
        if pam_module is None:
            problem = pam_unavailable()
            if problem is not None:
                raise RuntimeError(problem)
            import pam as pam_module
        self._pam = pam_module
        self._service = service
        self._pam_dir = pam_dir
        self._level_of = level_of
        self._run_blocking = run_blocking

    def warm(self) -> None:
        """Load libpam now (blocking: off the reactor). python-pam loads it
        with its first handle, finding the libraries with ldconfig: tens
        of milliseconds the first logon would otherwise wait."""
        self._pam.pam()

    def _check(self, username: str, password: str, keep: bool) -> Any:
        handle = self._pam.pam()
        service = self._service or ogon_pam_service(self._pam_dir)
        # python-pam's authenticate runs pam_acct_mgmt after pam_authenticate,
        # as ogon's pam_auth.c does: a locked or expired account fails here
        # (tests/e2e/test_accounts.py shows it with pam_unix).
        if handle.authenticate(username, password, service=service, call_end=not keep):
            return handle
        if keep:
            handle.end()
        return None

    def authenticate(self, username: str, password: str, domain: str,
                     for_session: bool = False) -> Deferred[Identity | None]:
        def checked(handle: Any) -> Identity | None:
            if handle is None:
                return None
            return Identity(username, domain, self._level_of(username),
                            pam=handle if for_session else None)

        return self._run_blocking(self._check, username, password, for_session).addCallback(
            checked)

    def open_session(self, identity: Identity) -> Deferred[Callable[[], Deferred[Any]] | None]:
        """Open a PAM session with the identity's handle; fires with a
        function that closes it (and ends the handle), or None when PAM
        would not open one (logged; the desktop still starts)."""
        handle = identity.pam
        if handle is None:
            return succeed(None)

        def opened(status: int) -> Callable[[], Deferred[Any]] | None:
            if status != 0:
                self.log.warn("PAM would not open a session for {username} (status "
                              "{status})", username=identity.username, status=status)
                return None
            return lambda: self._run_blocking(self._close, handle)

        return self._run_blocking(handle.open_session).addCallback(opened)

    @staticmethod
    def _close(handle: Any) -> None:
        try:
            handle.close_session()
        finally:
            handle.end()

    @staticmethod
    def release(identity: Identity) -> None:
        """End a kept handle that no PAM session will use."""
        if identity.pam is not None:
            identity.pam.end()
