"""The sandboxed runner with real processes: each misbehaving job is contained and reported.

Every scenario runs twice: in a job cgroup below the workers' cgroup (the real kernel's, here
cgroup v1 cpu + v2 freezer), and without one (process group, tree and token fallback). As
root the jobs run as the unprivileged user ``qrad-job`` (created if missing); tests that
only mean something for that user are skipped otherwise, with the reason printed.

The helpers at the top are shared by the ledger and scheduler tests.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.cgroups import WorkerCgroup
from qrad_agent.actuators.settings import CgroupConfig
from qrad_agent.jobs.sandbox import JobRun, Outcome, Refusal, Sandbox, SandboxError
from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.jobs.spec import JobState, Reason, parse_spec
from tests.procs import alive, remove_cgroup, wait_for

CGROUP_ROOT = Path("/sys/fs/cgroup")
JOB_USER = "qrad-job"
SYSTEM_PYTHON = "/usr/bin/python3"


def skip(reason: str) -> None:
    print(f"SKIPPED: {reason}")
    pytest.skip(reason)


def job_user() -> str | None:
    """The unprivileged job user when running as root (created if missing), else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(JOB_USER)
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", JOB_USER],
                              capture_output=True, text=True)
        if done.returncode != 0:
            skip(f"cannot create the job user {JOB_USER}: {done.stderr.strip()}")
    return JOB_USER


def job_python(user: str | None) -> str:
    """An interpreter the job user can run (the venv's may live in root's home)."""
    if user is None:
        return sys.executable
    for candidate in (SYSTEM_PYTHON, sys.executable):
        probe = subprocess.run(["su", "-s", "/bin/sh", user, "-c", f"{candidate} -c pass"],
                               capture_output=True)
        if probe.returncode == 0:
            return candidate
    skip(f"no Python interpreter that user {user} may execute")
    raise AssertionError("unreachable")


@dataclass
class JobEnv:
    base: Path  # root-owned, passable by the job user
    work: Path  # the sandbox's work root
    shared: Path  # writable by everyone: where jobs leave marks the tests read
    python: str
    user: str | None

    def config(self, **kw: Any) -> JobsConfig:
        allow = sorted({self.python, os.path.realpath(self.python)})
        return JobsConfig(**{"allow": allow, "max_processes": 64, "cpu_slack_s": 2.0, **kw})


def job_env_lifetime() -> Iterator[JobEnv]:
    """A job environment for one test (wrapped in a fixture by each test module)."""
    user = job_user()
    python = job_python(user)
    base = Path(tempfile.mkdtemp(prefix="qrad-jobs-", dir="/tmp"))
    os.chmod(base, 0o711)
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    yield JobEnv(base, base / "jobs", shared, python, user)
    shutil.rmtree(base, ignore_errors=True)


def wait_user_gone(user: str, timeout: float = 10.0) -> None:
    """Wait until no process of ``user`` is left, zombies included: RLIMIT_NPROC counts
    zombies, and the next test's jobs run as the same user. (Here PID 1 reaps orphans with
    a delay of a second or two; a board's systemd does it at once.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in psutil.process_iter(["username"]) if p.info["username"] == user]:
            return
        time.sleep(0.05)


@pytest.fixture
def job_env() -> Iterator[JobEnv]:
    yield from job_env_lifetime()


def cgroup_parent_lifetime() -> Iterator[str]:
    """A parent cgroup name of one test's own; whatever is left below it is removed after."""
    name = f"qrad-test-jobs-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    for hierarchy in ("cpu", "freezer", "unified", "."):
        top = CGROUP_ROOT / hierarchy / name
        if top.exists():
            for d in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if d.is_dir():
                    remove_cgroup(d)
            remove_cgroup(top)


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    yield from cgroup_parent_lifetime()




def make_cgroup(parent: str) -> WorkerCgroup:
    if os.geteuid() != 0:
        skip("job cgroups need root")
    cg = WorkerCgroup(CgroupConfig(parent=parent), CGROUP_ROOT)
    if not cg.uses():
        skip(f"no usable cgroup here: {cg.quota_why}; {cg.freeze_why}")
    return cg






