"""Configuration: TOML validated by pydantic. Unknown keys are errors, and every error names
the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from qrad_agent.actuators.settings import (
    CgroupConfig,
    DutyCycleConfig,
    MeteringConfig,
    RaplLimitConfig,
    WorkersConfig,
)
from qrad_agent.core.models import Mode, Role
from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.link.settings import LinkConfig
from qrad_agent.ops.settings import OpsConfig
from qrad_agent.safety_settings import AutotuneConfig, SafetyConfig
from qrad_agent.section import Section

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class NodeConfig(Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = "qrad-sim"
    state_dir: Path = Path("/var/lib/qrad-agent")


class ControlConfig(Section):
    period_s: Annotated[float, Field(ge=1, le=300)] = 10.0
    sensor_period_s: Annotated[float, Field(ge=0.5, le=60)] = 2.0

    @model_validator(mode="after")
    def _sensors_not_slower(self) -> ControlConfig:
        if self.sensor_period_s > self.period_s:
            raise ValueError(
                f"sensor_period_s ({self.sensor_period_s}) must not exceed period_s "
                f"({self.period_s}): every control tick needs a fresh reading"
            )
        return self


class PidConfig(Section):
    """Gains in demand units: demand 1.0 = every slot at full speed."""

    # Defaults from SIMC rules on the shipped rooms (air time constant ~75 min, ~5 K per unit
    # of demand): integral time kp/ki ≈ 42 min. `qrad-agent tune` fits them to a real room.
    kp: Annotated[float, Field(ge=0, le=10)] = 1.0  # per kelvin
    ki: Annotated[float, Field(ge=0, le=0.1)] = 0.0004  # per kelvin-second
    kd: Annotated[float, Field(ge=0, le=10000)] = 0.0  # per kelvin/second
    d_filter_s: Annotated[float, Field(ge=0, le=3600)] = 120.0  # derivative low-pass time const
    # low-pass on the room temperature the PID sees: averages a sensor's last-bit dither
    # (0.0625 K on a TMP102) so the demand does not flap, at a lag rooms do not notice
    input_filter_s: Annotated[float, Field(ge=0, le=900)] = 60.0
    feedforward_w_per_k: Annotated[float, Field(ge=0, le=1000)] = 0.0  # 0 = no outdoor feed-forward


class ComfortPeriod(Section):
    """A comfort period on some days, e.g. ``{days = "mon-fri", start = "06:00", end = "22:00"}``.

    ``end`` before ``start`` means the period runs past midnight into the next day.
    """

    days: str = "mon-sun"
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not a time of day; use HH:MM from 00:00 to 24:00")
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: str) -> str:
        parse_days(v)
        return v

    def weekdays(self) -> list[int]:
        return parse_days(self.days)

    def minutes(self) -> tuple[int, int]:
        def m(s: str) -> int:
            h, mm = s.split(":")
            return int(h) * 60 + int(mm)

        return m(self.start), m(self.end)


def parse_days(spec: str) -> list[int]:
    """``"mon-fri"``, ``"sat,sun"``, ``"mon-sun"`` or ``"daily"`` to weekday numbers (Mon = 0)."""
    spec = spec.strip().lower()
    if spec == "daily":
        return list(range(7))
    days: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        ends = part.split("-")
        if len(ends) > 2 or any(e not in DAY_NAMES for e in ends):
            raise ValueError(
                f"{spec!r} is not a set of days; use names from {', '.join(DAY_NAMES)} "
                "joined by ',' and '-' (e.g. 'mon-fri' or 'sat,sun'), or 'daily'"
            )
        a, b = DAY_NAMES.index(ends[0]), DAY_NAMES.index(ends[-1])
        days.extend(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return sorted(set(days))


class WindowConfig(Section):
    """Window-open detection from the room temperature's slope."""

    enabled: bool = True
    drop_k: Annotated[float, Field(gt=0, le=10)] = 0.6  # fall that signals an open window …
    within_s: Annotated[float, Field(ge=30, le=1800)] = 300.0  # … within this time
    max_off_s: Annotated[float, Field(ge=60, le=7200)] = 1800.0  # longest heating pause


