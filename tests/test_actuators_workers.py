"""Worker slots and the duty cycle, with real processes measured by psutil."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import CgroupConfig, DutyCycleConfig, WorkersConfig
from qrad_agent.actuators.workers import DutyCycle, WorkerSlots
from qrad_agent.core.models import Plan
from tests.procs import alive, wait_for

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def slots(n: int, quota: float = 1.0) -> Plan:
    return Plan(slots=n, freq_khz=1_000_000, quota=quota)






def cpu_of(pids: list[int], seconds: float) -> float:
    """CPUs' worth of time ``pids`` (and their children) used over ``seconds``."""
    procs = [psutil.Process(p) for p in pids]

    def total() -> float:
        t = 0.0
        for proc in procs:
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    c = p.cpu_times()
                    t += c.user + c.system
                except psutil.NoSuchProcess:
                    pass
        return t

    c0, w0 = total(), time.monotonic()
    time.sleep(seconds)
    return (total() - c0) / (time.monotonic() - w0)


def ready_command(tmp_path: Path, body: str) -> tuple[list[str], Path]:
    """A worker command that writes ``ready`` to a file once its setup is done."""
    ready = tmp_path / f"ready-{uuid.uuid4().hex[:6]}"
    script = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.py"
    script.write_text(textwrap.dedent(body).replace("READY", repr(str(ready))))
    return [PY, str(script)], ready


@pytest.fixture
def made() -> Iterator[list[WorkerSlots]]:
    """Slots levers a test makes; restored after it, whatever happened."""
    levers: list[WorkerSlots] = []
    yield levers
    for lever in levers:
        lever.restore()


def new_slots(made: list[WorkerSlots], cfg: WorkersConfig, **kw: object) -> WorkerSlots:
    lever = WorkerSlots(cfg, **kw)  # type: ignore[arg-type]
    made.append(lever)
    return lever


# -- the built-in burner -----------------------------------------------------------------------


def test_burners_start_nice_and_in_their_own_session(made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(), max_slots=2)
    assert lever.discover().range["command"] == "built-in burner"
    lever.apply(slots(2))
    pids = lever.pids()
    assert len(pids) == 2 and lever.starts == 2
    # the launcher lowers its priority first thing, a few ms after the spawn
    wait_for(lambda: all(psutil.Process(p).nice() == 19 for p in pids), what="nice 19")
    for pid in pids:
        assert os.getpgid(pid) == pid  # its own process group
        assert os.getsid(pid) == pid  # and session


def test_burners_burn_and_stop(made: list[WorkerSlots]) -> None:
    # nice 0 here, so the measurement does not depend on what else the machine runs
    lever = new_slots(made, WorkersConfig(stop_grace_s=2, nice=0), max_slots=2)
    lever.apply(slots(2))
    pids = lever.pids()
    time.sleep(0.3)  # past the interpreter's start
    assert cpu_of(pids, 0.6) > 0.2
    lever.apply(slots(1))
    wait_for(lambda: lever.read_back()["stopping"] == 0, what="the second burner to stop")
    assert lever.pids() == [pids[0]]  # the newest went first
    assert not alive(pids[1])
    lever.restore()
    assert lever.read_back()["running"] == 0
    assert not any(alive(p) for p in pids)
    assert lever.starts == 2 and lever.exits == 0


def test_more_slots_than_the_board_has_are_clamped(made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(), max_slots=1)
    lever.apply(slots(5))
    assert len(lever.pids()) == 1


