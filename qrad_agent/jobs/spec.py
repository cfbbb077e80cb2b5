"""What a job is (``JobSpec``) and what a radiator says about it (``JobStatus``).

Both are wire models of the pull protocol (DESIGN.md, "Jobs: a pull protocol with leases"):
a spec arrives on ``work/assign`` inside the fleet's signed envelope, a status leaves on
``jobs/{job}/status``. Like the rest of the contract (``link/messages.py``) they are strict:
unknown keys, a number sent as a string or a missing field are refused, and the refusal
names the field and what is allowed.

Everything a job can send to the radiator is bounded here, before anything is written to
disk or started: argv, environment, inline inputs and expected outputs have a maximum count
and size. What *this* radiator allows on top (executables, environment names, memory,
timeout) is its configuration's business (``jobs/settings.py``, checked by the sandbox).

argv is executed directly, never through a shell: there is no string form of a command.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qrad_agent.core.jobs import Priority

__all__ = [
    "TERMINAL",
    "InputFile",
    "JobSpec",
    "JobState",
    "JobStatus",
    "OutputDigest",
    "OutputFile",
    "Priority",
    "Reason",
    "SpecError",
    "WorkAssignment",
    "WorkRequestMessage",
    "parse_spec",
    "salvage_key",
]

JOB_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
REASON_PATTERN = r"^[a-z][a-z_]{0,39}$"
_ENV_NAME = re.compile(ENV_NAME_PATTERN)

MAX_ARGV = 256  # items
MAX_ARG_CHARS = 4096
MAX_ARGV_BYTES = 64 * 1024  # all of argv, UTF-8
MAX_ENV = 64
MAX_ENV_VALUE = 4096
MAX_INPUTS = 32
MAX_INPUT_BYTES = 256 * 1024  # all inline inputs together, decoded
MAX_OUTPUTS = 32
MAX_PATH_CHARS = 255
MAX_PATH_DEPTH = 8
MAX_TAIL_CHARS = 8192
MAX_OUTPUT_DATA_CHARS = 512 * 1024  # base64 of one collected output file in a status
MAX_TIMESTAMP = 4102444800.0  # 2100-01-01, as in link/messages.py


class SpecError(ValueError):
    """A job spec that cannot be accepted; ``str()`` says which field and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN,
                             description="the fleet's job id: letters, digits and _.:-")]
Attempt = Annotated[int, Field(ge=1, le=1000, description="1 for the first placement")]


def _relative_path(v: str, what: str) -> str:
    """A path inside the job's work directory: relative, normalised, nothing that climbs."""
    if not v or len(v) > MAX_PATH_CHARS:
        raise ValueError(f"{what} path must be 1 to {MAX_PATH_CHARS} characters")
    if "\0" in v or "\\" in v:
        raise ValueError(f"{what} path {v!r} holds a NUL or a backslash; use '/' only")
    if v.startswith("/"):
        raise ValueError(f"{what} path {v!r} is absolute; give it relative to the work directory")
    parts = v.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{what} path {v!r} must be normalised: no empty, '.' or '..' parts, no "
            "trailing '/'"
        )
    if len(parts) > MAX_PATH_DEPTH:
        raise ValueError(f"{what} path {v!r} is deeper than {MAX_PATH_DEPTH} directories")
    if any(p.startswith("-") for p in parts):
        raise ValueError(f"{what} path {v!r} has a part starting with '-' (read as an option)")
    return v


class InputFile(_Model):
    """A small file written into the work directory before the job starts."""

    path: str
    data: Annotated[str, Field(description="the content, base64 (RFC 4648, padded)")]
    executable: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _relative_path(v, "input")

    @field_validator("data")
    @classmethod
    def _base64(cls, v: str) -> str:
        if len(v) > (MAX_INPUT_BYTES * 4) // 3 + 4:
            raise ValueError(f"input data exceeds {MAX_INPUT_BYTES} bytes")
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("input data is not base64 (standard alphabet, padded)") from None
        return v

    def content(self) -> bytes:
        return base64.b64decode(self.data, validate=True)


