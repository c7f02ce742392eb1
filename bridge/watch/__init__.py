"""Watching the bridge: what operators and desktop software see of it.

- ``admin``: the admin HTTP endpoint (twisted.web): ``/events`` (the journal
  as Server-Sent Events), ``/sessions``, ``/metrics``, ``/healthz`` and the
  status page (``status.html``, one file, no build step).
- ``actions``: the admin endpoint's ``POST /sessions/<id>/<action>`` routes
  (logoff, disconnect, message), on the OTS API's SessionActions.
- ``metrics``: the Prometheus collector, reading the counters the parts keep.
- ``dbus``: ogon's SessionNotification signals on the system bus.

The parts it reads are handed in (constructor arguments), not fetched from
the service.

May import: ``bridge.state`` (the journal), ``bridge.sessions``,
``bridge.security``, ``bridge.backends``, ``bridge.lifecycle``, ``bridge.rdp``,
``bridge.otsapi``, ``bridge.farm`` (the farm's view and commands) and the
ground modules: it watches every room below the
top, and none of them imports it.
"""
