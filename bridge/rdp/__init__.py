"""The RDP server side: the ICP link to ogon's RDP server and the answers to
what it asks.

- ``link``: RdpServerLink, at most one RDP server connection at a time (peer
  uid checks, SO_PEERCRED), and the call entry point for the bridge's own
  requests to it.
- ``handlers``: the ICP handler table: LogonUser, the properties,
  IsChannelAllowed, the greeter's SBP requests, ...; each checks, asks the
  lifecycle and maps the answer.
- ``standin``: a stand-in RDP server speaking ICP as ogon's does
  (``icp-bridge peer``), for demos, client development, tests and the bench.

May import: ``bridge.lifecycle``, ``bridge.sessions``, ``bridge.security``,
``bridge.backends`` (the stand-in connects to backend endpoints) and the
ground modules; never ``bridge.otsapi``, ``bridge.state``, ``bridge.watch``.
"""
