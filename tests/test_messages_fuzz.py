"""Every inbound message type of the MQTT contract, fuzzed through the entry point the running
code uses, past the signature check.

Inventory (what the agent and the reference dispatcher parse from the network):

agent (``FleetLink`` on_message -> ``parse_inbound`` -> ``poll``, then ``LinkBridge.apply``):
  - ``nodes/{node}/cmd/{name}`` and ``fleet/cmd/{name}``: signed envelopes with a setpoint,
    mode, schedule, override, config, drain, resume or identify body;
  - ``nodes/{node}/ha/set/{temperature,mode}``: Home Assistant's unsigned values;
  - ``nodes/{node}/work/assign`` (``JobsBridge._on_assign``, the link's handler): signed
    envelopes with an ``assign`` body (job specs, ``jobs/spec.py``) or a ``cancel`` body.
dispatcher (``Dispatcher.handle``, what its paho thread queues):
  - ``nodes/{node}/work/request``, ``nodes/{node}/jobs/{job}/status``, ``nodes/{node}/status``.
(The agent takes no retained config or schedule message: the fleet changes those with the
``config`` and ``schedule`` commands above; ``homeassistant/status`` only triggers discovery.)

For each: a valid message with one field (at any depth) retyped to a hostile value (huge and
edge numbers, NaN, infinities, unicode, lone surrogates, nested junk), removed, or joined by
an unknown one, signed with a fleet key the node trusts so the case reaches the body's own
checks; and raw bytes. Every case must end with no exception escaping; a refusal that names
the field (or, for what JSON itself cannot carry, the token); nothing stored lost: a refused
message leaves the node's state, the job ledger and the fleet queue exactly as they were.

Budget: ``QRAD_FUZZ_EXAMPLES`` cases per target (``tests/fuzz_strategies.py``);
``python -m benchmarks.fuzz`` runs the long version.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qrad_agent.config import AgentConfig, ConfigError, load_config, parse_config
from qrad_agent.fleet.dispatcher import BrokerConfig, Dispatcher
from qrad_agent.fleet.placement import FleetState
from qrad_agent.fleet.queue import FleetJob
from qrad_agent.jobs.bridge import JobsBridge
from qrad_agent.jobs.ledger import Ledger
from qrad_agent.jobs.sandbox import Sandbox
from qrad_agent.jobs.scheduler import JobScheduler
from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.jobs.spec import JobState, JobStatus, parse_spec
from qrad_agent.link.bridge import LinkBridge
from qrad_agent.link.client import Clock, FleetLink
from qrad_agent.link.messages import CommandResult, ResultStatus
from qrad_agent.link.security import public_key_b64, sign
from qrad_agent.link.settings import LinkConfig
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario
from qrad_agent.store.db import open_store
from qrad_agent.store.outbox import Kind
from tests.fuzz_strategies import count, dumps, fuzz_settings, junk, long_run, mutated, numbers
from tests.test_config_fuzz import documents

NOW = 1_800_000_000.0
NODE = "node-1"
PREFIX = f"qrad/v1/nodes/{NODE}"
TRUE = "/bin/true"  # the one executable the fuzzed node allows: specs naming it get recorded

# refusals that are about the message as a whole, not one field: what each envelope field's
# refusal may say instead of the field's name
SYNONYMS = {
    "issued_at": ("issued", "valid for"), "expires_at": ("expire", "valid for"),
    "node": ("misaddressed",), "cmd": ("command",), "target_c": ("temperature",),
    "exit_code": ("exit code",),
}
# what JSON itself cannot carry is refused by the parser, before any field is looked at
JSON_WORDS = ("not a JSON number", "too large for JSON", "out of range", "not UTF-8",
              "Invalid JSON", "not JSON", "surrogate")
SIZE_WORDS = ("oversized", "bytes; at most")  # too big to read at all: no field is looked at


def json_level_problem(value: Any) -> bool:
    """Does ``value`` hold something JSON cannot carry exactly (refused by the parser, before
    any field is looked at)?"""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > 2**53  # link/messages.py strict_json refuses these
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)  # a lone surrogate
    if isinstance(value, list):
        return any(json_level_problem(v) for v in value)
    if isinstance(value, dict):
        return any(json_level_problem(k) or json_level_problem(v) for k, v in value.items())
    return False


def names_field(reason: str, name: str | None, value: Any) -> bool:
    """Does the refusal ``reason`` say what was wrong with field ``name`` (None: a message
    with no one field to blame, raw bytes)?"""
    if name is None or any(w in reason for w in SIZE_WORDS):
        return True
    if name in reason or any(w in reason for w in SYNONYMS.get(name, ())):
        return True
    return (json_level_problem(value) or json_level_problem(name)) \
        and any(w in reason for w in JSON_WORDS)


# ------------------------------------------------------------------ the node under test


@dataclass
class FuzzNode:
    link: FleetLink
    bridge: LinkBridge
    jobs: JobsBridge
    key: Ed25519PrivateKey
    mid: int = 0
    seq: int = 1_000
    job_n: int = 0
    accepted_jobs: list[str] = field(default_factory=list)

    def inject(self, topic: str, payload: bytes, response_topic: str | None = None,
               correlation: bytes | None = None) -> None:
        """As the broker delivers: paho's on_message callback (the network thread's part)."""
        self.mid += 1
        msg = mqtt.MQTTMessage(self.mid, topic.encode())
        msg.payload = payload
        msg.qos = 1
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            msg.properties = props
        cb = self.link._client.on_message
        assert cb is not None
        cb(self.link._client, None, msg)

    def turn(self) -> list[CommandResult]:
        """One control-loop turn: poll (which runs the work/assign handler), apply commands;
        the results sent. Other outbox rows are cleared so each case sees only its own."""
        local = datetime(2026, 1, 5, 12, 0)
        mark = self.link.outbox.max_id()
        for cmd in self.link.poll():
            self.link.reply(cmd, self.bridge.apply(cmd, 100.0, local))
        rows = self.link.outbox.pending([Kind.RESULT], after_id=mark, limit=100)
        return [CommandResult.model_validate_json(r.payload) for r in rows]

    def job_statuses(self, after: int) -> list[JobStatus]:
        rows = self.link.outbox.pending([Kind.JOB], after_id=after, limit=1000)
        return [JobStatus.model_validate_json(r.payload) for r in rows]

    def clear_outbox(self) -> None:
        ob = self.link.outbox
        ob.delete([r.id for r in ob.pending(list(Kind), limit=10_000)])

    def snapshot(self) -> dict[str, Any]:
        agent = self.bridge.agent
        th = agent.controller.thermostat  # type: ignore[attr-defined]
        pid = agent.controller.pid  # type: ignore[attr-defined]
        db = self.link.kv.db
        return {
            "cfg": agent.cfg.model_dump(mode="json"),
            "mode": th.mode, "override": th.override, "gains": (pid.kp, pid.ki, pid.kd),
            "bridge": (self.bridge.revision, copy.deepcopy(self.bridge.overlay),
                       self.bridge.draining, self.bridge.identify_until),
            "kv": db.query("SELECT key, value FROM kv ORDER BY 1"),
            "ledger": self.ledger(),
        }

    def ledger(self) -> list[tuple[Any, ...]]:
        return sorted((e.spec.job, e.spec.attempt, e.state.value, e.runs)
                      for e in self.jobs.scheduler.ledger.entries())

    def ledger_states(self) -> list[tuple[str, str]]:
        return [(e.spec.job, e.state.value) for e in self.jobs.scheduler.ledger.entries()]

    def seqs(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.link.kv.db.query(
            "SELECT key_id, seq FROM command_seq ORDER BY 1")]

    def signed(self, env: dict[str, Any]) -> dict[str, Any]:
        """``env`` with the next seq (unless it holds its own) and a valid signature over
        whatever it now says; NaN and co cannot be signed, so those keep a dummy one."""
        env = dict(env)
        env.pop("sig", None)
        try:
            env["sig"] = sign(self.key, env)
        except ValueError:
            env["sig"] = "A" * 86
        return env

    def envelope(self, body: dict[str, Any], node: str = NODE) -> dict[str, Any]:
        self.seq += 1
        return {"id": f"c{self.seq}", "node": node, "issued_at": NOW - 1,
                "expires_at": NOW + 299, "seq": self.seq, "body": body}

    def new_job_id(self) -> str:
        self.job_n += 1
        return f"fz-{self.job_n}"


@pytest.fixture(scope="module")
def node() -> Iterator[FuzzNode]:
    tmp = Path(tempfile.mkdtemp(prefix="qrad-fuzz-"))
    os.chmod(tmp, 0o711)  # the job user passes through to its work directory
    key = Ed25519PrivateKey.generate()
    cfg = LinkConfig.model_validate({
        "security": {"fleet_keys": [{"name": "ops", "public_key":
                                     public_key_b64(key.public_key())}],
                     "max_command_bytes": 16384},
        "home_assistant": {"enabled": True, "trust_commands": True},
    })
    agent, world = build_sim_agent(AgentConfig(), load_scenario("winter-week"))
    store = open_store(tmp / "state")
    link = FleetLink(cfg, NODE, store, clock=Clock(wall=lambda: NOW, mono=lambda: 100.0))
    bridge = LinkBridge(agent, link)
    jc = JobsConfig(allow=[TRUE], filler="none", work_dir=tmp / "jobs")
    # the plan stays at 0 slots (the scheduler is never given one), so no job ever starts:
    # specs are checked, recorded and acknowledged, which is all this test is about
    sched = JobScheduler(jc, NODE, Ledger(link.outbox.db), Sandbox(jc, jc.work_root(tmp)),
                         slots=2, clock=lambda: 100.0, wall=lambda: NOW)
    jobs = JobsBridge(agent, link, sched, link_bridge=bridge)
    jobs.start()
    yield FuzzNode(link, bridge, jobs, key)
    assert sched.read_back()["running"] == []
    sched.restore()
    world.close()
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ commands

COMMANDS: dict[str, dict[str, Any]] = {
    "setpoint": {"cmd": "setpoint", "target_c": 21.5, "duration_s": 3600.0},
    "mode": {"cmd": "mode", "mode": "comfort"},
    "schedule": {"cmd": "schedule", "periods": [
        {"days": "mon-fri", "start": "07:00", "end": "09:00"},
        {"days": "sat,sun", "start": "08:00", "end": "23:00"}]},
    "override": {"cmd": "override", "target_c": 22.0, "duration_s": 3600.0, "cancel": False},
    "config": {"cmd": "config", "patch": {"pid": {"kp": 1.5, "ki": 0.002},
                                          "thermostat": {"eco_c": 17.0, "comfort_c": 21.0}},
               "base_revision": None},
    "drain": {"cmd": "drain", "reason": "maintenance"},
    "resume": {"cmd": "resume"},
    "identify": {"cmd": "identify", "duration_s": 10.0},
}


def check_command(node: FuzzNode, topic: str, payload: bytes, name: str | None, value: Any,
                  target: str) -> str:
    before, seqs = node.snapshot(), node.seqs()
    errors = node.link.stats.callback_errors
    node.inject(topic, payload)
    results = node.turn()
    node.clear_outbox()
    assert node.link.stats.callback_errors == errors
    assert len(results) == 1, results
    r = results[0]
    if r.status is ResultStatus.OK:
        assert r.state is not None
        assert node.ledger() == before["ledger"]
        count(target, "accepted")
        return "accepted"
    assert r.reason, r
    after = node.snapshot()
    assert after == before, "a refused or failed command changed the node"
    if r.reason.startswith("refused: "):
        assert node.seqs() == seqs  # a refusal does not even use up the sequence number
        assert names_field(r.reason, name, value), (name, value, r.reason)
        count(target, "refused")
        return "refused"
    count(target, "not applied")  # valid, but not applicable now (a setpoint in mode off)
    return "not applied"


@fuzz_settings(share=1.0)
@given(data=st.data(), cmd=st.sampled_from(sorted(COMMANDS)))
def test_signed_commands_with_one_field_broken(node: FuzzNode, data: st.DataObject,
                                               cmd: str) -> None:
    body = copy.deepcopy(COMMANDS[cmd])
    if data.draw(st.integers(0, 3)):  # mostly the body: what reaches the bridge's handlers
        body, name, value = data.draw(mutated(body, keep=frozenset({"cmd"})))
        env = node.envelope(body)
    else:
        # seq is left alone: an accepted seq of 2^53 - 1 would make every later case a replay
        env, name, value = data.draw(mutated(node.envelope(body), keep=frozenset({"seq"})))
    check_command(node, f"{PREFIX}/cmd/{cmd}", dumps(node.signed(env)), name,
                  value, "command (signed envelope)")


def test_the_unbroken_messages_are_accepted(node: FuzzNode, fleet: Fleet) -> None:
    """The fuzz targets break one field of these: each must be accepted as it is, so that a
    refusal in a case is the broken field's doing."""
    for cmd, body in COMMANDS.items():
        env = node.signed(node.envelope(copy.deepcopy(body)))
        assert check_command(node, f"{PREFIX}/cmd/{cmd}", dumps(env), None, None,
                             "explicit cases") == "accepted", cmd
    spec = valid_spec(node)
    env = node.signed(node.envelope({"cmd": "assign", "request": "req-1", "jobs": [spec],
                                     "retry_after_s": None}))
    outcome, statuses = check_assign(node, dumps(env))
    assert outcome == "accepted" and [s.state for s in statuses] == [JobState.ACCEPTED]
    env = node.signed(node.envelope({"cmd": "cancel", "jobs": [spec["job"]],
                                     "reason": "done elsewhere"}))
    outcome, statuses = check_assign(node, dumps(env))
    assert outcome == "accepted"
    assert dict(node.ledger_states())[spec["job"]] == JobState.CANCELLED.value
    fleet.top_up()
    assert check_dispatch(fleet, "qrad/v1/nodes/rad-1/work/request", dumps(valid_request()),
                          None, None, "explicit cases") == "accepted"
    leased = fleet.leased_to("rad-1")
    assert leased, "the request leased nothing"
    status = {"v": 1, "node": "rad-1", "job": leased[0].job_id, "attempt": leased[0].attempt,
              "state": "running", "seq": 1, "at": NOW}
    assert check_dispatch(fleet, f"qrad/v1/nodes/rad-1/jobs/{leased[0].job_id}/status",
                          dumps(status), None, None, "explicit cases") == "accepted"
    lost = {"v": 1, "node": "rad-1", "status": "lost", "boot": 3, "at": NOW, "version": "0.1"}
    assert check_dispatch(fleet, "qrad/v1/nodes/rad-1/status", dumps(lost), None, None,
                          "explicit cases") == "accepted"


