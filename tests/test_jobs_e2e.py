"""Jobs end to end: the reference dispatcher and radiator agents against a real Mosquitto.

Each agent is a real process (``agent_main`` below, started with ``python -c``): the agent's
own code on a simulated room, its own FleetLink, state database and ledger, and real job
processes in the sandbox. So an agent can be SIGKILLed mid-job, which leaves its job
processes orphaned exactly as a power cut of the agent alone would.

Jobs mark what they did in a shared directory (one file per finished run, named by job,
attempt and pid), so "exactly once" is counted from what ran, not from what was reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.fleet.dispatcher import BrokerConfig, Dispatcher
from qrad_agent.fleet.placement import FleetState
from qrad_agent.jobs.spec import JobSpec, parse_spec
from qrad_agent.link.security import make_envelope, public_key_b64
from tests.mqtt_broker import Broker, FleetClient
from tests.procs import alive
from tests.test_jobs_sandbox import JobEnv, job_env_lifetime

REPO = Path(__file__).resolve().parents[1]
NODES = ("rad-a", "rad-b", "rad-c")
E2E_JOBS = 300  # of mixed priority, each a Python process, through three radiators

# a job: marks "<job>.<attempt>.<pid>.done" when it has finished its work; job "slow" of
# attempt 1 first marks ".start" and then sleeps long (the agent is killed meanwhile)
JOB_CODE = (
    "import os, sys, time\n"
    "d, j, a = sys.argv[1], os.environ['QRAD_JOB_ID'], os.environ['QRAD_JOB_ATTEMPT']\n"
    "if j.startswith('slow') and a == '1':\n"
    "    open(f'{d}/{j}.{a}.{os.getpid()}.start', 'x').close()\n"
    "    time.sleep(120)\n"
    "open(f'{d}/{j}.{a}.{os.getpid()}.done', 'x').close()\n"
)


# ------------------------------------------------------------------ the agent process


def agent_main(conf_text: str) -> None:
    """One radiator: sim room, real link, real jobs. Runs until SIGTERM (clean stop)."""
    import logging

    from qrad_agent.config import AgentConfig
    from qrad_agent.connect import FleetConnection
    from qrad_agent.jobs.compose import attach_jobs
    from qrad_agent.jobs.settings import JobsConfig
    from qrad_agent.link.bridge import LinkBridge
    from qrad_agent.link.client import Clock, FleetLink
    from qrad_agent.link.settings import LinkConfig
    from qrad_agent.runner import StopFlag, run_realtime
    from qrad_agent.sim.run import build_sim_agent
    from qrad_agent.sim.scenario import load_scenario
    from qrad_agent.store.db import open_store

    c = json.loads(conf_text)
    logging.basicConfig(filename=c["log"], level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = Path(c["state"])
    base = AgentConfig()
    cfg = base.model_copy(update={
        "control": base.control.model_copy(update={"sensor_period_s": 10.0}),
        "jobs": JobsConfig.model_validate(c["jobs"]),
    })
    scenario = load_scenario("winter-week")
    if c.get("cores"):  # a smaller board: fewer slots
        scenario = scenario.model_copy(update={
            "radiator": scenario.radiator.model_copy(update={"cores": int(c["cores"])})})
    agent, world = build_sim_agent(cfg, scenario)
    if c.get("filler_lever"):
        # worker slots as on a board (next to the simulated heat source), so that the
        # scheduler takes them over and runs the configured filler in them
        from qrad_agent.actuators.workers import WorkerSlots

        at = agent.levers.index(world.slots) + 1
        agent.levers.insert(at, WorkerSlots(cfg.actuators.workers))
    # a cold room that stays cold: heat (and so work) is wanted until a command says otherwise
    agent.controller.set_override(28.0, world.t, 7 * 86400.0)
    stop = StopFlag()
    stop.install()  # SIGTERM: a clean stop
    link = FleetLink(LinkConfig.model_validate(c["link"]), c["node"], open_store(state),
                     clock=Clock(wall=time.time, mono=lambda: world.t), wake=stop.wake)
    bridge = LinkBridge(agent, link)
    jobs = attach_jobs(agent, agent.cfg, link, state, link_bridge=bridge)
    assert jobs is not None
    bridge.start(world.t, world.local)
    fleet = FleetConnection(link, bridge, jobs)
    # the agent's own service loop, its simulated time 50x real (a control tick every 0.2 s):
    # it wakes for link messages and for job ends
    run_realtime(agent, stop, world, 50.0, on_beat=fleet.beat, wake_fds=fleet.wake_fds,
                 after_wake=fleet.after_wake)
    agent.stop()
    jobs.stop()
    bridge.stop()
    world.close()


class AgentProc:
    def __init__(self, tmp: Path, node: str, broker: Broker, keys: list[Ed25519PrivateKey],
                 env: JobEnv) -> None:
        self.node = node
        self.log = tmp / f"{node}.log"
        self.conf: dict[str, Any] = {
            "node": node, "state": str(tmp / f"state-{node}"), "log": str(self.log),
            "link": {
                "enabled": True,
                "broker": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                           "reconnect_max_s": 0.5, "keepalive_s": 5},
                "security": {"fleet_keys": [
                    {"name": f"k{i}", "public_key": public_key_b64(k.public_key())}
                    for i, k in enumerate(keys)]},
                "telemetry": {"period_s": 60},
            },
            "jobs": env.config(work_dir=str(env.base / f"work-{node}"), filler="none",
                               request_interval_s=0.1, heartbeat_s=1.0, grace_s=600.0,
                               ).model_dump(mode="json"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        code = ("import sys; from tests.test_jobs_e2e import agent_main; "
                "agent_main(sys.argv[1])")
        with open(self.log.with_suffix(".err"), "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(self.conf)],
                                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def job_env() -> Iterator[JobEnv]:
    yield from job_env_lifetime()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def job_spec(env: JobEnv, job: str, priority: str = "low", **kw: Any) -> JobSpec:
    return parse_spec({"job": job, "priority": priority,
                       "argv": [env.python, "-c", JOB_CODE, str(env.shared)],
                       "timeout_s": 300.0, "lease_s": 6.0, **kw})




def marks(env: JobEnv, suffix: str = ".done") -> Counter[str]:
    return Counter(p.name.split(".")[0] for p in env.shared.iterdir() if p.name.endswith(suffix))


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               logs: list[Path] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                            for p in logs if p.exists())
            pytest.fail(f"not within {timeout} s: {what}{tails}")
        time.sleep(0.1)


# ------------------------------------------------------------------ the tests


def test_300_jobs_on_three_radiators_then_a_radiator_killed_mid_job(
    tmp_path: Path, broker: Broker, job_env: JobEnv
) -> None:
    dkey = Ed25519PrivateKey.generate()
    agents = [AgentProc(tmp_path, n, broker, [dkey], job_env) for n in NODES]
    disp = Dispatcher(BrokerConfig(broker.host, broker.port), tmp_path / "fleet.db", dkey,
                      retry_after_s=0.2, tick_s=0.2)
    logs = [a.log for a in agents] + [a.log.with_suffix(".err") for a in agents]
    watcher: FleetClient | None = None
    try:
        disp.start()
        assert disp.connected.wait(5)
        prios = ("high", "low", "background")
        specs = [job_spec(job_env, f"j{i:03d}", prios[i % 3]) for i in range(E2E_JOBS)]
        disp.queue.submit_many(specs)
        for a in agents:
            a.start()

        def all_succeeded() -> bool:
            return disp.queue.counts().get("succeeded", 0) == E2E_JOBS

        wait_until(all_succeeded, 120, f"{E2E_JOBS} jobs succeeded ({disp.queue.counts()})",
                   logs)
        done = marks(job_env)
        assert sorted(done) == sorted(s.job for s in specs)
        assert set(done.values()) == {1}, [j for j, n in done.items() if n != 1]
        where: Counter[str] = Counter()
        for fj in disp.queue.list():
            assert fj.state is FleetState.SUCCEEDED
            assert fj.result is not None and fj.result.exit_code == 0
            assert fj.result.output is not None  # the result itself was delivered
            where[fj.result.node] += 1
        assert len(where) >= 2, where  # placement spread the work

        # -- a radiator dies mid-job: the job runs elsewhere; the restarted one reports
        # "interrupted" and does not run it again
        victim = agents[0]
        for a in agents[1:]:
            a.stop()  # clean stops: only the victim asks for work now
        disp.queue.submit(job_spec(job_env, "slow", "high", lease_s=5.0))
        wait_until(lambda: marks(job_env, ".start")["slow"] == 1, 30, "slow job started",
                   logs)
        job = disp.queue.get("slow")
        assert job is not None and job.node == victim.node and job.attempt == 1
        watcher = FleetClient(broker.host, broker.port, "watcher")
        watcher.subscribe("qrad/v1/nodes/+/jobs/slow/status")
        victim.kill()
        # the orphaned job process goes on; the will ("lost") or the lease requeues it
        wait_until(lambda: (j := disp.queue.get("slow")) is not None
                   and j.state is FleetState.QUEUED, 20, "slow job requeued", logs)
        agents[1].start()
        wait_until(lambda: (j := disp.queue.get("slow")) is not None
                   and j.state is FleetState.SUCCEEDED, 30, "slow job done elsewhere", logs)
        final = disp.queue.get("slow")
        assert final is not None and final.result is not None
        assert final.result.node == agents[1].node and final.result.attempt == 2
        orphan = int(next(job_env.shared.glob("slow.1.*.start")).name.split(".")[2])
        # the agent's death ended its job: the spawner saw the agent go and killed it, so
        # attempt 1 did not run on while attempt 2 ran elsewhere
        wait_until(lambda: not alive(orphan), 10, "orphan killed with its agent", logs)
        watcher.clear()
        victim.start()
        # the restarted victim finds attempt 1 "running" in its ledger: it reports it
        # failed/interrupted (and would kill what is left of it), and never runs it again
        r = watcher.expect(lambda m: m.topic == f"qrad/v1/nodes/{victim.node}/jobs/slow/status",
                           30)
        st = json.loads(r.payload)
        assert (st["attempt"], st["state"], st["reason"]) == (1, "failed", "interrupted"), st
        time.sleep(1.0)
        assert marks(job_env, ".start")["slow"] == 1
        assert marks(job_env)["slow"] == 1  # only attempt 2 finished
        final = disp.queue.get("slow")
        assert final is not None and final.result is not None and final.result.attempt == 2
        assert disp.queue.counts() == {"succeeded": E2E_JOBS + 1}
    finally:
        for a in agents:
            a.stop()
        disp.stop()
        if watcher is not None:
            watcher.close()


def test_forged_replayed_expired_misaddressed_and_bad_specs_are_refused(
    tmp_path: Path, broker: Broker, job_env: JobEnv
) -> None:
    ops = Ed25519PrivateKey.generate()
    agent = AgentProc(tmp_path, "rad-x", broker, [ops], job_env)
    fleet = FleetClient(broker.host, broker.port, "tester")
    topic = "qrad/v1/nodes/rad-x"
    fleet.subscribe(f"{topic}/jobs/+/status")
    seq = [time.time_ns() // 1000]

    def envelope(jobs: list[dict[str, Any]], *, key: Ed25519PrivateKey | None = ops,
                 node: str = "rad-x", issued: float | None = None, ttl: float = 60.0,
                 same_seq: bool = False) -> dict[str, Any]:
        if not same_seq:
            seq[0] += 1
        return make_envelope(key, node, {"cmd": "assign", "jobs": jobs}, seq=seq[0],
                             issued_at=time.time() if issued is None else issued, ttl_s=ttl,
                             command_id=f"t{seq[0]}")

    def send(env: dict[str, Any]) -> None:
        fleet.publish(f"{topic}/work/assign", json.dumps(env))

    def status_of(job: str, timeout: float = 10.0) -> dict[str, Any]:
        r = fleet.expect(lambda m: m.topic == f"{topic}/jobs/{job}/status", timeout)
        return dict(json.loads(r.payload))

    def spec(job: str) -> dict[str, Any]:
        return job_spec(job_env, job).model_dump(mode="json")

    try:
        agent.start()
        wait_until(lambda: "connected to" in (agent.log.read_text(errors="replace")
                                              if agent.log.exists() else ""),
                   20, "agent connected", [agent.log])
        cases = [
            ("forged", envelope([spec("forged")], key=Ed25519PrivateKey.generate()),
             "bad_signature"),
            ("unsigned", envelope([spec("unsigned")], key=None), "unsigned"),
            ("expired", envelope([spec("expired")], issued=time.time() - 120, ttl=60),
             "expired"),
            ("misaddr", envelope([spec("misaddr")], node="rad-y"), "misaddressed"),
        ]
        for job, env, reason in cases:
            send(env)
            st = status_of(job)
            assert (st["state"], st["reason"]) == ("returned", reason), st
        # a good one runs; the same envelope again is a replay: refused, not run twice
        good = envelope([spec("good")])
        send(good)
        # taken and started in one step: its first status is ``running`` (which acknowledges
        # it; ``accepted`` is not sent separately when superseded in the same batch)
        assert status_of("good")["state"] in ("accepted", "running")
        wait_until(lambda: marks(job_env)["good"] == 1, 20, "good job ran", [agent.log])
        send(good)
        # another job under a seq already used: replayed, refused with a status
        send(envelope([spec("late")], same_seq=True))
        st = status_of("late")
        assert (st["state"], st["reason"]) == ("returned", "replayed"), st
        # a spec that is not valid, next to a valid one in the same envelope
        bad = {**spec("badspec"), "argv": []}
        send(envelope([bad, spec("fine")]))
        st = status_of("badspec")
        assert (st["state"], st["reason"]) == ("failed", "invalid_spec"), st
        assert "argv" in st["detail"]
        wait_until(lambda: marks(job_env)["fine"] == 1, 20, "fine job ran", [agent.log])
        time.sleep(0.5)
        assert marks(job_env)["good"] == 1
        for job, *_ in cases:
            assert marks(job_env)[job] == 0
        assert marks(job_env)["badspec"] == 0
    finally:
        agent.stop()
        fleet.close()
    # nothing of the refused ones reached the ledger
    assert os.path.exists(tmp_path / "state-rad-x")


# a job that marks its start and its end; attempt 1 runs argv[2] seconds, later ones argv[3]
TIMED_CODE = (
    "import os, sys, time\n"
    "d, j, a = sys.argv[1], os.environ['QRAD_JOB_ID'], os.environ['QRAD_JOB_ATTEMPT']\n"
    "open(f'{d}/{j}.{a}.{os.getpid()}.start', 'x').close()\n"
    "time.sleep(float(sys.argv[2] if a == '1' else sys.argv[3]))\n"
    "open(f'{d}/{j}.{a}.{os.getpid()}.done', 'x').close()\n"
)


def timed_spec(env: JobEnv, job: str, first_s: float, later_s: float,
               priority: str = "low") -> JobSpec:
    return parse_spec({"job": job, "priority": priority,
                       "argv": [env.python, "-c", TIMED_CODE, str(env.shared), str(first_s),
                                str(later_s)],
                       "timeout_s": 300.0, "lease_s": 6.0})


def started(env: JobEnv, job: str, attempt: int) -> list[int]:
    """Pids of the runs of ``job``'s ``attempt`` that have started."""
    return [int(p.name.split(".")[2]) for p in env.shared.glob(f"{job}.{attempt}.*.start")]


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return "?"