class JobSpec(_Model):
    """One placement of a job on a radiator."""

    job: JobId
    attempt: Attempt = 1
    priority: Priority = Priority.LOW
    argv: Annotated[list[str], Field(min_length=1, max_length=MAX_ARGV)]
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV)
    cores: Annotated[int, Field(ge=1, le=256)] = 1
    memory_mb: Annotated[int, Field(ge=16, le=1_048_576)] = 512
    timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 3600.0
    lease_s: Annotated[float, Field(ge=5, le=86400)] = 300.0
    inputs: Annotated[list[InputFile], Field(max_length=MAX_INPUTS)] = Field(default_factory=list)
    outputs: Annotated[list[str], Field(max_length=MAX_OUTPUTS)] = Field(default_factory=list)
    idempotent: bool = False  # may run again from the start after a crash of the radiator

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("argv[0] must name the program to run")
        for i, arg in enumerate(v):
            if "\0" in arg:
                raise ValueError(f"argv[{i}] holds a NUL byte")
            if len(arg) > MAX_ARG_CHARS:
                raise ValueError(f"argv[{i}] is longer than {MAX_ARG_CHARS} characters")
        if sum(len(a.encode()) + 1 for a in v) > MAX_ARGV_BYTES:
            raise ValueError(f"argv is longer than {MAX_ARGV_BYTES} bytes in all")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(
                    f"environment name {name!r} is not allowed: use letters, digits and _, "
                    "not starting with a digit, at most 128 characters"
                )
            if "\0" in value or len(value) > MAX_ENV_VALUE:
                raise ValueError(
                    f"environment value of {name} must have no NUL byte and at most "
                    f"{MAX_ENV_VALUE} characters"
                )
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        for p in v:
            _relative_path(p, "output")
        dupes = sorted({p for p in v if v.count(p) > 1})
        if dupes:
            raise ValueError(f"output paths must be unique; repeated: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _inputs_bounded(self) -> JobSpec:
        paths = [f.path for f in self.inputs]
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        if dupes:
            raise ValueError(f"input paths must be unique; repeated: {', '.join(dupes)}")
        total = sum(len(f.content()) for f in self.inputs)
        if total > MAX_INPUT_BYTES:
            raise ValueError(
                f"inline inputs hold {total} bytes in all; at most {MAX_INPUT_BYTES} are allowed"
                " (larger data belongs in storage the job fetches)"
            )
        names = set(paths)
        for p in paths:
            # "a" as a file and "a/b" as another would need "a" to be both
            parent = p.rpartition("/")[0]
            while parent:
                if parent in names:
                    raise ValueError(
                        f"input {parent!r} is a file but {p!r} needs it as a directory")
                parent = parent.rpartition("/")[0]
        return self

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.attempt)


def parse_spec(raw: bytes | str | Mapping[str, Any]) -> JobSpec:
    """A ``JobSpec`` from JSON text or an already parsed object; :class:`SpecError` if not.

    Parsed objects go through JSON too, so a spec from a TOML file or a test is held to
    exactly the rules a spec from the wire is.
    """
    try:
        text = raw if isinstance(raw, bytes | str) else json.dumps(raw, allow_nan=False)
        return JobSpec.model_validate_json(text)
    except ValidationError as exc:
        raise SpecError(describe(exc)) from None
    except (TypeError, ValueError) as exc:
        raise SpecError(f"not a JSON object: {exc}") from None


def salvage_key(raw: bytes | str | Mapping[str, Any]) -> tuple[str, int] | None:
    """The (job id, attempt) of a spec too broken to parse, if they can be read, so that the
    refusal can be reported on the job's own status topic."""
    try:
        obj = json.loads(raw) if isinstance(raw, bytes | str) else raw
        job, attempt = obj.get("job"), obj.get("attempt", 1)
    except (ValueError, AttributeError, TypeError):
        return None
    if isinstance(job, str) and re.match(JOB_ID_PATTERN, job) and type(attempt) is int \
            and 1 <= attempt <= 1000:
        return job, attempt
    return None


def describe(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


# ------------------------------------------------------------------ status


class JobState(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUSPENDED = "suspended"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETURNED = "returned"  # given back so the fleet places it elsewhere

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                      JobState.RETURNED})