def finish(run: JobRun, timeout: float = 10.0) -> Outcome:
    deadline = time.monotonic() + timeout
    while (o := run.poll()) is None:
        if time.monotonic() > deadline:
            run.kill(JobState.FAILED, Reason.TIMEOUT, "the test gave up")
            pytest.fail(f"job {run.spec.job} did not end within {timeout} s")
        time.sleep(0.01)
    return o


def py_job(je: JobEnv, name: str, code: str, **kw: Any):
    return parse_spec({"job": name, "argv": [je.python, "-c", textwrap.dedent(code)], **kw})


# -- the sandbox under test, with and without a cgroup ---------------------------------------------


@pytest.fixture(params=["cgroup", "fallback"])
def box(request: pytest.FixtureRequest, job_env: JobEnv) -> Iterator[Sandbox]:
    cg = None
    if request.param == "cgroup":
        cg = make_cgroup(request.getfixturevalue("cgroup_parent"))
    sandbox = Sandbox(job_env.config(max_processes=24), job_env.work, cg)
    yield sandbox
    sandbox.close()
    if cg is not None:
        with contextlib.suppress(LeverError):  # a failed test may leave a job; the parent's
            cg.release()                        # fixture removes what is left


# -- each misbehaviour contained -------------------------------------------------------------------


def test_a_memory_bomb_hits_its_address_space_limit(box: Sandbox, job_env: JobEnv) -> None:
    run = box.start(py_job(job_env, "mem", """
        blocks = []
        while True:
            blocks.append(bytearray(8 << 20))
    """, memory_mb=96))
    peak = 0
    while (o := run.poll()) is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, psutil.Process(run.pid).memory_info().rss)
        if peak > 256 << 20:  # uncontained: stop it before it hurts the machine
            run.kill(JobState.FAILED, Reason.KILLED, "the test stopped an uncontained bomb")
            pytest.fail(f"memory bomb reached {peak >> 20} MiB under a 96 MiB limit")
        time.sleep(0.005)
    assert o.state is JobState.FAILED and o.reason is Reason.EXIT_STATUS and o.exit_code == 1
    assert o.output is not None and "MemoryError" in o.output.tail
    assert peak <= 96 << 20, f"resident {peak >> 20} MiB under a 96 MiB address space limit"


def test_a_fork_bomb_is_bounded_and_killed_at_its_timeout(box: Sandbox, job_env: JobEnv) -> None:
    user = job_env.user
    if user is None:
        skip("RLIMIT_NPROC bounds a user's processes; not root, the jobs run as the test's user")
        return
    wait_user_gone(user)  # earlier tests' orphans count until PID 1 reaps them
    run = box.start(py_job(job_env, "forkbomb", """
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.005)
    """, timeout_s=2.0))  # time enough to fork up to the limit at nice 19 on a busy machine
    most = 0
    while (o := run.poll()) is None:
        procs = [p for p in psutil.process_iter(["username", "status"])
                 if p.info["username"] == user]
        most = max(most, len(procs))
        time.sleep(0.01)
    assert o.state is JobState.FAILED and o.reason is Reason.TIMEOUT
    # psutil can list a child that already exited but is not yet reaped next to the 24 the
    # kernel allows: a couple over the limit is that race, an uncontained bomb is hundreds
    assert 1 < most <= 24 + 2, f"{most} processes of {user} with RLIMIT_NPROC 24"
    left = [p.pid for p in psutil.process_iter(["username"])
            if p.info["username"] == user and alive(p.pid)]
    assert left == [], f"fork bomb processes still alive: {left}"
    wait_user_gone(user)  # their zombies would eat the next test's process limit


def test_a_cpu_hog_is_killed_at_its_timeout(box: Sandbox, job_env: JobEnv) -> None:
    run = box.start(py_job(job_env, "hog", "while True: pass", timeout_s=0.8))
    o = finish(run)
    assert o.state is JobState.FAILED and o.reason is Reason.TIMEOUT
    assert o.signal == 9 and o.exit_code is None
    assert 0.8 <= o.wall_s < 1.3, o.wall_s
    assert o.cpu_s > 0.3, f"only {o.cpu_s} CPU s counted for a busy loop of 0.8 s"
    assert not alive(run.pid)


