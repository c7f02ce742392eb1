"""ogon's own module kinds, as ogon's session manager runs them
(session-manager/module/*, session-manager/common/module/*,
backend-launcher/*): which kind a config name selects and the properties
its module reads (``properties``), ogon's command-line splitting
(``commandline``), the X11 module's xauth file (``xauth``), the X11
module run by the bridge itself (``x11``), Qt and Weston (``kinds``), and
modules run by ogon-backend-launcher over ogon's module protocol
(``remote``), whose launchers live under one keeper process that outlives
the bridge (``keeper`` is that process, standard library only;
``keeper_client`` the bridge's side of it).

Part of ``bridge.backends``: imports ``bridge.sessions`` and the rest of
``bridge.backends``, nothing higher.
"""
