"""Fleet link benchmark, on loopback against a real Mosquitto.

1. Command latency: a signed ``setpoint`` command from a fleet client to the result that
   carries the applied state (and to the retained ``state`` update), p50/p99 over N
   commands. The node runs its real control loop in real time on the simulated radiator,
   woken by the link when a message arrives. Target: p99 <= 50 ms.
2. Replay: a simulated day of telemetry (a sample per 10 s control tick) buffered while the
   broker is down, then drained after it comes back, at the default replay rate. Timed
   from the reconnect until the fleet client has every sample. Target: <= 10 s.

Run: ``.venv/bin/python -m benchmarks.link`` (``--commands 500``, ``--check`` to exit 1 on a
miss). Needs ``mosquitto`` (scripts/test installs it).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.config import AgentConfig
from qrad_agent.fleet.keys import sign_command
from qrad_agent.link.bridge import LinkBridge
from qrad_agent.link.client import Clock, FleetLink
from qrad_agent.link.security import public_key_b64
from qrad_agent.link.settings import LinkConfig
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario
from qrad_agent.store.db import open_store
from tests.mqtt_broker import Broker, FleetClient

NODE = "bench-1"
TOPIC = f"qrad/v1/nodes/{NODE}"
P99_TARGET_MS = 50.0
DRAIN_TARGET_S = 10.0


def link_config(broker: Broker, key: Ed25519PrivateKey) -> LinkConfig:
    return LinkConfig.model_validate({
        "enabled": True,
        "broker": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.5},
        "security": {"fleet_keys": [{"name": "bench",
                                     "public_key": public_key_b64(key.public_key())}]},
    })


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class RealTimeLoop(threading.Thread):
    """The control loop as on a board: service what is due, sleep until the next due time
    or until the link wakes it (the radiator's room is simulated, stepped in real time)."""

    def __init__(self, tmp: Path, cfg: LinkConfig) -> None:
        super().__init__(daemon=True)
        self.agent, self.world = build_sim_agent(AgentConfig(), load_scenario("winter-week"))
        self.wake = threading.Event()
        self.link = FleetLink(cfg, NODE, open_store(tmp / "node"), wake=self.wake.set,
                              clock=Clock(wall=time.time, mono=lambda: self.world.t))
        self.bridge = LinkBridge(self.agent, self.link)
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        step = self.agent.cfg.control.sensor_period_s
        self.bridge.start(self.world.t, self.world.local)
        while not self.stopping.is_set():
            elapsed = time.monotonic() - started
            decision = None
            while self.world.t + step <= elapsed:
                self.world.step(step)
                d = self.agent.service(self.world.t, self.world.local)
                decision = d or decision
            self.bridge.service(self.world.t, self.world.local, decision)
            self.wake.wait(min(0.5, max(0.0, self.world.t + step - elapsed)))
            self.wake.clear()
        self.bridge.stop()
        self.world.close()


def bench_commands(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    key = Ed25519PrivateKey.generate()
    with Broker(tmp / "broker-cmd") as broker:
        fleet = FleetClient(broker.host, broker.port, "bench-fleet")
        fleet.subscribe("qrad/v1/replies/bench/#", f"{TOPIC}/state")
        loop = RealTimeLoop(tmp, link_config(broker, key))
        loop.start()
        fleet.expect(f"{TOPIC}/state", timeout=10)
        while not loop.link.connected:
            time.sleep(0.01)
        to_result: list[float] = []
        to_state: list[float] = []
        for i in range(n):
            target = 22.0 if i % 2 else 20.0
            env = sign_command(key, NODE, {"cmd": "setpoint", "target_c": target,
                                           "duration_s": 3600})
            reply_topic = f"qrad/v1/replies/bench/{env['id']}"
            fleet.clear()
            sent = time.perf_counter()
            fleet.publish(f"{TOPIC}/cmd/setpoint", json.dumps(env), response_topic=reply_topic,
                          correlation=env["id"].encode(), wait=False)
            state_at = result_at = None
            while state_at is None or result_at is None:
                m = fleet.expect(lambda r: True, timeout=5)
                if m.topic == reply_topic:
                    body = json.loads(m.payload)
                    assert body["status"] == "ok" and body["state"]["target_c"] == target, body
                    result_at = m.at
                elif m.topic.endswith("/state") and json.loads(m.payload)["target_c"] == target:
                    state_at = m.at
            # Received.at is time.monotonic(); perf_counter shares its clock on Linux
            to_result.append((result_at - sent) * 1000)
            to_state.append((state_at - sent) * 1000)
        loop.stopping.set()
        loop.join(10)
        fleet.close()
    return to_result, to_state


def bench_replay(tmp: Path) -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    with Broker(tmp / "broker-replay", persistence=True) as broker:
        fleet = FleetClient(broker.host, broker.port, "bench-history", session_expiry=3600,
                            clean_start=False)
        fleet.fast_reconnect()
        fleet.subscribe(f"{TOPIC}/telemetry")
        base = AgentConfig()
        cfg = base.model_copy(update={"control": base.control.model_copy(
            update={"sensor_period_s": 10.0})})
        agent, world = build_sim_agent(cfg, load_scenario("winter-week"))
        link = FleetLink(link_config(broker, key), NODE, open_store(tmp / "replay"),
                         clock=Clock(wall=lambda: 1.8e9 + world.t, mono=lambda: world.t))
        bridge = LinkBridge(agent, link)
        bridge.start(world.t, world.local)
        while not link.connected:
            bridge.service(world.t, world.local, None)
            time.sleep(0.01)
        broker.stop()
        for _ in range(8640):  # 24 h of 10 s control ticks, the broker down
            world.step(10.0)
            bridge.service(world.t, world.local, agent.service(world.t, world.local))
        stats = link.outbox.stats()
        samples = stats.by_kind.get("telemetry", 0)
        stored = stats.bytes
        broker.start()
        while not link.is_connected():
            time.sleep(0.005)
        started = time.perf_counter()
        got = 0
        while got < samples and time.perf_counter() - started < 60:
            bridge.service(world.t, world.local, None)
            while True:
                try:
                    m = fleet.messages.get_nowait()
                except Exception:
                    break
                got += len(json.loads(m.payload)["samples"])
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        batches = link.stats.replayed_batches
        bridge.stop()
        world.close()
        fleet.close()
    return {"samples": samples, "received": got, "bytes": stored, "seconds": elapsed,
            "batches": batches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commands", type=int, default=300, help="setpoint commands to time")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the agent's own warnings are not the figures
    ok = True
    with tempfile.TemporaryDirectory(prefix="qrad-bench-link-") as d:
        tmp = Path(d)
        to_result, to_state = bench_commands(tmp, args.commands)
        p50, p99 = percentile(to_result, 0.5), percentile(to_result, 0.99)
        print(f"setpoint -> result with applied state, {len(to_result)} commands: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(to_result):.1f} ms, "
              f"mean {statistics.fmean(to_result):.1f} ms")
        print(f"setpoint -> retained state updated: p50 {percentile(to_state, 0.5):.1f} ms, "
              f"p99 {percentile(to_state, 0.99):.1f} ms")
        verdict = "ok" if p99 <= P99_TARGET_MS else "MISSED"
        ok &= p99 <= P99_TARGET_MS
        print(f"  target p99 <= {P99_TARGET_MS:.0f} ms: {verdict}")
        r = bench_replay(tmp)
        rate = r["bytes"] / max(r["seconds"], 1e-9) / 1024**2
        print(f"replay of 24 h of telemetry: {r['received']:.0f}/{r['samples']:.0f} samples, "
              f"{r['bytes'] / 1024**2:.2f} MiB stored, {r['batches']:.0f} batches, "
              f"{r['seconds']:.2f} s ({rate:.2f} MiB/s)")
        drained = r["received"] >= r["samples"] and r["seconds"] <= DRAIN_TARGET_S
        ok &= drained
        print(f"  target <= {DRAIN_TARGET_S:.0f} s: {'ok' if drained else 'MISSED'}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
