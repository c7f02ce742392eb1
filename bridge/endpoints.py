"""Listening on endpoint strings, with the care a UNIX socket path needs."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.fdesc import setNonBlocking
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protocols.endpoint_strings import StreamListenSpec, split_endpoint
from protocols.listening import bind_listening_socket, listen_stream

__all__ = ["split_endpoint"]  # re-exported: callers have always found it here


class StartupError(Exception):
    """The service cannot start; the text is one line for the operator."""


def move_aside(path: Path, tries: int = 3) -> Path:
    """Rename what stands at ``path`` (a directory someone filled, which not
    even root may remove with one call) to a hidden name beside it that no
    one can guess, so that it cannot be made to fail by planting at the name
    first. Returns the new name; raises OSError when every try failed."""
    error: OSError | None = None
    for _ in range(tries):
        aside = path.with_name(f".{path.name}.aside-{secrets.token_hex(8)}")
        try:
            os.rename(path, aside)
        except FileExistsError as e:
            error = e
            continue
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            error = e
            continue
        return aside
    assert error is not None
    raise error


def unix_socket_path(description: str) -> Path | None:
    """The socket path of a ``unix:`` server endpoint string, else None."""
    parts = split_endpoint(description)
    if parts[0] != "unix":
        return None
    for part in parts[1:]:
        if part.startswith("address="):
            return Path(part[len("address="):])
    for part in parts[1:]:
        if "=" not in part:
            return Path(part)
    return None


def lock_file_for(path: Path, lock_dir: Path) -> Path:
    """Where the liveness lock of the socket at ``path`` lives: in
    ``lock_dir``, named after the socket's whole path as systemd escapes
    paths (``/tmp/.pipe/ogon_SessionManager`` ->
    ``tmp-.pipe-ogon_SessionManager.lock``), so that sockets of the same
    name in different directories do not share a lock."""
    raw = os.fsencode(str(path)).strip(b"/")
    out = []
    for n, byte in enumerate(raw):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in "_:" or (char == "." and n):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    name = "".join(out) or "-"
    if len(name) > 200:  # NAME_MAX is 255
        name = name[:150] + "-" + hashlib.sha256(raw).hexdigest()[:16]
    return lock_dir / f"{name}.lock"


def check_lock_dir(lock_dir: Path) -> None:
    """Create the lock directory (0755), or refuse one that anyone but root
    and the bridge's user could write to: a lock there could be planted."""
    try:
        info = lock_dir.lstat()
    except FileNotFoundError:
        try:
            lock_dir.mkdir(parents=True, mode=0o755)
            # mkdir's mode is cut by the umask; readable by all, as /run's are.
            os.chmod(lock_dir, 0o755)  # noqa: S103
        except FileExistsError:
            info = lock_dir.lstat()
        except OSError as e:
            raise StartupError(f"lock_dir: cannot create directory {lock_dir}: "
                               f"{e.strerror or e}") from None
        else:
            return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"lock_dir: {lock_dir} is not a directory; remove it")
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        raise StartupError(f"lock_dir: directory {lock_dir} (uid {info.st_uid}, mode "
                           f"{stat.S_IMODE(info.st_mode):04o}) may be written by others, who "
                           f"could plant the bridge's lock; make it root's and chmod 755")


