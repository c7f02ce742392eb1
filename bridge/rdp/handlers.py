"""Answers to what the RDP server asks the bridge over ICP, and to the
greeter's SBP requests it forwards. Each handler checks, asks the session
lifecycle, and maps the answer."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from bridge.lifecycle.facade import SessionLifecycle
from bridge.sessions.model import ClientInfo
from bridge.sessions.properties import (
    ChannelPolicy,
    PropertyTable,
    as_int32,
    as_uint32,
    connection_values,
)
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpHandlerError
from protocols.generated import ICP_pb2, SBP_pb2


class RdpRequestHandlers:
    """The ICP handler table the bridge offers the RDP server. The types
    ogon's session manager answers, plus IsChannelAllowed and
    LogoffUserSession (ogon answers those NOTFOUND)."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, lifecycle: SessionLifecycle,
                 properties: PropertyTable, channels: ChannelPolicy) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.properties = properties
        self.channels = channels

    def table(self) -> dict[int, icp.Handler]:
        return {
            icp.MSG_IS_CHANNEL_ALLOWED: self.is_channel_allowed,
            icp.MSG_PING: self.ping,
            icp.MSG_DISCONNECT_USER_SESSION: self.disconnect_user_session,
            icp.MSG_LOGOFF_USER_SESSION: self.logoff_user_session,
            icp.MSG_LOGON_USER: self.logon_user,
            icp.MSG_PROPERTY_BOOL: self.property_bool,
            icp.MSG_PROPERTY_NUMBER: self.property_number,
            icp.MSG_PROPERTY_STRING: self.property_string,
            icp.MSG_PROPERTY_BULK: self.property_bulk,
            icp.MSG_REMOTE_CONTROL_ENDED: self.remote_control_ended,
            icp.MSG_SBP_AUTHENTICATE_USER: self.sbp_authenticate_user,
            icp.MSG_SBP_END_SESSION: self.sbp_end_session,
            icp.MSG_SBP_VERSION_INFO: self.sbp_version_info,
        }

    # -- simple questions ----------------------------------------------------

    def ping(self, request: ICP_pb2.PingRequest) -> ICP_pb2.PingResponse:
        return ICP_pb2.PingResponse(pong=True)

    def is_channel_allowed(
        self, request: ICP_pb2.IsChannelAllowedRequest
    ) -> ICP_pb2.IsChannelAllowedResponse:
        allowed = self.channels.allowed(request.channelName)
        if not allowed:
            self.log.info("channel {channel} refused by policy",
                          channel=request.channelName[:100])
        return ICP_pb2.IsChannelAllowedResponse(channelAllowed=allowed)

    # -- logon ----------------------------------------------------------------

    def logon_user(self, request: ICP_pb2.LogonUserRequest
                   ) -> Deferred[ICP_pb2.LogonUserResponse]:
        client = ClientInfo(
            host_name=request.clientHostName, address=request.clientAddress,
            build_number=request.clientBuildNumber, product_id=request.clientProductId,
            hardware_id=request.clientHardwareId, protocol_type=request.clientProtocolType,
            width=request.width, height=request.height, color_depth=request.colorDepth,
            initial_width=request.width, initial_height=request.height,
        )

        async def logon() -> ICP_pb2.LogonUserResponse:
            # The request holds the password; only the lifecycle sees it.
            answer = await self.lifecycle.logon_user(
                request.connectionId, request.username, request.password, request.domain,
                client)
            return ICP_pb2.LogonUserResponse(
                serviceEndpoint=answer.service_endpoint, maxWidth=answer.max_width,
                maxHeight=answer.max_height, backendCookie=answer.backend_cookie,
                ogonCookie=answer.ogon_cookie)

        return Deferred.fromCoroutine(logon())

    # -- sessions ending -------------------------------------------------------

    def _known_connection(self, connection_id: int) -> None:
        """ogon answers a request for a connection it does not know (or one
        without a session) FAILED, without a payload or a description."""
        if self.registry.by_connection(connection_id) is None:
            raise IcpHandlerError(f"no session on connection {connection_id}", on_wire=False)

    def disconnect_user_session(
        self, request: ICP_pb2.DisconnectUserSessionRequest
    ) -> ICP_pb2.DisconnectUserSessionResponse:
        self._known_connection(request.connectionId)
        return ICP_pb2.DisconnectUserSessionResponse(
            disconnected=self.lifecycle.client_disconnected(request.connectionId))

    def logoff_user_session(
        self, request: ICP_pb2.LogoffUserSessionRequest
    ) -> Deferred[ICP_pb2.LogoffUserSessionResponse]:
        async def logoff() -> ICP_pb2.LogoffUserSessionResponse:
            done = await self.lifecycle.client_logged_off(request.connectionId)
            return ICP_pb2.LogoffUserSessionResponse(loggedoff=done)

        return Deferred.fromCoroutine(logoff())

    def remote_control_ended(
        self, request: ICP_pb2.RemoteControlEndedRequest
    ) -> ICP_pb2.RemoteControlEndedResponse:
        self._known_connection(request.spyId)
        return ICP_pb2.RemoteControlEndedResponse(
            success=self.lifecycle.remote_control_ended(request.spyId))

    # -- SBP, forwarded from the greeter ------------------------------------

    def sbp_version_info(self, request: SBP_pb2.VersionInfoRequest
                         ) -> SBP_pb2.VersionInfoResponse:
        major, minor = self.lifecycle.sbp_version(request.sessionId, request.vmajor,
                                                  request.vminor)
        return SBP_pb2.VersionInfoResponse(vmajor=major, vminor=minor)

    def sbp_authenticate_user(self, request: SBP_pb2.AuthenticateUserRequest
                              ) -> Deferred[SBP_pb2.AuthenticateUserResponse]:
        async def authenticate() -> SBP_pb2.AuthenticateUserResponse:
            status = await self.lifecycle.authenticate_user(
                request.sessionId, request.username, request.password, request.domain)
            return SBP_pb2.AuthenticateUserResponse(authStatus=status)

        return Deferred.fromCoroutine(authenticate())

    def sbp_end_session(self, request: SBP_pb2.EndSessionRequest
                        ) -> Deferred[SBP_pb2.EndSessionResponse]:
        async def end() -> SBP_pb2.EndSessionResponse:
            return SBP_pb2.EndSessionResponse(
                success=await self.lifecycle.end_session_request(request.sessionId))

        return Deferred.fromCoroutine(end())

    # -- properties ----------------------------------------------------------

    def _lookup(self, connection_id: int, path: str, kind: type) -> object:
        """A property as the asking connection's session sees it: its user's
        overrides and its client's ``current.connection.*`` values."""
        session = self.registry.by_connection(connection_id)
        username = session.username if session is not None else ""
        connection = connection_values(session) if session is not None else None
        if kind is bool:
            return self.properties.get_bool(path, username, connection)
        if kind is int:
            return self.properties.get_number(path, username, connection)
        return self.properties.get_string(path, username, connection)

    def property_bool(self, request: ICP_pb2.PropertyBoolRequest) -> ICP_pb2.PropertyBoolResponse:
        value = self._lookup(request.connectionId, request.path, bool)
        return ICP_pb2.PropertyBoolResponse(value=bool(value), success=value is not None)

    def property_number(
        self, request: ICP_pb2.PropertyNumberRequest
    ) -> ICP_pb2.PropertyNumberResponse:
        value = self._lookup(request.connectionId, request.path, int)
        return ICP_pb2.PropertyNumberResponse(
            value=as_uint32(value) if isinstance(value, int) else 0, success=value is not None)

    def property_string(
        self, request: ICP_pb2.PropertyStringRequest
    ) -> ICP_pb2.PropertyStringResponse:
        value = self._lookup(request.connectionId, request.path, str)
        return ICP_pb2.PropertyStringResponse(value=value if isinstance(value, str) else "",
                                              success=value is not None)

    def property_bulk(self, request: ICP_pb2.PropertyBulkRequest) -> ICP_pb2.PropertyBulkResponse:
        response = ICP_pb2.PropertyBulkResponse()
        for wanted in request.properties:
            result = response.results.add(success=False)
            path = wanted.propertyPath
            if wanted.propertyType == ICP_pb2.PropertyReq.PROP_BOOL:
                flag = self._lookup(request.connectionId, path, bool)
                if isinstance(flag, bool):
                    result.success, result.boolValue = True, flag
            elif wanted.propertyType == ICP_pb2.PropertyReq.PROP_NUMBER:
                number = self._lookup(request.connectionId, path, int)
                if isinstance(number, int):
                    result.success, result.intValue = True, as_int32(number)
            else:
                text = self._lookup(request.connectionId, path, str)
                if isinstance(text, str):
                    result.success, result.stringValue = True, text
        return response
