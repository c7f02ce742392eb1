"""The icp-bridge application, one room (subpackage) per concern:

- ``sessions``: what a session is, the registry, ogon's properties;
- ``security``: authentication, throttling, tokens and token files,
  permissions, TLS;
- ``backends``: the programs a session runs, and their launcher;
- ``state``: the SQLite store and the event journal;
- ``lifecycle``: every session transition, one flow per module;
- ``rdp``: the ICP link to the RDP server, its handlers, the stand-in;
- ``otsapi``: the OTS API handler;
- ``watch``: the admin endpoint, metrics, D-Bus notifications.

At the top: ``service`` (everything built and wired in one place),
``config``, ``tap`` (``twistd icp-bridge``) and ``cli`` (``icp-bridge``); and
the ground any room may use: ``endpoints`` and ``reactor``.

Each room's docstring says which rooms it may import; lower rooms never
import higher ones, nothing but the top imports the top, and parts are
handed in as constructor arguments (tests/test_layout.py checks it).
"""