def claim_unix_socket(path: Path, lock_dir: Path) -> int:
    """Take the socket path for this process: an flock on its lock file in
    ``lock_dir`` (held until the returned descriptor closes, which the
    kernel does when the process dies, however it dies), then clear the
    path (see take_back_socket_path).

    Liveness is decided by the lock and by connecting, never by a pid: a
    pid left by a kill -9 may be unreaped, or reused by another program.
    The lock lives apart from the socket: the socket's directory is
    world-writable (/tmp/.pipe), and a lock another user made or holds
    there would stop the bridge.
    """
    check_lock_dir(lock_dir)
    lock_path = lock_file_for(path, lock_dir)
    fd = open_lock_file(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another icp-bridge is listening on {path} (it holds "
                           f"{lock_path})") from None
    try:
        take_back_socket_path(path)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def open_lock_file(lock_path: Path) -> int:
    """The lock file, opened without following links; one that root or the
    bridge's user did not make is replaced, not deferred to."""
    log = Logger(namespace="bridge.endpoints")
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise StartupError(f"cannot open lock file {lock_path}: {e.strerror}") from None
            lock_path.unlink()  # a symlink: Twisted's own pid lock, or planted
            continue
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid in (0, os.geteuid()):
            return fd
        os.close(fd)
        log.error("lock file {lock} belongs to uid {owner_uid}, not to root or the bridge's "
                  "user: removing it and taking the lock", lock=str(lock_path),
                  owner_uid=info.st_uid)
        os.unlink(lock_path)
        flags |= os.O_EXCL
    raise StartupError(f"cannot take lock file {lock_path}: something keeps replacing it")


def take_back_socket_path(path: Path) -> None:
    """Clear ``path`` for the bridge's socket.

    Anything another user put there (a socket listening for the RDP
    server's LogonUser, a plain file, a directory) is taken back: removed,
    and logged loudly with its owner's uid. The bridge runs as root in the
    sticky /tmp/.pipe, where only root may remove another's file. What
    root or the bridge's own user left is a stale socket (removed) or a
    live one: another session manager, which the bridge does not displace.
    """
    log = Logger(namespace="bridge.endpoints")
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if info.st_uid not in (0, os.geteuid()):
        kind = _file_kind(info.st_mode)
        try:
            if stat.S_ISDIR(info.st_mode):
                move_aside(path)
            else:
                os.unlink(path)
        except OSError as e:
            raise StartupError(f"{path} is a {kind} of uid {info.st_uid}, which the bridge's "
                               f"user cannot remove ({e.strerror}); remove it as root") from None
        log.error("{path} was taken by uid {squatter_uid}: a {kind} of another user at the "
                  "ICP socket's path (while the bridge was down the RDP server may have "
                  "connected to it and sent it logons, passwords included); removed, the "
                  "bridge listens there again", path=str(path), squatter_uid=info.st_uid,
                  kind=kind)
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check socket {path}: {e.strerror}") from None
    else:
        raise StartupError(f"another process is listening on {path} (another session "
                           f"manager?)")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("removed stale socket {path}", path=str(path))


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISREG, "file")):
        if test(mode):
            return kind
    return "special file"


def without_twisted_lock(description: str) -> str:
    """A unix: endpoint string with Twisted's own pid lock turned off: the
    bridge holds an flock on the same ``<path>.lock`` instead."""
    parts = split_endpoint(description)
    if parts[0] != "unix":
        return description
    kept = [part for part in description.split(":") if not part.startswith("lockfile=")]
    return ":".join([*kept, "lockfile=0"])


