"""State: what the bridge keeps on disk, and the journal of what happened.

- ``store``: the SQLite state database: sessions, token digests and the
  session event journal, each change written with its journal row in one
  transaction; ``restore`` loads it after a restart; ``check`` for the CLI.
- ``journal``: the event journal as a stream that loses nothing (EventHub):
  subscribers resume after the last id they saw.

Room for another store beside SQLite (a PostgreSQL farm store).

May import: ``bridge.sessions``, ``bridge.security`` (token records) and
the ground modules (``bridge.endpoints``).
"""
