"""The fleet link end to end against real Mosquitto brokers, a paho client playing the fleet,
and the agent's real code on the simulated radiator.

The agent's control loop runs in its own thread (:class:`Loop`), stepping the simulated
room 10 s per turn, so a simulated hour passes in a few real seconds; the fleet talks to it
only over MQTT, as in the field.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.config import AgentConfig
from qrad_agent.core.models import Mode
from qrad_agent.fleet.keys import sign_command
from qrad_agent.link.bridge import LinkBridge
from qrad_agent.link.client import Clock, FleetLink, backoff_delay
from qrad_agent.link.messages import CommandResult, ResultStatus
from qrad_agent.link.security import public_key_b64
from qrad_agent.link.settings import LinkConfig
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario
from qrad_agent.store.db import open_store
from qrad_agent.store.outbox import Kind
from tests.mqtt_broker import Broker, FleetClient, Received

NODE = "rad-7"
N = f"qrad/v1/nodes/{NODE}"
REPO = Path(__file__).resolve().parents[1]


def link_config(broker: Broker, key: Ed25519PrivateKey, **extra: Any) -> LinkConfig:
    data: dict[str, Any] = {
        "enabled": True,
        "broker": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.4, "keepalive_s": 10},
        "security": {"fleet_keys": [{"name": "ops",
                                     "public_key": public_key_b64(key.public_key())}]},
        "telemetry": {"period_s": 60},
    }
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v}
    return LinkConfig.model_validate(data)


def sim_config() -> AgentConfig:
    base = AgentConfig()
    # one poll per control tick, as the fast simulation does: same decisions, less work
    return base.model_copy(update={"control": base.control.model_copy(
        update={"sensor_period_s": 10.0})})


class Loop(threading.Thread):
    """The agent's control loop on the simulated radiator, in compressed time: each turn steps
    the room 10 s and then waits ``pause`` real seconds (or less, when the link wakes it)."""

    def __init__(self, tmp: Path, cfg: LinkConfig, *, wall_from_sim: bool = False,
                 pause: float = 0.01, node: str = NODE) -> None:
        super().__init__(daemon=True)
        self.agent, self.world = build_sim_agent(sim_config(), load_scenario("winter-week"))
        self.wake = threading.Event()
        epoch = 1_800_000_000.0
        clock = Clock(wall=(lambda: epoch + self.world.t) if wall_from_sim else time.time,
                      mono=lambda: self.world.t)
        self.link = FleetLink(cfg, node, open_store(tmp / f"state-{node}"), clock=clock,
                              wake=self.wake.set, rng=random.Random(1))
        self.bridge = LinkBridge(self.agent, self.link)
        self.pause = pause
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.bridge.start(self.world.t, self.world.local)
            self.running.set()
            while not self.stopping.is_set():
                self.turn()
                self.wake.wait(self.pause)
                self.wake.clear()
            self.bridge.stop()
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self.running.set()

    def turn(self) -> None:
        self.world.step(10.0)
        decision = self.agent.service(self.world.t, self.world.local)
        self.bridge.service(self.world.t, self.world.local, decision)

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)
        self.world.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Loop:
        self.start()
        assert self.running.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request(fleet: FleetClient, key: Ed25519PrivateKey, body: dict[str, Any], *,
            node: str = NODE, topic: str | None = None, reply: str | None = "default",
            correlation: bytes | None = None, timeout: float = 5.0) -> CommandResult:
    """Send a signed command and wait for its result (on the reply topic or cmd/result)."""
    env = sign_command(key, node, body)
    corr = correlation if correlation is not None else env["id"].encode()
    response = f"qrad/v1/replies/fleet/{env['id']}" if reply == "default" else reply
    fleet.publish(topic or f"{N}/cmd/{body['cmd']}", json.dumps(env),
                  response_topic=response, correlation=corr if response else None)

    def is_answer(r: Received) -> bool:
        if r.topic not in (response, f"{N}/cmd/result"):
            return False
        return bool(json.loads(r.payload).get("id") == env["id"])

    got = fleet.expect(is_answer, timeout)
    result = CommandResult.model_validate_json(got.payload)
    if response and got.topic == response:
        assert got.properties.CorrelationData == corr
    return result


def batches(msgs: list[Received]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in msgs if m.topic.endswith("/telemetry")]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker", persistence=True) as b:
        yield b


# ------------------------------------------------------------------ every topic


def test_every_topic_end_to_end(tmp_path: Path, broker: Broker, key: Ed25519PrivateKey) -> None:
    fleet = FleetClient(broker.host, broker.port, "fleet")
    fleet.subscribe("qrad/v1/#", "homeassistant/#")
    cfg = link_config(broker, key, home_assistant={"enabled": True, "trust_commands": True})
    with Loop(tmp_path, cfg) as loop:
        status = json.loads(fleet.expect(f"{N}/status").payload)
        assert status["status"] == "online" and status["boot"] == 1
        meta = json.loads(fleet.expect(f"{N}/meta").payload)
        assert meta["slots"] == 4 and "setpoint" in meta["commands"] and meta["signed_commands"]
        climate = json.loads(fleet.expect(f"homeassistant/climate/{NODE}/thermostat/config")
                             .payload)
        assert climate["temperature_command_topic"] == f"{N}/ha/set/temperature"
        assert climate["modes"] == ["auto", "heat", "off"]
        started = json.loads(fleet.expect(f"{N}/events").payload)
        assert started["kind"] == "agent_started" and started["seq"] == 0
        # (samples stored before the first CONNACK are replayed first, flagged historical)
        tel = json.loads(fleet.expect(lambda m: m.topic == f"{N}/telemetry" and not json.loads(
            m.payload)["historical"], timeout=10).payload)
        assert tel["boot"] == 1 and tel["samples"]
        s = tel["samples"][0]
        assert {"room_c", "target_c", "mode", "demand", "plan", "power_w", "power_source",
                "energy_wh", "sensors"} <= s.keys()
        assert json.loads(fleet.expect(f"{N}/ha/state").payload)["mode"] in ("auto", "heat")

        # request/response: ResponseTopic + CorrelationData
        r = request(fleet, key, {"cmd": "setpoint", "target_c": 23.5, "duration_s": 1800},
                    correlation=b"\x00corr\xff")
        assert r.status is ResultStatus.OK and r.state is not None
        assert r.state.target_c == 23.5 and r.state.override is not None
        state = json.loads(fleet.find(lambda m: m.topic == f"{N}/state"
                                      and json.loads(m.payload)["target_c"] == 23.5).payload)
        assert state["reason"] == "override"
        # without a ResponseTopic, and with one outside qrad/v1/replies/: cmd/result
        r = request(fleet, key, {"cmd": "override", "cancel": True}, reply=None)
        assert r.status is ResultStatus.OK and r.state and r.state.override is None
        r = request(fleet, key, {"cmd": "mode", "mode": "comfort"}, reply="elsewhere/x")
        assert r.status is ResultStatus.OK and r.state and r.state.mode is Mode.COMFORT
        # every other command
        r = request(fleet, key, {"cmd": "setpoint", "target_c": 21.5})  # comfort: permanent
        assert r.state and r.state.setpoints.comfort_c == 21.5 and r.state.config_revision == 1
        periods = [{"days": "mon-fri", "start": "07:00", "end": "21:00"}]
        r = request(fleet, key, {"cmd": "schedule", "periods": periods})
        assert r.state and [p.model_dump() for p in r.state.schedule] == [
            {"days": "mon-fri", "start": "07:00", "end": "21:00"}]
        r = request(fleet, key, {"cmd": "config", "patch": {"pid": {"kp": 1.2}},
                                 "base_revision": 2})
        assert r.status is ResultStatus.OK and r.state and r.state.config_revision == 3
        r = request(fleet, key, {"cmd": "config", "patch": {"pid": {"kp": 1.3}},
                                 "base_revision": 2})
        assert r.status is ResultStatus.ERROR and r.reason and "revision 3" in r.reason
        r = request(fleet, key, {"cmd": "identify", "duration_s": 60})
        assert r.state and r.state.identify_until is not None
        r = request(fleet, key, {"cmd": "resume"})
        assert r.status is ResultStatus.OK and r.state and not r.state.draining

        # broadcast: node '*' on the fleet topic
        env = sign_command(key, "*", {"cmd": "drain", "reason": "broker maintenance"})
        fleet.publish("qrad/v1/fleet/cmd/drain", json.dumps(env),
                      response_topic="qrad/v1/replies/fleet/all", correlation=b"b1")
        got = fleet.expect("qrad/v1/replies/fleet/all")
        r = CommandResult.model_validate_json(got.payload)
        assert r.node == NODE and r.status is ResultStatus.OK and r.state and r.state.draining
        drain = fleet.find(lambda m: m.topic == f"{N}/events"
                           and json.loads(m.payload)["kind"] == "drain")
        assert "broker maintenance" in json.loads(drain.payload)["message"]

        # Home Assistant: a command, and its birth makes the node republish discovery
        fleet.publish(f"{N}/ha/set/temperature", "20.5")
        got = fleet.expect(lambda m: m.topic == f"{N}/cmd/result"
                           and json.loads(m.payload)["cmd"] == "setpoint")
        assert json.loads(got.payload)["state"]["setpoints"]["comfort_c"] == 20.5
        fleet.clear()
        fleet.publish("homeassistant/status", "online", qos=0)
        fleet.expect(f"homeassistant/sensor/{NODE}/energy/config")

        # a refused command gets its reason, and the config revision did not move
        r = request(fleet, key, {"cmd": "config", "patch": {"allocator": {"slots": 1}}})
        assert r.status is ResultStatus.ERROR and r.reason and "allocator.slots" in r.reason
        assert loop.bridge.revision == 4
    # a clean stop says offline (retained)
    off = fleet.expect(lambda m: m.topic == f"{N}/status"
                       and json.loads(m.payload)["status"] == "offline")
    assert json.loads(off.payload)["boot"] == 1
    fleet.close()
    late = FleetClient(broker.host, broker.port, "late")
    late.subscribe(f"{N}/status", f"{N}/state")
    retained = {m.topic: json.loads(m.payload) for m in late.drain(0.3) if m.retain}
    assert retained[f"{N}/status"]["status"] == "offline"
    assert retained[f"{N}/state"]["draining"] is True
    late.close()


def test_will_says_lost_when_the_agent_dies(tmp_path: Path, broker: Broker,
                                            key: Ed25519PrivateKey) -> None:
    fleet = FleetClient(broker.host, broker.port, "fleet")
    fleet.subscribe("qrad/v1/nodes/doomed/status")
    script = textwrap.dedent(f"""
        import sys, time
        from qrad_agent.link.client import FleetLink
        from qrad_agent.link.settings import LinkConfig
        from qrad_agent.store.db import open_store
        cfg = LinkConfig.model_validate({{"broker": {{"host": "{broker.host}",
                                          "port": {broker.port}}}}})
        link = FleetLink(cfg, "doomed", open_store(sys.argv[1]))
        link.start()
        while not link.connected:
            link.poll(); time.sleep(0.01)
        print("up", flush=True)
        while True:
            link.poll(); time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "doomed")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        online = json.loads(fleet.expect("qrad/v1/nodes/doomed/status").payload)
        assert online["status"] == "online"
        proc.kill()  # no goodbye: the broker publishes the will
        lost = json.loads(fleet.expect("qrad/v1/nodes/doomed/status").payload)
        assert lost["status"] == "lost" and lost["boot"] == online["boot"]
    finally:
        proc.kill()
        proc.wait()
        fleet.close()


