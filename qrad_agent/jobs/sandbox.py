"""The sandboxed runner: one job, one contained process tree.

What a job gets, and why:

- *An unprivileged user.* When the agent runs as root, the job runs as ``jobs.user``
  (supplementary groups dropped). Jobs are never run as root: a sandbox without that is
  refused at construction.
- *Its own session, process group and cgroup.* ``setsid`` keeps terminal signals away and
  gives the group one id to signal. The cgroup is a child of the workers' cgroup
  (``actuators/cgroups.py``) in every hierarchy it uses, so the allocator's quota throttles
  jobs as it throttles filler, and the job's own group can be frozen (suspend) and emptied
  (kill) as a whole, whatever sessions its processes moved to. The process joins it before
  it execs, so nothing it forks is ever outside. Without a usable cgroup the runner falls
  back to the process group, the process tree as last seen, and a per-run token in the
  environment (``QRAD_JOB_TOKEN``) that detached descendants inherit.
- *rlimits*: address space (the spec's ``memory_mb``), CPU time (a kernel-side backstop to
  the timeout), file size, processes (per user: with one job user it bounds all jobs
  together), open files, no core dumps.
- *A private work directory* (mode 0700, owned by the job user) holding the spec's inline
  inputs; expected outputs are read from it after the job ended, without following links
  and only as regular files of the job user, then the directory is removed.
- *A scrubbed environment*: PATH from the config, HOME and TMPDIR in the work directory, the
  job's identity, and only the names of the spec's environment that ``jobs.env_allow``
  allows (a spec asking for others is refused, not silently cut).
- *An executable allowlist*: argv[0] is resolved (absolute, or looked up in ``jobs.path``)
  and the path or its target must match a pattern of ``jobs.allow``. The resolved target is
  what is executed; argv[0] is passed as given.
- *A hard timeout* on running time (suspended time does not count), checked at every
  :meth:`JobRun.poll`, that kills the whole tree including detached grandchildren.

Standard output and error go, merged, to a file outside the work directory (the job cannot
replace it; RLIMIT_FSIZE bounds it); a status carries its size, SHA-256 and tail.

Jobs are forked by the job spawner (``spawner.py``), a small process of its own started
once: the child joins the cgroup, sets the limits and drops to the job user, in that order
(joining needs root), before it execs the job. The spawner is the jobs' parent and reports
their exits; forking the agent itself instead cost ~5 ms per job (decision 0015).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import grp
import hashlib
import logging
import math
import os
import pwd
import queue
import resource
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, cast

import psutil

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.jobs.settings import RESERVED_ENV, JobsConfig
from qrad_agent.jobs.spawner import Exit, Launch, Spawner, SpawnError
from qrad_agent.jobs.spec import (
    MAX_TAIL_CHARS,
    JobSpec,
    JobState,
    OutputDigest,
    OutputFile,
    Reason,
)

log = logging.getLogger(__name__)

TOKEN_ENV = "QRAD_JOB_TOKEN"
# below the work root, both made by the sandbox; nothing else in the work root is touched
RUN_DIR = "run"  # the jobs' private work directories (job user passes through, cannot list)
OUTPUT_DIR = "output"  # the jobs' merged stdout/stderr (the agent's only)
GROUP_PREFIX = "job-"
KILL_WAIT_S = 2.0
TREE_SCAN_S = 1.0  # without a cgroup, how often the process tree is looked at while it runs
MiB = 1024 * 1024
# signals the kernel sends when an rlimit is reached, and which one
_LIMIT_SIGNALS = {
    signal.SIGXCPU.value: " (its CPU time limit)",
    signal.SIGXFSZ.value: " (its file size limit)",
}


class Refusal(Exception):
    """This radiator will not run the job; ``reason`` is a :class:`Reason` value."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SandboxError(Exception):
    """The sandbox cannot be set up, or a job could not be started; the message says why."""

    def __init__(self, message: str, reason: Reason = Reason.SANDBOX_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JobUser:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended, with what it used and left."""

    state: JobState
    reason: Reason | None
    detail: str | None
    exit_code: int | None
    signal: int | None
    cpu_s: float
    wall_s: float  # running time, suspensions excluded
    output: OutputDigest | None
    outputs: list[OutputFile]
    leftovers: int  # processes that outlived the job's leader and were killed


class Sandbox:
    def __init__(
        self,
        cfg: JobsConfig,
        work_root: Path,
        cgroup: WorkerCgroup | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.cgroup = cgroup
        self.user = self._job_user()
        self.work_root = Path(work_root)
        self.run_dir = self.work_root / RUN_DIR
        self.output_dir = self.work_root / OUTPUT_DIR
        self._prepare_dirs()
        self._cgroup_why = "" if cgroup is not None else "no workers' cgroup configured"
        self.spawner = Spawner()  # its process starts with the first job
        self.janitor = _Janitor()

    def close(self) -> None:
        """Stop the spawner process (running jobs are not touched: end them first) and
        finish removing what ended jobs left."""
        self.spawner.close()
        self.janitor.drain()

    # -- what this sandbox offers -----------------------------------------------------------
    def _job_user(self) -> JobUser | None:
        if os.geteuid() != 0:
            log.warning("jobs: the agent is not root; jobs run as its own user (%d) and "
                        "cannot be separated from it", os.geteuid())
            return None
        try:
            pw = pwd.getpwnam(self.cfg.user)
        except KeyError:
            raise SandboxError(
                f"jobs.user {self.cfg.user!r} does not exist; create it (useradd --system "
                f"--no-create-home {self.cfg.user}) or name another unprivileged user"
            ) from None
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise SandboxError(f"jobs.user {self.cfg.user!r} has uid or gid 0; jobs never run "
                               "as root: name an unprivileged user")
        return JobUser(pw.pw_name, pw.pw_uid, pw.pw_gid)

    def _prepare_dirs(self) -> None:
        try:
            self.work_root.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir(exist_ok=True)
            # job users pass through to their own directory, but cannot list the others
            os.chmod(self.run_dir, 0o711)
            self.output_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.output_dir, 0o700)
        except OSError as exc:
            raise SandboxError(f"cannot prepare the jobs' directory {self.work_root}: "
                               f"{exc.strerror or exc}") from exc
        if self.user is not None:
            blocked = _first_closed_dir(self.run_dir, self.user)
            if blocked is not None:
                raise SandboxError(
                    f"user {self.user.name} cannot reach {self.run_dir}: {blocked} does not "
                    f"let it pass (needs execute permission for it); move jobs.work_dir or "
                    f"chmod o+x {blocked}")

    def describe(self) -> dict[str, Any]:
        uses = self.cgroup.uses() if self.cgroup is not None else []
        return {
            "user": self.user.name if self.user else f"uid {os.geteuid()} (agent's own)",
            "work_root": str(self.work_root),
            "cgroup": [str(u.group) for u in uses] or self._cgroup_why,
            "freezer": bool(self.cgroup is not None and self.cgroup.freeze_use is not None),
            "allow": list(self.cfg.allow),
            "env_allow": list(self.cfg.env_allow),
        }

    # -- admission ---------------------------------------------------------------------------
    def admit(self, spec: JobSpec, slots: int) -> str:
        """Check ``spec`` against this radiator's rules; returns the executable to run.
        Raises :class:`Refusal` naming what is not allowed and what is."""
        cfg = self.cfg
        max_cores = min(cfg.max_cores or slots, slots) if slots > 0 else cfg.max_cores or 1
        if spec.cores > max_cores:
            raise Refusal(Reason.TOO_BIG, f"the job asks for {spec.cores} cores; this radiator "
                                          f"gives one job at most {max_cores}")
        if spec.memory_mb > cfg.max_memory_mb:
            raise Refusal(Reason.TOO_BIG, f"the job asks for {spec.memory_mb} MB; this radiator "
                                          f"gives one job at most {cfg.max_memory_mb} MB")
        if spec.timeout_s > cfg.max_timeout_s:
            raise Refusal(Reason.TOO_BIG, f"the job's timeout is {spec.timeout_s:g} s; this "
                                          f"radiator allows at most {cfg.max_timeout_s:g} s")
        reserved = sorted(n for n in spec.env if n in RESERVED_ENV or n.startswith("QRAD_"))
        if reserved:
            raise Refusal(Reason.NOT_ALLOWED, f"environment {', '.join(reserved)} is set by "
                                              "the sandbox and cannot be given by a job")
        refused = sorted(n for n in spec.env
                         if not any(fnmatchcase(n, p) for p in cfg.env_allow))
        if refused:
            allowed = ", ".join(cfg.env_allow) or "none (jobs.env_allow is empty)"
            raise Refusal(Reason.NOT_ALLOWED, f"environment {', '.join(refused)} not allowed "
                                              f"here; allowed: {allowed}")
        return self.resolve(spec.argv[0])

    def resolve(self, name: str) -> str:
        """The real path of the executable ``name`` names, if the allowlist allows it."""
        if "/" in name:
            if not name.startswith("/"):
                raise Refusal(Reason.NOT_ALLOWED,
                              f"argv[0] {name!r} is a relative path; give an absolute path, or a "
                              f"bare name looked up in {self.cfg.path}")
            candidates = [os.path.normpath(name)]
        else:
            candidates = [os.path.join(d, name) for d in self.cfg.path.split(":")]
        found = next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)
        if found is None:
            where = candidates[0] if "/" in name else f"any of {self.cfg.path}"
            raise Refusal(Reason.EXEC_FAILED,
                          f"no executable file {name!r} in {where} on this radiator")
        real = os.path.realpath(found)
        if not any(PurePosixPath(p).match(pat) for p in {found, real} for pat in self.cfg.allow):
            allowed = ", ".join(self.cfg.allow) or "nothing (jobs.allow is empty)"
            target = f" (-> {real})" if real != found else ""
            raise Refusal(Reason.NOT_ALLOWED,
                          f"executable {found}{target} is not allowed here; allowed: {allowed}")
        return real

    # -- running -----------------------------------------------------------------------------
    def start(self, spec: JobSpec, token: str | None = None) -> JobRun:
        """Start ``spec`` (admitted before) in a fresh sandbox. Raises :class:`Refusal` if the
        allowlist no longer allows it, :class:`SandboxError` if it could not be started."""
        result = self.start_many([(spec, token or new_token())])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def start_many(self, jobs: list[tuple[JobSpec, str]]
                   ) -> list[JobRun | Refusal | SandboxError]:
        """:meth:`start` for several (spec, run token) at once, their processes set up side
        by side; for each, its run or why it did not start."""
        out: list[JobRun | Refusal | SandboxError | None] = [None] * len(jobs)
        ready: list[tuple[int, _Prepared]] = []
        for i, (spec, token) in enumerate(jobs):
            try:
                ready.append((i, self._prepare(spec, token)))
            except (Refusal, SandboxError) as exc:
                out[i] = exc
        pids = self.spawner.launch_many([p.launch for _, p in ready])
        for (i, prep), pid in zip(ready, pids, strict=True):
            if isinstance(pid, SpawnError):
                prep.discard(self.janitor)
                out[i] = self._start_error(prep, pid)
            else:
                out[i] = JobRun(self, prep.spec, pid, prep.token, prep.work, prep.log_path,
                                prep.group)
        assert all(r is not None for r in out)  # every job has its run or its error
        return cast(list[JobRun | Refusal | SandboxError], out)

    def _prepare(self, spec: JobSpec, token: str) -> _Prepared:
        exe = self.admit(spec, spec.cores)
        prep = _Prepared(spec, token, self.run_dir / f"{spec.job}.{spec.attempt}",
                         self.output_dir / f"{token}.log")
        try:
            self._make_work_dir(prep.work, spec)
            prep.group = self._make_group(token)
            prep.launch = Launch(
                exe=exe, argv=list(spec.argv), env=self._environment(spec, prep.work, token),
                cwd=str(prep.work), log=str(prep.log_path),
                procs=[str(f) for f in prep.group.procs_files()] if prep.group else [],
                limits=self._limits(spec), nice=self.cfg.nice,
                ids=(self.user.uid, self.user.gid) if self.user is not None else None)
        except BaseException:
            prep.discard(self.janitor)
            raise
        return prep

    def _start_error(self, prep: _Prepared, exc: SpawnError) -> SandboxError:
        if exc.uncertain:
            _kill_all(_scan(tokens={prep.token}))  # it may have started: nothing of it stays
        job = prep.spec.job
        if exc.exec_failed:
            return SandboxError(
                f"cannot execute {prep.launch.exe} for job {job}: {exc}"
                + (f" (as user {self.user.name})" if self.user else ""), Reason.EXEC_FAILED)
        return SandboxError(f"cannot start job {job}: {exc}")

    def _make_work_dir(self, work: Path, spec: JobSpec) -> None:
        if work.exists() or work.is_symlink():
            shutil.rmtree(work, ignore_errors=True)  # a crashed run's; the sweep missed it
        try:
            work.mkdir(mode=0o700)
            for f in spec.inputs:
                target = work / f.path
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o700 if f.executable else 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(f.content())
            if self.user is not None:
                for path in [work, *work.rglob("*")]:
                    os.chown(path, self.user.uid, self.user.gid, follow_symlinks=False)
        except OSError as exc:
            raise SandboxError(f"cannot prepare the work directory {work}: "
                               f"{exc.strerror or exc}") from exc

    def _make_group(self, token: str) -> JobGroup | None:
        if self.cgroup is None or not self.cgroup.uses():
            return None
        try:
            self.cgroup.ensure()
            return JobGroup.create(self.cgroup, GROUP_PREFIX + token)
        except (LeverError, OSError) as exc:
            if self._cgroup_why == "":
                log.error("jobs: cannot use a cgroup for jobs (%s); they run without one: the "
                          "process group and the run token find their processes", exc)
            self._cgroup_why = str(exc)
            return None

    def _environment(self, spec: JobSpec, work: Path, token: str) -> dict[str, str]:
        env = {
            "PATH": self.cfg.path,
            "HOME": str(work),
            "TMPDIR": str(work),
            "PWD": str(work),
            "LANG": "C.UTF-8",
            "QRAD_JOB_ID": spec.job,
            "QRAD_JOB_ATTEMPT": str(spec.attempt),
            "QRAD_JOB_CORES": str(spec.cores),
            TOKEN_ENV: token,
        }
        if self.user is not None:
            env["USER"] = env["LOGNAME"] = self.user.name
        # admit() refused names that are not allowed or that would replace these
        return {**spec.env, **env}

    def _limits(self, spec: JobSpec) -> list[tuple[int, int, int]]:
        cpu = math.ceil(spec.timeout_s * spec.cores + self.cfg.cpu_slack_s)
        return [
            (resource.RLIMIT_AS, spec.memory_mb * MiB, spec.memory_mb * MiB),
            (resource.RLIMIT_CPU, cpu, cpu + 5),  # SIGXCPU first, SIGKILL 5 s later
            (resource.RLIMIT_FSIZE, self.cfg.max_file_mb * MiB, self.cfg.max_file_mb * MiB),
            (resource.RLIMIT_NPROC, self.cfg.max_processes, self.cfg.max_processes),
            (resource.RLIMIT_NOFILE, self.cfg.max_open_files, self.cfg.max_open_files),
            (resource.RLIMIT_CORE, 0, 0),
        ]

    # -- after a crash -----------------------------------------------------------------------
    def sweep(self, runs: Iterable[tuple[str | None, int | None, float | None]] = ()) -> int:
        """Stop what earlier runs of the agent left, and clear their directories.

        ``runs`` are (token, pid, pid start time) of runs the ledger knew were live. Every
        job cgroup found is a leftover too (no job runs before the sweep). Call once, at
        start, before any job starts. Returns the number of processes killed.
        """
        killed = 0
        if self.cgroup is not None:
            for use in self.cgroup.uses():
                if not use.group.is_dir():
                    continue
                for d in sorted(use.group.glob(GROUP_PREFIX + "*")):
                    if d.is_dir():
                        group = JobGroup([d], d if _is_freezer(d) else None)
                        killed += len(group.pids())
                        left = group.kill()
                        if left:
                            log.error("jobs: processes %s would not leave %s", sorted(left), d)
                        group.remove()
        tokens = {t for t, _, _ in runs if t}
        for _token, pid, started in runs:
            if pid and started is not None and _started_at(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                    killed += 1
        if tokens:
            found = _scan(tokens=tokens)
            killed += len(found)
            _kill_all(found)
        for entry in self.run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
        for entry in self.output_dir.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        if killed:
            log.warning("jobs: killed %d process(es) an earlier run of the agent left", killed)
        return killed


class _Janitor:
    """Removes what ended jobs leave (the work directory, the job cgroup) off the control
    loop: removing a cgroup waits for the kernel, ~1 ms each under cgroup v1. The work
    directory is renamed away at once, so its name is free again; whatever is left when the
    agent dies, the next start's sweep removes."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, JobGroup | None] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def discard(self, work: Path, group: JobGroup | None) -> None:
        trash = work.with_name(f".ended-{work.name}-{new_token()}")
        try:
            work.rename(trash)
        except OSError:
            trash = work  # gone already, or it cannot move: removed in place
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qrad-jobs-janitor",
                                                daemon=True)
                self._thread.start()
        self._queue.put((trash, group))

    def drain(self) -> None:
        """Wait until everything handed over is removed."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, group = item
            try:
                if group is not None:
                    group.remove()
                shutil.rmtree(work, ignore_errors=True)
            except Exception:  # one failed removal must not stop the others
                log.exception("jobs: cannot remove %s", work)


@dataclass(slots=True)
class _Prepared:
    """A job's sandbox, made and not yet started: undone with :meth:`discard`."""

    spec: JobSpec
    token: str
    work: Path
    log_path: Path
    group: JobGroup | None = None
    launch: Launch = field(init=False)

    def discard(self, janitor: _Janitor) -> None:
        if self.group is not None:
            self.group.kill()  # now; the janitor removes the group and the directory
        janitor.discard(self.work, self.group)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class JobRun:
    """One started job: poll it, suspend/resume it, kill it; its :class:`Outcome` at the end."""

    def __init__(self, box: Sandbox, spec: JobSpec, pid: int, token: str,
                 work: Path, log_path: Path, group: JobGroup | None) -> None:
        self.box = box
        self.spec = spec
        self.pid = pid
        self.token = token
        self.work = work
        self.log_path = log_path
        self.group = group
        self.started = box.clock()
        self.pid_start = _started_at(self.pid) or 0.0
        # the leader's start in clock ticks since boot: nothing of the job is older, so the
        # /proc scans look only at processes started since (a pid reused later is newer)
        self._start_ticks = _start_ticks(self.pid) or 0
        self.suspended_at: float | None = None
        self.suspended_total = 0.0
        self.outcome: Outcome | None = None
        self._kill: tuple[JobState, Reason, str] | None = None
        self._cpu_seen = 0.0
        self._tree: dict[int, float] = {}  # pid -> start time, without a cgroup
        self._next_scan = -math.inf

    @property
    def contained_by(self) -> str:
        return "cgroup" if self.group is not None else "process group and token"

    def running_s(self, now: float) -> float:
        paused = self.suspended_total + (now - self.suspended_at if self.suspended_at else 0.0)
        return max(0.0, now - self.started - paused)

    def poll(self, now: float | None = None) -> Outcome | None:
        """The outcome once the job has ended (then everything of it is gone), else None.
        Enforces the timeout."""
        if self.outcome is not None:
            return self.outcome
        now = self.box.clock() if now is None else now
        ended = self._reap(block=False)
        if ended is None:
            if self.running_s(now) > self.spec.timeout_s:
                return self.kill(JobState.FAILED, Reason.TIMEOUT,
                                 f"ran longer than its timeout of {self.spec.timeout_s:g} s")
            if self.group is None and now >= self._next_scan:
                self._track_tree()
                self._next_scan = now + TREE_SCAN_S
            return None
        return self._finish(ended, now)

    def suspend(self, now: float | None = None) -> None:
        if self.outcome is not None or self.suspended_at is not None:
            return
        now = self.box.clock() if now is None else now
        self._cpu_seen = max(self._cpu_seen, self.cpu_seconds())
        if self.group is not None and self.group.freezer is not None:
            self.group.freeze()
        else:
            _kill_all(self._members(), signal.SIGSTOP)
        self.suspended_at = now

    def resume(self, now: float | None = None) -> None:
        if self.suspended_at is None:
            return
        now = self.box.clock() if now is None else now
        if self.group is not None and self.group.freezer is not None:
            self.group.thaw()
        else:
            _kill_all(self._members(), signal.SIGCONT)
        self.suspended_total += now - self.suspended_at
        self.suspended_at = None

    def kill(self, state: JobState, reason: Reason, detail: str,
             now: float | None = None) -> Outcome:
        """End the job now, its whole tree; the outcome says ``state`` for ``reason``."""
        if self.outcome is not None:
            return self.outcome
        now = self.box.clock() if now is None else now
        self._cpu_seen = max(self._cpu_seen, self.cpu_seconds())
        self._kill = (state, reason, detail)
        if self.suspended_at is not None:
            self.suspended_total += now - self.suspended_at
            self.suspended_at = None
        killed = self._kill_tree()
        ended = self._reap(block=True)
        if ended is None:  # unkillable for now (D state); the spawner reaps it later
            log.error("jobs: %s (pid %d) did not die of SIGKILL", self.spec.job, self.pid)
            ended = Exit(None, None)
        return self._finish(ended, now, killed)

    def cpu_seconds(self) -> float:
        """CPU time used so far by the job's processes (user + system)."""
        if self.group is not None:
            usage = self.group.cpu_usage_s()
            if usage is not None:
                return max(self._cpu_seen, usage)
        total = 0.0
        for pid in self._members():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        self._cpu_seen = max(self._cpu_seen, total)
        return self._cpu_seen

    # -- the end -----------------------------------------------------------------------------
    def _reap(self, block: bool) -> Exit | None:
        def gone() -> bool:
            return _started_at(self.pid) != self.pid_start or _zombie(self.pid)

        return self.box.spawner.reap(self.pid, gone, KILL_WAIT_S if block else 0.0)

    def _finish(self, ended: Exit, now: float, killed: int = 0) -> Outcome:
        code = os.waitstatus_to_exitcode(ended.status) if ended.status is not None else None
        if self.suspended_at is not None:
            self.resume(now)
        leftovers = self._kill_tree() + killed
        cpu = self._cpu_seen
        if self.group is not None:
            cpu = max(cpu, self.group.cpu_usage_s() or 0.0)
        if ended.cpu_s is not None:
            cpu = max(cpu, ended.cpu_s)
        outputs = self._collect_outputs()
        digest = self._digest()
        self.box.janitor.discard(self.work, self.group)
        state, reason, detail, exit_code, sig = self._verdict(code)
        if leftovers and self._kill is None:
            detail = (detail + "; " if detail else "") + \
                f"{leftovers} process(es) it left behind were killed"
        self.outcome = Outcome(state, reason, detail, exit_code, sig, round(cpu, 3),
                               round(self.running_s(now), 3), digest, outputs, leftovers)
        return self.outcome

    def _verdict(self, code: int | None
                 ) -> tuple[JobState, Reason | None, str | None, int | None, int | None]:
        sig = -code if code is not None and code < 0 else None
        exit_code = code if code is not None and code >= 0 else None
        if self._kill is not None:
            state, reason, detail = self._kill
            return state, reason, detail, exit_code, sig
        if code is None:
            return (JobState.FAILED, Reason.INTERRUPTED, "its exit status was lost with the job "
                    "spawner process, which died", None, None)
        if exit_code == 0:
            return JobState.SUCCEEDED, None, None, 0, None
        if sig is not None:
            why = _LIMIT_SIGNALS.get(sig, "")
            return JobState.FAILED, Reason.KILLED, f"killed by {_signal_name(sig)}{why}", None, sig
        return JobState.FAILED, Reason.EXIT_STATUS, f"exit status {exit_code}", exit_code, None

    def _kill_tree(self) -> int:
        """SIGKILL every process of the job; how many there were besides the leader."""
        if self.group is not None:
            victims = self.group.pids()
            left = self.group.kill()
            if left:
                log.error("jobs: %s: processes %s would not die", self.spec.job, sorted(left))
            return len(victims - {self.pid})
        # Without a cgroup: stop first what can be found, so that nothing forks while the
        # rest is looked for, then kill; again until a look finds nothing.
        victims = set()
        deadline = time.monotonic() + KILL_WAIT_S
        while (found := self._members()) and time.monotonic() < deadline:
            victims |= found
            _kill_all(found, signal.SIGSTOP)
            _kill_all(found | self._members())
            time.sleep(0.005)
        if found:
            log.error("jobs: %s: processes %s would not die", self.spec.job, sorted(found))
        return len(victims - {self.pid})

    def _members(self) -> set[int]:
        """The job's live processes: its cgroup's; without one, its process group, the tree
        as last seen (each pid checked against its start time) and whatever carries the
        run's token in its environment (a detached grandchild does)."""
        if self.group is not None:
            return self.group.pids()
        return set(self._tree_alive()) | _scan(pgid=self.pid, tokens={self.token},
                                               since_ticks=self._start_ticks)

    def _track_tree(self) -> None:
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._tree.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass

    def _tree_alive(self) -> list[int]:
        alive = []
        for pid, started in list(self._tree.items()):
            if _started_at(pid) == started and not _zombie(pid):
                alive.append(pid)
            else:
                del self._tree[pid]
        return alive

    def _collect_outputs(self) -> list[OutputFile]:
        cfg = self.box.cfg
        out: list[OutputFile] = []
        budget = cfg.outputs_max_bytes
        try:
            root = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            return [OutputFile(path=p, found=False, why=f"work directory gone: {exc.strerror}")
                    for p in self.spec.outputs]
        try:
            for rel in self.spec.outputs:
                out.append(self._read_output(root, rel, budget))
                budget -= len(out[-1].data or "") * 3 // 4
        finally:
            os.close(root)
        return out

    def _read_output(self, root: int, rel: str, budget: int) -> OutputFile:
        cfg = self.box.cfg
        try:
            fd = _open_beneath(root, rel)
        except OSError as exc:
            why = "not found" if exc.errno == errno.ENOENT else (
                "a symbolic link, not a file" if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                else exc.strerror or str(exc))
            return OutputFile(path=rel, found=False, why=why)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return OutputFile(path=rel, found=False, why="not a regular file")
            if self.box.user is not None and (st.st_uid != self.box.user.uid or st.st_nlink != 1):
                return OutputFile(path=rel, found=False,
                                  why="not a file the job made (owner or links differ)")
            h = hashlib.sha256()
            size = 0
            keep = min(cfg.output_file_max_bytes, max(0, budget))
            data = bytearray()
            while chunk := os.read(fd, 1 << 16):
                h.update(chunk)
                size += len(chunk)
                if len(data) <= keep:
                    data += chunk[: keep + 1 - len(data)]
            included = size <= keep
            return OutputFile(
                path=rel, found=True, bytes=size, sha256=h.hexdigest(),
                data=_b64(bytes(data)) if included else None,
                why=None if included else f"larger than the {keep} bytes a status may carry",
            )
        finally:
            os.close(fd)

    def _digest(self) -> OutputDigest | None:
        limit = min(self.box.cfg.output_tail_bytes, MAX_TAIL_CHARS // 4)
        try:
            with open(self.log_path, "rb") as f:
                h = hashlib.sha256()
                size = 0
                while chunk := f.read(1 << 16):
                    h.update(chunk)
                    size += len(chunk)
                f.seek(max(0, size - limit))
                tail = f.read(limit)
        except OSError as exc:
            log.warning("jobs: %s: cannot read its output %s: %s", self.spec.job, self.log_path,
                        exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        text = tail.decode("utf-8", errors="replace")
        return OutputDigest(bytes=size, sha256=h.hexdigest(), tail=text[-MAX_TAIL_CHARS:],
                            truncated=size > len(tail))


@dataclass
class JobGroup:
    """One job's cgroup: a directory in each hierarchy the workers' cgroup uses."""

    dirs: list[Path]
    freezer: Path | None  # the directory whose freezer suspends the job
    _made: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, cgroup: WorkerCgroup, name: str) -> JobGroup:
        dirs: list[Path] = []
        freezer: Path | None = None
        group = cls(dirs, None)
        try:
            for use in cgroup.uses():
                d = use.group / name
                d.mkdir()
                group._made.append(d)
                dirs.append(d)
                if cgroup.freeze_use is not None and use.group == cgroup.freeze_use.group:
                    freezer = d
        except OSError as exc:
            group.remove()
            raise LeverError(f"cannot create the job cgroup {name}: {exc.strerror}") from exc
        group.freezer = freezer
        return group

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(t) for t in (d / "cgroup.procs").read_text().split())
        return out

    def freeze(self) -> None:
        if self.freezer is not None:
            _write_first(self.freezer, (("cgroup.freeze", "1"), ("freezer.state", "FROZEN")))

    def thaw(self) -> None:
        if self.freezer is not None:
            _write_first(self.freezer, (("cgroup.freeze", "0"), ("freezer.state", "THAWED")))

    def cpu_usage_s(self) -> float | None:
        """CPU seconds of everything that ever ran in the group, where the kernel counts it
        (cgroup v2 ``cpu.stat`` or v1 ``cpuacct.usage``)."""
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                if (d / "cpu.stat").is_file():
                    for line in (d / "cpu.stat").read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "usage_usec":
                            return int(value) / 1e6
                if (d / "cpuacct.usage").is_file():
                    return int((d / "cpuacct.usage").read_text()) / 1e9
        return None

    def kill(self, timeout_s: float = KILL_WAIT_S) -> set[int]:
        """SIGKILL everything in the group; the pids still there after ``timeout_s``.

        Frozen first where there is a freezer, so that nothing forks between reading the
        list and killing it; v2's ``cgroup.kill`` does it all in one write.
        """
        if not self.pids():
            return set()
        for d in self.dirs:
            if (d / "cgroup.kill").is_file():
                with contextlib.suppress(OSError):
                    (d / "cgroup.kill").write_text("1")
        if self.freezer is not None:
            with contextlib.suppress(OSError):
                self.freeze()
        deadline = time.monotonic() + timeout_s
        while True:
            left = self.pids()
            _kill_all(left)
            if self.freezer is not None:
                # a task frozen by the v1 freezer dies only once thawed
                with contextlib.suppress(OSError):
                    self.thaw()
            if not left:
                return set()
            if time.monotonic() >= deadline:
                return left
            time.sleep(0.005)

    def remove(self) -> None:
        for d in sorted(set(self.dirs) | set(self._made), key=lambda p: len(p.parts),
                        reverse=True):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # the last killed tasks leave the group a moment after they die
                    _kill_all(self.pids())
                    time.sleep(0.01)
            else:
                log.error("jobs: cannot remove the job cgroup %s", d)


