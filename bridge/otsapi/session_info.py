"""querySessionInformation's answers: the WTS_INFO_CLASS values the bridge
answers (WIRE.md section 3) from a session, as ogon's OTSApiHandler does,
and the wire forms they take (FILETIME, signed Thrift integers)."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from bridge.sessions.model import ConnectState, Session
from protocols.generated.otsapi_blocking.ttypes import TWTSINFO, TClientDisplay, TSessionInfoValue

_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601


class WtsInfoClass:
    """WTS_INFO_CLASS values the bridge answers (WIRE.md section 3)."""

    SESSION_ID = 4
    USER_NAME = 5
    WIN_STATION_NAME = 6
    DOMAIN_NAME = 7
    CONNECT_STATE = 8
    CLIENT_BUILD_NUMBER = 9
    CLIENT_NAME = 10
    CLIENT_PRODUCT_ID = 12
    CLIENT_HARDWARE_ID = 13
    CLIENT_ADDRESS = 14
    CLIENT_DISPLAY = 15
    CLIENT_PROTOCOL_TYPE = 16
    LOGON_TIME = 18
    SESSION_INFO = 24


def filetime(unix_seconds: float | None) -> int:
    """Windows FILETIME (100 ns ticks since 1601-01-01 UTC); 0 for never."""
    if unix_seconds is None:
        return 0
    return _FILETIME_UNIX_EPOCH + int(unix_seconds * 10_000_000)


def signed(value: int, bits: int) -> int:
    """A wire unsigned value in a Thrift signed field of the same width."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def session_info(session: Session, info_class: int | None, clock: IReactorTime
                 ) -> TSessionInfoValue | None:
    """What querySessionInformation answers for ``info_class`` (None: not
    available for this session)."""
    anonymous = session.state in (ConnectState.CONNECTED, ConnectState.INIT)
    c = WtsInfoClass
    if info_class == c.SESSION_ID:
        return TSessionInfoValue(int32Value=session.session_id)
    if info_class == c.USER_NAME:
        return TSessionInfoValue(stringValue="" if anonymous else session.username)
    if info_class == c.DOMAIN_NAME:
        return TSessionInfoValue(stringValue="" if anonymous else session.domain)
    if info_class == c.WIN_STATION_NAME:
        return TSessionInfoValue(stringValue=session.win_station_name)
    if info_class == c.CONNECT_STATE:
        return TSessionInfoValue(int32Value=int(session.state))
    if info_class == c.LOGON_TIME:
        return TSessionInfoValue(int64Value=filetime(session.logon_time))
    if info_class == c.SESSION_INFO:
        return TSessionInfoValue(WTSINFO=TWTSINFO(
            State=int(session.state), SessionId=session.session_id,
            IncomingBytes=0, OutgoingBytes=0, IncomingFrames=0, OutgoingFrames=0,
            IncomingCompressedBytes=0, OutgoingCompressedBytes=0,
            WinStationName=session.win_station_name,
            Domain="" if anonymous else session.domain,
            UserName="" if anonymous else session.username,
            ConnectTime=filetime(session.connect_time),
            DisconnectTime=filetime(session.disconnect_time),
            LastInputTime=0,
            LogonTime=filetime(session.logon_time),
            CurrentTime=filetime(clock.seconds()),
        ))
    if session.connection_id is None:
        return None  # client properties exist only while a client is attached
    client = session.client
    if info_class == c.CLIENT_BUILD_NUMBER:
        return TSessionInfoValue(int32Value=signed(client.build_number, 32))
    if info_class == c.CLIENT_NAME:
        return TSessionInfoValue(stringValue=client.host_name)
    if info_class == c.CLIENT_PRODUCT_ID:
        return TSessionInfoValue(int16Value=signed(client.product_id, 16))
    if info_class == c.CLIENT_HARDWARE_ID:
        return TSessionInfoValue(int32Value=signed(client.hardware_id, 32))
    if info_class == c.CLIENT_ADDRESS:
        return TSessionInfoValue(stringValue=client.address)
    if info_class == c.CLIENT_DISPLAY:
        return TSessionInfoValue(displayValue=TClientDisplay(
            displayWidth=signed(client.width, 32), displayHeight=signed(client.height, 32),
            colorDepth=signed(client.color_depth, 32)))
    if info_class == c.CLIENT_PROTOCOL_TYPE:
        return TSessionInfoValue(int16Value=signed(client.protocol_type, 16))
    return None
