"""ogon's module protocol: the session manager's side of the channel to
ogon-backend-launcher (ogon's doc/moduleProtocol.md, Module.proto).

The launcher reads requests on its stdin and answers on its stdout with
ICP's framing and envelope: a big-endian uint32 length, then one pbRPC
``RPCBase``. Unlike ICP there is no VersionInfo handshake, frames are at
most 65535 bytes (ogon's REMOTE_CLIENT_BUFFER_SIZE), and each side
numbers its own requests from tag 2. The session manager asks
(ModuleStart, Stop, GetCustomInfo, Connect, Disconnect, Exit); while it
waits, the launcher's module asks for properties (PropertyBool, Number,
String), which the session manager answers from its property table.

This is ICP's call engine (:class:`protocols.icp.IcpProtocol`) with another
method table; ogon's launcher handles one request at a time, so callers
send the next request only once the previous one is answered.
"""

from __future__ import annotations

from collections.abc import Mapping

from protocols.generated import Module_pb2
from protocols.icp import IcpMethod, IcpProtocol, _request_fields

MSG_MODULE_START = Module_pb2.ModuleStart
MSG_MODULE_STOP = Module_pb2.ModuleStop
MSG_MODULE_GET_CUSTOM_INFO = Module_pb2.ModuleGetCustomInfo
MSG_MODULE_CONNECT = Module_pb2.ModuleConnect
MSG_MODULE_DISCONNECT = Module_pb2.ModuleDisconnect
MSG_PROPERTY_BOOL = Module_pb2.PropertyBool
MSG_PROPERTY_NUMBER = Module_pb2.PropertyNumber
MSG_PROPERTY_STRING = Module_pb2.PropertyString
MSG_MODULE_EXIT = Module_pb2.ModuleExit

#: ogon's REMOTE_CLIENT_BUFFER_SIZE: the largest frame either side reads.
MAX_MODULE_FRAME = 0xFFFF
#: ogon's first request tag on this channel (its counter pre-increments from 1).
FIRST_TAG = 2


def _method_table() -> dict[int, IcpMethod]:
    return {msg_type: IcpMethod(msg_type, name, getattr(Module_pb2, f"{name}Request"),
                                getattr(Module_pb2, f"{name}Response"))
            for name, msg_type in Module_pb2.MSGTYPE.items()}


#: Every message type of the module protocol, by msgType value.
MODULE_METHODS: Mapping[int, IcpMethod] = _method_table()


class ModuleProtocol(IcpProtocol):
    """One channel to an ogon-backend-launcher, the session manager's end.

    ``call(MSG_MODULE_START, ModuleStartRequest(...))`` and friends return a
    Deferred of the response, as ICP calls do; ``handlers`` answer the
    launcher's Property* requests. Ready as soon as it is connected.
    """

    methods = MODULE_METHODS
    request_fields = {msg_type: _request_fields(msg_type) for msg_type in MODULE_METHODS}
    handshake = False
    first_tag = FIRST_TAG

    def __init__(self, handlers: Mapping[int, object], **kwargs: object) -> None:
        kwargs.setdefault("max_frame_size", MAX_MODULE_FRAME)
        kwargs.setdefault("max_send_frame", MAX_MODULE_FRAME + 4)
        super().__init__(handlers, **kwargs)  # type: ignore[arg-type]
