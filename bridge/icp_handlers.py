"""Answers to what the RDP server asks the bridge over ICP."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from bridge.auth import Authenticator, Identity
from bridge.config import Config, PropertyValue
from bridge.sessions import ClientInfo, Session, SessionRegistry
from protocols import icp
from protocols.generated import ICP_pb2

_UINT32_MAX = 0xFFFFFFFF
_INT32_RANGE = range(-(2**31), 2**31)


class PropertyTable:
    """Configured properties, with per-user overrides (``user_properties``)."""

    def __init__(self, config: Config) -> None:
        self._global = config.properties
        self._per_user = config.user_properties

    def get(self, path: str, username: str = "") -> PropertyValue | None:
        user_table = self._per_user.get(username) if username else None
        if user_table is not None and path in user_table:
            return user_table[path]
        return self._global.get(path)

    def get_bool(self, path: str, username: str) -> bool | None:
        value = self.get(path, username)
        return value if isinstance(value, bool) else None

    def get_number(self, path: str, username: str, valid: range | None = None) -> int | None:
        value = self.get(path, username)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        if valid is not None and value not in valid:
            return None
        return value

    def get_string(self, path: str, username: str) -> str | None:
        value = self.get(path, username)
        return value if isinstance(value, str) else None


class ChannelPolicy:
    """IsChannelAllowed: deny list first, then the allow list if one is set.
    RDP channel names compare case-insensitively."""

    def __init__(self, allow: list[str], deny: list[str]) -> None:
        self._allow = {name.lower() for name in allow}
        self._deny = {name.lower() for name in deny}

    def allowed(self, name: str) -> bool:
        key = name.lower()
        if key in self._deny:
            return False
        return not self._allow or key in self._allow


class RdpRequestHandlers:
    """The ICP handler table the bridge offers the RDP server."""

    log = Logger()

    def __init__(
        self,
        registry: SessionRegistry,
        authenticator: Authenticator,
        config: Config,
        make_cookie: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.registry = registry
        self.authenticator = authenticator
        self.config = config
        self.properties = PropertyTable(config)
        self.channels = ChannelPolicy(config.channels_allow, config.channels_deny)
        self._make_cookie = make_cookie

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
        }

    # -- simple questions ----------------------------------------------------

    def ping(self, request: ICP_pb2.PingRequest) -> ICP_pb2.PingResponse:
        return ICP_pb2.PingResponse(pong=True)

    def is_channel_allowed(
        self, request: ICP_pb2.IsChannelAllowedRequest
    ) -> ICP_pb2.IsChannelAllowedResponse:
        allowed = self.channels.allowed(request.channelName)
        if not allowed:
            self.log.info("channel {channel} refused by policy", channel=request.channelName)
        return ICP_pb2.IsChannelAllowedResponse(channelAllowed=allowed)

    # -- logon ----------------------------------------------------------------

    def logon_user(
        self, request: ICP_pb2.LogonUserRequest
    ) -> ICP_pb2.LogonUserResponse | Deferred[ICP_pb2.LogonUserResponse]:
        client = ClientInfo(
            host_name=request.clientHostName,
            address=request.clientAddress,
            build_number=request.clientBuildNumber,
            product_id=request.clientProductId,
            hardware_id=request.clientHardwareId,
            protocol_type=request.clientProtocolType,
            width=request.width,
            height=request.height,
            color_depth=request.colorDepth,
        )
        if not request.username:
            return self._greeter(request.connectionId, client)
        d = self.authenticator.authenticate(request.username, request.password, request.domain)
        # The request holds the password; pass on only what is needed.
        return d.addCallback(
            self._logon_decided, request.connectionId, request.username, request.domain, client
        )

    def _logon_decided(self, identity: Identity | None, connection_id: int, username: str,
                       domain: str, client: ClientInfo) -> ICP_pb2.LogonUserResponse:
        if identity is None:
            self.log.warn(
                "failed logon for user {username} on connection {connection_id}",
                username=username, connection_id=connection_id,
            )
            return self._greeter(connection_id, client)
        current = self.registry.by_connection(connection_id)
        target = self.registry.disconnected_session_of(identity.username, identity.domain)
        if target is not None:
            if current is not None and not current.logged_on:
                self.registry.end(current)
            self.registry.reconnect(target, connection_id, client)
            session = target
        elif current is not None and not current.logged_on:
            current.client = client
            self.registry.log_on(current, identity.username, identity.domain, identity.permission)
            session = current
        else:
            session = self.registry.create(
                connection_id, client, identity.username, identity.domain,
                identity.permission, cookies=(self._make_cookie(), self._make_cookie()),
            )
        return self._logon_response(session, self.config.desktop_endpoint)

    def _greeter(self, connection_id: int, client: ClientInfo) -> ICP_pb2.LogonUserResponse:
        session = self.registry.by_connection(connection_id)
        if session is None:
            session = self.registry.create(
                connection_id, client, cookies=(self._make_cookie(), self._make_cookie())
            )
        return self._logon_response(session, self.config.greeter_endpoint)

    def _logon_response(self, session: Session, template: str) -> ICP_pb2.LogonUserResponse:
        return ICP_pb2.LogonUserResponse(
            serviceEndpoint=template.format(session_id=session.session_id),
            maxWidth=self.config.max_width,
            maxHeight=self.config.max_height,
            backendCookie=session.backend_cookie,
            ogonCookie=session.ogon_cookie,
        )

    # -- session ends --------------------------------------------------------

    def disconnect_user_session(
        self, request: ICP_pb2.DisconnectUserSessionRequest
    ) -> ICP_pb2.DisconnectUserSessionResponse:
        session = self.registry.by_connection(request.connectionId)
        if session is None:
            self.log.info("disconnect for unknown connection {connection_id}",
                          connection_id=request.connectionId)
            return ICP_pb2.DisconnectUserSessionResponse(disconnected=False)
        self.registry.client_gone(session)
        return ICP_pb2.DisconnectUserSessionResponse(disconnected=True)

    def logoff_user_session(
        self, request: ICP_pb2.LogoffUserSessionRequest
    ) -> ICP_pb2.LogoffUserSessionResponse:
        session = self.registry.by_connection(request.connectionId)
        if session is None:
            self.log.info("logoff for unknown connection {connection_id}",
                          connection_id=request.connectionId)
            return ICP_pb2.LogoffUserSessionResponse(loggedoff=False)
        self.registry.end(session)
        return ICP_pb2.LogoffUserSessionResponse(loggedoff=True)

    def remote_control_ended(
        self, request: ICP_pb2.RemoteControlEndedRequest
    ) -> ICP_pb2.RemoteControlEndedResponse:
        spy = self.registry.by_connection(request.spyId)
        if spy is None:
            return ICP_pb2.RemoteControlEndedResponse(success=False)
        self.registry.set_shadowing(spy, None)
        return ICP_pb2.RemoteControlEndedResponse(success=True)

    # -- properties ----------------------------------------------------------

    def _username(self, connection_id: int) -> str:
        session = self.registry.by_connection(connection_id)
        return session.username if session is not None else ""

    def property_bool(self, request: ICP_pb2.PropertyBoolRequest) -> ICP_pb2.PropertyBoolResponse:
        value = self.properties.get_bool(request.path, self._username(request.connectionId))
        return ICP_pb2.PropertyBoolResponse(value=bool(value), success=value is not None)

    def property_number(
        self, request: ICP_pb2.PropertyNumberRequest
    ) -> ICP_pb2.PropertyNumberResponse:
        value = self.properties.get_number(
            request.path, self._username(request.connectionId), range(_UINT32_MAX + 1)
        )
        return ICP_pb2.PropertyNumberResponse(value=value or 0, success=value is not None)

    def property_string(
        self, request: ICP_pb2.PropertyStringRequest
    ) -> ICP_pb2.PropertyStringResponse:
        value = self.properties.get_string(request.path, self._username(request.connectionId))
        return ICP_pb2.PropertyStringResponse(value=value or "", success=value is not None)

    def property_bulk(self, request: ICP_pb2.PropertyBulkRequest) -> ICP_pb2.PropertyBulkResponse:
        username = self._username(request.connectionId)
        response = ICP_pb2.PropertyBulkResponse()
        for wanted in request.properties:
            result = response.results.add(success=False)
            path = wanted.propertyPath
            if wanted.propertyType == ICP_pb2.PropertyReq.PROP_BOOL:
                flag = self.properties.get_bool(path, username)
                if flag is not None:
                    result.success, result.boolValue = True, flag
            elif wanted.propertyType == ICP_pb2.PropertyReq.PROP_NUMBER:
                number = self.properties.get_number(path, username, _INT32_RANGE)
                if number is not None:
                    result.success, result.intValue = True, number
            else:
                text = self.properties.get_string(path, username)
                if text is not None:
                    result.success, result.stringValue = True, text
        return response
