"""twistd plugin: ``twistd -n icp-bridge``. Kept tiny; bridge.tap is only
imported when twistd runs it."""

from twisted.application.service import ServiceMaker

icp_bridge = ServiceMaker(
    "icp-bridge",
    "bridge.tap",
    "Session-manager bridge for FreeRDS/ogon RDP servers (ICP <-> OTS API)",
    "icp-bridge",
)
