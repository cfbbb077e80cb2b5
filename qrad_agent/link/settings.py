"""The ``[link]`` section of the agent config: broker, TLS, auth, topics, telemetry, outbox,
command security and Home Assistant.

This module must not import ``qrad_agent.config`` (which imports it), so it has its own base
class with the same rules: unknown keys are errors, assignments are validated.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from qrad_agent.section import Section as _Section

_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")


class TlsConfig(_Section):
    """TLS to the broker. The server certificate is always verified (against ``ca_file``, or
    the system's CAs when it is unset) and so is its host name; there is no switch to turn
    either off. A client certificate identifies the node: its CN must be the node id."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file go together: set both (client certificate and its "
                "private key) or neither"
            )
        if not self.enabled and any((self.ca_file, self.cert_file, self.key_file)):
            raise ValueError("ca_file, cert_file and key_file need enabled = true")
        return self


class AuthConfig(_Section):
    """MQTT username and password, for brokers that authenticate that way. Prefer
    ``password_file`` (readable by the agent only) to a password in the config file."""

    username: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    password: Annotated[str, Field(max_length=256)] | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_password(self) -> AuthConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.username is None and (self.password is not None or self.password_file):
            raise ValueError("a password needs a username")
        return self

    def read_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return self.password


class BrokerConfig(_Section):
    host: Annotated[str, Field(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # None: 8883 with TLS, else 1883
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    connect_timeout_s: Annotated[float, Field(ge=0.5, le=120)] = 10.0
    # MQTT 5 session expiry: subscriptions and commands queued for the node survive an outage
    # this long. The first connect after a start is clean (nothing stale from a previous run).
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 86400)] = 3600
    # Reconnect delay: uniformly random in [0, min(max, min * 2^n)] after n failures ("full
    # jitter"), so a fleet does not stampede a broker that just came back.
    reconnect_min_s: Annotated[float, Field(ge=0.01, le=60)] = 1.0
    reconnect_max_s: Annotated[float, Field(ge=0.1, le=3600)] = 120.0
    # MQTT 5 will delay: a reconnect within this time does not publish the "lost" will
    will_delay_s: Annotated[int, Field(ge=0, le=3600)] = 0
    tls: TlsConfig = Field(default_factory=TlsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _ordered(self) -> BrokerConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must not be below reconnect_min_s "
                f"({self.reconnect_min_s})"
            )
        if self.will_delay_s > self.session_expiry_s:
            raise ValueError(
                f"will_delay_s ({self.will_delay_s}) must not exceed session_expiry_s "
                f"({self.session_expiry_s}): the broker sends the will when the session ends"
            )
        return self

    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls.enabled else 1883


class TopicsConfig(_Section):
    prefix: Annotated[str, Field(min_length=1, max_length=64)] = "qrad/v1"
    # A request's MQTT 5 ResponseTopic is used only under one of these prefixes (the ACL lets
    # nodes write there); any other gets its result on the node's own cmd/result.
    reply_prefixes: list[str] = Field(default_factory=lambda: ["qrad/v1/replies/"])

    @field_validator("prefix")
    @classmethod
    def _levels(cls, v: str) -> str:
        if not all(_TOPIC_LEVEL.match(level) for level in v.split("/")):
            raise ValueError(
                f"{v!r} is not a topic prefix; use levels of letters, digits, '_', '.', '-' "
                "joined by '/', without wildcards or a trailing '/'"
            )
        return v

    @field_validator("reply_prefixes")
    @classmethod
    def _no_wildcards(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or "+" in p or "#" in p or not p.endswith("/"):
                raise ValueError(
                    f"reply prefix {p!r} is invalid; use a topic prefix ending in '/' without "
                    "wildcards, e.g. 'qrad/v1/replies/'"
                )
        return v


class TelemetryConfig(_Section):
    # one sample per control tick is stored; they leave in one batch per period
    period_s: Annotated[float, Field(ge=1, le=3600)] = 60.0


class OutboxConfig(_Section):
    """Store-and-forward bounds. When over a bound the oldest telemetry goes first; events,
    command results and job reports are never dropped."""

    max_bytes: Annotated[int, Field(ge=16 * 1024, le=4 * 1024**3)] = 64 * 1024**2
    max_age_s: Annotated[float, Field(ge=60, le=90 * 86400)] = 14 * 86400.0
    # replay after a reconnect: this many bytes per second at most, in batches up to
    # batch_bytes, with at most max_inflight messages awaiting their PUBACK
    replay_bytes_per_s: Annotated[int, Field(ge=1024, le=100 * 1024**2)] = 1024**2
    batch_bytes: Annotated[int, Field(ge=1024, le=1024**2)] = 64 * 1024
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 20

    @model_validator(mode="after")
    def _batch_fits(self) -> OutboxConfig:
        if self.batch_bytes > self.max_bytes:
            raise ValueError(
                f"batch_bytes ({self.batch_bytes}) must not exceed max_bytes ({self.max_bytes})"
            )
        return self


class FleetKey(_Section):
    """A fleet public key allowed to sign commands: ``public_key`` is the raw 32-byte Ed25519
    key in base64, as ``qrad-fleet keygen`` prints it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _raw_ed25519(cls, v: str) -> str:
        text = v.strip()
        padded = text + "=" * (-len(text) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(
                "not an Ed25519 public key; use the 32-byte key in base64 (44 characters) as "
                "`qrad-fleet keygen` prints it"
            )
        return text


class SecurityConfig(_Section):
    # None: signatures are required on a board and optional in the simulator
    require_signed: bool | None = None
    fleet_keys: list[FleetKey] = Field(default_factory=list)
    max_clock_skew_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    # a command valid for longer than this is refused: a leaked envelope stays usable briefly
    max_lifetime_s: Annotated[float, Field(ge=1, le=30 * 86400)] = 86400.0
    max_command_bytes: Annotated[int, Field(ge=1024, le=1024**2)] = 64 * 1024

    @field_validator("fleet_keys")
    @classmethod
    def _unique(cls, v: list[FleetKey]) -> list[FleetKey]:
        names = [k.name for k in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"fleet key names must be unique; repeated: {', '.join(dupes)}")
        return v

    def signed_required(self, simulated: bool) -> bool:
        return (not simulated) if self.require_signed is None else self.require_signed


class HomeAssistantConfig(_Section):
    """Home Assistant MQTT discovery: a climate entity and sensors for this radiator."""

    enabled: bool = False
    discovery_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "homeassistant"
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # default: node id
    # Home Assistant cannot sign. With trust_commands its setpoint and mode commands are
    # accepted unsigned (they still pass the same validation): trust in whoever may publish on
    # the node's ha/set topics, which the shipped ACL gives to the Home Assistant account only.
    # Without it the entity is read-only.
    trust_commands: bool = False


class LinkConfig(_Section):
    enabled: bool = False
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    home_assistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