def test_rooms_warming_up_jobs_suspended_then_returned_and_placed_on_a_colder_radiator(
    tmp_path: Path, broker: Broker, job_env: JobEnv
) -> None:
    from qrad_agent.fleet.keys import sign_command

    dkey, okey = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    grace_s = 2.0
    warm = AgentProc(tmp_path, "rad-w", broker, [dkey, okey], job_env)
    warm.conf["jobs"]["grace_s"] = grace_s
    cold = AgentProc(tmp_path, "rad-c", broker, [dkey, okey], job_env)
    disp = Dispatcher(BrokerConfig(broker.host, broker.port), tmp_path / "fleet.db", dkey,
                      retry_after_s=0.2, tick_s=0.2)
    logs = [p for a in (warm, cold) for p in (a.log, a.log.with_suffix(".err"))]
    watcher = FleetClient(broker.host, broker.port, "watcher")
    jobs = ("warm0", "warm1", "warm2")
    try:
        watcher.subscribe("qrad/v1/nodes/+/jobs/+/status", "qrad/v1/nodes/rad-w/cmd/result")
        disp.start()
        assert disp.connected.wait(5)
        # attempt 1 would run for minutes; a later attempt is short
        disp.queue.submit_many([timed_spec(job_env, j, 120.0, 0.3) for j in jobs])
        warm.start()
        wait_until(lambda: all(started(job_env, j, 1) for j in jobs), 30,
                   "all three jobs running on rad-w", logs)
        for j in jobs:
            fj = disp.queue.get(j)
            assert fj is not None and fj.node == "rad-w" and fj.attempt == 1
        first = {j: started(job_env, j, 1)[0] for j in jobs}
        cold.start()  # asks for work; nothing is queued yet

        # the room of rad-w is warm enough now: a signed override far below its air
        env = sign_command(okey, "rad-w", {"cmd": "override", "target_c": 7.0,
                                           "duration_s": 7 * 86400.0})
        watcher.publish("qrad/v1/nodes/rad-w/cmd/override", json.dumps(env))
        res = watcher.expect("qrad/v1/nodes/rad-w/cmd/result", 10)
        assert json.loads(res.payload)["status"] == "ok", res.payload

        def of(node: str, job: str, state: str) -> Callable[[], bool]:
            def seen() -> bool:
                return any(r.topic == f"qrad/v1/nodes/{node}/jobs/{job}/status"
                           and json.loads(r.payload)["state"] == state
                           for r in list(watcher.history))
            return seen

        for j in jobs:
            wait_until(of("rad-w", j, "suspended"), 15, f"{j} suspended on rad-w", logs)
        suspended_at = {j: min(r.at for r in watcher.history
                               if r.topic == f"qrad/v1/nodes/rad-w/jobs/{j}/status"
                               and json.loads(r.payload)["state"] == "suspended")
                        for j in jobs}
        # suspended, not killed: the processes are stopped while the grace runs
        for j in jobs:
            assert proc_state(first[j]) == "T", (j, proc_state(first[j]))
            assert not any(job_env.shared.glob(f"{j}.*.done"))

        for j in jobs:
            wait_until(of("rad-w", j, "returned"), 15, f"{j} returned by rad-w", logs)
            r = next(r for r in watcher.history
                     if r.topic == f"qrad/v1/nodes/rad-w/jobs/{j}/status"
                     and json.loads(r.payload)["state"] == "returned")
            st = json.loads(r.payload)
            assert (st["attempt"], st["reason"]) == (1, "no_heat"), st
            # not before the grace period was over
            assert r.at - suspended_at[j] >= grace_s - 0.3, (j, r.at - suspended_at[j])
        wait_until(lambda: not any(alive(p) for p in first.values()), 10,
                   "the first attempts killed", logs)

        # the fleet places them again: on the radiator that still wants heat
        wait_until(lambda: disp.queue.counts() == {"succeeded": 3}, 20,
                   f"three jobs succeeded ({disp.queue.counts()})", logs)
        for j in jobs:
            fj = disp.queue.get(j)
            assert fj is not None and fj.result is not None
            assert (fj.result.node, fj.result.attempt) == ("rad-c", 2), fj.result
        time.sleep(0.5)
        done = marks(job_env)
        assert {j: done[j] for j in jobs} == dict.fromkeys(jobs, 1)
        assert not any(job_env.shared.glob("*.1.*.done"))  # no first attempt finished
        assert all(len(started(job_env, j, 1)) == 1 for j in jobs)
    finally:
        for a in (warm, cold):
            a.stop()
        disp.stop()
        watcher.close()


