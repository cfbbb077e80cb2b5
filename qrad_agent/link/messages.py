"""Every payload of the MQTT contract v1, as strict pydantic models, and the topic names.

Inbound payloads are validated from JSON text (``model_validate_json``) in strict mode: a
number sent as a string, a boolean where a number belongs, an unknown key or a missing one is
refused, and the refusal names the field and what is allowed. Outbound payloads are built
from these same models, so what the node sends is what ``docs/asyncapi.yaml`` documents.

Times are Unix seconds (wall clock, float). Temperatures are °C. Every top-level payload
carries ``v`` (the contract version) and the node id.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from qrad_agent.config import ComfortPeriod
from qrad_agent.core.models import Mode, Quality, Role

CONTRACT_VERSION = 1
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BROADCAST = "*"
MAX_TIMESTAMP = 4102444800.0  # 2100-01-01: beyond it a timestamp is a bug, not a date
MAX_SEQ = 2**53 - 1  # sequence numbers stay exact in every JSON implementation
MIN_SETPOINT_C = 5.0
MAX_SETPOINT_C = 28.0


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


NodeId = Annotated[str, Field(pattern=NODE_ID_PATTERN, description="the node id")]
Timestamp = Annotated[
    float, Field(ge=0, le=MAX_TIMESTAMP, description="Unix time in seconds (wall clock)")
]
Boot = Annotated[int, Field(ge=1, le=MAX_SEQ, description="the node's start counter")]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Temperature = Annotated[float, Field(ge=-60, le=150, description="°C")]
Setpoint = Annotated[float, Field(ge=MIN_SETPOINT_C, le=MAX_SETPOINT_C, description="°C")]
ShortText = Annotated[str, Field(max_length=500)]


# ------------------------------------------------------------------ node -> fleet


class NodeStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"  # stopped cleanly
    LOST = "lost"  # the broker's will: the connection died without a goodbye


class StatusMessage(Message):
    """Retained. ``online`` on connect, ``offline`` on a clean stop, ``lost`` as the will."""

    v: Literal[1] = 1
    node: NodeId
    status: NodeStatus
    boot: Boot
    at: Timestamp
    version: Annotated[str, Field(max_length=64)]


class SensorInfo(Message):
    name: str
    kind: str
    role: Role


class LeverMeta(Message):
    name: str
    available: bool
    why_not: str = ""
    range: dict[str, JsonValue] = Field(default_factory=dict)


class CommandName(StrEnum):
    SETPOINT = "setpoint"
    MODE = "mode"
    SCHEDULE = "schedule"
    OVERRIDE = "override"
    CONFIG = "config"
    DRAIN = "drain"
    RESUME = "resume"
    IDENTIFY = "identify"


class Meta(Message):
    """Retained. What this node is: versions, hardware, levers, power, capabilities."""

    v: Literal[1] = 1
    node: NodeId
    boot: Boot
    at: Timestamp
    version: str
    python: str
    sensors: list[SensorInfo]
    levers: list[LeverMeta]
    slots: Annotated[int, Field(ge=0, le=4096)]
    max_power_w: Annotated[float, Field(ge=0)]
    commands: list[CommandName]
    telemetry_period_s: float
    signed_commands: bool
    home_assistant: bool


class Setpoints(Message):
    comfort_c: Temperature
    eco_c: Temperature
    frost_c: Temperature
    boost_c: Temperature


class OverrideState(Message):
    target_c: Temperature
    until: Timestamp


class SafetyState(Message):
    state: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")] = "normal"
    reasons: list[ShortText] = Field(default_factory=list)


class State(Message):
    """Retained. What the node applies now; republished on every change and on reconnect."""

    v: Literal[1] = 1
    node: NodeId
    boot: Boot
    at: Timestamp
    mode: Mode
    target_c: Temperature | None  # None: not heating (mode off, no healthy room sensor)
    reason: str | None  # why this target: comfort, eco, override, window, preheat, …
    setpoints: Setpoints
    override: OverrideState | None
    schedule: list[ComfortPeriod]
    config_revision: Annotated[int, Field(ge=0)]
    draining: bool  # true: takes no new jobs (drain command)
    identify_until: Timestamp | None
    safety: SafetyState


class SensorSample(Message):
    quality: Quality
    temperature_c: Temperature | None = None
    humidity_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    co2_ppm: Annotated[float, Field(ge=0, le=100000)] | None = None


class PlanSample(Message):
    slots: Annotated[int, Field(ge=0)]
    freq_khz: Annotated[int, Field(ge=0)]
    quota: Annotated[float, Field(ge=0, le=1)]


class PowerSource(StrEnum):
    METER = "meter"
    RAPL = "rapl"
    MODEL = "model"


class TelemetrySample(Message):
    """One control tick. Fields a board cannot measure are left out."""

    seq: Seq = Field(default=0, description="per boot, +1 per sample; gaps are dropped samples")
    at: Timestamp
    room_c: Temperature | None = None
    room_sensors_ok: Annotated[int, Field(ge=0)] | None = None
    humidity_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    co2_ppm: Annotated[float, Field(ge=0, le=100000)] | None = None
    board_c: Temperature | None = None
    outdoor_c: Temperature | None = None
    target_c: Temperature | None = None
    mode: Mode | None = None
    reason: str | None = None
    demand: Annotated[float, Field(ge=0, le=1)] | None = None
    plan: PlanSample | None = None
    power_w: Annotated[float, Field(ge=0)] | None = None
    power_source: PowerSource | None = None
    energy_wh: Annotated[float, Field(ge=0)] | None = None
    jobs_running: Annotated[int, Field(ge=0)] | None = None
    safety: str | None = None
    sensors: dict[str, SensorSample] | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class TelemetryBatch(Message):
    """Samples of one boot in ``seq`` order. ``historical``: replayed from the outbox after
    an outage, not live."""

    v: Literal[1] = 1
    node: NodeId
    boot: Boot
    historical: bool
    samples: Annotated[list[TelemetrySample], Field(min_length=1, max_length=100_000)]


class EventKind(StrEnum):
    AGENT_STARTED = "agent_started"
    MODE_CHANGED = "mode_changed"
    SETPOINT_CHANGED = "setpoint_changed"
    OVERRIDE_SET = "override_set"
    OVERRIDE_CLEARED = "override_cleared"
    SCHEDULE_CHANGED = "schedule_changed"
    CONFIG_CHANGED = "config_changed"
    CONFIG_OVERLAY_INVALID = "config_overlay_invalid"
    DRAIN = "drain"
    RESUME = "resume"
    IDENTIFY = "identify"
    SENSOR_FAULT = "sensor_fault"
    SENSOR_RECOVERED = "sensor_recovered"
    WINDOW_OPEN = "window_open"
    WINDOW_CLOSED = "window_closed"
    SAFETY_TRIP = "safety_trip"
    SAFETY_STEP = "safety_step"  # the failsafe ladder moved a step down or up
    SAFETY_CLEARED = "safety_cleared"
    SAFETY_NOTICE = "safety_notice"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


Scalar = str | int | float | bool | None


class Event(Message):
    """Something happened. ``seq`` is per boot and has no gaps: events are never dropped."""

    v: Literal[1] = 1
    node: NodeId
    boot: Boot
    seq: Seq
    at: Timestamp
    kind: EventKind
    severity: Severity
    message: ShortText
    data: dict[str, Scalar] = Field(default_factory=dict)


class ResultStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


class CommandResult(Message):
    """The answer to every command: ``ok`` with the resulting state, or ``error`` with a
    reason a person can act on (nothing was changed then)."""

    v: Literal[1] = 1
    node: NodeId
    id: str | None  # the command's id; None when the message was too broken to have one
    cmd: str | None
    status: ResultStatus
    reason: ShortText | None = None
    at: Timestamp
    state: State | None = None


class HaMode(StrEnum):
    AUTO = "auto"
    HEAT = "heat"
    OFF = "off"


class HaAction(StrEnum):
    HEATING = "heating"
    IDLE = "idle"
    OFF = "off"


class HaState(Message):
    """Retained on ``{node}/ha/state`` for Home Assistant's templates: current values only."""

    room_c: Temperature | None
    target_c: Temperature | None
    mode: HaMode
    action: HaAction
    humidity_pct: float | None
    co2_ppm: float | None
    power_w: float | None
    energy_kwh: float | None


