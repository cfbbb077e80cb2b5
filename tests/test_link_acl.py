"""The shipped broker config (configs/mosquitto/mosquitto.conf) and ACL (configs/mosquitto/acl)
on a real Mosquitto, with certificates generated here: a node reaches its own subtree and
nothing of another node's, the dispatcher and Home Assistant have what they need, and
clients without a certificate from the fleet CA do not get in.

Only what must differ on a test machine is rewritten: the listener port (loopback), the
certificate, ACL, persistence and log paths. Every directive and every ACL line is the
shipped one.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from qrad_agent.fleet.keys import sign_command
from qrad_agent.link.client import FleetLink
from qrad_agent.link.messages import CommandResult, ResultStatus, TelemetrySample
from qrad_agent.link.security import public_key_b64
from qrad_agent.link.settings import LinkConfig
from qrad_agent.store.db import open_store
from tests.mqtt_broker import Broker, FleetClient, Pki, free_port, make_pki

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONF = REPO / "configs" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = REPO / "configs" / "mosquitto" / "acl"
A, B = "node-a", "node-b"
HA_PASSWORD = "correct horse"


def shipped_config(tmp: Path, pki: Pki, port: int, ha_port: int, passwd: Path) -> str:
    text = SHIPPED_CONF.read_text()
    subs = {
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^cafile .*$": f"cafile {pki.ca}",
        r"^certfile .*$": f"certfile {pki.server_cert}",
        r"^keyfile .*$": f"keyfile {pki.server_key}",
        r"^acl_file .*$": f"acl_file {SHIPPED_ACL}",
        r"^persistence_location .*$": f"persistence_location {tmp}/",
        r"^log_dest syslog$": f"log_dest file {tmp}/mosquitto.log",
        # the optional Home Assistant listener, switched on as its comment says
        r"^#listener 8884$": f"listener {ha_port} 127.0.0.1",
        r"^#protocol mqtt$": "protocol mqtt",
        r"^#certfile .*$": f"certfile {pki.server_cert}",
        r"^#keyfile .*$": f"keyfile {pki.server_key}",
        r"^#password_file .*$": f"password_file {passwd}",
    }
    for pattern, replacement in subs.items():
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert n >= 1, f"the shipped config no longer has a line matching {pattern}"
    return text


@dataclass
class Site:
    broker: Broker
    pki: Pki
    ha_port: int

    def tls(self, name: str | None, ca: Path | None = None) -> Callable[[mqtt.Client], None]:
        def setup(c: mqtt.Client) -> None:
            ctx = ssl.create_default_context(cafile=str(ca or self.pki.ca))
            if name is not None:
                crt, key = self.pki.client(name)
                ctx.load_cert_chain(str(crt), str(key))
            c.tls_set_context(ctx)
        return setup

    def client(self, name: str, client_id: str | None = None) -> FleetClient:
        return FleetClient(self.broker.host, self.broker.port, client_id or name,
                           tls=self.tls(name))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    tmp = tmp_path_factory.mktemp("acl")
    pki = make_pki(tmp / "pki", [A, B, "dispatcher", "homeassistant"])
    make_pki(tmp / "rogue", ["rogue"], ca_name="some other CA")
    passwd = tmp / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "homeassistant", HA_PASSWORD],
                   check=True, capture_output=True)
    port, ha_port = free_port(), free_port()
    broker = Broker(tmp / "broker", raw_conf=shipped_config(tmp / "broker", pki, port, ha_port,
                                                           passwd), port=port)
    broker.dir.mkdir(parents=True, exist_ok=True)
    with broker:
        yield Site(broker, pki, ha_port)


class NodeLoop(threading.Thread):
    """node-a's real link over TLS with its certificate; answers every command with ok."""

    def __init__(self, site: Site, tmp: Path, key: Ed25519PrivateKey) -> None:
        super().__init__(daemon=True)
        crt, k = site.pki.client(A)
        cfg = LinkConfig.model_validate({
            "broker": {"host": "127.0.0.1", "port": site.broker.port, "reconnect_min_s": 0.05,
                       "tls": {"enabled": True, "ca_file": str(site.pki.ca),
                               "cert_file": str(crt), "key_file": str(k)}},
            "security": {"fleet_keys": [{"name": "ops", "public_key":
                                         public_key_b64(key.public_key())}]},
            "home_assistant": {"enabled": True},
            "telemetry": {"period_s": 1},
        })
        self.link = FleetLink(cfg, A, open_store(tmp / "node-a"))
        self.stop = threading.Event()

    def run(self) -> None:
        self.link.start()
        while not self.stop.is_set():
            for cmd in self.link.poll():
                self.link.reply(cmd, self.link.result(cmd, ResultStatus.OK))
            time.sleep(0.01)
        self.link.stop()


