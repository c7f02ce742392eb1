"""Running as a system service: what systemd and an operator's tools expect
of a daemon, apart from what the bridge does.

- ``notify``: systemd's notification protocol (``NOTIFY_SOCKET``): ready,
  reloading, stopping, status, and the watchdog's keep-alive.
- ``logs``: the log's observer: journald's ``<N>`` priorities without a
  timestamp of its own when the output is the journal, the ``log_level``
  filter, and ``--logfile`` reopened on SIGUSR1 (after a ``mv``).

Socket activation itself is Twisted's ``systemd:`` endpoint (the bridge's
``bridge.endpoints`` hands such a socket over without claiming its path).

May import: only the ground modules. The top (``bridge.tap``) wires these
parts to the service.
"""
