"""Backends: the programs a session runs (a greeter, a desktop), started,
watched and stopped on the reactor.

- ``modules``: what a backend is: a ``[modules.NAME]`` table, the context it
  is started for, BackendError, the named pipe of its endpoint.
- ``environment``: whom it runs as and the environment it gets (ogon's
  variables), the values of a module's placeholders.
- ``launcher``: BackendLauncher starts, adopts and stops backends; Backend
  is one process, watched until it exits. ``spawn_backend`` is the one way
  any kind of module's process comes to be.
- ``endpoint``: the socket a backend makes, and when it counts as its own.
- ``logs``: backends' output files, bounded by size, removed when no one
  writes to them any more.
- ``output``: a backend's output file followed into the bridge's log.
- ``ledger``: every process spawned and not seen exit, recorded at once.
- ``orphans``: stopping what a previous run started and no session owns.
- ``standin``: the stand-in backend (``icp-bridge backend``), standard
  library only, runnable as a plain script.

- ``ogon``: ogon's own module kinds (X11, Qt, Weston), run by the bridge
  or through ogon-backend-launcher over ogon's module protocol, and the
  launcher keeper that lets launcher sessions outlive the bridge.

May import: ``bridge.sessions`` (the backend record) and the ground modules;
nothing else of the bridge (``standin`` imports nothing of it at all).
"""
