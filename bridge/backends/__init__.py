"""Backends: the programs a session runs (a greeter, a desktop), started,
watched and stopped on the reactor.

- ``modules``: what a backend is: a ``[modules.NAME]`` table, the context it
  is started for, BackendError, the named pipe of its endpoint.
- ``environment``: whom it runs as and the environment it gets (ogon's
  variables), the values of a module's placeholders.
- ``launcher``: BackendLauncher starts, adopts and stops backends; Backend
  is one process, watched until it exits.
- ``output``: a backend's log file followed into the bridge's log.
- ``standin``: the stand-in backend (``icp-bridge backend``), standard
  library only, runnable as a plain script.

Room for more kinds of module beside today's command line: ogon's X11, Qt
and Weston modules, ogon's backend launcher.

May import: ``bridge.sessions`` (the backend record) and the ground modules;
nothing else of the bridge (``standin`` imports nothing of it at all).
"""
