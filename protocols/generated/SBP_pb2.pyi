from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MSGTYPE(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AuthenticateUser: _ClassVar[MSGTYPE]
    EndSession: _ClassVar[MSGTYPE]
    VersionInfo: _ClassVar[MSGTYPE]
AuthenticateUser: MSGTYPE
EndSession: MSGTYPE
VersionInfo: MSGTYPE

class AuthenticateUserRequest(_message.Message):
    __slots__ = ("sessionId", "username", "password", "domain")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    username: str
    password: str
    domain: str
    def __init__(self, sessionId: _Optional[int] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class AuthenticateUserResponse(_message.Message):
    __slots__ = ("authStatus",)
    class AUTH_STATUS(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        AUTH_SUCCESSFUL: _ClassVar[AuthenticateUserResponse.AUTH_STATUS]
        AUTH_BAD_CREDENTIALS: _ClassVar[AuthenticateUserResponse.AUTH_STATUS]
        AUTH_WRONG_SESSION_STATE: _ClassVar[AuthenticateUserResponse.AUTH_STATUS]
        AUTH_UNKNOWN_ERROR: _ClassVar[AuthenticateUserResponse.AUTH_STATUS]
    AUTH_SUCCESSFUL: AuthenticateUserResponse.AUTH_STATUS
    AUTH_BAD_CREDENTIALS: AuthenticateUserResponse.AUTH_STATUS
    AUTH_WRONG_SESSION_STATE: AuthenticateUserResponse.AUTH_STATUS
    AUTH_UNKNOWN_ERROR: AuthenticateUserResponse.AUTH_STATUS
    AUTHSTATUS_FIELD_NUMBER: _ClassVar[int]
    authStatus: AuthenticateUserResponse.AUTH_STATUS
    def __init__(self, authStatus: _Optional[_Union[AuthenticateUserResponse.AUTH_STATUS, str]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("sessionId",)
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    def __init__(self, sessionId: _Optional[int] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class VersionInfoRequest(_message.Message):
    __slots__ = ("sessionId", "vmajor", "vminor")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    VMAJOR_FIELD_NUMBER: _ClassVar[int]
    VMINOR_FIELD_NUMBER: _ClassVar[int]
    sessionId: int
    vmajor: int
    vminor: int
    def __init__(self, sessionId: _Optional[int] = ..., vmajor: _Optional[int] = ..., vminor: _Optional[int] = ...) -> None: ...

class VersionInfoResponse(_message.Message):
    __slots__ = ("vmajor", "vminor")
    VMAJOR_FIELD_NUMBER: _ClassVar[int]
    VMINOR_FIELD_NUMBER: _ClassVar[int]
    vmajor: int
    vminor: int
    def __init__(self, vmajor: _Optional[int] = ..., vminor: _Optional[int] = ...) -> None: ...