def test_backoff_has_full_jitter_and_a_cap() -> None:
    rng = random.Random(42)
    for failures in range(12):
        cap = min(30.0, 0.5 * 2**failures)
        delays = [backoff_delay(failures, 0.5, 30.0, rng) for _ in range(300)]
        assert all(0 <= d <= cap for d in delays)
        # spread over the whole window, not bunched: a fleet does not reconnect in step
        assert min(delays) < cap * 0.1 and max(delays) > cap * 0.9


# ------------------------------------------------------------------ outages


def test_broker_restart_with_persistence_mid_stream(tmp_path: Path, broker: Broker,
                                                    key: Ed25519PrivateKey) -> None:
    # a persistent session: what the node sends while the fleet client reconnects waits.
    # (Mosquitto 2.0 writes to disk only sessions that connected with clean start off.)
    fleet = FleetClient(broker.host, broker.port, "fleet-persistent", session_expiry=600,
                        clean_start=False)
    fleet.fast_reconnect()
    fleet.subscribe(f"{N}/telemetry", f"{N}/events")
    cfg = link_config(broker, key, telemetry={"period_s": 30})
    loop = Loop(tmp_path, cfg)
    with loop:
        fleet.expect(f"{N}/telemetry", timeout=10)
        broker.restart()  # SIGTERM: mosquitto saves sessions, queues and retained messages
        time.sleep(0.5)  # meanwhile the node keeps sampling into its outbox
        deadline = time.monotonic() + 10
        while loop.link.stats.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.link.stats.connects >= 2, loop.link.stats
        time.sleep(1.0)
    produced = loop.link._tel_seq  # samples numbered in this run
    unsent = {r.seq for r in loop.link.outbox.pending([Kind.TELEMETRY], limit=10_000)}
    fleet.drain(1.0)
    fleet.close()
    msgs = fleet.history
    seen: list[int] = []
    for b in batches(msgs):
        assert b["boot"] == 1
        seen.extend(s["seq"] for s in b["samples"])
    first = list(dict.fromkeys(seen))  # duplicates allowed (at least once), loss is not
    assert first == sorted(first), "telemetry out of order within a boot"
    missing = set(range(produced)) - unsent - set(first)
    assert not missing, f"lost samples: {sorted(missing)[:20]}"
    assert produced > 100 and len(unsent) < 20  # a real stream, nearly all delivered
    assert any(b["historical"] for b in batches(msgs)), "nothing was replayed after the restart"


