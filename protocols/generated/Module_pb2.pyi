from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class MSGTYPE(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ModuleStart: _ClassVar[MSGTYPE]
    ModuleStop: _ClassVar[MSGTYPE]
    ModuleGetCustomInfo: _ClassVar[MSGTYPE]
    ModuleConnect: _ClassVar[MSGTYPE]
    ModuleDisconnect: _ClassVar[MSGTYPE]
    PropertyBool: _ClassVar[MSGTYPE]
    PropertyNumber: _ClassVar[MSGTYPE]
    PropertyString: _ClassVar[MSGTYPE]
    ModuleExit: _ClassVar[MSGTYPE]
ModuleStart: MSGTYPE
ModuleStop: MSGTYPE
ModuleGetCustomInfo: MSGTYPE
ModuleConnect: MSGTYPE
ModuleDisconnect: MSGTYPE
PropertyBool: MSGTYPE
PropertyNumber: MSGTYPE
PropertyString: MSGTYPE
ModuleExit: MSGTYPE

class ModuleStartRequest(_message.Message):
    __slots__ = ("sessionId", "userName", "userDomain", "baseConfigPath", "envBlock", "moduleFileName", "remoteIp")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    USERDOMAIN_FIELD_NUMBER: _ClassVar[int]
    BASECONFIGPATH_FIELD_NUMBER: _ClassVar[int]
    ENVBLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULEFILENAME_FIELD_NUMBER: _ClassVar[int]
    REMOTEIP_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    userName: str
    userDomain: str
    baseConfigPath: str
    envBlock: bytes
    moduleFileName: str
    remoteIp: str
    def __init__(self, sessionId: _Optional[int] = ..., userName: _Optional[str] = ..., userDomain: _Optional[str] = ..., baseConfigPath: _Optional[str] = ..., envBlock: _Optional[bytes] = ..., moduleFileName: _Optional[str] = ..., remoteIp: _Optional[str] = ...) -> None: ...

class ModuleStartResponse(_message.Message):
    __slots__ = ("pipeName",)
    PIPENAME_FIELD_NUMBER: _ClassVar[int]
    pipeName: str
    def __init__(self, pipeName: _Optional[str] = ...) -> None: ...

class ModuleStopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleStopResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: int
    def __init__(self, success: _Optional[int] = ...) -> None: ...

class ModuleGetCustomInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleGetCustomInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: str
    def __init__(self, info: _Optional[str] = ...) -> None: ...

class ModuleConnectRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleConnectResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: int
    def __init__(self, success: _Optional[int] = ...) -> None: ...

class ModuleDisconnectRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleDisconnectResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: int
    def __init__(self, success: _Optional[int] = ...) -> None: ...

class PropertyBoolRequest(_message.Message):
    __slots__ = ("sessionId", "path")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    path: str
    def __init__(self, sessionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyBoolResponse(_message.Message):
    __slots__ = ("success", "value")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    value: bool
    def __init__(self, success: _Optional[bool] = ..., value: _Optional[bool] = ...) -> None: ...

class PropertyNumberRequest(_message.Message):
    __slots__ = ("sessionId", "path")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    path: str
    def __init__(self, sessionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyNumberResponse(_message.Message):
    __slots__ = ("success", "value")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    value: int
    def __init__(self, success: _Optional[bool] = ..., value: _Optional[int] = ...) -> None: ...

class PropertyStringRequest(_message.Message):
    __slots__ = ("sessionId", "path")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    path: str
    def __init__(self, sessionId: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PropertyStringResponse(_message.Message):
    __slots__ = ("success", "value")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    value: str
    def __init__(self, success: _Optional[bool] = ..., value: _Optional[str] = ...) -> None: ...

class ModuleExitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleExitResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...