def nothing_arrives(client: FleetClient, what: Callable[[str], bool], wait: float = 0.4) -> None:
    time.sleep(wait)
    leaked = [m.topic for m in client.history if what(m.topic)]
    assert not leaked, f"{client.c._client_id!r} received {leaked}"


def test_nodes_are_confined_to_their_own_subtree(site: Site, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    dispatcher = site.client("dispatcher")
    assert not any(r.is_failure for r in dispatcher.subscribe(
        "qrad/v1/nodes/+/telemetry", "qrad/v1/nodes/+/state", "qrad/v1/nodes/+/status",
        "qrad/v1/nodes/+/cmd/result", "qrad/v1/replies/dispatcher/#"))
    ha = site.client("homeassistant")
    ha.subscribe("homeassistant/#", "qrad/v1/nodes/+/status")
    node = NodeLoop(site, tmp_path, key)
    node.start()
    try:
        # node-a's own link works over TLS, identified by its certificate
        status = dispatcher.expect(f"qrad/v1/nodes/{A}/status")
        assert json.loads(status.payload)["status"] == "online"
        ha.expect(f"homeassistant/climate/{A}/thermostat/config")  # its discovery is allowed
        deadline = time.monotonic() + 5
        while not node.link.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        node.link.add_sample(TelemetrySample(at=time.time(), room_c=20.0))
        dispatcher.expect(f"qrad/v1/nodes/{A}/telemetry", timeout=5)

        # node-b subscribes into node-a's subtree and the dispatcher's replies. Mosquitto 2.0
        # grants the subscriptions and checks the ACL on every delivery: nothing may arrive.
        b = site.client(B)
        b.subscribe(f"qrad/v1/nodes/{A}/#", f"qrad/v1/nodes/{A}/cmd/resume",
                    f"qrad/v1/nodes/{A}/telemetry", "qrad/v1/replies/#",
                    "qrad/v1/nodes/+/telemetry", f"qrad/v1/nodes/{A}/status")
        # …and whatever node-a sends or is sent does not reach node-b
        env = sign_command(key, A, {"cmd": "resume"})
        dispatcher.publish(f"qrad/v1/nodes/{A}/cmd/resume", json.dumps(env),
                           response_topic=f"qrad/v1/replies/dispatcher/{env['id']}",
                           correlation=b"c1")
        reply = dispatcher.expect(f"qrad/v1/replies/dispatcher/{env['id']}")
        assert CommandResult.model_validate_json(reply.payload).status is ResultStatus.OK
        node.link.add_sample(TelemetrySample(at=time.time(), room_c=20.5))
        dispatcher.expect(f"qrad/v1/nodes/{A}/telemetry", timeout=5)
        nothing_arrives(b, lambda t: A in t or "replies" in t)

        # node-b cannot write into node-a's subtree: no forged telemetry, state, status, no
        # commands, no results, no discovery for node-a
        refused_before = node.link.stats.received
        dispatcher.clear()
        for topic in (f"qrad/v1/nodes/{A}/telemetry", f"qrad/v1/nodes/{A}/state",
                      f"qrad/v1/nodes/{A}/status", f"qrad/v1/nodes/{A}/cmd/result",
                      f"qrad/v1/nodes/{A}/cmd/resume", f"qrad/v1/nodes/{A}/ha/set/mode",
                      f"homeassistant/climate/{A}/thermostat/config", "qrad/v1/fleet/cmd/drain"):
            info = b.publish(topic, b'{"forged": true}')
            assert info.is_published()
        time.sleep(0.4)
        forged = [m.topic for m in dispatcher.history + ha.history if b"forged" in m.payload]
        assert forged == [], forged
        assert node.link.stats.received == refused_before  # node-a got none of them
        # node-b can still use its own subtree (the pattern is per identity, not a lock-out)
        b.publish(f"qrad/v1/nodes/{B}/telemetry", b'{"own": true}')
        dispatcher.expect(f"qrad/v1/nodes/{B}/telemetry")

        # Home Assistant: reads status, writes ha/set, and reads no telemetry
        ha.subscribe("qrad/v1/nodes/+/telemetry", f"qrad/v1/nodes/{A}/ha/state")
        ha.publish(f"qrad/v1/nodes/{A}/ha/set/mode", "heat")
        refusal = dispatcher.expect(f"qrad/v1/nodes/{A}/cmd/result")  # untrusted by node-a
        assert "trust_commands" in json.loads(refusal.payload)["reason"]
        ha.publish(f"qrad/v1/nodes/{A}/cmd/resume", json.dumps(env))
        node.link.add_sample(TelemetrySample(at=time.time(), room_c=21.0))
        dispatcher.expect(f"qrad/v1/nodes/{A}/telemetry", timeout=5)
        assert node.link.stats.received == refused_before + 1  # only the ha/set one
        nothing_arrives(ha, lambda t: t.endswith("/telemetry"), wait=0.1)
        b.close()
    finally:
        node.stop.set()
        node.join(10)
        dispatcher.close()
        ha.close()


def test_a_client_id_grants_nothing(site: Site) -> None:
    """node-b claiming node-a's client id is still node-b to the ACL (identity = CN)."""
    spoof = site.client(B, client_id=A)
    spoof.subscribe(f"qrad/v1/nodes/{A}/cmd/+", f"qrad/v1/nodes/{B}/cmd/+")
    dispatcher = site.client("dispatcher")
    dispatcher.publish(f"qrad/v1/nodes/{A}/cmd/resume", b"for node-a")
    dispatcher.publish(f"qrad/v1/nodes/{B}/cmd/resume", b"for node-b")
    got = spoof.expect(lambda m: m.payload == b"for node-b")  # its own: delivered
    assert got.topic == f"qrad/v1/nodes/{B}/cmd/resume"
    nothing_arrives(spoof, lambda t: A in t, wait=0.1)
    spoof.close()
    dispatcher.close()


def test_only_the_fleet_ca_gets_in(site: Site) -> None:
    def attempt(tls: Callable[[mqtt.Client], None], **kw: str) -> str:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder",
                        protocol=mqtt.MQTTv5)
        tls(c)
        if kw:
            c.username_pw_set(kw["user"], kw["password"])
        try:
            c.connect("127.0.0.1", int(kw.get("port", site.broker.port)), keepalive=5)
            for _ in range(100):
                c.loop(0.02)
                if c.is_connected():
                    c.disconnect()
                    return "connected"
            return "no CONNACK"
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"

    assert attempt(site.tls(None)) != "connected"  # no client certificate
    rogue_dir = site.pki.dir.parent / "rogue"
    rogue = Pki(rogue_dir, rogue_dir / "ca.crt", rogue_dir / "server.crt",
                rogue_dir / "server.key")
    def rogue_cert(c: mqtt.Client) -> None:
        ctx = ssl.create_default_context(cafile=str(site.pki.ca))
        crt, key = rogue.client("rogue")
        ctx.load_cert_chain(str(crt), str(key))
        c.tls_set_context(ctx)
    assert attempt(rogue_cert) != "connected"  # a certificate from another CA
    assert attempt(site.tls("homeassistant")) == "connected"  # the control: a fleet cert
    # the optional Home Assistant listener: server TLS, username and password
    assert attempt(site.tls(None), user="homeassistant", password=HA_PASSWORD,
                   port=str(site.ha_port)) == "connected"
    assert attempt(site.tls(None), user="homeassistant", password="wrong",
                   port=str(site.ha_port)) != "connected"