# ------------------------------------------------------------------ fleet -> node


class SetpointBody(Message):
    """The temperature wanted now.

    With ``duration_s``: a temporary override for that long. Without it: in ``auto``, an
    override until the schedule next changes (comfort <-> eco); in a fixed mode (``comfort``,
    ``eco``, ``frost``, ``boost``), that mode's setpoint is changed for good (persisted like a
    config patch). In ``off`` it is refused: set a mode first.
    """

    cmd: Literal["setpoint"]
    target_c: Setpoint
    duration_s: Annotated[float, Field(ge=60, le=7 * 86400)] | None = None


class ModeBody(Message):
    cmd: Literal["mode"]
    mode: Mode


class ScheduleBody(Message):
    """Replaces the weekly comfort schedule (persisted in the config overlay)."""

    cmd: Literal["schedule"]
    periods: Annotated[list[ComfortPeriod], Field(max_length=64)]


class OverrideBody(Message):
    """A temporary target (``target_c`` for ``duration_s``), or ``cancel: true``."""

    cmd: Literal["override"]
    target_c: Setpoint | None = None
    duration_s: Annotated[float, Field(ge=60, le=7 * 86400)] | None = None
    cancel: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> OverrideBody:
        if self.cancel and (self.target_c is not None or self.duration_s is not None):
            raise ValueError("cancel: true takes no target_c or duration_s")
        if not self.cancel and (self.target_c is None or self.duration_s is None):
            raise ValueError("an override needs both target_c and duration_s (or cancel: true)")
        return self