def test_a_job_that_forks_and_detaches_leaves_nothing_behind(
    box: Sandbox, job_env: JobEnv
) -> None:
    detach = """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()  # a new session: out of the job's process group
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(60)
            os._exit(0)
        time.sleep({wait})
    """
    run = box.start(py_job(job_env, "detach", detach.format(wait=0.3)))
    o = finish(run)
    assert o.state is JobState.SUCCEEDED and o.output is not None
    grandchild = int(o.output.tail.split()[0])
    assert o.leftovers == 1 and "left behind were killed" in (o.detail or "")
    assert not alive(grandchild)
    # and when the timeout kills the job, the detached grandchild goes with it
    run = box.start(py_job(job_env, "detach-hog", detach.format(wait=60), timeout_s=0.5))
    wait_for(lambda: run.log_path.stat().st_size > 0, what="the grandchild to start")
    grandchild = int(run.log_path.read_text().split()[0])
    assert alive(grandchild)
    o = finish(run)
    assert o.reason is Reason.TIMEOUT and not alive(grandchild)


def test_writing_outside_the_work_dir_is_denied(box: Sandbox, job_env: JobEnv) -> None:
    if job_env.user is None:
        skip("only a different, unprivileged user can be kept out; not root here")
    # root-owned places (nothing outside the test's own directory, should the test fail)
    targets = [job_env.base / "escape", box.output_dir / "escape", box.work_root / "escape"]
    run = box.start(py_job(job_env, "escape", f"""
        import sys
        denied = 0
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
            except PermissionError:
                denied += 1
        open("inside.txt", "w").write("fine")
        sys.exit(10 + denied)
    """, outputs=["inside.txt"]))
    o = finish(run)
    assert o.state is JobState.FAILED and o.exit_code == 10 + len(targets)
    assert all(not t.exists() for t in targets)
    assert o.outputs[0].found and o.outputs[0].data == "ZmluZQ=="  # base64 of "fine"
    assert not run.work.exists()  # the work dir is gone after the outputs were read


def test_an_executable_not_on_the_allowlist_is_refused(box: Sandbox, job_env: JobEnv) -> None:
    with pytest.raises(Refusal) as exc:
        box.start(parse_spec({"job": "sh", "argv": ["sh", "-c", "echo pwned"]}))
    assert exc.value.reason is Reason.NOT_ALLOWED
    assert "/usr/bin/sh" in str(exc.value) or "/bin/sh" in str(exc.value)
    assert job_env.python in str(exc.value)  # says what is allowed
    with pytest.raises(Refusal, match="relative path"):
        box.admit(parse_spec({"job": "rel", "argv": ["./python3"]}), 1)
    with pytest.raises(Refusal, match="no executable file"):
        box.admit(parse_spec({"job": "none", "argv": ["no-such-program-here"]}), 1)
    # a link to an allowed program under another name is still refused if neither its path
    # nor its target matches
    link = job_env.base / "innocent"
    link.symlink_to("/bin/sh")
    with pytest.raises(Refusal, match="is not allowed here"):
        box.admit(parse_spec({"job": "link", "argv": [str(link)]}), 1)
    assert not list(box.run_dir.glob("sh.*"))  # nothing was prepared for it


# -- what a job gets -------------------------------------------------------------------------------


def test_environment_is_scrubbed_and_filtered(job_env: JobEnv, monkeypatch) -> None:
    monkeypatch.setenv("AGENT_SECRET", "hunter2")
    box = Sandbox(job_env.config(env_allow=["SEED", "OMP_*"]), job_env.work)
    run = box.start(py_job(job_env, "env", """
        import os
        for k in sorted(os.environ):
            print(k, os.environ[k])
    """, env={"SEED": "42", "OMP_NUM_THREADS": "1"}))
    o = finish(run)
    assert o.state is JobState.SUCCEEDED and o.output is not None
    env = dict(line.split(" ", 1) for line in o.output.tail.splitlines())
    assert "AGENT_SECRET" not in env and "hunter2" not in o.output.tail
    assert env["SEED"] == "42" and env["OMP_NUM_THREADS"] == "1"
    assert env["HOME"] == env["TMPDIR"] == str(run.work)
    assert env["QRAD_JOB_ID"] == "env" and env["PATH"] == box.cfg.path
    assert set(env) - {"SEED", "OMP_NUM_THREADS", "USER", "LOGNAME", "LC_CTYPE"} == {
        "HOME", "TMPDIR", "PWD", "LANG", "PATH", "QRAD_JOB_ID", "QRAD_JOB_ATTEMPT",
        "QRAD_JOB_CORES", "QRAD_JOB_TOKEN"}
    with pytest.raises(Refusal, match=r"environment LD_PRELOAD not allowed here; allowed: SEED"):
        box.admit(py_job(job_env, "x", "pass", env={"LD_PRELOAD": "/tmp/evil.so"}), 1)
    with pytest.raises(Refusal, match="set by the sandbox"):
        box.admit(py_job(job_env, "x", "pass", env={"HOME": "/root"}), 1)


