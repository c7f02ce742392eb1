"""The session lifecycle: every transition the bridge makes to a session
(logon, the greeter's login, ogon's policies, disconnect, timeout, end,
remote control), on the reactor. ``facade.SessionLifecycle`` is what the RDP
and OTS API handlers and the service call.

May import: ``bridge.sessions``, ``bridge.security``, ``bridge.backends`` and
the ground modules; never ``bridge.state``, ``bridge.rdp``, ``bridge.otsapi``,
``bridge.watch`` (the RDP server is handed in as something to call).
"""
