"""The job spawner with real processes: what its children are given before exec, how their
ends are reported, and what happens when the spawner itself is interrupted or dies."""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qrad_agent.jobs.spawner import Exit, Launch, Spawner, SpawnError
from tests.procs import alive

SH = "/bin/sh"


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close()


def launch(tmp: Path, script: str, **kw: object) -> Launch:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    fields: dict[str, object] = {
        "exe": SH, "argv": ["job", "-c", script], "env": {"PATH": "/usr/bin:/bin", "MARK": "m"},
        "cwd": str(work), "log": str(tmp / "out.log"), "procs": [], "limits": [], "nice": 0,
        "ids": None}
    fields.update(kw)
    return Launch(**fields)  # type: ignore[arg-type]


def wait_exit(s: Spawner, pid: int, timeout: float = 10.0) -> Exit:
    ended = s.reap(pid, lambda: False, timeout)
    assert ended is not None, f"pid {pid} did not end within {timeout} s"
    return ended




def test_child_gets_its_directory_environment_output_session_and_limits(
        spawner: Spawner, tmp_path: Path) -> None:
    script = ('echo "cwd=$(pwd) mark=$MARK argv0=$0"; echo err >&2; '
              'ps -o sid= -p $$; cat /proc/self/limits; grep -E "^(SigIgn|SigBlk)" '
              '/proc/self/status; echo "nice=$(ps -o ni= -p $$ | tr -d " ")"; exit 3')
    req = launch(tmp_path, script, nice=7, umask=0o027,
                 limits=[(resource.RLIMIT_NOFILE, 77, 77), (resource.RLIMIT_CORE, 0, 0)])
    pid = spawner.launch(req)
    ended = wait_exit(spawner, pid)
    assert ended.status is not None and os.waitstatus_to_exitcode(ended.status) == 3
    assert ended.cpu_s is not None and ended.cpu_s >= 0
    out = (tmp_path / "out.log").read_text()
    assert f"cwd={tmp_path / 'work'} mark=m argv0=job" in out
    assert "err" in out  # stderr merged into the same file
    assert f"{pid}" in out.split("\n")[2]  # its own session: sid is its pid
    nofile = next(line for line in out.splitlines() if line.startswith("Max open files"))
    assert nofile.split()[3:5] == ["77", "77"]
    # nothing ignored or blocked is inherited from the spawner (it ignores SIGINT/TERM/HUP)
    assert "nice=7" in out
    assert "SigIgn:\t0000000000000000" in out and "SigBlk:\t0000000000000000" in out
    assert oct((tmp_path / "out.log").stat().st_mode & 0o777) == "0o600"


def test_exec_failure_and_setup_failure_are_told_apart(spawner: Spawner, tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as missing:
        spawner.launch(launch(tmp_path, "true", exe="/nonexistent/program"))
    assert missing.value.exec_failed and "No such file" in str(missing.value)
    with pytest.raises(SpawnError) as nowhere:
        spawner.launch(launch(tmp_path, "true", cwd=str(tmp_path / "absent")))
    assert not nowhere.value.exec_failed
    assert "cannot enter the work directory" in str(nowhere.value)
    with pytest.raises(SpawnError) as badgroup:
        spawner.launch(launch(tmp_path, "true", procs=[str(tmp_path / "no" / "cgroup.procs")]))
    assert "cannot join the job's cgroup" in str(badgroup.value)
    # and the spawner goes on: the next launch works
    pid = spawner.launch(launch(tmp_path, "exit 0"))
    assert wait_exit(spawner, pid).status == 0


def test_a_batch_starts_side_by_side_and_each_end_is_reported(spawner: Spawner,
                                                               tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / str(i)).mkdir()
    reqs = [launch(tmp_path / str(i), f"exit {i}") for i in range(6)]
    reqs.insert(3, launch(tmp_path, "true", exe="/nonexistent"))
    results = spawner.launch_many(reqs)
    assert isinstance(results[3], SpawnError) and results[3].exec_failed
    pids = [r for r in results if isinstance(r, int)]
    assert len(set(pids)) == 6
    codes = [os.waitstatus_to_exitcode(wait_exit(spawner, pid).status or 0) for pid in pids]
    assert codes == list(range(6))


def test_ctrl_c_on_the_terminal_does_not_stop_the_spawner(spawner: Spawner,
                                                          tmp_path: Path) -> None:
    pid = spawner.launch(launch(tmp_path, "sleep 0.3"))
    spawner_pid = spawner.pid
    assert spawner_pid is not None
    os.kill(spawner_pid, signal.SIGINT)
    os.kill(spawner_pid, signal.SIGTERM)
    assert wait_exit(spawner, pid).status == 0
    assert spawner.pid == spawner_pid and alive(spawner_pid)


def test_a_dead_spawner_loses_the_exit_status_and_another_one_starts(
        spawner: Spawner, tmp_path: Path) -> None:
    pid = spawner.launch(launch(tmp_path, "sleep 30"))
    first = spawner.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # the job runs on (reparented); while it does, nothing is known
    assert spawner.reap(pid, lambda: not alive(pid), 0.2) is None
    assert alive(pid)
    os.kill(pid, signal.SIGKILL)
    ended = spawner.reap(pid, lambda: not alive(pid), 5.0)
    assert ended == Exit(None, None)
    # the next launch starts a new spawner
    again = spawner.launch(launch(tmp_path, "exit 5"))
    assert spawner.pid not in (None, first)
    assert os.waitstatus_to_exitcode(wait_exit(spawner, again).status or 0) == 5


def test_when_the_agent_goes_its_jobs_go_with_the_spawner(tmp_path: Path) -> None:
    """The socket closes (the agent died, or closed it with jobs still running): the spawner
    kills each job's whole session, detached children of it too, then exits."""
    s = Spawner()
    job = s.launch(launch(tmp_path, "sleep 30 & sleep 30"))
    spawner_pid = s.pid
    assert spawner_pid is not None
    deadline = time.monotonic() + 5
    while len(psutil.Process(job).children()) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    tree = [job, *(c.pid for c in psutil.Process(job).children())]
    s.close()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in (spawner_pid, *tree)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(spawner_pid)
    assert not [p for p in tree if alive(p)]