def test_a_lone_surrogate_in_the_id_is_refused_with_a_result(node: FuzzNode) -> None:
    """Found by this fuzzing: a command whose id held a lone surrogate escape ("\ud800")
    parsed, and its refusal, which echoes the id, could not be serialised: the command got
    no result and the error surfaced in ``poll``. Now the parser refuses such text."""
    env = node.envelope(copy.deepcopy(COMMANDS["config"]))
    env["id"] = "\ud800"
    assert check_command(node, f"{PREFIX}/cmd/config", dumps(node.signed(env)), "id",
                         env["id"], "explicit cases") == "refused"
    env = node.envelope({"cmd": "drain", "reason": "ok \udfff"})
    check_command(node, f"{PREFIX}/cmd/drain", dumps(node.signed(env)), "body.reason",
                  None, "explicit cases")


@fuzz_settings(share=0.5)
@given(cmd=st.sampled_from(sorted(COMMANDS)), value=junk)
def test_signed_commands_with_a_junk_body(node: FuzzNode, cmd: str, value: Any) -> None:
    """The body replaced whole by any JSON value, the envelope signed: refused, naming the
    body."""
    env = node.signed({**node.envelope({}), "body": value})
    payload = dumps(env)
    assume(len(payload) <= 16384)
    outcome = check_command(node, f"{PREFIX}/cmd/{cmd}", payload, "body", value,
                            "command (junk body)")
    assert outcome == "refused"