class OptimalStartConfig(Section):
    enabled: bool = True
    initial_rate_k_per_h: Annotated[float, Field(gt=0, le=20)] = 1.0  # until one warm-up is seen
    max_lead_s: Annotated[float, Field(ge=0, le=6 * 3600)] = 4 * 3600.0


class ThermostatConfig(Section):
    mode: Mode = Mode.AUTO
    comfort_c: Annotated[float, Field(ge=10, le=28)] = 21.0
    eco_c: Annotated[float, Field(ge=5, le=28)] = 18.0
    frost_c: Annotated[float, Field(ge=5, le=12)] = 7.0
    boost_c: Annotated[float, Field(ge=10, le=28)] = 23.0
    boost_s: Annotated[float, Field(ge=60, le=4 * 3600)] = 3600.0
    schedule: list[ComfortPeriod] = Field(
        default_factory=lambda: [ComfortPeriod(days="mon-sun", start="06:00", end="22:00")]
    )
    window: WindowConfig = Field(default_factory=WindowConfig)
    optimal_start: OptimalStartConfig = Field(default_factory=OptimalStartConfig)

    @model_validator(mode="after")
    def _ordered(self) -> ThermostatConfig:
        if not self.frost_c <= self.eco_c <= self.comfort_c:
            raise ValueError(
                f"setpoints must satisfy frost_c <= eco_c <= comfort_c; got frost_c={self.frost_c},"
                f" eco_c={self.eco_c}, comfort_c={self.comfort_c}"
            )
        return self


class AllocatorConfig(Section):
    """How heat demand becomes worker slots, a frequency cap and a CPU quota."""

    slots: Annotated[int, Field(ge=0, le=256)] = 0  # 0 = one per CPU core
    min_on_s: Annotated[float, Field(ge=0, le=7200)] = 600.0
    min_off_s: Annotated[float, Field(ge=0, le=7200)] = 600.0
    slot_hysteresis: Annotated[float, Field(ge=0, le=0.9)] = 0.3  # in slots
    start_demand: Annotated[float, Field(gt=0, le=0.5)] = 0.04  # first slot starts above this
    stop_demand: Annotated[float, Field(ge=0, le=0.5)] = 0.01  # slots pause below this …
    # … and stop after this long a pause: an airing, a sunny afternoon or a warm evening only
    # pause the work (a frozen worker costs memory, not heat); a night off or a warm spell
    # stops it. Jobs themselves are returned to the fleet on their own grace period.
    stop_after_s: Annotated[float, Field(ge=0, le=86400)] = 6 * 3600.0
    min_quota: Annotated[float, Field(gt=0, le=1)] = 0.05

    @model_validator(mode="after")
    def _ordered(self) -> AllocatorConfig:
        if self.stop_demand >= self.start_demand:
            raise ValueError(
                f"stop_demand ({self.stop_demand}) must be below start_demand "
                f"({self.start_demand}) so the last slot has hysteresis"
            )
        return self


class PowerModelConfig(Section):
    """Board watts = idle_w + per slot: slot_w * (freq / max_freq) ** freq_exponent * quota."""

    idle_w: Annotated[float, Field(ge=0, le=2000)] = 20.0
    slot_w: Annotated[float, Field(gt=0, le=1000)] = 120.0
    freq_exponent: Annotated[float, Field(ge=0.5, le=3)] = 1.5


