from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionInfo(_message.Message):
    __slots__ = ("vmajor", "vminor", "cookie")
    VMAJOR_FIELD_NUMBER: _ClassVar[int]
    VMINOR_FIELD_NUMBER: _ClassVar[int]
    COOKIE_FIELD_NUMBER: _ClassVar[int]
    vmajor: int
    vminor: int
    cookie: str
    def __init__(self, vmajor: _Optional[int] = ..., vminor: _Optional[int] = ..., cookie: _Optional[str] = ...) -> None: ...

class RPCBase(_message.Message):
    __slots__ = ("tag", "isResponse", "status", "msgType", "payload", "errorDescription", "versionInfo")
    class RPCSTATUS(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SUCCESS: _ClassVar[RPCBase.RPCSTATUS]
        FAILED: _ClassVar[RPCBase.RPCSTATUS]
        NOTFOUND: _ClassVar[RPCBase.RPCSTATUS]
    SUCCESS: RPCBase.RPCSTATUS
    FAILED: RPCBase.RPCSTATUS
    NOTFOUND: RPCBase.RPCSTATUS
    TAG_FIELD_NUMBER: _ClassVar[int]
    ISRESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MSGTYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERRORDESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VERSIONINFO_FIELD_NUMBER: _ClassVar[int]
    tag: int
    isResponse: bool
    status: RPCBase.RPCSTATUS
    msgType: int
    payload: bytes
    errorDescription: str
    versionInfo: VersionInfo
    def __init__(self, tag: _Optional[int] = ..., isResponse: _Optional[bool] = ..., status: _Optional[_Union[RPCBase.RPCSTATUS, str]] = ..., msgType: _Optional[int] = ..., payload: _Optional[bytes] = ..., errorDescription: _Optional[str] = ..., versionInfo: _Optional[_Union[VersionInfo, _Mapping]] = ...) -> None: ...
