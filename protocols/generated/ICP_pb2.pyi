from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MSGTYPE(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IsChannelAllowed: _ClassVar[MSGTYPE]
    Ping: _ClassVar[MSGTYPE]
    DisconnectUserSession: _ClassVar[MSGTYPE]
    LogoffUserSession: _ClassVar[MSGTYPE]
    OtsApiVirtualChannelOpen: _ClassVar[MSGTYPE]
    LogonUser: _ClassVar[MSGTYPE]
    SwitchTo: _ClassVar[MSGTYPE]
    PropertyBool: _ClassVar[MSGTYPE]
    PropertyNumber: _ClassVar[MSGTYPE]
    PropertyString: _ClassVar[MSGTYPE]
    OtsApiVirtualChannelClose: _ClassVar[MSGTYPE]
    OtsApiStartRemoteControl: _ClassVar[MSGTYPE]
    OtsApiStopRemoteControl: _ClassVar[MSGTYPE]
    RemoteControlEnded: _ClassVar[MSGTYPE]
    Message: _ClassVar[MSGTYPE]
    PropertyBulk: _ClassVar[MSGTYPE]
IsChannelAllowed: MSGTYPE
Ping: MSGTYPE
DisconnectUserSession: MSGTYPE
LogoffUserSession: MSGTYPE
OtsApiVirtualChannelOpen: MSGTYPE
LogonUser: MSGTYPE
SwitchTo: MSGTYPE
PropertyBool: MSGTYPE
PropertyNumber: MSGTYPE
PropertyString: MSGTYPE
OtsApiVirtualChannelClose: MSGTYPE
OtsApiStartRemoteControl: MSGTYPE
OtsApiStopRemoteControl: MSGTYPE
RemoteControlEnded: MSGTYPE
Message: MSGTYPE
PropertyBulk: MSGTYPE

class IsChannelAllowedRequest(_message.Message):
    __slots__ = ("channelName",)
    CHANNELNAME_FIELD_NUMBER: _ClassVar[int]
    channelName: str
    def __init__(self, channelName: _Optional[str] = ...) -> None: ...

class IsChannelAllowedResponse(_message.Message):
    __slots__ = ("channelAllowed",)
    CHANNELALLOWED_FIELD_NUMBER: _ClassVar[int]
    channelAllowed: bool
    def __init__(self, channelAllowed: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("pong",)
    PONG_FIELD_NUMBER: _ClassVar[int]
    pong: bool
    def __init__(self, pong: _Optional[bool] = ...) -> None: ...

class DisconnectUserSessionRequest(_message.Message):
    __slots__ = ("connectionId",)
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    def __init__(self, connectionId: _Optional[int] = ...) -> None: ...

class DisconnectUserSessionResponse(_message.Message):
    __slots__ = ("disconnected",)
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    disconnected: bool
    def __init__(self, disconnected: _Optional[bool] = ...) -> None: ...

class LogoffUserSessionRequest(_message.Message):
    __slots__ = ("connectionId",)
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    def __init__(self, connectionId: _Optional[int] = ...) -> None: ...

class LogoffUserSessionResponse(_message.Message):
    __slots__ = ("loggedoff",)
    LOGGEDOFF_FIELD_NUMBER: _ClassVar[int]
    loggedoff: bool
    def __init__(self, loggedoff: _Optional[bool] = ...) -> None: ...

class OtsApiVirtualChannelOpenRequest(_message.Message):
    __slots__ = ("connectionId", "virtualName", "dynamicChannel", "flags")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    VIRTUALNAME_FIELD_NUMBER: _ClassVar[int]
    DYNAMICCHANNEL_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    virtualName: str
    dynamicChannel: bool
    flags: int
    def __init__(self, connectionId: _Optional[int] = ..., virtualName: _Optional[str] = ..., dynamicChannel: _Optional[bool] = ..., flags: _Optional[int] = ...) -> None: ...

class OtsApiVirtualChannelOpenResponse(_message.Message):
    __slots__ = ("connectionString", "instance")
    CONNECTIONSTRING_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    connectionString: str
    instance: int
    def __init__(self, connectionString: _Optional[str] = ..., instance: _Optional[int] = ...) -> None: ...

class LogonUserRequest(_message.Message):
    __slots__ = ("connectionId", "username", "password", "domain", "width", "height", "colorDepth", "clientHostName", "clientAddress", "clientBuildNumber", "clientProductId", "clientHardwareId", "clientProtocolType")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    COLORDEPTH_FIELD_NUMBER: _ClassVar[int]
    CLIENTHOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CLIENTADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENTBUILDNUMBER_FIELD_NUMBER: _ClassVar[int]
    CLIENTPRODUCTID_FIELD_NUMBER: _ClassVar[int]
    CLIENTHARDWAREID_FIELD_NUMBER: _ClassVar[int]
    CLIENTPROTOCOLTYPE_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    username: str
    password: str
    domain: str
    width: int
    height: int
    colorDepth: int
    clientHostName: str
    clientAddress: str
    clientBuildNumber: int
    clientProductId: int
    clientHardwareId: int
    clientProtocolType: int
    def __init__(self, connectionId: _Optional[int] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., domain: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., colorDepth: _Optional[int] = ..., clientHostName: _Optional[str] = ..., clientAddress: _Optional[str] = ..., clientBuildNumber: _Optional[int] = ..., clientProductId: _Optional[int] = ..., clientHardwareId: _Optional[int] = ..., clientProtocolType: _Optional[int] = ...) -> None: ...

class LogonUserResponse(_message.Message):
    __slots__ = ("serviceEndpoint", "maxHeight", "maxWidth", "backendCookie", "ogonCookie")
    SERVICEENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAXHEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAXWIDTH_FIELD_NUMBER: _ClassVar[int]
    BACKENDCOOKIE_FIELD_NUMBER: _ClassVar[int]
    OGONCOOKIE_FIELD_NUMBER: _ClassVar[int]
    serviceEndpoint: str
    maxHeight: int
    maxWidth: int
    backendCookie: str
    ogonCookie: str
    def __init__(self, serviceEndpoint: _Optional[str] = ..., maxHeight: _Optional[int] = ..., maxWidth: _Optional[int] = ..., backendCookie: _Optional[str] = ..., ogonCookie: _Optional[str] = ...) -> None: ...

class SwitchToRequest(_message.Message):
    __slots__ = ("connectionId", "serviceEndpoint", "maxHeight", "maxWidth", "backendCookie", "ogonCookie")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    SERVICEENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAXHEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAXWIDTH_FIELD_NUMBER: _ClassVar[int]
    BACKENDCOOKIE_FIELD_NUMBER: _ClassVar[int]
    OGONCOOKIE_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    serviceEndpoint: str
    maxHeight: int
    maxWidth: int
    backendCookie: str
    ogonCookie: str
    def __init__(self, connectionId: _Optional[int] = ..., serviceEndpoint: _Optional[str] = ..., maxHeight: _Optional[int] = ..., maxWidth: _Optional[int] = ..., backendCookie: _Optional[str] = ..., ogonCookie: _Optional[str] = ...) -> None: ...

class SwitchToResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class PropertyBoolRequest(_message.Message):
    __slots__ = ("connectionId", "path")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    path: str
    def __init__(self, connectionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyBoolResponse(_message.Message):
    __slots__ = ("value", "success")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    value: bool
    success: bool
    def __init__(self, value: _Optional[bool] = ..., success: _Optional[bool] = ...) -> None: ...

class PropertyNumberRequest(_message.Message):
    __slots__ = ("connectionId", "path")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    path: str
    def __init__(self, connectionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyNumberResponse(_message.Message):
    __slots__ = ("value", "success")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    value: int
    success: bool
    def __init__(self, value: _Optional[int] = ..., success: _Optional[bool] = ...) -> None: ...

class PropertyStringRequest(_message.Message):
    __slots__ = ("connectionId", "path")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    path: str
    def __init__(self, connectionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyStringResponse(_message.Message):
    __slots__ = ("value", "success")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    value: str
    success: bool
    def __init__(self, value: _Optional[str] = ..., success: _Optional[bool] = ...) -> None: ...

class OtsApiVirtualChannelCloseRequest(_message.Message):
    __slots__ = ("connectionId", "virtualName", "instance")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    VIRTUALNAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    virtualName: str
    instance: int
    def __init__(self, connectionId: _Optional[int] = ..., virtualName: _Optional[str] = ..., instance: _Optional[int] = ...) -> None: ...

class OtsApiVirtualChannelCloseResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class OtsApiStartRemoteControlRequest(_message.Message):
    __slots__ = ("connectionId", "targetConnectionId", "hotKeyVk", "hotKeyModifiers", "flags")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    TARGETCONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    HOTKEYVK_FIELD_NUMBER: _ClassVar[int]
    HOTKEYMODIFIERS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    targetConnectionId: int
    hotKeyVk: int
    hotKeyModifiers: int
    flags: int
    def __init__(self, connectionId: _Optional[int] = ..., targetConnectionId: _Optional[int] = ..., hotKeyVk: _Optional[int] = ..., hotKeyModifiers: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class OtsApiStartRemoteControlResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class OtsApiStopRemoteControlRequest(_message.Message):
    __slots__ = ("connectionId",)
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    def __init__(self, connectionId: _Optional[int] = ...) -> None: ...

class OtsApiStopRemoteControlResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class RemoteControlEndedRequest(_message.Message):
    __slots__ = ("spyId", "spiedId")
    SPYID_FIELD_NUMBER: _ClassVar[int]
    SPIEDID_FIELD_NUMBER: _ClassVar[int]
    spyId: int
    spiedId: int
    def __init__(self, spyId: _Optional[int] = ..., spiedId: _Optional[int] = ...) -> None: ...

class RemoteControlEndedResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class MessageRequest(_message.Message):
    __slots__ = ("connectionId", "type", "style", "timeout", "parameterNum", "parameter1", "parameter2", "parameter3", "parameter4", "parameter5")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERNUM_FIELD_NUMBER: _ClassVar[int]
    PARAMETER1_FIELD_NUMBER: _ClassVar[int]
    PARAMETER2_FIELD_NUMBER: _ClassVar[int]
    PARAMETER3_FIELD_NUMBER: _ClassVar[int]
    PARAMETER4_FIELD_NUMBER: _ClassVar[int]
    PARAMETER5_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    type: int
    style: int
    timeout: int
    parameterNum: int
    parameter1: str
    parameter2: str
    parameter3: str
    parameter4: str
    parameter5: str
    def __init__(self, connectionId: _Optional[int] = ..., type: _Optional[int] = ..., style: _Optional[int] = ..., timeout: _Optional[int] = ..., parameterNum: _Optional[int] = ..., parameter1: _Optional[str] = ..., parameter2: _Optional[str] = ..., parameter3: _Optional[str] = ..., parameter4: _Optional[str] = ..., parameter5: _Optional[str] = ...) -> None: ...

class MessageResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: int
    def __init__(self, result: _Optional[int] = ...) -> None: ...

class PropertyReq(_message.Message):
    __slots__ = ("propertyType", "propertyPath")
    class EnumPropertyType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PROP_BOOL: _ClassVar[PropertyReq.EnumPropertyType]
        PROP_NUMBER: _ClassVar[PropertyReq.EnumPropertyType]
        PROP_STRING: _ClassVar[PropertyReq.EnumPropertyType]
    PROP_BOOL: PropertyReq.EnumPropertyType
    PROP_NUMBER: PropertyReq.EnumPropertyType
    PROP_STRING: PropertyReq.EnumPropertyType
    PROPERTYTYPE_FIELD_NUMBER: _ClassVar[int]
    PROPERTYPATH_FIELD_NUMBER: _ClassVar[int]
    propertyType: PropertyReq.EnumPropertyType
    propertyPath: str
    def __init__(self, propertyType: _Optional[_Union[PropertyReq.EnumPropertyType, str]] = ..., propertyPath: _Optional[str] = ...) -> None: ...

class PropertyValue(_message.Message):
    __slots__ = ("success", "stringValue", "boolValue", "intValue")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STRINGVALUE_FIELD_NUMBER: _ClassVar[int]
    BOOLVALUE_FIELD_NUMBER: _ClassVar[int]
    INTVALUE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    stringValue: str
    boolValue: bool
    intValue: int
    def __init__(self, success: _Optional[bool] = ..., stringValue: _Optional[str] = ..., boolValue: _Optional[bool] = ..., intValue: _Optional[int] = ...) -> None: ...

class PropertyBulkRequest(_message.Message):
    __slots__ = ("connectionId", "properties")
    CONNECTIONID_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    connectionId: int
    properties: _containers.RepeatedCompositeFieldContainer[PropertyReq]
    def __init__(self, connectionId: _Optional[int] = ..., properties: _Optional[_Iterable[_Union[PropertyReq, _Mapping]]] = ...) -> None: ...

class PropertyBulkResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PropertyValue]
    def __init__(self, results: _Optional[_Iterable[_Union[PropertyValue, _Mapping]]] = ...) -> None: ...
