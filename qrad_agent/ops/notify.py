"""A small client of systemd's notification protocol (sd_notify(3)), without libsystemd.

The service manager passes ``NOTIFY_SOCKET``: a datagram Unix socket, by path or (leading
``@``) in the abstract namespace. Each message is one datagram of newline-separated
``KEY=VALUE`` lines. The agent sends:

- ``READY=1`` once the first control tick has succeeded (so ``systemctl start`` returns when
  the radiator is really under control), and again after a reload;
- ``WATCHDOG=1`` while the control loop is healthy, at least twice per ``WATCHDOG_USEC``;
- ``STATUS=...``: one line for ``systemctl status``;
- ``RELOADING=1`` with ``MONOTONIC_USEC`` at a SIGHUP reload, ``STOPPING=1`` on shutdown.

Without ``NOTIFY_SOCKET`` (a terminal, a test) every call does nothing. Sending never raises:
losing a notification must not take the heater down with it (and systemd's own timeouts
report a manager that hears nothing).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("qrad_agent.notify")


def notify_address(value: str) -> str | bytes | None:
    """The socket address ``NOTIFY_SOCKET`` names, or None if this client cannot use it."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock:… and other transports are not spoken here


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = notify_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a Unix socket path or @abstract name; "
                        "systemd will not hear from the agent", raw)
        self.watchdog_s = self._watchdog_interval(env)
        self.sent = 0  # datagrams sent, for status
        self.failed = 0
        self._sock: socket.socket | None = None
        self._last_status = ""
        self._warned = False

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """``WATCHDOG_USEC`` in seconds, if it is meant for this process."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None  # inherited from a parent that is the one being watched
        return int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines; ``send(READY=1, STATUS="…")``."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # a value is one line in the protocol
            lines.append(f"{key}={text}")
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full queue must not stall the control loop
            self._sock.sendto(data, self.address)
        except OSError as exc:
            self.failed += 1
            if not self._warned:  # once: a lost manager would otherwise flood the log
                log.warning("cannot notify systemd at %s: %s", self._shown(), exc)
                self._warned = True
            return False
        self.sent += 1
        return True

    def _shown(self) -> str:
        a = self.address
        return "@" + os.fsdecode(a[1:]) if isinstance(a, bytes) else str(a)

    def ready(self, status: str | None = None) -> bool:
        if status is not None:
            self._last_status = status
            return self.send(READY=1, STATUS=status)
        return self.send(READY=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """STATUS=text, only when it changed."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from older ones
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        if status is not None:
            self._last_status = status
            return self.send(STOPPING=1, STATUS=status)
        return self.send(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