# -- helpers ---------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_hex(8)


def _open_beneath(root: int, rel: str) -> int:
    """Open ``rel`` below the directory ``root`` without following a link anywhere."""
    parts = rel.split("/")
    fd = os.dup(root)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        # O_NONBLOCK: a FIFO planted as an output must not hang the agent
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_first(d: Path, choices: tuple[tuple[str, str], ...]) -> None:
    for name, value in choices:
        if (d / name).is_file():
            (d / name).write_text(value)
            return


def _is_freezer(d: Path) -> bool:
    return (d / "cgroup.freeze").is_file() or (d / "freezer.state").is_file()


def _first_closed_dir(path: Path, user: JobUser) -> Path | None:
    """The first directory from / down to ``path`` that ``user`` cannot pass through."""
    groups = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem}
    d = Path("/")
    for part in ("/", *path.resolve().parts[1:]):
        d = d / part
        try:
            st = d.stat()
        except OSError:
            return d
        mode = st.st_mode
        if st.st_uid == user.uid:
            ok = mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = mode & stat.S_IXGRP
        else:
            ok = mode & stat.S_IXOTH
        if not ok:
            return d
    return None


def _started_at(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _zombie(pid: int) -> bool:
    """Dead and waiting for its parent to reap it (or gone): nothing left to kill."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except OSError:
        return True
    return st[st.rfind(b")") + 2:][:1] in (b"Z", b"X")


def _kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    me = os.getpid()
    for pid in pids:
        if pid > 1 and pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return int(st[st.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _scan(pgid: int = 0, tokens: set[str] | None = None, since_ticks: int = 0) -> set[int]:
    """Live processes in process group ``pgid``, or whose environment holds one of ``tokens``
    (as ``QRAD_JOB_TOKEN=<token>``). One pass over /proc.

    ``since_ticks``: only processes started at or after it (clock ticks since boot) can match.
    A job's processes all descend from its leader, so none is older than it: the others'
    environments need not be read (most of a scan's cost)."""
    needles = {f"{TOKEN_ENV}={t}".encode() for t in tokens or ()}
    me = os.getpid()
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = st[st.rfind(b")") + 2:].split()
        if len(fields) < 20 or fields[0] in (b"Z", b"X"):
            continue
        if since_ticks and int(fields[19]) < since_ticks:
            continue
        if pgid and int(fields[2]) == pgid:
            out.add(pid)
            continue
        if needles:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needles.intersection(env):
                out.add(pid)
    return out


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
