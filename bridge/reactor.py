"""The bridge's reactor: Twisted's epoll reactor, dispatching I/O events
without the legacy per-event logging context.

For every ready descriptor ``EPollReactor.doPoll`` calls the read or write
through ``twisted.python.log.callWithLogger``: it asks the transport for its
log prefix, copies the legacy log context, pushes it on a thread-local stack
and pops it afterwards. That context only fills the ``[system]`` column of
messages sent through the legacy ``twisted.python.log`` API; the bridge logs
through ``twisted.logger``, which does not read it. Under load it cost about
6% of the bridge's CPU per OTS API call (bench/README.md), one event per
call. This reactor dispatches directly; the few legacy messages Twisted
itself logs from inside a read or write show ``-`` as their system.

``twistd -n icp-bridge`` installs it unless ``--reactor`` chose another.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger


class BridgeReactor(EPollReactor):
    """EPollReactor with a leaner event dispatch; everything else is
    Twisted's (``_doReadOrWrite`` still logs a failing read or write and
    disconnects that one transport)."""

    _dispatch_log = Logger()

    def doPoll(self, timeout: float | None) -> None:
        try:
            # As many events as descriptors we watch, as EPollReactor does.
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                dispatch(selectable, fd, event)
            except Exception:
                # What callWithLogger would have done: log it and go on with
                # the other descriptors of this poll.
                self._dispatch_log.failure("unhandled error dispatching I/O on {selectable}",
                                           selectable=selectable)

    doIteration = doPoll


def install() -> Any:
    """Install BridgeReactor as the global reactor; returns it."""
    from twisted.internet.main import installReactor

    reactor = BridgeReactor()
    installReactor(reactor)
    return reactor


def install_unless_chosen() -> None:
    """Install BridgeReactor unless a reactor is installed already (by
    ``twistd --reactor=...`` or by anything that imported the default)."""
    if "twisted.internet.reactor" not in sys.modules:
        install()