def test_burner_ends_itself_when_the_agent_dies(tmp_path: Path) -> None:
    agent = subprocess.Popen(
        [PY, "-c", textwrap.dedent("""
            import time
            from qrad_agent.actuators.settings import WorkersConfig
            from qrad_agent.actuators.workers import WorkerSlots
            from qrad_agent.core.models import Plan
            lever = WorkerSlots(WorkersConfig(), max_slots=2)
            lever.apply(Plan(2, 1, 1.0))
            print(*lever.pids(), flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert agent.stdout is not None
    pids = [int(p) for p in agent.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    agent.kill()
    agent.wait()
    wait_for(lambda: not any(alive(p) for p in pids), 3.0, "orphaned burners to end")


# -- suspend and resume ------------------------------------------------------------------------


def test_shed_suspend_stops_and_continues_the_same_process(made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(shed="suspend", nice=0), max_slots=2)
    lever.apply(slots(2))
    first, second = lever.pids()
    time.sleep(0.3)
    lever.apply(slots(1))
    wait_for(lambda: psutil.Process(second).status() == psutil.STATUS_STOPPED,
             what="SIGSTOP to take effect")
    assert cpu_of([second], 0.4) < 0.02
    assert lever.read_back()["suspended"] == 1
    lever.apply(slots(2))
    assert sorted(lever.pids()) == sorted([first, second])  # resumed, not restarted
    assert lever.starts == 2
    assert cpu_of([second], 0.5) > 0.05


def test_restore_stops_suspended_workers_too(made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(shed="suspend", stop_grace_s=1), max_slots=2)
    lever.apply(slots(2))
    pids = lever.pids()
    lever.apply(slots(0))  # no cgroup: both SIGSTOPped
    wait_for(lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids))
    started = time.monotonic()
    lever.restore()
    assert time.monotonic() - started < 1.0  # SIGTERM reached them: no SIGKILL wait
    assert not any(alive(p) for p in pids)
    assert lever.kills == 0


# -- configured commands: stubborn workers, children, exits ------------------------------------

IGNORES_TERM = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(READY, "w").close()
    while True:
        time.sleep(0.05)
"""

WITH_CHILDREN = """
    import subprocess, sys, time
    # one child that spins, one that also shrugs SIGTERM off
    kids = [subprocess.Popen([sys.executable, "-c", "while True: pass"]),
            subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(600)"])]
    time.sleep(0.3)
    with open(READY, "w") as f:
        f.write(" ".join(str(k.pid) for k in kids))
    for k in kids:
        k.wait()
"""


def test_worker_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, made: list[WorkerSlots]
) -> None:
    argv, ready = ready_command(tmp_path, IGNORES_TERM)
    lever = new_slots(made, WorkersConfig(command=argv, stop_grace_s=0.5), max_slots=1)
    lever.apply(slots(1))
    (pid,) = lever.pids()
    wait_for(ready.exists, what="the worker to ignore SIGTERM")
    started = time.monotonic()
    lever.apply(slots(0))
    assert time.monotonic() - started < 0.3  # apply does not wait for the stop
    assert alive(pid)

    def tick() -> bool:  # as the control loop calls it
        lever.apply(slots(0))
        return not alive(pid)

    wait_for(tick, 3.0, "SIGKILL after the grace")
    assert time.monotonic() - started >= 0.5
    assert lever.kills == 1
    assert lever.read_back()["stopping"] == 0


def test_children_of_a_worker_are_stopped_with_it(tmp_path: Path, made: list[WorkerSlots]) -> None:
    argv, ready = ready_command(tmp_path, WITH_CHILDREN)
    lever = new_slots(made, WorkersConfig(command=argv, stop_grace_s=0.5), max_slots=1)
    lever.apply(slots(1))
    (pid,) = lever.pids()
    wait_for(lambda: ready.exists() and ready.read_text() != "", what="the children")
    kids = [int(k) for k in ready.read_text().split()]
    assert all(alive(k) for k in kids)
    assert {psutil.Process(k).ppid() for k in kids} == {pid}
    lever.restore()
    assert not alive(pid)
    assert not any(alive(k) for k in kids), "orphans left"
    assert lever.kills == 1  # the stubborn child needed SIGKILL, sent to the whole group


def test_worker_that_exits_is_restarted_with_backoff(
    tmp_path: Path, made: list[WorkerSlots]
) -> None:
    now = [100.0]
    cfg = WorkersConfig(command=[PY, "-c", "import sys; sys.exit(5)"],
                        restart_min_s=10, restart_max_s=25, healthy_run_s=60)
    lever = new_slots(made, cfg, max_slots=1, clock=lambda: now[0])
    lever.apply(slots(1))
    assert lever.starts == 1
    (pid,) = lever.pids()
    wait_for(lambda: not alive(pid), what="the worker to exit")
    lever.apply(slots(1))
    assert lever.exits == 1
    assert lever.starts == 1  # backing off: not restarted at once
    now[0] += 10
    lever.apply(slots(1))
    assert lever.starts == 2  # restarted per plan
    (pid,) = lever.pids()
    wait_for(lambda: not alive(pid), what="the second worker to exit")
    lever.apply(slots(1))
    now[0] += 10
    lever.apply(slots(1))
    assert lever.starts == 2  # the wait doubled to 20 s
    now[0] += 10
    lever.apply(slots(1))
    assert (lever.starts, lever.exits) == (3, 2)


def test_missing_command_is_reported_not_started(tmp_path: Path, made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(command=[str(tmp_path / "no-such-program")]))
    info = lever.discover()
    assert not info.available
    assert "is not an executable file" in info.why_not
    with pytest.raises(LeverError, match="no-such-program"):
        lever.apply(slots(1))
    assert lever.starts == 0


# -- crash safety ------------------------------------------------------------------------------

_AGENT = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from qrad_agent.actuators.restore import RestoreRecord
    from qrad_agent.actuators.settings import WorkersConfig
    from qrad_agent.actuators.workers import WorkerSlots
    from qrad_agent.core.models import Plan

    record, mode = Path(sys.argv[1]), sys.argv[2]
    cfg = WorkersConfig(command=[sys.executable, "-c", "import time; time.sleep(600)"],
                        stop_grace_s=1)
    lever = WorkerSlots(cfg, RestoreRecord(record), max_slots=2)
    if mode == "term":
        def on_term(signum, frame):
            lever.restore()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
    lever.apply(Plan(2, 1, 1.0))
    print(*lever.pids(), flush=True)
    while True:
        time.sleep(0.05)
""")


def _run_agent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    script = tmp_path / "agent.py"
    script.write_text(_AGENT)
    proc = subprocess.Popen(
        [PY, str(script), str(tmp_path / "restore.json"), mode], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        pytest.fail(f"agent did not start workers: {proc.communicate(timeout=10)[1]}")
    return proc, [int(p) for p in line.split()]


def test_sigterm_to_the_agent_stops_its_workers(tmp_path: Path) -> None:
    agent, pids = _run_agent(tmp_path, "term")
    try:
        assert all(alive(p) for p in pids)
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=10)
    finally:
        agent.kill()
    assert agent.returncode == 0, err
    assert not any(alive(p) for p in pids)
    assert not (tmp_path / "restore.json").exists()


def test_next_start_stops_workers_a_killed_agent_left(tmp_path: Path) -> None:
    agent, pids = _run_agent(tmp_path, "kill")
    agent.kill()
    agent.communicate(timeout=10)
    time.sleep(0.3)
    assert all(alive(p) for p in pids)  # commands outlive the agent, unlike the burner
    record = RestoreRecord(tmp_path / "restore.json")
    assert len(record.originals("workers")) == 2
    WorkerSlots(WorkersConfig(stop_grace_s=1), record)
    wait_for(lambda: not any(alive(p) for p in pids), 3.0, "the leftovers to be stopped")
    assert record.originals("workers") == {}


def test_a_reused_pid_is_not_killed(tmp_path: Path) -> None:
    bystander = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"],
                                 start_new_session=True)
    try:
        record = RestoreRecord(tmp_path / "restore.json")
        # a worker with this pid, but started at another time: the pid was reused since
        record.remember("workers", f"{bystander.pid}:12345.00", "worker")
        WorkerSlots(WorkersConfig(stop_grace_s=0.5), record)
        assert alive(bystander.pid)
        assert record.originals("workers") == {}
    finally:
        bystander.kill()
        bystander.wait()


# -- with the cgroup ---------------------------------------------------------------------------


@pytest.fixture
def cgroup(tmp_path: Path) -> Iterator[WorkerCgroup]:
    if os.geteuid() != 0:
        print("SKIPPED: cgroups need root")
        pytest.skip("cgroups need root")
    cfg = CgroupConfig(parent=f"qrad-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    cg = WorkerCgroup(cfg, Path("/sys/fs/cgroup"), RestoreRecord(tmp_path / "cg.json"))
    if not cg.freeze_info().available:
        reason = f"no cgroup freezer here: {cg.freeze_info().why_not}"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    yield cg
    cg.kill_all()
    cg.release()


def test_no_slot_wanted_freezes_the_whole_group(
    cgroup: WorkerCgroup, made: list[WorkerSlots]
) -> None:
    lever = new_slots(made, WorkersConfig(shed="suspend", nice=0), cgroup=cgroup, max_slots=2)
    lever.apply(slots(2))
    pids = lever.pids()
    wait_for(lambda: cgroup.pids() >= set(pids), what="the workers to join the cgroup")
    lever.apply(slots(0))
    assert cgroup.wait_frozen()
    assert lever.read_back()["slots"] == 0
    assert cpu_of(pids, 0.5) < 0.02
    lever.apply(slots(1))  # thawed, one SIGSTOPped first so it never ran
    assert not cgroup.frozen()
    assert lever.read_back()["suspended"] == 1
    assert cpu_of(lever.pids(), 0.5) > 0.05
    assert lever.starts == 2


def test_restore_kills_a_child_that_left_the_process_group(
    tmp_path: Path, cgroup: WorkerCgroup, made: list[WorkerSlots]
) -> None:
    argv, ready = ready_command(tmp_path, """
        import subprocess, sys, time
        kid = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               start_new_session=True)
        with open(READY, "w") as f:
            f.write(str(kid.pid))
        time.sleep(600)
    """)
    lever = new_slots(made, WorkersConfig(command=argv, stop_grace_s=0.5), cgroup=cgroup,
                      max_slots=1)
    lever.apply(slots(1))
    wait_for(lambda: ready.exists() and ready.read_text() != "", what="the escaping child")
    kid = int(ready.read_text())
    assert os.getpgid(kid) == kid  # out of the worker's process group…
    assert kid in cgroup.pids()  # …but not out of its cgroup
    lever.restore()
    wait_for(lambda: not alive(kid), 3.0, "the escaped child to be killed")


# -- the duty cycle ----------------------------------------------------------------------------


def test_duty_cycle_ticks_stop_and_continue_on_the_edges(made: list[WorkerSlots]) -> None:
    lever = new_slots(made, WorkersConfig(), max_slots=1)
    lever.apply(slots(1))
    (pid,) = lever.pids()
    now = [0.0]
    duty = DutyCycle(lever, DutyCycleConfig(period_s=1.0), clock=lambda: now[0], threaded=False)
    duty.apply(slots(1, quota=0.25))
    assert duty.tick(0.1) == pytest.approx(0.25)  # on until a quarter of the period
    assert duty.tick(0.25) == pytest.approx(1.0)  # then off until the period ends
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, what="SIGSTOP")
    assert duty.tick(1.0) == pytest.approx(1.25)
    wait_for(lambda: psutil.Process(pid).status() != psutil.STATUS_STOPPED, what="SIGCONT")
    duty.apply(slots(1, quota=0.001))  # clamped to the shortest on-time
    assert duty.tick(2.0) == pytest.approx(2.05)
    assert duty.tick(2.5) == pytest.approx(3.0)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, what="SIGSTOP")
    assert duty.edges == 3  # on→off, off→on, on→off
    duty.restore()  # leaves the workers running
    wait_for(lambda: psutil.Process(pid).status() != psutil.STATUS_STOPPED, what="SIGCONT")


def test_duty_cycle_thread_gives_the_quota_as_cpu_share(made: list[WorkerSlots]) -> None:
    # nice 0, so other load on the machine shares the CPU fairly with it in both phases
    lever = new_slots(made, WorkersConfig(nice=0), max_slots=1)
    duty = DutyCycle(lever, DutyCycleConfig(period_s=0.2))
    try:
        lever.apply(slots(1, quota=0.5))
        duty.apply(slots(1, quota=0.5))
        time.sleep(0.3)
        half = cpu_of(lever.pids(), 2.0)
        duty.apply(slots(1, quota=1.0))
        time.sleep(0.1)
        full = cpu_of(lever.pids(), 1.0)
    finally:
        duty.restore()
    assert half <= 0.6, f"measured {half:.2f} CPUs at a 50 % duty cycle"
    assert 0.3 <= half / full <= 0.7, f"{half:.2f} CPUs at 50 %, {full:.2f} unthrottled"
    (pid,) = lever.pids()
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