class SensorHealthConfig(Section):
    """How a sensor's readings are judged (``sensors/health.py``). The defaults suit room
    sensors polled every few seconds; every threshold can be set per sensor in
    ``[sensors.health]`` under its ``[[sensors]]`` entry."""

    # extra attempts within one poll after an I2C error (NACK, timeout, remote I/O)
    retries: Annotated[int, Field(ge=0, le=5)] = 2
    # fastest believable temperature change; unset = by role (room 2, intake 5, exhaust 30,
    # board none: a CPU can swing tens of kelvin in a second); 0 = no rate check
    max_rate_k_per_min: Annotated[float, Field(ge=0, le=600)] | None = None
    # allowance on top of the rate for noise and resolution: one LM75 count is 0.5 K
    rate_margin_k: Annotated[float, Field(ge=0, le=10)] = 0.6
    # a new level that holds steady this long after a too-fast change is a real step (the
    # sensor was moved, a door stays open) and is accepted; shorter excursions are refused
    step_confirm_s: Annotated[float, Field(ge=10, le=3600)] = 60.0
    # identical raw value this long (and at least 30 reads) on a chip that normally dithers
    # = stuck
    stuck_after_s: Annotated[float, Field(ge=10, le=7 * 86400)] = 900.0
    # a chip with no new measurement yet (SCD4x between its 5 s samples, a DS18B20 that did
    # not convert) stands in with its last good value for at most this long
    hold_last_good_s: Annotated[float, Field(ge=0, le=3600)] = 15.0


SYSFS_SENSOR_KINDS = ("ds18b20", "board")
_W1_ID = re.compile(r"^28-[0-9a-f]{12}$")


