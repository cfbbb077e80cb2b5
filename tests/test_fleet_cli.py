"""``qrad-fleet`` as an operator runs it: real subprocesses (``python -m qrad_agent.fleet.cli``)
against a real Mosquitto, the reference dispatcher (itself started by the CLI) and one
radiator agent process (``tests/test_jobs_e2e.agent_main``). Quick error cases call
``main(argv)`` in this process.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrad_agent.fleet.cli import main
from qrad_agent.fleet.keys import load_private_key
from qrad_agent.fleet.placement import FleetState
from qrad_agent.fleet.queue import FleetQueue
from tests.mqtt_broker import Broker, FleetClient
from tests.procs import alive
from tests.test_jobs_e2e import (
    JOB_CODE,
    TIMED_CODE,
    AgentProc,
    marks,
    started,
    wait_until,
)
from tests.test_jobs_sandbox import JobEnv, job_env_lifetime

REPO = Path(__file__).resolve().parents[1]


def fleet(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrad_agent.fleet.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def job_env() -> Iterator[JobEnv]:
    yield from job_env_lifetime()


def test_submit_jobs_and_cancel_on_the_queue(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "q.db")
    # -- ARGV: the whole argv is the job's, options before it still count
    r = fleet("submit", "--db", db, "--id", "hello", "--priority", "high", "--",
              "/usr/bin/python3", "-c", "print('hi')")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", "")
    # a job file, with options after it; --count makes copies
    (tmp_path / "jobs.json").write_text(json.dumps(
        [{"job": "a", "argv": ["/bin/true"]}, {"job": "b", "argv": ["/bin/true", "x"]}]))
    r = fleet("submit", "--db", db, str(tmp_path / "jobs.json"), "--count", "2",
              "--priority", "background")
    assert (r.returncode, r.stdout.split()) == (0, ["a-0", "a-1", "b-0", "b-1"]), r.stderr
    (tmp_path / "jobs.toml").write_text('[[jobs]]\nargv = ["/bin/echo", "t"]\ncores = 1\n')
    r = fleet("submit", "--db", db, "--id", "tom", str(tmp_path / "jobs.toml"))
    assert (r.returncode, r.stdout) == (0, "tom\n"), r.stderr

    r = fleet("jobs", "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    rows = {j["job"]: j for j in json.loads(r.stdout)}
    assert sorted(rows) == ["a-0", "a-1", "b-0", "b-1", "hello", "tom"]
    q = FleetQueue.open(db)
    hello = q.get("hello")
    assert hello is not None and hello.spec.argv == ["/usr/bin/python3", "-c", "print('hi')"]
    b1 = q.get("b-1")
    assert b1 is not None and b1.spec.argv == ["/bin/true", "x"]
    q.db.close()
    assert rows["hello"]["priority"] == "high" and rows["a-0"]["priority"] == "background"
    assert {j["state"] for j in rows.values()} == {"queued"}

    r = fleet("cancel", "--db", db, "hello")
    assert (r.returncode, r.stdout) == (0, "hello: cancelled\n"), r.stderr
    r = fleet("jobs", "--db", db)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "PRIO", "ATT", "NODE", "REASON"]
    assert lines[1].split() == ["hello", "cancelled", "high", "0", "cancelled"]  # rank first
    assert lines[-1] == "cancelled=1  queued=5"
    r = fleet("jobs", "--db", db, "--state", "cancelled")
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:-1]] == ["hello"]

    # what is wrong is said, with exit code 1 (2 for a command line argparse refuses)
    capsys.readouterr()
    assert main(["submit", "--db", db, "--id", "hello", "--", "/bin/true"]) == 1
    assert "is taken" in capsys.readouterr().err
    assert main(["submit", "--db", db]) == 1
    assert "give a job file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"job": "bad", "argv": []}))
    assert main(["submit", "--db", db, str(tmp_path / "bad.json")]) == 1
    assert "argv" in capsys.readouterr().err
    assert main(["submit", "--db", db, str(tmp_path / "jobs.json"), "--", "/bin/true"]) == 1
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--db", db, "--"])
    assert exc.value.code == 2
    assert main(["cancel", "--db", db, "nope"]) == 1
    assert "no job 'nope'" in capsys.readouterr().err
    assert main(["cancel", "--db", db, "hello"]) == 0  # already over: says so
    assert capsys.readouterr().out == "hello: cancelled\n"


def test_dispatcher_nodes_cmd_watch_and_cancel_against_a_broker_and_a_radiator(
    tmp_path: Path, job_env: JobEnv
) -> None:
    # two keys: the dispatcher's, and the operator's (a radiator refuses a seq not above the
    # last from that key, and two signers' clocks interleave)
    keys = {}
    for name in ("fleet", "ops"):
        r = fleet("keygen", "--out", str(tmp_path / f"{name}.pem"), "--name", name)
        assert r.returncode == 0, r.stderr
        assert f'name = "{name}"' in r.stdout and "key id" in r.stderr
        keys[name] = load_private_key(str(tmp_path / f"{name}.pem"))
        m = re.search(r'public_key = "([^"]+)"', r.stdout)
        assert m is not None
    r = fleet("keygen", "--out", str(tmp_path / "ops.pem"))
    assert r.returncode == 1 and "exists" in r.stderr

    db = str(tmp_path / "q.db")
    broker = Broker(tmp_path / "broker").start()
    url = f"mqtt://{broker.host}:{broker.port}"
    agent = AgentProc(tmp_path, "rad-x", broker, [keys["fleet"], keys["ops"]], job_env)
    with open(tmp_path / "dispatcher.err", "wb") as derr:
        disp = subprocess.Popen(
            [sys.executable, "-m", "qrad_agent.fleet.cli", "dispatcher", "--broker", url,
             "--db", db, "--key", str(tmp_path / "fleet.pem"), "--retry-after", "0.2"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=derr)
    watch: subprocess.Popen[str] | None = None
    watched: list[str] = []
    results = FleetClient(broker.host, broker.port, "results")
    logs = [agent.log, agent.log.with_suffix(".err"), tmp_path / "dispatcher.err"]

    def state_of(job: str) -> FleetState | None:
        q = FleetQueue.open(db)
        try:
            j = q.get(job)
            return j.state if j is not None else None
        finally:
            q.db.close()

    try:
        results.subscribe("qrad/v1/nodes/rad-x/cmd/result")
        agent.start()
        # a job through the queue, the dispatcher and the radiator
        r = fleet("submit", "--db", db, "--id", "quick", "--", job_env.python, "-c", JOB_CODE,
                  str(job_env.shared))
        assert (r.returncode, r.stdout) == (0, "quick\n"), r.stderr
        wait_until(lambda: state_of("quick") is FleetState.SUCCEEDED, 30, "quick succeeded",
                   logs)
        assert marks(job_env)["quick"] == 1
        r = fleet("jobs", "--db", db)
        assert r.stdout.splitlines()[1].split()[:5] == ["quick", "succeeded", "low", "1",
                                                         "rad-x"]

        # nodes: from the retained status and state
        r = fleet("nodes", "--broker", url, "--wait", "1")
        assert r.returncode == 0, r.stderr
        row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("rad-x"))
        assert row[1] == "online" and float(row[3]) == 28.0, r.stdout  # the test's override

        # watch: live telemetry and events until interrupted
        watch = subprocess.Popen(
            [sys.executable, "-m", "qrad_agent.fleet.cli", "watch", "--broker", url,
             "--node", "rad-x"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        out = watch.stdout
        assert out is not None

        def read() -> None:
            for line in out:
                watched.append(line)

        threading.Thread(target=read, daemon=True).start()
        tele = re.compile(r"^rad-x +room [0-9.]+ target 28\.0 power [0-9.]+ W")
        wait_until(lambda: any(tele.match(ln) for ln in watched), 20,
                   f"telemetry in watch: {watched}", logs)

        # cmd: signed by the operator's key; the radiator applies it
        r = fleet("cmd", "--broker", url, "rad-x", "override", "--key",
                  str(tmp_path / "ops.pem"), "--body",
                  json.dumps({"target_c": 21.5, "duration_s": 7 * 86400}))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("sent override (") and "nodes/rad-x/cmd/override" in r.stdout
        res = json.loads(results.expect("qrad/v1/nodes/rad-x/cmd/result", 10).payload)
        assert (res["cmd"], res["status"]) == ("override", "ok"), res
        assert res["state"]["target_c"] == 21.5
        wait_until(lambda: any("event override_set" in ln for ln in watched), 10,
                   f"the override's event in watch: {watched}", logs)
        r = fleet("nodes", "--broker", url, "--wait", "1")
        row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("rad-x"))
        assert float(row[3]) == 21.5, r.stdout
        # to all: a broadcast the radiator answers too
        r = fleet("cmd", "--broker", url, "--all", "identify", "--key",
                  str(tmp_path / "ops.pem"), "--body", '{"duration_s": 5}')
        assert r.returncode == 0 and "fleet/cmd/identify" in r.stdout, r.stderr
        res = json.loads(results.expect("qrad/v1/nodes/rad-x/cmd/result", 10).payload)
        assert (res["cmd"], res["status"]) == ("identify", "ok"), res
        # unsigned: sent, and refused by the radiator
        r = fleet("cmd", "--broker", url, "rad-x", "mode", "--body", '{"mode": "off"}')
        assert r.returncode == 0, r.stderr
        res = json.loads(results.expect("qrad/v1/nodes/rad-x/cmd/result", 10).payload)
        assert res["status"] == "error" and "unsigned" in res["reason"], res
        # not a valid command: refused before anything is sent
        r = fleet("cmd", "--broker", url, "rad-x", "mode", "--body", '{"mode": "warm"}')
        assert r.returncode == 1 and "not a valid command" in r.stderr, r.stderr
        r = fleet("cmd", "--broker", url, "mode", "--body", '{"mode": "off"}')
        assert r.returncode == 1 and "give a NODE or --all" in r.stderr, r.stderr

        # cancel a running job: the radiator kills it and the queue says cancelled
        r = fleet("submit", "--db", db, "--id", "long", "--", job_env.python, "-c",
                  TIMED_CODE, str(job_env.shared), "120", "120")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: bool(started(job_env, "long", 1)), 30, "long started", logs)
        pid = started(job_env, "long", 1)[0]
        r = fleet("cancel", "--db", db, "long", "--broker", url, "--key",
                  str(tmp_path / "ops.pem"))
        assert (r.returncode, r.stdout) == (0, "long: cancelling; rad-x told to kill it\n"), \
            r.stderr
        wait_until(lambda: not alive(pid), 10, "the cancelled job killed", logs)
        wait_until(lambda: state_of("long") is FleetState.CANCELLED, 10, "long cancelled",
                   logs)
        r = fleet("jobs", "--db", db, "--state", "cancelled")
        assert r.stdout.splitlines()[1].split()[:2] == ["long", "cancelled"], r.stdout

        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
        watch = None

        agent.stop()
        r = fleet("nodes", "--broker", url, "--wait", "1")
        row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("rad-x"))
        assert row[1] == "offline", r.stdout
    finally:
        if watch is not None:
            watch.kill()
            watch.wait()
        agent.stop()
        disp.terminate()
        try:
            disp.wait(10)
        except subprocess.TimeoutExpired:
            disp.kill()
            disp.wait()
        results.close()
        broker.stop()