@fuzz_settings(share=0.5)
@given(topic=st.sampled_from([f"{PREFIX}/cmd/{c}" for c in COMMANDS]
                             + [f"qrad/v1/fleet/cmd/{c}" for c in COMMANDS]),
       payload=st.binary(max_size=400))
def test_command_topics_with_raw_bytes(node: FuzzNode, topic: str, payload: bytes) -> None:
    outcome = check_command(node, topic, payload, None, None, "command (raw bytes)")
    assert outcome == "refused"


@fuzz_settings(share=0.3)
@given(response_topic=st.one_of(st.none(), st.text(max_size=40), st.text(max_size=600).map(
    lambda t: "qrad/v1/replies/" + t)), correlation=st.one_of(st.none(), st.binary(max_size=300)),
    good=st.booleans())
def test_response_topic_and_correlation(node: FuzzNode, response_topic: str | None,
                                        correlation: bytes | None, good: bool) -> None:
    """MQTT 5 request/response properties from the sender: the result goes to the requested
    topic only when it is a plain topic under an allowed prefix, else to cmd/result; the
    correlation data comes back as sent (when it is not oversized), refused command or not."""
    body = copy.deepcopy(COMMANDS["identify"]) if good else {"cmd": "identify", "x": 1}
    env = node.signed(node.envelope(body))
    errors = node.link.stats.callback_errors
    mark = node.link.outbox.max_id()
    node.inject(f"{PREFIX}/cmd/identify", dumps(env), response_topic, correlation)
    node.turn()
    rows = node.link.outbox.pending([Kind.RESULT], after_id=mark, limit=10)
    node.clear_outbox()
    assert node.link.stats.callback_errors == errors and len(rows) == 1
    allowed = (response_topic is not None and response_topic.startswith("qrad/v1/replies/")
               and len(response_topic) <= 512 and not set("+#\x00") & set(response_topic))
    assert rows[0].topic == (response_topic if allowed else f"{PREFIX}/cmd/result")
    if correlation is not None and len(correlation) <= 256:
        assert rows[0].correlation == correlation
    count("command (response properties)", "accepted" if good else "refused")


