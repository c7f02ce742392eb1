"""The farm: many RDP hosts, one PostgreSQL (opt-in with ``farm_database``).

Each host stays the authority for its own sessions (its SQLite state);
what it owes the farm goes through the outbox (``bridge.state.outbox``) to
the farm store (``bridge.state.farm_store``).

- ``shipper``: ships the host's journal, sessions and failed-logon counts
  to the farm, in order, exactly once, resuming after any outage; the
  heartbeat.
- ``commands``: admin commands across hosts: queued as rows, run by the
  owning host as its own OTS API would, never twice; callers wait for
  results.
- ``view``: the farm's journal as a stream (``/events?scope=farm``), its
  hosts (stale or not) and sessions.
- ``policies``: ``session.farm.singleSession``; farm-wide failed-logon
  budgets.
- ``haproxy``: reconnect routing: the user -> host map, pushed to HAProxy's
  runtime API and written as a map file.
- ``service``: FarmService, which builds and wires them.

May import: ``bridge.sessions``, ``bridge.security``, ``bridge.state``,
``bridge.lifecycle``, ``bridge.otsapi`` and the ground modules; the admin
endpoint (``bridge.watch``) and the top import it.
"""
