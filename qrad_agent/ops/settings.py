"""The ``[ops]`` section of the agent config: the status socket, the metrics endpoint, the
systemd watchdog and the bounds of the life cycle.

Like the other section modules this one imports nothing of the agent's, so ``config.py`` can
import it; it has its own base class with the same rules (unknown keys are errors).
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from qrad_agent.section import Section as _Section

DEFAULT_STATUS_SOCKET = Path("/run/qrad-agent/status.sock")  # systemd RuntimeDirectory
DEFAULT_METRICS_PORT = 9810


def sim_status_socket() -> Path:
    """Where ``run --sim`` serves status unless told otherwise: per user, in the temp dir, so
    ``qrad-agent status --sim`` finds it and a simulator never needs /run."""
    return Path(tempfile.gettempdir()) / f"qrad-agent-sim-{os.getuid()}" / "status.sock"


class MetricsConfig(_Section):
    """A Prometheus text endpoint (``GET /metrics``). Off by default: a radiator reports to
    its fleet over MQTT; this is for sites that scrape their boards locally."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_METRICS_PORT

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str) -> str:
        # The endpoint has no authentication: it must not be reachable from the network.
        # A remote Prometheus reaches it through an SSH tunnel or a local exporter.
        try:
            loopback = ipaddress.ip_address(v).is_loopback
        except ValueError:
            loopback = v == "localhost"
        if not loopback:
            raise ValueError(
                f"{v!r} is not a loopback address; allowed: 127.0.0.1, ::1 or localhost "
                "(the endpoint has no authentication)"
            )
        return v


class OpsConfig(_Section):
    # None: /run/qrad-agent/status.sock on a board, sim_status_socket() with --sim
    status_socket: Path | None = None
    # the socket's permission bits: owner and group may connect (connecting needs write)
    status_socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # send WATCHDOG=1 when systemd asks for it (WatchdogSec=); off only to debug a stall
    watchdog: bool = True
    # a tick later than this many control periods (plus stall_grace_s) makes the loop
    # unhealthy: keep-alives stop and systemd restarts the service
    stall_periods: Annotated[float, Field(ge=1.5, le=20)] = 3.0
    stall_grace_s: Annotated[float, Field(ge=0, le=600)] = 10.0
    # without a systemd watchdog, the agent exits (status 1, for Restart=on-failure) when no
    # tick has succeeded for this long; 0 = never
    give_up_after_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    # SIGTERM to exit: restoring the levers (stopping workers takes up to
    # actuators.workers.stop_grace_s) must finish within this; past it the agent exits anyway
    # and the restore record puts the board back at the next start. Keep it below the unit's
    # TimeoutStopSec.
    stop_timeout_s: Annotated[float, Field(ge=1, le=600)] = 30.0
    # events kept for `qrad-agent events` (the fleet gets every one over MQTT)
    events_kept: Annotated[int, Field(ge=10, le=10000)] = 200

    @field_validator("status_socket")
    @classmethod
    def _socket_path(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} is relative; use an absolute path such as "
                             f"{DEFAULT_STATUS_SOCKET}")
        # sun_path holds 108 bytes with its terminating NUL
        if len(os.fsencode(str(v))) > 107:
            raise ValueError("the path is longer than a Unix socket allows (107 bytes); "
                             "use a shorter one")
        return v

    @model_validator(mode="after")
    def _mode_readable(self) -> OpsConfig:
        if self.status_socket_mode & 0o600 != 0o600:
            raise ValueError(f"status_socket_mode {oct(self.status_socket_mode)} must let the "
                             "owner read and write (0o600 at least)")
        return self

    def socket_path(self, simulated: bool) -> Path:
        if self.status_socket is not None:
            return self.status_socket
        return sim_status_socket() if simulated else DEFAULT_STATUS_SOCKET