def test_runs_as_the_job_user_in_its_own_session(job_env: JobEnv) -> None:
    if job_env.user is None:
        skip("not root: jobs run as the agent's own user")
        return
    box = Sandbox(job_env.config(), job_env.work)
    run = box.start(py_job(job_env, "who", """
        import os, resource
        print(os.getuid(), os.getgid(), os.getgroups(), os.getsid(0) == os.getpid(),
              os.getpgrp() == os.getpid(), resource.getrlimit(resource.RLIMIT_NOFILE)[0],
              os.nice(0))
    """))
    o = finish(run)
    pw = pwd.getpwnam(JOB_USER)
    assert o.output is not None
    assert o.output.tail.split() == [str(pw.pw_uid), str(pw.pw_gid), "[]", "True", "True",
                                     "256", "19"]


def test_inputs_in_outputs_out_and_links_are_not_followed(job_env: JobEnv) -> None:
    box = Sandbox(job_env.config(output_file_max_bytes=16), job_env.work)
    spec = parse_spec({
        "job": "io", "argv": [job_env.python, "run.py"],
        "inputs": [{"path": "run.py", "data": _b64(textwrap.dedent("""
            import os
            data = open("in/data.txt").read()
            os.makedirs("out")
            open("out/result.txt", "w").write(data.upper())
            open("out/big.bin", "wb").write(b"x" * 100)
            os.symlink("/etc/passwd", "out/leak")
            os.mkfifo("out/fifo")
        """).encode())}, {"path": "in/data.txt", "data": _b64(b"heat")}],
        "outputs": ["out/result.txt", "out/big.bin", "out/leak", "out/fifo", "out/missing"],
    })
    o = finish(box.start(spec))
    assert o.state is JobState.SUCCEEDED, o.output
    result, big, leak, fifo, missing = o.outputs
    assert result.found and result.data == _b64(b"HEAT") and result.bytes == 4
    assert big.found and big.data is None and big.bytes == 100 and big.sha256 is not None
    assert not leak.found and "symbolic link" in (leak.why or "")
    assert not fifo.found and fifo.why == "not a regular file"
    assert not missing.found and missing.why == "not found"


def test_output_tail_and_digest_are_bounded(job_env: JobEnv) -> None:
    box = Sandbox(job_env.config(output_tail_bytes=100), job_env.work)
    o = finish(box.start(py_job(job_env, "chatty", """
        import sys
        for i in range(2000):
            print("line", i)
        sys.stdout.flush()
        print("the end", file=sys.stderr)  # stderr lands in the same capture
    """)))
    assert o.output is not None and o.output.truncated
    assert len(o.output.tail) == 100 and o.output.tail.endswith("the end\n")
    assert o.output.bytes > 18000
    assert not list(box.output_dir.iterdir())  # the captured output file is removed


def test_suspend_stops_the_cpu_and_resume_gives_it_back(box: Sandbox, job_env: JobEnv) -> None:
    run = box.start(py_job(job_env, "spin", """
        import os
        if os.fork() == 0:
            os.setsid()
        while True:
            pass
    """, timeout_s=30))
    time.sleep(0.3)
    run.suspend()
    time.sleep(0.1)  # let the freeze settle
    before = run.cpu_seconds()
    time.sleep(0.4)
    assert run.cpu_seconds() - before < 0.05, "a suspended job kept using the CPU"
    run.resume()
    # at nice 19 on a busy machine it may get little CPU, but it must get some
    wait_for(lambda: run.cpu_seconds() - before > 0.1, timeout=5, what="the job to run again")
    o = run.kill(JobState.CANCELLED, Reason.CANCELLED, "test over")
    assert o.state is JobState.CANCELLED and o.leftovers >= 1


