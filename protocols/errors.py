"""Exceptions with which ICP calls fail, one class per cause.

Callers of :meth:`protocols.icp.IcpProtocol.call` tell a slow RDP server
(:class:`IcpTimeoutError`) from a refusing one (:class:`IcpRemoteError`,
:class:`IcpNotFoundError`) from a gone one (:class:`IcpDisconnectedError`,
:class:`IcpNotConnectedError`) by type alone.
"""

from __future__ import annotations


class IcpError(Exception):
    """Base class of every ICP call failure."""


class IcpTimeoutError(IcpError):
    """The peer did not answer within the call timeout."""

    def __init__(self, msg_type: int, timeout: float) -> None:
        super().__init__(f"no answer to msgType {msg_type} within {timeout:g} s")
        self.msg_type = msg_type
        self.timeout = timeout


class IcpRemoteError(IcpError):
    """The peer answered ``status = FAILED``; carries its errorDescription."""

    def __init__(self, msg_type: int, description: str) -> None:
        super().__init__(f"peer failed msgType {msg_type}: {description or '(no description)'}")
        self.msg_type = msg_type
        self.description = description


class IcpNotFoundError(IcpError):
    """The peer answered ``status = NOTFOUND``: it has no handler for the type."""

    def __init__(self, msg_type: int) -> None:
        super().__init__(f"peer does not handle msgType {msg_type}")
        self.msg_type = msg_type


class IcpDisconnectedError(IcpError):
    """The connection went away before the answer came, or had already gone."""


class IcpNotConnectedError(IcpError):
    """There is no connection ready to carry the call (none, or mid-handshake)."""


class IcpBackpressureError(IcpError):
    """The peer is not taking what is sent to it fast enough: too many calls
    wait for answers, or too many bytes for the socket. Not sent."""


class IcpFrameTooLargeError(IcpError):
    """A request the bridge would send is bigger than the peer reads reliably
    (see ``max_send_frame``); it was not sent."""


class IcpProtocolError(IcpError):
    """The peer broke the protocol: the reason a connection was dropped, or a
    malformed answer to one call."""


class IcpHandshakeTimeoutError(IcpProtocolError):
    """The peer connected but did not handshake in time."""


class IcpHandlerError(IcpError):
    """Raised by a request handler to answer ``FAILED`` with this description.

    Unlike any other exception from a handler, it is an expected refusal: it
    is logged without a traceback and its text goes on the wire, unless
    ``on_wire`` is false: then the answer carries no description, as ogon's
    session manager answers a request for a connection or session it does
    not know."""

    def __init__(self, description: str, on_wire: bool = True) -> None:
        super().__init__(description)
        self.on_wire = on_wire
