"""Sessions: what a session is and where the bridge keeps it.

- ``model``: a session, its connect state, its client, the backend it runs,
  a change to it (what a journal row records), StateWriteError.
- ``registry``: every session by id and by RDP connection; the one place
  session state changes, each change stored before anyone hears of it.
- ``properties``: ogon's session-manager properties (per user, global,
  ogon's defaults) and the virtual channel policy.
- ``ogon_config``: ogon's config.ini read with ogon's rules, merged with the
  TOML file's properties (pure: bytes in, tables out).

The flows that change sessions (logon, greeter login, policies, ending,
remote control) are in ``bridge.lifecycle``.

May import: nothing of the bridge but the ground modules (``bridge.endpoints``,
``bridge.reactor``). Every other room may import this one.
"""
