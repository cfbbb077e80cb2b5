"""Worker slots: the processes that make the heat, and a duty cycle for boards with no
finer lever.

``WorkerSlots`` runs one worker process per slot the plan asks for: the built-in burner
(``burn.py``), or the configured command (an argv, no shell). Every worker starts through
the launcher in ``burn.py``, which joins the workers' cgroup and lowers its priority before
anything else runs, and in a session (and so a process group) of its own, so signals reach
its children too:

* stop: SIGTERM to the group, with SIGCONT so a stopped group sees it; SIGKILL to the group
  at the first call (``apply``, ``poll``, ``read_back``) after ``stop_grace_s``. Stopping
  does not wait inside ``apply``, so a worker that ignores SIGTERM costs the control loop
  nothing; ``restore`` does wait, for the grace and the SIGKILL.
* suspend/resume (``shed = "suspend"``): SIGSTOP/SIGCONT to the group; when no slot at all
  is wanted and the cgroup has a freezer, the whole group is frozen instead (its children
  too, whatever session they moved to, and unseen by the processes).
* a worker that exits on its own is counted, what it left in its group is stopped, and the
  slot is started again at a later ``apply`` while the plan still wants it; restarts back
  off (``restart_min_s`` doubling to ``restart_max_s``) unless the worker had run for
  ``healthy_run_s``, so a command that fails at once does not spin.

Every started worker is in the ``RestoreRecord`` (pid and start time, which together name a
process for good), so a run after a crash stops what the crashed one left. ``restore``
stops every worker and waits for them. A burner also ends by itself when the agent dies.

Only the control loop calls ``apply``. ``DutyCycle`` runs its own thread, which only sends
signals to the slots' running workers through ``WorkerSlots.signal_running`` under the
slots' lock; it never starts, stops or counts anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from qrad_agent.actuators.base import LeverError, LeverInfo
from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import DutyCycleConfig, WorkersConfig
from qrad_agent.core.models import Plan

log = logging.getLogger(__name__)

BURN = Path(__file__).with_name("burn.py")
RECORD_NAME = "workers"
RUNNING, SUSPENDED, STOPPING = "running", "suspended", "stopping"
_EXIT_MEANING = {
    3: "the launcher could not join the workers' cgroup",
    4: "the launcher could not lower its priority",
    127: "the command could not be executed",
}
_COMPACT_AFTER = 32  # dead entries in the record before it is rewritten with the live ones


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    started: float  # clock() at start
    key: str  # name in the restore record: "pid:start time"
    state: str = RUNNING
    kill_at: float = math.inf  # STOPPING: SIGKILL to the group from then on
    killed: bool = False
    on_its_own: bool = False  # the leader ended without being asked to

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerSlots:
    name = "slots"

    def __init__(
        self,
        cfg: WorkersConfig,
        record: RestoreRecord | None = None,
        cgroup: WorkerCgroup | None = None,
        *,
        max_slots: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.max_slots = max_slots or cfg.max_slots or os.cpu_count() or 1
        self._record = record
        self._cgroup = cgroup
        self._clock = clock
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._dead_keys = 0
        self._frozen = False
        self._backoff = cfg.restart_min_s
        self._next_start = -math.inf
        self._checked: LeverInfo | None = None
        self.starts = 0  # workers started
        self.exits = 0  # workers that ended without being asked to
        self.kills = 0  # stops that needed SIGKILL
        if record is not None and record.originals(RECORD_NAME):
            self._stop_recorded(record.originals(RECORD_NAME))
            try:
                record.forget(RECORD_NAME)
            except OSError as exc:
                log.error("workers: cannot clear %s: %s", record.path, exc)

    # -- the Lever shape -------------------------------------------------------------------
    def discover(self) -> LeverInfo:
        if not self.cfg.enabled:
            return LeverInfo(self.name, False, "disabled in config (actuators.workers.enabled)")
        info: dict[str, Any] = {
            "max_slots": self.max_slots,
            "command": list(self.cfg.command) or "built-in burner",
            "shed": self.cfg.shed,
            "nice": self.cfg.nice,
            "stop_grace_s": self.cfg.stop_grace_s,
            "cgroup": [str(p) for p in self._cgroup.procs_files()] if self._cgroup else None,
            "freeze": self._can_freeze(),
        }
        if self.cfg.command:
            exe = self.cfg.command[0]
            cwd = str(self.cfg.cwd) if self.cfg.cwd else None
            found = (
                exe if os.sep in exe and os.access(Path(cwd or ".") / exe, os.X_OK)
                else shutil.which(exe)
            )
            if not found:
                return LeverInfo(
                    self.name, False,
                    f"worker command {exe!r} is not an executable file (nor on PATH)", info,
                )
        if self.cfg.cwd is not None and not self.cfg.cwd.is_dir():
            return LeverInfo(self.name, False, f"worker cwd {self.cfg.cwd} is not a directory",
                             info)
        return LeverInfo(self.name, True, range=info)

    def apply(self, plan: Plan) -> None:
        if self._checked is None:
            self._checked = self.discover()
        if not self._checked.available:
            raise LeverError(f"slots: {self._checked.why_not}")
        target = max(0, min(plan.slots, self.max_slots))
        with self._lock:
            now = self._clock()
            self.poll(now)
            running = [w for w in self._workers if w.state == RUNNING]
            suspended = [w for w in self._workers if w.state == SUSPENDED]
            if target == 0 and self.cfg.shed == "suspend" and self._can_freeze():
                if running and not self._frozen:
                    assert self._cgroup is not None
                    self._cgroup.freeze()
                    self._frozen = True
                return
            if self._frozen:
                # stop or suspend what must not run first, then thaw: no burst of heat
                self._shed(running[target:] if target else running, now)
                assert self._cgroup is not None
                self._cgroup.thaw()
                self._frozen = False
                running = running[:target]
            if len(running) > target:
                self._shed(running[target:], now)  # the newest go first
            for w in suspended[: max(0, target - len(running))]:
                _signal_group(w.pid, signal.SIGCONT)
                w.state = RUNNING
                running.append(w)
            missing = target - len(running)
            if missing > 0 and now >= self._next_start:
                for _ in range(missing):
                    self._start(now)

    def read_back(self) -> dict[str, Any]:
        with self._lock:
            self.poll(self._clock())
            by = {s: [w.pid for w in self._workers if w.state == s]
                  for s in (RUNNING, SUSPENDED, STOPPING)}
            return {
                "slots": 0 if self._frozen else len(by[RUNNING]),
                "running": len(by[RUNNING]), "suspended": len(by[SUSPENDED]),
                "stopping": len(by[STOPPING]), "frozen": self._frozen,
                "starts": self.starts, "exits": self.exits, "kills": self.kills,
                "pids": by[RUNNING],
            }

    def restore(self) -> None:
        """Stop every worker and wait for them (at most ``stop_grace_s`` and a little)."""
        with self._lock:
            now = self._clock()
            if self._frozen and self._cgroup is not None:
                self._cgroup.thaw()
            self._frozen = False
            self._shed([w for w in self._workers if w.state != STOPPING], now, stop=True)
            deadline = time.monotonic() + self.cfg.stop_grace_s + 2.0
            while self._workers and time.monotonic() < deadline:
                self.poll(self._clock())
                if self._workers:
                    time.sleep(0.02)
            if self._workers:
                # SIGKILL cannot be ignored; still here means unkillable (D state) for now
                log.error("workers: %s did not end", [w.pid for w in self._workers])
            if self._cgroup is not None:
                left = self._cgroup.kill_all() if self._cgroup.uses() else set()
                if left:
                    log.error("workers: %s would not leave the cgroup", sorted(left))
                self._cgroup.release()
            if self._record is not None and not self._workers:
                try:
                    self._record.forget(RECORD_NAME)
                except OSError as exc:
                    raise LeverError(f"workers stopped, but {self._record.path} could not be "
                                     f"cleared: {exc}") from exc
            self._next_start = -math.inf
            self._backoff = self.cfg.restart_min_s

    # -- for the duty cycle, the CLI and tests ----------------------------------------------
    def signal_running(self, sig: int) -> None:
        """Send ``sig`` to the group of every running (not suspended or stopping) worker."""
        with self._lock:
            if self._frozen:
                return
            for w in self._workers:
                if w.state == RUNNING:
                    _signal_group(w.pid, sig)

    def pids(self) -> list[int]:
        """Leader pids of the running workers."""
        with self._lock:
            return [w.pid for w in self._workers if w.state == RUNNING]

    def poll(self, now: float) -> None:
        """Notice workers that ended, move stops along (SIGKILL when due), forget the gone."""
        with self._lock:
            for w in self._workers:
                ended = w.proc.poll() is not None
                if ended and w.state != STOPPING:
                    self._ended_on_its_own(w, now)
                if w.state == STOPPING and now >= w.kill_at and not w.killed:
                    if ended and not _group_members(w.pid):
                        continue
                    log.warning("workers: %d did not stop within %.1f s of SIGTERM; SIGKILL",
                                w.pid, self.cfg.stop_grace_s)
                    _signal_group(w.pid, signal.SIGKILL)
                    w.killed = True
                    self.kills += 1
            gone = [w for w in self._workers
                    if w.state == STOPPING and w.proc.poll() is not None
                    and not _group_members(w.pid)]
            if gone:
                self._workers = [w for w in self._workers if w not in gone]
                self._forget(gone)

    # -- steps -----------------------------------------------------------------------------
    def _can_freeze(self) -> bool:
        return (self._cgroup is not None and self._cgroup.freeze_use is not None
                and self._cgroup.cfg.freeze)

    def _start(self, now: float) -> None:
        argv = [sys.executable, "-I", "-S", str(BURN), "--nice", str(self.cfg.nice),
                "--parent", str(os.getpid())]
        if self._cgroup is not None and self._cgroup.uses():
            try:
                self._cgroup.ensure()
            except LeverError as exc:
                # heat matters more than the finer lever: run outside it, and say so loudly
                log.error("workers: cannot use the cgroup (%s); workers run outside it, "
                          "not throttled by the quota nor frozen", exc)
                self._cgroup = None
            else:
                for procs in self._cgroup.procs_files():
                    argv += ["--cgroup", str(procs)]
        if self.cfg.command:
            argv += ["--", *self.cfg.command]
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.cfg.log_file is not None:
            try:
                out = open(self.cfg.log_file, "ab")  # noqa: SIM115 - closed right after the spawn
            except OSError as exc:
                raise LeverError(f"cannot open the worker log {self.cfg.log_file}: {exc}") from exc
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.cfg.cwd, env={**os.environ, **self.cfg.env},
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            raise LeverError(f"cannot start a worker ({argv[-1]}): {exc}") from exc
        finally:
            if not isinstance(out, int):
                out.close()
        key = f"{proc.pid}:{_start_time(proc.pid)}"
        worker = _Worker(proc, now, key)
        self._workers.append(worker)
        self.starts += 1
        if self._record is not None:
            try:
                self._record.remember(RECORD_NAME, key, "worker")
            except OSError as exc:
                # it runs unrecorded: a burner ends with the agent anyway, a command may not
                log.error("workers: cannot record worker %d in %s: %s", proc.pid,
                          self._record.path, exc)
        log.debug("workers: started %d (%s)", proc.pid, " ".join(argv[4:]))

    def _shed(self, workers: list[_Worker], now: float, *, stop: bool = False) -> None:
        for w in reversed(workers):
            if self.cfg.shed == "suspend" and not stop:
                if w.state == RUNNING:
                    _signal_group(w.pid, signal.SIGSTOP)
                    w.state = SUSPENDED
            elif w.state != STOPPING:
                self._begin_stop(w, now)

    def _begin_stop(self, w: _Worker, now: float) -> None:
        w.state = STOPPING
        w.kill_at = now + self.cfg.stop_grace_s
        _signal_group(w.pid, signal.SIGTERM)
        _signal_group(w.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only after

    def _ended_on_its_own(self, w: _Worker, now: float) -> None:
        code = w.proc.returncode
        ran = now - w.started
        why = _EXIT_MEANING.get(code, "")
        log.warning("workers: %d ended by itself after %.0f s with status %s%s", w.pid, ran,
                    code, f" ({why})" if why else "")
        self.exits += 1
        w.on_its_own = True
        if ran >= self.cfg.healthy_run_s:
            self._backoff = self.cfg.restart_min_s
        self._next_start = now + self._backoff
        if ran < self.cfg.healthy_run_s:
            self._backoff = min(self._backoff * 2, self.cfg.restart_max_s)
        # whatever it left in its group goes too; the leader is reaped, but its pid stays
        # taken (as the group's id) while any member lives, so the signal cannot go astray
        self._begin_stop(w, now)

    def _forget(self, gone: list[_Worker]) -> None:
        if self._record is None:
            return
        self._dead_keys += len(gone)
        try:
            if not self._workers:
                self._record.forget(RECORD_NAME)
                self._dead_keys = 0
            elif self._dead_keys >= _COMPACT_AFTER:
                # two writes: a crash between them leaves the live workers unrecorded for
                # a moment; rare, and a burner ends with the agent anyway
                self._record.forget(RECORD_NAME)
                self._record.remember_all(RECORD_NAME, {w.key: "worker" for w in self._workers})
                self._dead_keys = 0
        except OSError as exc:
            log.error("workers: cannot update %s: %s", self._record.path, exc)

    def _stop_recorded(self, keys: dict[str, str]) -> None:
        """Stop the workers a crashed run left: those whose pid still names the same process."""
        leaders = []
        for key in keys:
            pid_text, _, started = key.partition(":")
            try:
                pid = int(pid_text)
            except ValueError:
                continue
            if pid > 1 and _start_time(pid) == started and pid != os.getpgrp():
                leaders.append(pid)
        if not leaders:
            return
        log.warning("workers: stopping %d worker(s) a previous run left: %s", len(leaders),
                    leaders)
        for pid in leaders:
            _signal_group(pid, signal.SIGTERM)
            _signal_group(pid, signal.SIGCONT)
        deadline = time.monotonic() + self.cfg.stop_grace_s
        while any(_group_members(p) for p in leaders) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in leaders:
            if _group_members(pid):
                _signal_group(pid, signal.SIGKILL)


class DutyCycle:
    """SIGSTOP/SIGCONT the running workers so they run ``Plan.quota`` of each period.

    For boards with neither a frequency cap nor a cgroup quota (as the BOINC client throttles
    its tasks). ``apply`` only records the wanted share; a thread (started by the first
    ``apply``, or ``start``) sends the signals on each edge of the cycle. Without the thread
    (``threaded=False``), whoever drives it calls ``tick(now)``, which sends the signal the
    moment calls for and returns when the next edge is due.
    """

    name = "duty_cycle"

    def __init__(
        self,
        workers: WorkerSlots,
        cfg: DutyCycleConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
    ) -> None:
        self.workers = workers
        self.cfg = cfg or DutyCycleConfig()
        self._clock = clock
        self._threaded = threaded
        self._duty = 1.0
        self._on = True
        self._t0 = clock()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.edges = 0

    def discover(self) -> LeverInfo:
        return LeverInfo(self.name, True, range={
            "period_s": self.cfg.period_s, "min_duty": self.cfg.min_duty,
            "signals": "SIGSTOP/SIGCONT to each running worker's process group",
        })

    def apply(self, plan: Plan) -> None:
        duty = 1.0 if plan.quota >= 1.0 else min(1.0, max(self.cfg.min_duty, plan.quota))
        with self._lock:
            changed = duty != self._duty
            self._duty = duty
        if self._threaded:
            self.start()
            if changed:
                self._wake.set()

    def tick(self, now: float) -> float:
        """Signal the workers as the cycle stands at ``now``; returns the next edge's time."""
        with self._lock:
            duty = self._duty
        period = self.cfg.period_s
        if duty >= 1.0:
            if not self._on:
                self.workers.signal_running(signal.SIGCONT)
                self._on = True
                self.edges += 1
            return now + period
        phase = (now - self._t0) % period
        on_for = duty * period
        on = phase < on_for
        # sent at every edge, not only on a change: a worker started meanwhile follows too
        self.workers.signal_running(signal.SIGCONT if on else signal.SIGSTOP)
        if on != self._on:
            self.edges += 1
        self._on = on
        return now - phase + (on_for if on else period)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qrad-duty-cycle", daemon=True)
        self._thread.start()

    def read_back(self) -> dict[str, Any]:
        with self._lock:
            return {"quota": self._duty, "on": self._on, "period_s": self.cfg.period_s,
                    "edges": self.edges}

    def restore(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._lock:
            self._duty = 1.0
        self.workers.signal_running(signal.SIGCONT)
        self._on = True

    def _run(self) -> None:
        while not self._stopping:
            try:
                due = self.tick(self._clock())
            except Exception:  # a failed signal must not end the cycle with workers stopped
                log.exception("duty cycle: tick failed")
                due = self._clock() + self.cfg.period_s
            self._wake.wait(max(0.0, due - self._clock()))
            self._wake.clear()


# -- processes ---------------------------------------------------------------------------------


def _signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        raise LeverError(f"refusing to signal process group {pgid}: not a worker's")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _start_time(pid: int) -> str:
    """The process's start time as recorded (with its pid it names one process for good)."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``.

    ``killpg(pgid, 0)`` is not enough: it succeeds on zombies, which an init that does not
    reap (some containers) keeps for good, and which burn nothing.
    """
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(entry.name))
    return out
