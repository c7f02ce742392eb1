"""systemd's notification protocol, spoken directly: each state change is
one datagram of ``NAME=value`` lines to the UNIX socket ``NOTIFY_SOCKET``
names (``@`` at its start: an abstract address). A few lines, so no
library: libsystemd's python bindings need a C build, and
``sd_notify(3)`` documents the protocol as stable.

Type=notify units wait for ``READY=1``; around a reload the bridge sends
``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253 and later want it)
and ``READY=1`` again; ``STOPPING=1`` when it stops; ``WATCHDOG=1`` every
half ``WatchdogSec`` while the reactor turns (``WATCHDOG_USEC``), so that a
wedged reactor is restarted.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: What systemd hands the main process for notifications and the watchdog.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_address(value: str) -> str | None:
    """The socket address of a ``NOTIFY_SOCKET`` value: a path, or an
    abstract address for ``@name``; None for an empty or unsupported one
    (``vsock:``, which systemd uses only for virtual machines)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: MutableMapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between keep-alives: half of ``WATCHDOG_USEC``, when the
    watchdog is meant for this process (``WATCHDOG_PID``, if set, names it)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 2_000_000


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Tells systemd how the service is; does nothing outside systemd (no
    ``NOTIFY_SOCKET``). Sending never blocks: a datagram the socket would
    not take now is dropped with a log line."""

    log = Logger()

    def __init__(self, environ: MutableMapping[str, str] | None = None,
                 unset: bool = False) -> None:
        """Read ``environ`` (os.environ by default); with ``unset`` remove the
        variables from it, so that backends passed the bridge's environment
        (``environment.filter = "*"``) do not notify on its behalf."""
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = watchdog_interval(environ)
        if environ.get("NOTIFY_SOCKET") and self.address is None:
            self.log.warn("NOTIFY_SOCKET {value!r} is not a UNIX socket address; systemd "
                          "will not hear from the bridge", value=environ["NOTIFY_SOCKET"])
        if unset:
            for name in NOTIFY_VARIABLES:
                environ.pop(name, None)
        self._watchdog: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``NAME=value`` fields as one datagram; True if sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.connect(self.address)
                s.send(message)
        except OSError as e:
            self.log.warn("cannot notify systemd ({fields}): {error}", fields=" ".join(fields),
                          error=e.strerror or str(e))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                           "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def start_watchdog(self, clock: IReactorTime) -> None:
        """Keep-alives on ``clock`` (the reactor: when it stops turning, they
        stop, and systemd restarts the service)."""
        if self.address is None or self.watchdog_interval is None or self._watchdog:
            return
        self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_interval, now=True)
        self.log.info("systemd watchdog: a keep-alive every {seconds:g} s",
                      seconds=self.watchdog_interval)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
