"""``[jobs]``: who runs the fleet's jobs, what they may run, their limits, and the scheduling
knobs. Imports nothing of the agent's but the core, so ``config.py`` can import it.

Safe defaults: no executable is allowed until the operator lists one, jobs never run as
root (a dedicated unprivileged user, ``qrad-job``, which the package's install creates), and
every limit is finite.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from qrad_agent.core.jobs import PolicyConfig
from qrad_agent.section import Section

_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_ENV_PATTERN = re.compile(r"^[A-Za-z_*?][A-Za-z0-9_*?]{0,127}$")
# set by the sandbox for every job; a job's own environment may not replace them
RESERVED_ENV = ("PATH", "HOME", "TMPDIR", "PWD", "USER", "LOGNAME", "SHELL", "LANG")


class JobsConfig(Section):
    enabled: bool = True
    # jobs run as this user when the agent runs as root; never as root itself
    user: str = "qrad-job"
    # absolute glob patterns the resolved executable must match ('*' stays within one
    # directory), e.g. ["/usr/bin/python3", "/opt/qrad-jobs/bin/*"]; empty = nothing runs
    allow: list[str] = Field(default_factory=list)
    # environment names (glob patterns) a job may set; everything else it sends is refused
    env_allow: list[str] = Field(default_factory=list)
    # the PATH bare argv[0] names are looked up in, and that jobs get
    path: str = "/usr/local/bin:/usr/bin:/bin"
    work_dir: Path | None = None  # private work directories go below; None = <state_dir>/jobs
    nice: Annotated[int, Field(ge=0, le=19)] = 19  # the board's own work comes first

    # what one job may ask for on this radiator (a bigger one is returned to the fleet)
    max_cores: Annotated[int, Field(ge=0, le=256)] = 0  # 0 = every slot
    max_memory_mb: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    max_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0

    # rlimits of every job process
    max_file_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 1024  # RLIMIT_FSIZE
    # RLIMIT_NPROC counts every process of the job user, so it bounds all jobs together
    max_processes: Annotated[int, Field(ge=1, le=65536)] = 256
    max_open_files: Annotated[int, Field(ge=16, le=65536)] = 256  # RLIMIT_NOFILE
    # RLIMIT_CPU = timeout_s * cores + this: a guard the kernel keeps if the agent cannot
    cpu_slack_s: Annotated[float, Field(ge=1, le=3600)] = 10.0

    # what a status may carry of the job's output
    output_tail_bytes: Annotated[int, Field(ge=0, le=8192)] = 2048
    output_file_max_bytes: Annotated[int, Field(ge=0, le=384 * 1024)] = 64 * 1024
    outputs_max_bytes: Annotated[int, Field(ge=0, le=1024 * 1024)] = 256 * 1024

    # scheduling
    grace_s: Annotated[float, Field(ge=0, le=7 * 86400)] = 1800.0  # waiting longer: returned
    heartbeat_s: Annotated[float, Field(ge=1, le=3600)] = 30.0
    request_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 30.0
    request_ttl_s: Annotated[float, Field(ge=1, le=3600)] = 60.0  # a request expires after
    horizon_s: Annotated[float, Field(ge=60, le=86400)] = 3600.0  # heat budget's horizon
    # filler work while heat is wanted and no job holds the slot: the built-in burner, the
    # command below (a volunteer-computing client, say; argv, no shell), or nothing
    filler: Literal["burner", "command", "none"] = "burner"
    filler_command: list[str] = Field(default_factory=list)
    # finished jobs whose result was delivered are kept this long (duplicates are recognised)
    retention_s: Annotated[float, Field(ge=0, le=365 * 86400)] = 7 * 86400.0

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if v == "root" or not _USER.match(v):
            raise ValueError(
                f"{v!r} cannot run jobs: give an unprivileged user's name (lowercase letters, "
                "digits, _ and -), such as 'qrad-job'; never root"
            )
        return v

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for pattern in v:
            p = PurePosixPath(pattern)
            if not p.is_absolute() or ".." in p.parts or "\0" in pattern:
                raise ValueError(
                    f"allow pattern {pattern!r} must be an absolute path pattern without '..', "
                    "e.g. '/usr/bin/python3' or '/opt/qrad-jobs/bin/*'"
                )
        return v

    @field_validator("env_allow")
    @classmethod
    def _env_allow(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _ENV_PATTERN.match(pattern):
                raise ValueError(
                    f"env_allow entry {pattern!r} is not a name pattern: letters, digits, _ "
                    "and the wildcards * ?"
                )
            if pattern.upper() in RESERVED_ENV or pattern.startswith("QRAD_"):
                raise ValueError(
                    f"{pattern} is set by the sandbox itself and cannot be allowed; reserved: "
                    f"{', '.join(RESERVED_ENV)} and QRAD_*"
                )
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        dirs = v.split(":")
        if not all(d.startswith("/") for d in dirs):
            raise ValueError(f"path {v!r} must list absolute directories separated by ':'")
        return v

    @field_validator("filler_command")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if v and (not v[0].strip() or any("\0" in a for a in v)):
            raise ValueError(
                "filler_command must be an argv list whose first item names the program, "
                "with no NUL bytes, e.g. ['/usr/bin/boinc', '--daemon']"
            )
        return v

    @model_validator(mode="after")
    def _filler_has_command(self) -> JobsConfig:
        if self.filler == "command" and not self.filler_command:
            raise ValueError("filler = 'command' needs filler_command (an argv list)")
        if self.filler != "command" and self.filler_command:
            raise ValueError(
                f"filler_command is set but filler is {self.filler!r}; set filler = 'command' "
                "or remove filler_command"
            )
        return self

    def policy(self) -> PolicyConfig:
        return PolicyConfig(grace_s=self.grace_s, request_interval_s=self.request_interval_s,
                            horizon_s=self.horizon_s)

    def work_root(self, state_dir: Path) -> Path:
        return self.work_dir if self.work_dir is not None else state_dir / "jobs"
