"""The OTS API side: what WTSAPI applications and admin tools call.

- ``handler``: OtsApiHandler, the fourteen ``otsapi`` methods with ogon's
  semantics: check the token, ask the lifecycle or the RDP server, answer
  the method's failure value (logged) when anything refuses.
- ``session_info``: querySessionInformation's answer for each WTS_INFO_CLASS.
- ``actions``: SessionActions, logoff, disconnect and message as ogon does
  them, saying who asked; the admin endpoint's routes use them too.

The Thrift server protocol itself is ``protocols.thrift_server``.

May import: ``bridge.lifecycle``, ``bridge.sessions``, ``bridge.security``
and the ground modules; never ``bridge.rdp``, ``bridge.state``,
``bridge.watch``.
"""