class SensorConfig(Section):
    """One sensor. I2C kinds take ``bus`` and ``address``; ``ds18b20`` takes ``device`` (its
    w1 id); ``board`` is the hottest CPU temperature from hwmon/thermal zones. The last two are
    read from the sysfs mounted at ``sysfs_root``."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")]
    kind: str
    bus: Annotated[int, Field(ge=0, le=255)] = 1
    address: Annotated[int, Field(ge=0x03, le=0x77)] | None = None
    device: str | None = None
    role: Role = Role.ROOM
    sysfs_root: Path = Path("/sys")
    health: SensorHealthConfig = Field(default_factory=SensorHealthConfig)

    @model_validator(mode="before")
    @classmethod
    def _board_role(cls, data: Any) -> Any:
        # a board sensor is the board's temperature unless the config says otherwise (and is
        # then refused below, naming the conflict); set here so the default reads right
        if isinstance(data, dict) and data.get("kind") == "board" and "role" not in data:
            return {**data, "role": Role.BOARD.value}
        return data

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        from qrad_agent.sensors import REGISTRY

        if v not in REGISTRY and v not in SYSFS_SENSOR_KINDS:
            allowed = ", ".join(sorted([*REGISTRY, *SYSFS_SENSOR_KINDS]))
            raise ValueError(f"unknown sensor kind {v!r}; allowed: {allowed}")
        return v

    @field_validator("device")
    @classmethod
    def _w1_id(cls, v: str | None) -> str | None:
        if v is not None and not _W1_ID.match(v):
            raise ValueError(
                "not a DS18B20 id; use its directory name under /sys/bus/w1/devices: 28-, "
                "then 12 lowercase hex digits (e.g. 28-0316a2790eff)"
            )
        return v

    @field_validator("sysfs_root")
    @classmethod
    def _sysfs_mount(cls, v: Path) -> Path:
        # drivers address sysfs files as sys/class/..., sys/bus/... under the mount's parent
        if v.name != "sys":
            raise ValueError(
                "must be the directory where sysfs is mounted, a path ending in /sys "
                "(normally /sys; for a test tree <dir>/sys)"
            )
        return v

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SensorConfig:
        def refuse(keys: set[str], why: str) -> None:
            keys &= self.model_fields_set
            if keys:
                names = " and ".join(sorted(keys))
                verb, pronoun = ("does", "it") if len(keys) == 1 else ("do", "them")
                raise ValueError(
                    f"{names} {verb} not apply to kind {self.kind!r} ({why}); remove {pronoun}"
                )

        if self.kind == "ds18b20":
            refuse({"bus", "address"}, "a 1-Wire sensor, found by its device id")
        elif self.kind == "board":
            refuse({"bus", "address", "device"}, "read from hwmon and thermal zones in sysfs")
        else:
            refuse({"device"}, "an I2C sensor; device is the w1 id of a ds18b20")
            refuse({"sysfs_root"}, "an I2C sensor; sysfs_root is for kinds ds18b20 and board")
        if self.kind == "ds18b20" and self.device is None:
            raise ValueError(
                "device is required for kind 'ds18b20': the sensor's w1 id such as "
                "28-0316a2790eff (`ls /sys/bus/w1/devices` lists them)"
            )
        if self.kind == "board" and self.role is not Role.BOARD:
            raise ValueError(
                f"role {self.role.value!r} is not allowed for kind 'board', the CPU "
                f"temperature: use role 'board' (or leave role out)"
            )
        if self.kind not in SYSFS_SENSOR_KINDS and self.address is not None:
            from qrad_agent.sensors import REGISTRY

            allowed = REGISTRY[self.kind].addresses
            if self.address not in allowed:
                raise ValueError(
                    f"address 0x{self.address:02x} is not one a {self.kind} can be strapped "
                    f"to; allowed for {self.kind}: {', '.join(f'0x{a:02x}' for a in allowed)}"
                )
        return self


class CpufreqConfig(Section):
    enabled: bool = True
    sysfs_root: Path = Path("/sys")


class ActuatorsConfig(Section):
    cpufreq: CpufreqConfig = Field(default_factory=CpufreqConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    cgroups: CgroupConfig = Field(default_factory=CgroupConfig)
    duty_cycle: DutyCycleConfig = Field(default_factory=DutyCycleConfig)
    rapl: RaplLimitConfig = Field(default_factory=RaplLimitConfig)


class SimConfig(Section):
    """The simulated radiator used by ``run --sim`` (and by ``simulate`` unless a scenario says)."""

    scenario: str = "winter-week"  # a shipped scenario name or a path to a scenario TOML
    cores: Annotated[int, Field(ge=1, le=64)] = 4
    min_freq_khz: Annotated[int, Field(ge=100_000)] = 800_000
    max_freq_khz: Annotated[int, Field(ge=100_000)] = 3_000_000
    freq_step_khz: Annotated[int, Field(ge=1_000)] = 100_000
    sensor_noise_k: Annotated[float, Field(ge=0, le=1)] = 0.02


class AgentConfig(Section):
    node: NodeConfig = Field(default_factory=NodeConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    pid: PidConfig = Field(default_factory=PidConfig)
    thermostat: ThermostatConfig = Field(default_factory=ThermostatConfig)
    allocator: AllocatorConfig = Field(default_factory=AllocatorConfig)
    power_model: PowerModelConfig = Field(default_factory=PowerModelConfig)
    sensors: list[SensorConfig] = Field(
        default_factory=lambda: [SensorConfig(name="room", kind="tmp102", bus=1, address=0x48)]
    )
    actuators: ActuatorsConfig = Field(default_factory=ActuatorsConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    autotune: AutotuneConfig = Field(default_factory=AutotuneConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)

    @field_validator("sensors")
    @classmethod
    def _unique_names(cls, v: list[SensorConfig]) -> list[SensorConfig]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sensor names must be unique; repeated: {', '.join(dupes)}")
        return v


class ConfigError(Exception):
    """An invalid configuration; ``problems`` holds one line per fault, for people."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def describe_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `qrad-agent config schema` lists every key)"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) \
            else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}")
    return lines


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc)) from None


def read_toml(path: Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file's content, or ``error`` saying why the file cannot be read as TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise error(str(path), [
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(str(path), [f"not valid TOML: {exc}"]) from None


def load_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    return parse_config(read_toml(path), str(path))


def json_schema() -> dict[str, Any]:
    return AgentConfig.model_json_schema()