@fuzz_settings(share=0.5)
@given(value=st.one_of(numbers, junk))
def test_home_assistant_temperature(node: FuzzNode, value: Any) -> None:
    """Unsigned, one number: accepted exactly when it is a finite number of 5 to 28 °C."""
    payload = dumps(value)
    wanted = (isinstance(value, int | float) and not isinstance(value, bool)
              and not json_level_problem(value) and 5 <= value <= 28)
    outcome = check_command(node, f"{PREFIX}/ha/set/temperature", payload, "target_c", value,
                            "home assistant temperature")
    if wanted:
        assert outcome in ("accepted", "not applied")
    else:
        assert outcome == "refused"


@fuzz_settings(share=0.3)
@given(payload=st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"heat", b"off", b"auto", b" heat\n", b"HEAT", b"cool", b"\xff", b"heat\x00",
     b"\xc2\xa0off\x1c"])))
def test_home_assistant_mode(node: FuzzNode, payload: bytes) -> None:
    # surrounding whitespace (Unicode's, as Python's str.strip sees it) is not part of it
    wanted = payload.decode("utf-8", "replace").strip() in ("heat", "off", "auto")
    before = node.snapshot()
    errors = node.link.stats.callback_errors
    node.inject(f"{PREFIX}/ha/set/mode", payload)
    results = node.turn()
    node.clear_outbox()
    assert node.link.stats.callback_errors == errors and len(results) == 1
    r = results[0]
    if wanted:
        assert r.status is ResultStatus.OK
        count("home assistant mode", "accepted")
    else:
        assert r.status is ResultStatus.ERROR and r.reason and "heat, off, auto" in r.reason
        assert node.snapshot() == before
        count("home assistant mode", "refused")