def burners(pid: int) -> list[int]:
    """The built-in burner processes (filler) below the agent process ``pid``."""
    import psutil

    from qrad_agent.actuators.workers import BURN

    out = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            if str(BURN) in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def test_filler_runs_while_the_queue_is_empty_and_gives_its_slot_to_real_work(
    tmp_path: Path, broker: Broker, job_env: JobEnv
) -> None:
    dkey = Ed25519PrivateKey.generate()
    agent = AgentProc(tmp_path, "rad-f", broker, [dkey], job_env)
    agent.conf["jobs"]["filler"] = "burner"
    agent.conf["filler_lever"] = True
    agent.conf["cores"] = 2  # two slots: two burners, then one job and one burner
    disp = Dispatcher(BrokerConfig(broker.host, broker.port), tmp_path / "fleet.db", dkey,
                      retry_after_s=0.2, tick_s=0.2)
    logs = [agent.log, agent.log.with_suffix(".err")]
    try:
        disp.start()
        assert disp.connected.wait(5)
        agent.start()
        assert agent.proc is not None
        pid = agent.proc.pid
        # heat is wanted and no job is there: filler in every slot
        wait_until(lambda: len(burners(pid)) == 2, 20, "two burners running", logs)
        time.sleep(1.0)  # it keeps asking for work meanwhile; nothing changes
        before = burners(pid)
        assert len(before) == 2 and disp.queue.counts() == {}

        submitted = time.monotonic()
        disp.queue.submit(timed_spec(job_env, "real", 3.0, 3.0, "high"))
        wait_until(lambda: bool(started(job_env, "real", 1)), 10, "the job started", logs)
        assert time.monotonic() - submitted < 3.0  # promptly: pulled at the next request
        job_pid = started(job_env, "real", 1)[0]
        # the filler gave up the slot the job took, and only that one
        wait_until(lambda: len(burners(pid)) == 1, 3, "one burner stopped", logs)
        left = burners(pid)
        assert set(left) < set(before)
        while alive(job_pid):  # never more than the plan's two slots busy
            assert len(burners(pid)) <= 1
            time.sleep(0.1)
        wait_until(lambda: disp.queue.counts() == {"succeeded": 1}, 10, "the job succeeded",
                   logs)
        fj = disp.queue.get("real")
        assert fj is not None and fj.result is not None and fj.result.node == "rad-f"
        assert marks(job_env)["real"] == 1
        # the slot is free again: the filler takes it back
        wait_until(lambda: len(burners(pid)) == 2, 10, "filler back in both slots", logs)
        last = burners(pid)
        agent.stop()
        assert not [b for b in last if alive(b)]  # a clean stop leaves no filler behind
    finally:
        agent.stop()
        disp.stop()