def with_backlog(description: str, backlog: int) -> str:
    """A tcp:/ssl: endpoint string with ``backlog=`` added when it has none.
    Twisted's default of 50 drops the SYNs of a connection storm (10,000
    clients after a restart waited out 1, 3, 7 s retries); the kernel clamps
    the value to net.core.somaxconn."""
    parts = split_endpoint(description)
    if parts[0] not in ("tcp", "ssl", "tcp6"):
        return description
    if any(part.startswith("backlog=") for part in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft, soft
    return soft, hard


def check_directory(path: Path, option: str, shared: bool) -> None:
    """Create ``path``, or refuse one another user could tamper with.

    A directory is safe when root or the bridge's own user owns it and no
    one else may write to it, or only with the sticky bit set (as winpr
    makes /tmp/.pipe: then no one may remove or rename another's socket).
    Made here it is owned by the bridge's user: mode 1777 when ``shared``
    and the bridge runs as root (backends of other users create their
    endpoints in it, as with winpr), else 0755.
    """
    euid = os.geteuid()
    try:
        info = path.lstat()
    except FileNotFoundError:
        mode = 0o1777 if shared and euid == 0 else 0o755
        try:
            path.mkdir(parents=True, mode=0o755)
            os.chmod(path, mode)  # mkdir's mode is cut by the umask
        except FileExistsError:
            info = path.lstat()
        except OSError as e:
            raise StartupError(f"{option}: cannot create directory {path}: "
                               f"{e.strerror or e}") from None
        else:
            return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{option}: {path} is not a directory (a symlink or file is in the "
                           f"way); remove it")
    if info.st_uid not in (0, euid):
        raise StartupError(f"{option}: directory {path} belongs to uid {info.st_uid}, who could "
                           f"swap the sockets in it; remove it or make it root's")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise StartupError(f"{option}: directory {path} is writable by others without the "
                           f"sticky bit (mode {stat.S_IMODE(info.st_mode):04o}); chmod o-w,g-w "
                           f"or +t it")


def from_systemd(description: str) -> bool:
    """Whether the endpoint string names a socket systemd hands over."""
    return split_endpoint(description)[0] == "systemd"


def validate_endpoint(reactor: Any, description: str, option: str) -> None:
    """Parse an endpoint string now (it reads TLS certificate files), so a
    mistake stops startup with one line naming the option."""
    try:
        serverFromString(reactor, description)
    except (KeyError, IndexError) as e:
        if not from_systemd(description):
            raise StartupError(f"{option}: bad endpoint {description!r}: {e}") from None
        names = os.environ.get("LISTEN_FDNAMES", "")
        raise StartupError(
            f"{option}: systemd handed over no socket {e} for {description!r} (LISTEN_FDS="
            f"{os.environ.get('LISTEN_FDS', '')!r}, LISTEN_FDNAMES={names!r}); start the "
            f"bridge through its .socket unit, or give another endpoint") from None
    except Exception as e:
        raise StartupError(f"{option}: bad endpoint {description!r}: {e}") from None


class _HandedUnixPort(unix.Port):
    """A listening UNIX socket systemd handed over. Its socket unit owns the
    path and the mode (``SocketMode=0600``): Twisted's adopted Port would
    chmod it to 0666 and remove the path when it stops listening (systemd's
    socket would be left without a name for the next start). This one does
    neither."""

    def startListening(self) -> None:
        path = self._bindPath
        if isinstance(path, str | bytes) and path and path[:1] not in ("\0", b"\0"):
            # Twisted chmods the path to self.mode: make that its own mode.
            self.mode = stat.S_IMODE(os.stat(path).st_mode)
        super().startListening()

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's, which removes the path


@implementer(IStreamServerEndpoint)
class _HandedUnixEndpoint:
    """Listens on a UNIX socket descriptor systemd handed over, as a
    ``_HandedUnixPort``; the inherited descriptor is closed (the port has
    its own copy)."""

    def __init__(self, reactor: Any, fileno: int) -> None:
        self.reactor = reactor
        self.fileno = fileno

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        try:
            setNonBlocking(self.fileno)
            port = _HandedUnixPort._fromListeningDescriptor(self.reactor, self.fileno, factory)
            port.startListening()
            os.close(self.fileno)
        except BaseException:
            return fail()
        return succeed(port)


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """``serverFromString``, but a UNIX socket systemd hands over keeps its
    path and mode (``_HandedUnixPort``)."""
    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, AdoptedStreamServerEndpoint) and \
            endpoint.addressFamily == socket.AF_UNIX:
        return _HandedUnixEndpoint(reactor, endpoint.fileno)
    return endpoint


def _address_in_use(result: Any) -> bool:
    error = getattr(getattr(result, "value", None), "socketError", None)
    return isinstance(result, Failure) and getattr(error, "errno", None) == errno.EADDRINUSE


class LazyFactory(Factory):
    """A factory that builds the real one (``build()``) for its first
    connection: what it needs is imported then, not at startup."""

    noisy = False

    def __init__(self, build: Callable[[], Factory]) -> None:
        self.build = build
        self.factory: Factory | None = None
        self._started = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.factory is None:
            self.factory = self.build()
            if self._started:
                self.factory.doStart()
        return self.factory.buildProtocol(addr)

    def startFactory(self) -> None:
        self._started = True
        if self.factory is not None:
            self.factory.doStart()

    def stopFactory(self) -> None:
        self._started = False
        if self.factory is not None:
            self.factory.doStop()