# ------------------------------------------------------------------ work/assign (agent)


def valid_spec(node: FuzzNode) -> dict[str, Any]:
    return {"job": node.new_job_id(), "attempt": 1, "priority": "low", "argv": [TRUE, "x"],
            "env": {}, "cores": 1, "memory_mb": 64, "timeout_s": 60.0, "lease_s": 300.0,
            "inputs": [{"path": "in/a.txt", "data": "aGVsbG8=", "executable": False}],
            "outputs": ["out.txt"], "idempotent": False}


def check_assign(node: FuzzNode, payload: bytes) -> tuple[str, list[JobStatus]]:
    """Deliver on work/assign; returns whether the envelope was accepted or refused, and the
    job statuses sent."""
    ledger_before, seqs = node.ledger(), node.seqs()
    refused = node.jobs.stats.refused_envelopes
    errors = node.link.stats.callback_errors
    mark = node.link.outbox.max_id()
    node.inject(f"{PREFIX}/work/assign", payload)
    node.turn()
    statuses = node.job_statuses(mark)
    node.clear_outbox()
    assert node.link.stats.callback_errors == errors, "the work/assign handler raised"
    after = node.ledger()
    # nothing recorded is ever lost: every row before is still there (its state may move on
    # only by a cancel)
    assert {r[:2] for r in ledger_before} <= {r[:2] for r in after}
    assert node.jobs.scheduler.read_back()["running"] == []
    if node.jobs.stats.refused_envelopes > refused:
        assert after == ledger_before and node.seqs() == seqs
        return "refused", statuses
    return "accepted", statuses