class ConfigBody(Message):
    """A JSON merge patch (RFC 7396) on the fleet's overlay of the config file: objects merge,
    lists and values replace, ``null`` removes the fleet's value (back to the file's). Only
    whitelisted keys; validated as a whole; applied atomically or not at all.
    ``base_revision``, when given, must equal the current revision (optimistic locking)."""

    cmd: Literal["config"]
    patch: Annotated[dict[str, JsonValue], Field(min_length=1)]
    base_revision: Annotated[int, Field(ge=0)] | None = None


class DrainBody(Message):
    """Stop taking new jobs (running ones finish); persisted until ``resume``."""

    cmd: Literal["drain"]
    reason: Annotated[str, Field(max_length=200)] | None = None


class ResumeBody(Message):
    cmd: Literal["resume"]


class IdentifyBody(Message):
    """Make the radiator show itself (LED, display) for ``duration_s``."""

    cmd: Literal["identify"]
    duration_s: Annotated[float, Field(ge=1, le=600)] = 30.0


JobIdText = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")]
MAX_ASSIGNED_JOBS = 64


class AssignBody(Message):
    """``work/assign``: jobs answering a work request (each a job spec, see
    ``jobs/spec.py`` ``JobSpec``, with the attempt it is leased for), or none and when to ask
    again. Specs are checked one by one on the radiator, so one bad spec is refused with a
    status on its own ``jobs/{job}/status`` while the others in the message are taken."""

    cmd: Literal["assign"]
    request: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    jobs: Annotated[list[dict[str, JsonValue]], Field(max_length=MAX_ASSIGNED_JOBS)] = Field(
        default_factory=list)
    retry_after_s: Annotated[float, Field(ge=0, le=86400)] | None = None


class CancelBody(Message):
    """``work/assign``: kill these jobs' whole process trees here; each is reported
    ``cancelled`` (or with the final state it already reached)."""

    cmd: Literal["cancel"]
    jobs: Annotated[list[JobIdText], Field(min_length=1, max_length=MAX_ASSIGNED_JOBS)]
    reason: Annotated[str, Field(max_length=200)] | None = None


# what the work/assign topic carries; cmd/{name} topics accept only CommandName bodies
WORK_BODIES = frozenset({"assign", "cancel"})

CommandBody = Annotated[
    SetpointBody | ModeBody | ScheduleBody | OverrideBody | ConfigBody | DrainBody | ResumeBody
    | IdentifyBody | AssignBody | CancelBody,
    Field(discriminator="cmd"),
]


