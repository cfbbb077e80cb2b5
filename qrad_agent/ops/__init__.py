"""Operations: what makes the agent a good Linux service and lets it explain itself.

- ``settings``: the ``[ops]`` config section (status socket, metrics, watchdog, bounds);
- ``notify``: systemd's notification protocol (READY, WATCHDOG, STATUS, STOPPING);
- ``status_server``: the status snapshot and the Unix socket that serves it;
- ``metrics``: an optional Prometheus text endpoint on loopback;
- ``logging``: journald-friendly log lines with ``key=value`` context;
- ``doctor``: checks of a board, each with the fix;
- ``cli``: ``status``, ``top``, ``events``, ``jobs`` and ``doctor``.

The life cycle itself (signals, reload, shutdown) is in ``qrad_agent.runner``.
"""