def test_a_day_without_broker(tmp_path: Path, broker: Broker, key: Ed25519PrivateKey) -> None:
    """The broker is down for a simulated day. The room is still regulated, the outbox stays
    within its bound (oldest telemetry dropped), every event survives, and once the broker is
    back everything left arrives in order, flagged historical."""
    fleet = FleetClient(broker.host, broker.port, "fleet-day", session_expiry=3600,
                        clean_start=False)
    fleet.fast_reconnect()
    fleet.subscribe(f"{N}/telemetry", f"{N}/events")
    max_bytes = 400_000
    cfg = link_config(broker, key, telemetry={"period_s": 60},
                      outbox={"max_bytes": max_bytes, "replay_bytes_per_s": 2 * 1024**2})
    loop = Loop(tmp_path, cfg, wall_from_sim=True)
    loop.bridge.start(loop.world.t, loop.world.local)
    deadline = time.monotonic() + 5
    while not loop.link.connected and time.monotonic() < deadline:
        loop.turn()
        time.sleep(0.01)
    assert loop.link.connected
    broker.stop()
    ticks0, samples0 = loop.agent.stats.ticks, loop.link._tel_seq
    comfort_errors: list[float] = []
    peak_bytes = 0
    day = 8640
    for i in range(day):
        if i % 360 == 0:  # the occupant changes the mode every hour: events to keep
            mode = Mode.COMFORT if (i // 360) % 2 else Mode.AUTO
            loop.agent.controller.set_mode(mode, loop.world.t)  # type: ignore[attr-defined]
        loop.turn()
        peak_bytes = max(peak_bytes, loop.link.outbox.total_bytes)
        hour = loop.world.local.hour
        if i > 360 * 8 and 10 <= hour < 21:  # comfort either way, after a morning's warm-up
            comfort_errors.append(abs(loop.world.room.air_c - 21.0))
    assert loop.agent.stats.ticks - ticks0 == day  # a decision every 10 s, all day
    assert max(comfort_errors) < 1.5, max(comfort_errors)  # regulated while offline
    assert peak_bytes <= max_bytes + 2000, peak_bytes
    stats = loop.link.outbox.stats()
    assert stats.dropped_over_bytes > 0  # the bound did bite: a day does not fit
    events_made = loop.link._event_seq
    samples_made = loop.link._tel_seq
    assert samples_made - samples0 == day

    broker.start()
    started = time.monotonic()
    while loop.link.outbox.stats().rows and time.monotonic() - started < 20:
        loop.bridge.service(loop.world.t, loop.world.local, None)
        loop.wake.wait(0.01)
        loop.wake.clear()
    drain_s = time.monotonic() - started
    assert loop.link.outbox.stats().rows == 0, f"outbox not drained in {drain_s:.1f} s"
    loop.bridge.stop()
    loop.world.close()
    msgs = fleet.drain(0.5)
    fleet.close()
    events = [json.loads(m.payload) for m in msgs if m.topic.endswith("/events")]
    assert [e["seq"] for e in events] == list(range(events_made))  # every event, in order
    assert sum(e["kind"] == "mode_changed" for e in events) == 23
    got = [s["seq"] for b in batches(msgs) for s in b["samples"]]
    assert got == sorted(set(got))  # in order, no duplicates
    assert got[-1] == samples_made - 1  # the newest kept; the oldest were dropped
    day_samples = [s for s in got if s >= samples0]  # (a few from before may have gone out)
    assert day_samples == list(range(day_samples[0], samples_made))  # nothing missing after
    assert len(day_samples) < day / 2  # the cut: the bound kept only the newest part
    assert all(b["historical"] for b in batches(msgs) if b["samples"][0]["seq"] >= samples0)


def test_hooks_for_the_jobs_work(tmp_path: Path, broker: Broker,
                                 key: Ed25519PrivateKey) -> None:
    """Node-topic handlers (acknowledged only when they return), stored job reports and
    expiring publishes, for the parts that own the work and jobs topics."""
    fleet = FleetClient(broker.host, broker.port, "dispatcher")
    fleet.subscribe(f"{N}/work/request", f"{N}/jobs/+/status")
    link = FleetLink(link_config(broker, key), NODE, open_store(tmp_path / "n"))
    got: list[tuple[str, bytes]] = []
    fail = [True]

    def assign(topic: str, payload: bytes) -> None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("ledger write failed")  # not acknowledged: comes back
        got.append((topic, payload))

    link.subscribe_node("work/assign", assign)
    link.start()
    try:
        deadline = time.monotonic() + 5
        while not link.connected and time.monotonic() < deadline:
            link.poll()
            time.sleep(0.01)
        assert link.publish_now("work/request", b'{"slots": 2}', expiry_s=30)
        req = fleet.expect(f"{N}/work/request")
        assert req.properties.MessageExpiryInterval <= 30
        assert link.send_stored(Kind.JOB, "jobs/j1/status", b'{"state": "running"}')
        fleet.expect(f"{N}/jobs/j1/status")
        fleet.publish(f"{N}/work/assign", b'{"jobs": []}')
        deadline = time.monotonic() + 3
        while link.stats.callback_errors == 0 and time.monotonic() < deadline:
            link.poll()
            time.sleep(0.01)
        assert link.stats.callback_errors == 1 and got == []
        link._client.disconnect()  # the unacknowledged assignment is redelivered on resume
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            link.poll()
            time.sleep(0.01)
        assert got == [(f"{N}/work/assign", b'{"jobs": []}')]
        deadline = time.monotonic() + 2
        while link.outbox.stats().rows and time.monotonic() < deadline:
            link.poll()
            time.sleep(0.01)
        assert link.outbox.stats().rows == 0  # the job report was acknowledged and deleted
    finally:
        link.stop(1.0)
        fleet.close()