@fuzz_settings(share=1.0)
@given(data=st.data())
def test_assignments_with_one_field_broken(node: FuzzNode, data: st.DataObject) -> None:
    spec = valid_spec(node)
    body: dict[str, Any] = {"cmd": "assign", "request": "req-1", "jobs": [spec],
                            "retry_after_s": None}
    if data.draw(st.integers(0, 3)):  # mostly the spec: what reaches the scheduler
        body["jobs"][0], name, value = data.draw(mutated(spec))
        env = node.envelope(body)
    else:
        env, name, value = data.draw(mutated(node.envelope(body), keep=frozenset({"seq"})))
    env = node.signed(env)
    ledger_before = node.ledger()
    outcome, statuses = check_assign(node, dumps(env))
    target = "work/assign (assign)"
    if outcome == "refused":
        reason = node.jobs.stats.refusals[-1]
        assert names_field(reason, name, value), (name, reason)
        # jobs named in a refused assignment are given back, with the reason
        assert all(s.state is JobState.RETURNED and s.reason for s in statuses)
        count(target, "refused")
        return
    by_job = {s.job: s for s in statuses}
    jobs = env["body"].get("jobs") or []  # the body was accepted: these are the specs sent
    if not jobs:  # an empty assignment ("nothing now"): nothing to record or to say
        assert statuses == [] and node.ledger() == ledger_before
        count(target, "accepted")
        return
    sent = jobs[0]
    s = by_job.get(sent.get("job")) if isinstance(sent.get("job"), str) else None
    if s is None:  # the job id itself was broken: refused, with no topic to say it on
        assert statuses == [] and "invalid spec" in node.jobs.stats.refusals[-1]
        count(target, "refused")
    elif s.state is JobState.ACCEPTED:
        node.accepted_jobs.append(s.job)
        count(target, "accepted")
    elif s.reason == "invalid_spec":
        assert s.state is JobState.FAILED and s.detail, s
        assert names_field(s.detail, name, value), (name, s.detail)
        count(target, "refused")
    else:  # a valid spec this radiator does not take (too big, not allowed, ...)
        assert s.state is JobState.RETURNED or s.state is JobState.FAILED, s
        assert s.reason and s.detail, s
        count(target, "not applied")