def describe_port(port: IListeningPort) -> str:
    address = port.getHost()
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return f"{address.type.lower()}:{address.host}:{address.port}"


class ListeningService(Service):
    """Listens on an endpoint string while running; ``port`` is the
    listening port once started (tests read bound addresses from it).
    Binding happens in privilegedStartService, so twistd can bind before
    dropping privileges, and a failure stops startup."""

    log = Logger()

    def __init__(self, what: str, description: str, factory: Factory, reactor: Any,
                 lock_dir: Path | None = None, stream: StreamListenSpec | None = None) -> None:
        """``lock_dir`` holds the liveness lock of a ``unix:`` endpoint
        (default: the socket's own directory, for tools and tests).
        ``stream``: serve this tcp:/ssl: endpoint on protocols.listening's
        StreamPort (TLS by the ssl module) instead of Twisted's endpoint."""
        self.what = what
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.lock_dir = lock_dir
        self.stream = stream
        self.port: IListeningPort | None = None
        # The bound socket of a stream listener (shared with worker processes)
        # and its TLS context.
        self.socket: socket.socket | None = None
        self.context: ssl.SSLContext | None = None
        self._lock_fd: int | None = None

    def privilegedStartService(self) -> None:
        if self.port is None:
            self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        super().startService()

    def _listen(self) -> None:
        if self.stream is not None:
            self._listen_stream(self.stream)
            return
        path = unix_socket_path(self.description)
        description = self.description
        if path is not None:
            self._lock_fd = claim_unix_socket(path, self.lock_dir or path.parent)
            description = without_twisted_lock(description)
        # A socket systemd hands over is the socket unit's: no lock, no
        # stale-socket check, no unlink (systemd made it and keeps it).
        try:
            endpoint = server_endpoint(self.reactor, description)
        except BaseException:
            self._unlock()
            raise
        result = self._listen_once(endpoint)
        # Another user may bind the path again between taking it back and
        # the bind: take it back again, a few times, then give up loudly.
        for _ in range(3):
            if path is None or not _address_in_use(result):
                break
            try:
                take_back_socket_path(path)
            except BaseException:
                self._unlock()
                raise
            result = self._listen_once(endpoint)
        if isinstance(result, Failure):
            self._unlock()
            raise StartupError(
                f"{self.what}: cannot listen on {self.description}: {result.getErrorMessage()}"
            )
        self.port = result
        address = describe_port(result)
        if split_endpoint(self.description)[0] == "ssl":
            address = address.replace("tcp:", "tls:", 1)
        if from_systemd(self.description):
            self.log.info("{what} listening on {address} (socket handed over by systemd: "
                          "{description})", what=self.what, address=address,
                          description=self.description)
            return
        self.log.info("{what} listening on {address}", what=self.what, address=address)

    def _listen_once(self, endpoint: Any) -> Any:
        outcome: list[Any] = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            self._unlock()
            raise StartupError(f"{self.what}: listening on {self.description} did not complete")
        return outcome[0]

    def _listen_stream(self, spec: StreamListenSpec) -> None:
        try:
            context = spec.context()
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"{self.what}: cannot use the TLS certificate and key of "
                               f"{self.description}: {e}") from None
        try:
            self.socket = bind_listening_socket(spec)
        except OSError as e:
            raise StartupError(f"{self.what}: cannot listen on {self.description}: "
                               f"{e.strerror or e}") from None
        self.context = context
        self.port = listen_stream(self.reactor, self.socket, self.factory, context)
        host = self.socket.getsockname()
        self.log.info("{what} listening on {address}", what=self.what,
                      address=f"{'tls' if spec.tls else 'tcp'}:{host[0]}:{host[1]}")

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            self._unlock()
            return maybeDeferred(lambda: None)
        return maybeDeferred(port.stopListening).addBoth(self._after_stop)

    def _after_stop(self, result: Any) -> Any:
        self._unlock()
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        return result