class Reason(StrEnum):
    """Why a job left the radiator the way it did (``JobStatus.reason``)."""

    EXIT_STATUS = "exit_status"  # ended with a status other than 0
    KILLED = "killed"  # ended by a signal nobody here sent (SIGXCPU, SIGSEGV, the OOM killer)
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # the fleet asked
    INTERRUPTED = "interrupted"  # the radiator stopped (crash, power cut) while it ran
    INVALID_SPEC = "invalid_spec"
    NOT_ALLOWED = "not_allowed"  # executable or environment not allowed here
    TOO_BIG = "too_big"  # more cores, memory or time than this radiator gives one job
    BUSY = "busy"  # another attempt of this job id is live here
    EXEC_FAILED = "exec_failed"
    SANDBOX_ERROR = "sandbox_error"
    LEASE_EXPIRED = "lease_expired"
    MODE_OFF = "mode_off"
    SEASON_WARM = "season_warm"
    NO_HEAT = "no_heat"
    NO_SLOT = "no_slot"
    AGENT_STOPPING = "agent_stopping"
    RERUN = "rerun"  # idempotent, queued again after the radiator stopped while it ran
    DRAINING = "draining"  # the radiator takes no new work
    DISABLED = "disabled"  # jobs are switched off in this radiator's config


class OutputDigest(_Model):
    """The job's standard output and error (merged), bounded: size, SHA-256 and the tail."""

    bytes: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    tail: Annotated[str, Field(max_length=MAX_TAIL_CHARS)]
    truncated: bool  # the tail is not the whole output


class OutputFile(_Model):
    """One expected output file as found after the job ended."""

    path: str
    found: bool
    bytes: Annotated[int, Field(ge=0)] = 0
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    data: Annotated[str, Field(max_length=MAX_OUTPUT_DATA_CHARS)] | None = None  # base64
    why: Annotated[str, Field(max_length=200)] | None = None  # not found or not included


class JobStatus(_Model):
    """One report about one attempt of one job. ``seq`` grows with every change of state on
    this radiator (heartbeats repeat it), so a reordered or replayed report can be told."""

    v: Literal[1] = 1
    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    job: JobId
    attempt: Attempt
    state: JobState
    seq: Annotated[int, Field(ge=0)] = 0
    at: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, description="Unix time, seconds")]
    exit_code: int | None = None
    signal: Annotated[int, Field(ge=1, le=128)] | None = None
    cpu_s: Annotated[float, Field(ge=0)] | None = None
    wall_s: Annotated[float, Field(ge=0)] | None = None
    energy_wh: Annotated[float, Field(ge=0)] | None = None
    output: OutputDigest | None = None
    outputs: Annotated[list[OutputFile], Field(max_length=MAX_OUTPUTS)] = Field(
        default_factory=list)
    reason: Annotated[str, Field(pattern=REASON_PATTERN)] | None = None
    detail: Annotated[str, Field(max_length=500)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> JobStatus:
        if self.state in (JobState.FAILED, JobState.CANCELLED, JobState.RETURNED) \
                and not self.reason:
            raise ValueError(f"a {self.state.value} status needs a reason")
        if self.state is JobState.SUCCEEDED and self.exit_code not in (0, None):
            raise ValueError(f"succeeded with exit code {self.exit_code}: only 0 is success")
        return self

    @property
    def key(self) -> tuple[str, int]:
        return (self.job, self.attempt)


# ------------------------------------------------------------------ work request / assignment


class WorkRequestMessage(_Model):
    """``work/request``: the radiator can take work now. Expires at ``expires_at``."""

    v: Literal[1] = 1
    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    at: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP)]
    expires_at: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP)]
    free_slots: Annotated[int, Field(ge=1, le=4096)]
    heat_budget_w: Annotated[float, Field(ge=0)]
    horizon_s: Annotated[float, Field(gt=0, le=86400)]
    max_cores: Annotated[int, Field(ge=1, le=4096)]
    max_memory_mb: Annotated[int, Field(ge=16)]
    max_timeout_s: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _window(self) -> WorkRequestMessage:
        if self.expires_at <= self.at:
            raise ValueError(f"expires_at ({self.expires_at}) must be after at ({self.at})")
        return self


class WorkAssignment(_Model):
    """``work/assign`` body: jobs answering a request, or none and when to ask again."""

    request: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    jobs: Annotated[list[JobSpec], Field(max_length=64)] = Field(default_factory=list)
    retry_after_s: Annotated[float, Field(ge=0, le=86400)] | None = None