@fuzz_settings(share=0.5)
@given(data=st.data())
def test_cancels_with_one_field_broken(node: FuzzNode, data: st.DataObject) -> None:
    known = node.accepted_jobs[-3:] or ["fz-unknown"]
    body: dict[str, Any] = {"cmd": "cancel", "jobs": known, "reason": "done elsewhere"}
    if data.draw(st.integers(0, 3)):
        body, name, value = data.draw(mutated(body, keep=frozenset({"cmd"})))
        env = node.envelope(body)
    else:
        env, name, value = data.draw(mutated(node.envelope(body), keep=frozenset({"seq"})))
    outcome, statuses = check_assign(node, dumps(node.signed(env)))
    if outcome == "refused":
        assert names_field(node.jobs.stats.refusals[-1], name, value)
        assert statuses == []
    count("work/assign (cancel)", outcome)


@fuzz_settings(share=0.5)
@given(payload=st.one_of(st.binary(max_size=400), junk.map(dumps)))
def test_work_assign_with_raw_bytes(node: FuzzNode, payload: bytes) -> None:
    outcome, _ = check_assign(node, payload)
    assert outcome == "refused"
    count("work/assign (raw bytes)", outcome)


# ------------------------------------------------------------------ the dispatcher


@dataclass
class Fleet:
    dispatcher: Dispatcher
    log: list[str]
    n: int = 0

    def rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.dispatcher.queue.db.query(
            "SELECT * FROM fleet_jobs ORDER BY job_id")]

    def leased_to(self, node: str) -> list[FleetJob]:
        return [j for j in self.dispatcher.queue.list()
                if j.node == node and j.state is FleetState.LEASED]

    def top_up(self) -> None:
        """Keep a few jobs queued, so requests have something to lease."""
        if self.dispatcher.queue.counts().get("queued", 0) < 3:
            for _ in range(3):
                self.n += 1
                self.dispatcher.queue.submit(parse_spec({"job": f"q-{self.n}",
                                                         "argv": [TRUE]}), now=NOW)


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    tmp = Path(tempfile.mkdtemp(prefix="qrad-fuzz-fleet-"))
    d = Dispatcher(BrokerConfig(), tmp / "fleet.db", Ed25519PrivateKey.generate())
    messages: list[str] = []
    handler = _ListHandler(messages)
    logger = logging.getLogger("qrad_agent.fleet.dispatcher")
    logger.addHandler(handler)
    yield Fleet(d, messages)
    logger.removeHandler(handler)
    d.queue.db.close()
    shutil.rmtree(tmp, ignore_errors=True)


def check_dispatch(fleet: Fleet, topic: str, payload: bytes, name: str | None, value: Any,
                   target: str) -> str:
    fleet.top_up()
    before = fleet.rows()
    bad = fleet.dispatcher.stats.bad_messages
    errors = len(fleet.dispatcher.stats.errors)
    fleet.log.clear()
    fleet.dispatcher.handle([(topic, payload)])  # must not raise
    after = fleet.rows()
    assert len(fleet.dispatcher.stats.errors) == errors
    assert {r[0] for r in before} == {r[0] for r in after}, "a job left the queue"
    if fleet.dispatcher.stats.bad_messages > bad:
        assert after == before, "a refused message changed the queue"
        assert fleet.log and names_field(fleet.log[-1], name, value), (name, fleet.log)
        count(target, "refused")
        return "refused"
    count(target, "accepted")
    return "accepted"


def valid_request(node: str = "rad-1") -> dict[str, Any]:
    return {"v": 1, "node": node, "id": "req-1", "at": NOW, "expires_at": NOW + 60,
            "free_slots": 2, "heat_budget_w": 400.0, "horizon_s": 3600.0, "max_cores": 4,
            "max_memory_mb": 2048, "max_timeout_s": 86400.0}


@fuzz_settings(share=0.7)
@given(data=st.data())
def test_dispatcher_work_requests(fleet: Fleet, data: st.DataObject) -> None:
    msg, name, value = data.draw(mutated(valid_request()))
    check_dispatch(fleet, "qrad/v1/nodes/rad-1/work/request", dumps(msg), name,
                   value, "dispatcher work/request")


