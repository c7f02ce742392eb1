"""Security: who may log on, and what a token may do.

- ``auth``: the Authenticator interface, the users file (scrypt hashes),
  PAM, ogon's group rule (``permission.groups.*``), atomic file writes.
- ``throttle``: failed-logon throttling and lockouts (where a lockout is
  decided), bounded password checks: LogonGuard in front of the authenticator.
- ``lockouts``: the failed-logon records' keys (what counts as a source),
  and the state database's lockouts table.
- ``file_trust``: whether only root and the bridge's user can change a file
  the bridge trusts with root's power (configuration, users file, programs).
- ``tokens``: OTS API tokens (logon and session tokens), kept as digests.
- ``token_files``: each logged-on session's token file for WTSAPI clients.
- ``permissions``: the permission flags and levels (WIRE.md section 3).
- ``tls``: the OTS API's certificate pair (generated when missing).

May import: ``bridge.sessions`` (the session model) and the ground modules
(``bridge.endpoints``); nothing else of the bridge.
"""