class Envelope(Message):
    """A signed command. ``sig`` is Ed25519 over the canonical JSON (RFC 8785) of this object
    without ``sig``, base64url without padding; see ``link/security.py``."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    node: Annotated[str, Field(pattern=rf"{NODE_ID_PATTERN}|^\*$")]  # "*": broadcast
    issued_at: Timestamp
    expires_at: Timestamp
    seq: Annotated[int, Field(ge=1, le=MAX_SEQ)]
    body: CommandBody
    sig: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{86}$")] | None = None

    @model_validator(mode="after")
    def _window(self) -> Envelope:
        if self.expires_at <= self.issued_at:
            raise ValueError(
                f"expires_at ({self.expires_at}) must be after issued_at ({self.issued_at})"
            )
        return self


# ------------------------------------------------------------------ parsing helpers


class ParseError(ValueError):
    """A payload that is not what the contract says; the message says what and why."""


def strict_json(raw: bytes) -> Any:
    """JSON as the contract allows it: UTF-8, no duplicate keys (which would let a signed
    and an acted-upon value differ), no NaN or Infinity."""

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ParseError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise ParseError(f"{name} is not a JSON number")

    def exact_int(text: str) -> int:
        value = int(text)
        if abs(value) > MAX_SEQ + 1:
            # beyond 2^53 a number means different things to different JSON parsers (and to
            # the signer's canonical form)
            raise ParseError(f"integer {text[:30]} is too large for JSON to carry exactly")
        return value

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ParseError(f"number {text[:30]} is out of range")
        return value

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constants,
                           parse_int=exact_int, parse_float=finite_float)
    except ParseError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"not JSON: {exc}") from None
    if "\\u" in text:  # only an escape can smuggle in a lone UTF-16 surrogate
        where = _lone_surrogate(value, "")
        if where is not None:
            # such a string cannot be written as UTF-8 again: not in a reply, not in the
            # signer's canonical form, not in the database
            raise ParseError(f"{where or '(message)'}: a lone UTF-16 surrogate escape (\\ud800 "
                             "to \\udfff without its pair) is not a character")
    return value


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The key path of the first string (or key) in ``value`` holding a lone surrogate."""
    if isinstance(value, str):
        return None if value.isascii() or _encodable(value) else path
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if not _encodable(key):
                return path or "(a key)"
            found = _lone_surrogate(item, sub)
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A validation error as one line for a person: which field, what was wrong."""
    parts = []
    errors = exc.errors()
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown command; allowed: {', '.join(c.value for c in CommandName)}"
        parts.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def finite_or_none(x: float | None) -> float | None:
    """``x`` if it is a real number, else None (a NaN must not reach a JSON payload)."""
    return x if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------ topics


@dataclass(frozen=True)
class Topics:
    """The topic names of one node. ``prefix`` is ``qrad/v1`` unless configured."""

    prefix: str
    node: str
    ha_prefix: str = "homeassistant"

    def _n(self, leaf: str) -> str:
        return f"{self.prefix}/nodes/{self.node}/{leaf}"

    def node_topic(self, leaf: str) -> str:
        """``{prefix}/nodes/{node}/{leaf}``, for the topics other parts own (work, jobs)."""
        if not leaf or leaf.startswith("/") or leaf.endswith("/"):
            raise ValueError(f"{leaf!r} is not a topic below the node: use e.g. 'work/assign'")
        return self._n(leaf)

    @property
    def status(self) -> str:
        return self._n("status")

    @property
    def meta(self) -> str:
        return self._n("meta")

    @property
    def state(self) -> str:
        return self._n("state")

    @property
    def telemetry(self) -> str:
        return self._n("telemetry")

    @property
    def events(self) -> str:
        return self._n("events")

    @property
    def cmd_result(self) -> str:
        return self._n("cmd/result")

    @property
    def cmd_filter(self) -> str:
        return self._n("cmd/+")

    def cmd(self, name: str) -> str:
        return self._n(f"cmd/{name}")

    @property
    def fleet_cmd_filter(self) -> str:
        return f"{self.prefix}/fleet/cmd/+"

    def fleet_cmd(self, name: str) -> str:
        return f"{self.prefix}/fleet/cmd/{name}"

    @property
    def ha_state(self) -> str:
        return self._n("ha/state")

    @property
    def ha_set_filter(self) -> str:
        return self._n("ha/set/+")

    def ha_set(self, what: str) -> str:
        return self._n(f"ha/set/{what}")

    @property
    def ha_status(self) -> str:
        return f"{self.ha_prefix}/status"

    def ha_discovery(self, component: str, object_id: str) -> str:
        # {prefix}/{component}/{node}/{object}/config: the node id is a whole topic level, so
        # one ACL pattern (%u) confines each node to its own discovery topics
        return f"{self.ha_prefix}/{component}/{self.node}/{object_id}/config"

    def classify(self, topic: str) -> tuple[str, str] | None:
        """("node" | "fleet" | "ha_set" | "ha_status", name) for an inbound topic, else None."""
        if topic == self.ha_status:
            return "ha_status", ""
        node_cmd = self._n("cmd/")
        if topic.startswith(node_cmd) and "/" not in topic[len(node_cmd):]:
            return "node", topic[len(node_cmd):]
        fleet_cmd = f"{self.prefix}/fleet/cmd/"
        if topic.startswith(fleet_cmd) and "/" not in topic[len(fleet_cmd):]:
            return "fleet", topic[len(fleet_cmd):]
        ha_set = self._n("ha/set/")
        if topic.startswith(ha_set) and "/" not in topic[len(ha_set):]:
            return "ha_set", topic[len(ha_set):]
        return None