def test_timeout_does_not_count_suspended_time(job_env: JobEnv) -> None:
    box = Sandbox(job_env.config(), job_env.work)
    run = box.start(py_job(job_env, "patient", "import time; time.sleep(0.6)", timeout_s=0.5))
    run.suspend()
    time.sleep(0.7)
    assert run.poll() is None  # 0.7 s of wall time, almost none of it running
    run.resume()
    o = finish(run)
    assert o.reason is Reason.TIMEOUT and o.wall_s < 0.8


def test_a_crashed_agents_leftovers_are_swept(job_env: JobEnv, cgroup_parent: str) -> None:
    cg = make_cgroup(cgroup_parent)
    box = Sandbox(job_env.config(), job_env.work, cg)
    in_group = box.start(py_job(job_env, "left1", "import time; time.sleep(60)"))
    no_group = Sandbox(job_env.config(), job_env.work)
    by_token = no_group.start(py_job(job_env, "left2", """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        time.sleep(60)
    """))
    wait_for(lambda: len(psutil.Process(by_token.pid).children()) == 1, what="the fork")
    orphan = psutil.Process(by_token.pid).children()[0].pid
    # the agent "dies": nobody polls these runs any more; a new sandbox starts
    fresh = Sandbox(job_env.config(), job_env.work, WorkerCgroup(cg.cfg, CGROUP_ROOT))
    killed = fresh.sweep([(by_token.token, None, None)])
    assert killed >= 3
    for pid in (in_group.pid, by_token.pid, orphan):
        wait_for(partial(_gone, pid), what=f"{pid} to die")
    assert not list(fresh.run_dir.glob("left*"))
    assert not [d for u in cg.uses() for d in u.group.glob("job-*")]
    cg.release()


def test_root_without_a_job_user_refuses_to_run_jobs(job_env: JobEnv) -> None:
    if os.geteuid() != 0:
        skip("only root would run jobs as another user")
    with pytest.raises(SandboxError, match="does not exist; create it"):
        Sandbox(job_env.config(user="no-such-user-x"), job_env.work)


# -- helpers ---------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _gone(pid: int) -> bool:
    return not alive(pid)




def test_a_job_whose_spawner_died_ends_interrupted_and_the_next_job_runs(
        box: Sandbox, job_env: JobEnv) -> None:
    """The spawner (the jobs' parent) is killed: the running job goes on, but its exit status
    is lost with it; once it ends it is reported failed, ``interrupted`` (the fleet runs it
    again), and the next job starts under a new spawner."""
    run = box.start(py_job(job_env, "orphaned", "import time; time.sleep(30)"))
    spawner_pid = box.spawner.pid
    assert spawner_pid is not None
    os.kill(spawner_pid, signal.SIGKILL)
    time.sleep(0.2)
    assert run.poll() is None and alive(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    o = finish(run)
    assert (o.state, o.reason) == (JobState.FAILED, Reason.INTERRUPTED)
    assert "spawner" in (o.detail or "")
    after = finish(box.start(py_job(job_env, "next", "print('ok')")))
    assert after.state is JobState.SUCCEEDED and box.spawner.pid not in (None, spawner_pid)


def test_what_ended_jobs_leave_is_removed_off_the_loop(box: Sandbox, job_env: JobEnv) -> None:
    """The work directory's name is free as soon as the job ended (the next attempt may
    reuse it); the directory and the job cgroup are gone once the janitor is drained."""
    runs = box.start_many([(py_job(job_env, f"j{i}", "open('f', 'w').write('x')"), f"t{i}")
                           for i in range(3)])
    for run in runs:
        assert isinstance(run, JobRun)
        assert finish(run).state is JobState.SUCCEEDED
        assert not (box.run_dir / f"{run.spec.job}.1").exists()
    box.close()
    assert list(box.run_dir.iterdir()) == []
    if box.cgroup is not None:
        assert not [d for u in box.cgroup.uses() for d in u.group.glob("job-*")]