@fuzz_settings(share=0.7)
@given(data=st.data())
def test_dispatcher_job_statuses(fleet: Fleet, data: st.DataObject) -> None:
    jobs = fleet.dispatcher.queue.list()
    # an index, not sampled_from(jobs): the draws must not depend on the queue's contents
    pick = data.draw(st.integers(0, 7))
    job = jobs[-1 - pick % len(jobs)] if jobs else None
    status = {"v": 1, "node": job.node if job and job.node else "rad-1",
              "job": job.job_id if job else "q-0", "attempt": max(1, job.attempt if job else 1),
              "state": data.draw(st.sampled_from([s.value for s in JobState])), "seq": 1,
              "at": NOW, "exit_code": 0, "reason": "exit_status", "detail": "fuzz"}
    msg, name, value = data.draw(mutated(status))
    check_dispatch(fleet, f"qrad/v1/nodes/{status['node']}/jobs/{status['job']}/status",
                   dumps(msg), name, value, "dispatcher jobs/status")


@fuzz_settings(share=0.5)
@given(data=st.data())
def test_dispatcher_node_status(fleet: Fleet, data: st.DataObject) -> None:
    status = {"v": 1, "node": "rad-1", "status": data.draw(st.sampled_from(
        ["online", "offline", "lost"])), "boot": 3, "at": NOW, "version": "0.1.0"}
    msg, name, value = data.draw(mutated(status))
    check_dispatch(fleet, "qrad/v1/nodes/rad-1/status", dumps(msg), name,
                   value, "dispatcher node status")


@pytest.mark.parametrize(("field", "raw"), [("heat_budget_w", "Infinity"),
                                            ("heat_budget_w", "NaN"),
                                            ("max_memory_mb", "1" + "0" * 30)])
def test_the_dispatcher_refuses_what_json_cannot_carry_as_the_agent_does(
        fleet: Fleet, field: str, raw: str) -> None:
    """Found by the fuzzer: pydantic's JSON parser took Infinity and integers beyond 2^53,
    which the agent's strict parser refuses; the dispatcher now parses as the agent does."""
    text = dumps(valid_request(), compact=True).decode().replace(
        f'"{field}":{json.dumps(valid_request()[field])}', f'"{field}":{raw}')
    assert raw in text
    outcome = check_dispatch(fleet, "qrad/v1/nodes/rad-1/work/request", text.encode(), None,
                             None, "dispatcher work/request")
    assert outcome == "refused"


@fuzz_settings(share=0.5)
@given(leaf=st.sampled_from(["work/request", "jobs/q-1/status", "status"]),
       payload=st.one_of(st.binary(max_size=300), junk.map(dumps)))
def test_dispatcher_raw_bytes(fleet: Fleet, leaf: str, payload: bytes) -> None:
    outcome = check_dispatch(fleet, f"qrad/v1/nodes/rad-1/{leaf}", payload, None, None,
                             "dispatcher raw bytes")
    assert outcome == "refused"


# ------------------------------------------------------------------ the config loader (long run)
# tests/test_config_fuzz.py fuzzes the loader at the suite's budget; the long run repeats its
# properties here with the benchmark's budget.


@pytest.mark.skipif(not long_run(), reason="the suite runs tests/test_config_fuzz.py instead")
@fuzz_settings(share=1.0)
@given(doc=documents())
def test_config_documents_long(doc: dict[str, Any]) -> None:
    try:
        parse_config(doc, "fuzz.toml")
    except ConfigError as exc:
        assert exc.problems and all(": " in line for line in exc.problems)
        count("config loader (documents)", "refused")
    else:
        count("config loader (documents)", "accepted")


@pytest.mark.skipif(not long_run(), reason="the suite runs tests/test_config_fuzz.py instead")
@fuzz_settings(share=1.0)
@given(data=st.binary(max_size=300))
def test_config_bytes_long(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "agent.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.source == str(path) and exc.problems
        count("config loader (file bytes)", "refused")
    else:
        count("config loader (file bytes)", "accepted")

