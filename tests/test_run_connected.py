"""`qrad-agent run --sim` with `[link] enabled`: the real process joins a real broker, takes a
signed command from the fleet, and leaves cleanly — the composition a board runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.fleet.keys import sign_command
from qrad_agent.link.security import public_key_b64
from tests.mqtt_broker import Broker, FleetClient, Received

REPO = Path(__file__).resolve().parents[1]
NODE = "qrad-sim"
N = f"qrad/v1/nodes/{NODE}"


def test_agent_process_joins_the_fleet_obeys_a_signed_command_and_says_offline(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    cfg = tmp_path / "agent.toml"
    public = public_key_b64(key.public_key())
    with Broker(tmp_path / "broker") as broker:
        cfg.write_text(f"""
[link]
enabled = true
broker = {{ host = "{broker.host}", port = {broker.port}, reconnect_min_s = 0.05 }}
security = {{ fleet_keys = [{{ name = "ops", public_key = "{public}" }}] }}
""")
        fleet = FleetClient(broker.host, broker.port, "fleet-test")
        fleet.subscribe(f"{N}/#", "qrad/v1/replies/#")
        proc = subprocess.Popen(
            [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", "60", "-c", str(cfg),
             "--status-socket", str(tmp_path / "status.sock")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            online = fleet.expect(lambda r: r.topic == f"{N}/status", timeout=30)
            assert json.loads(online.payload)["status"] == "online"
            fleet.expect(lambda r: r.topic == f"{N}/meta", timeout=10)

            env = sign_command(key, NODE, {"cmd": "mode", "mode": "comfort"})
            reply = f"qrad/v1/replies/fleet-test/{env['id']}"
            fleet.publish(f"{N}/cmd/mode", json.dumps(env), response_topic=reply,
                          correlation=env["id"].encode())

            def answered(r: Received) -> bool:
                return r.topic in (reply, f"{N}/cmd/result") and \
                    json.loads(r.payload).get("id") == env["id"]

            result = json.loads(fleet.expect(answered, timeout=10).payload)
            assert result["status"] == "ok", result

            def comfort_state(r: Received) -> bool:
                return r.topic == f"{N}/state" and json.loads(r.payload).get("mode") == "comfort"

            assert fleet.find(comfort_state, timeout=10)  # may come before the result

            forged = sign_command(Ed25519PrivateKey.generate(), NODE,
                                  {"cmd": "mode", "mode": "off"})
            fleet.publish(f"{N}/cmd/mode", json.dumps(forged))
            refused = json.loads(fleet.expect(
                lambda r: r.topic == f"{N}/cmd/result"
                and json.loads(r.payload).get("id") == forged["id"], timeout=10).payload)
            assert refused["status"] == "error"

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, proc.stderr.read().decode() if proc.stderr else ""
            last = fleet.find(lambda r: r.topic == f"{N}/status"
                              and json.loads(r.payload)["status"] == "offline", timeout=10)
            assert last is not None
        finally:
            if proc.poll() is None:
                proc.kill()
            fleet.close()