def test_the_node_verifies_the_broker(site: Site, tmp_path: Path) -> None:
    """A node configured with another CA refuses the broker's certificate, and says so."""
    crt, k = site.pki.client(A)
    other_ca = site.pki.dir.parent / "rogue" / "ca.crt"
    cfg = LinkConfig.model_validate({
        "broker": {"host": "127.0.0.1", "port": site.broker.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.1,
                   "tls": {"enabled": True, "ca_file": str(other_ca), "cert_file": str(crt),
                           "key_file": str(k)}},
    })
    link = FleetLink(cfg, A, open_store(tmp_path / "x"))
    link.start()
    try:
        deadline = time.monotonic() + 10
        while link.stats.connect_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.is_connected()
        assert "CERTIFICATE_VERIFY_FAILED" in link.stats.last_error, link.stats.last_error
        assert link.stats.connect_failures >= 2  # and it keeps trying, with backoff
    finally:
        link.stop(1.0)


def test_the_link_authenticates_with_a_password(site: Site, tmp_path: Path) -> None:
    """``link.broker.auth`` over server-only TLS (the optional Home Assistant listener, whose
    account is the one with a password): a wrong password is reported, the right one works."""
    (tmp_path / "pw").write_text(HA_PASSWORD + "\n")
    (tmp_path / "bad").write_text("nope\n")

    def link_with(password_file: Path) -> FleetLink:
        cfg = LinkConfig.model_validate({
            "broker": {"host": "127.0.0.1", "port": site.ha_port, "reconnect_min_s": 0.05,
                       "reconnect_max_s": 0.1,
                       "tls": {"enabled": True, "ca_file": str(site.pki.ca)},
                       "auth": {"username": "homeassistant",
                                "password_file": str(password_file)}},
        })
        return FleetLink(cfg, f"pw-{password_file.name}",
                         open_store(tmp_path / f"state-{password_file.name}"))

    good, bad = link_with(tmp_path / "pw"), link_with(tmp_path / "bad")
    good.start()
    bad.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                good.is_connected() and bad.stats.connect_failures >= 1):
            time.sleep(0.02)
        assert good.is_connected()
        assert not bad.is_connected()
        assert "refused the connection" in bad.stats.last_error, bad.stats.last_error
    finally:
        good.stop(1.0)
        bad.stop(1.0)
