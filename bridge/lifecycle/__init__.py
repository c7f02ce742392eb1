"""The session lifecycle: every transition the bridge makes to a session, on
the reactor, one flow per module.

- ``facade``: SessionLifecycle, what the RDP and OTS API handlers and the
  service call; it builds the flows below and routes each request.
- ``logon``: ICP LogonUser: the session a client connection gets (greeter,
  reconnect, take-over, new desktop) and the endpoint it is answered.
- ``greeter_login``: the greeter's SBP login and the SwitchTo to the desktop.
- ``policies``: ogon's session.reconnect/.singleSession/.timeout: which
  session a logon gets; disconnects and what follows them.
- ``ending``: ending a session, and the logoffs that end one.
- ``remote_control``: shadowing one session from another.
- ``runner``: a session's backend: which module, started with what, watched.
- ``authentication``: a logon's credentials checked, PAM sessions.
- ``runtime``: what the flows share (SessionRuntime: backends by session,
  session.timeout timers, shutting down), the RDP caller, LogonAnswer.

May import: ``bridge.sessions``, ``bridge.security``, ``bridge.backends`` and
the ground modules; never ``bridge.state``, ``bridge.rdp``, ``bridge.otsapi``,
``bridge.watch`` (the RDP server is handed in as something to call).
"""
