"""Inbound commands that must be refused: generated malformed, oversized, wrongly typed,
misaddressed, unsigned, forged, expired and replayed messages on every inbound topic.

Each goes through the same path as a message from the broker (paho's on_message callback,
then ``poll()`` in the control loop) into a node built on the simulated radiator. Each must be
refused with a reason (an ``error`` result in the outbox), crash nothing, and leave the
node's state exactly as it was. Also: the canonical form (RFC 8785) and the signing tools.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qrad_agent.config import AgentConfig
from qrad_agent.core.models import Mode
from qrad_agent.fleet.cli import main as fleet_main
from qrad_agent.fleet.keys import keygen, sign_command
from qrad_agent.link.bridge import LinkBridge
from qrad_agent.link.client import Clock, Command, FleetLink
from qrad_agent.link.messages import CommandName, CommandResult, Envelope, ResultStatus
from qrad_agent.link.security import (
    canonical_json,
    key_id,
    load_private_key,
    public_key_b64,
    public_key_from_text,
    sign,
    verify,
)
from qrad_agent.link.settings import LinkConfig
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario
from qrad_agent.store.db import open_store
from qrad_agent.store.outbox import Kind

NOW = 1_800_000_000.0
NODE = "node-1"
PREFIX = f"qrad/v1/nodes/{NODE}"
HYPO = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@dataclass
class Node:
    link: FleetLink
    bridge: LinkBridge
    key: Ed25519PrivateKey
    mid: int = 0

    def inject(self, topic: str, payload: bytes, response_topic: str | None = None) -> None:
        """Deliver ``payload`` as the broker would: through paho's on_message callback."""
        self.mid += 1
        msg = mqtt.MQTTMessage(self.mid, topic.encode())
        msg.payload = payload
        msg.qos = 1
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            msg.properties = props
        cb = self.link._client.on_message
        assert cb is not None
        cb(self.link._client, None, msg)

    def process(self) -> tuple[list[Command], list[CommandResult]]:
        """One control-loop turn; returns accepted commands (applied) and results sent."""
        mark = self.link.outbox.max_id()
        commands = self.link.poll()
        w = self.bridge.agent
        for cmd in commands:
            self.link.reply(cmd, self.bridge.apply(cmd, 100.0, _local(w)))
        rows = self.link.outbox.pending([Kind.RESULT], after_id=mark, limit=100)
        self.link.outbox.delete([r.id for r in rows])
        self.link.outbox.delete([r.id for r in self.link.outbox.pending([Kind.EVENT],
                                                                          limit=1000)])
        return commands, [CommandResult.model_validate_json(r.payload) for r in rows]

    def snapshot(self) -> dict[str, Any]:
        agent = self.bridge.agent
        th = agent.controller.thermostat  # type: ignore[attr-defined]
        pid = agent.controller.pid  # type: ignore[attr-defined]
        return {
            "cfg": agent.cfg.model_dump(mode="json"),
            "mode": th.mode, "override": th.override,
            "gains": (pid.kp, pid.ki, pid.kd),
            "bridge": (self.bridge.revision, copy.deepcopy(self.bridge.overlay),
                       self.bridge.draining, self.bridge.identify_until),
            "seqs": self.link.kv.db.query("SELECT key_id, seq FROM command_seq ORDER BY 1"),
            "kv": self.link.kv.db.query("SELECT key, value FROM kv ORDER BY 1"),
        }

    def envelope(self, body: dict[str, Any], *, node: str = NODE, seq: int | None = None,
                 issued: float = NOW - 1, ttl: float = 300.0,
                 key: Ed25519PrivateKey | str | None = "fleet") -> dict[str, Any]:
        signer = self.key if key == "fleet" else key
        assert not isinstance(signer, str)
        # later envelopes always get a higher seq than any before, explicit ones included
        self.seq_counter = max(getattr(self, "seq_counter", 10_000) + 1, seq or 0)
        return sign_command(signer, node, body, seq=seq or self.seq_counter, now=issued,
                            ttl_s=ttl)


def _local(agent: Any) -> Any:
    from datetime import datetime

    return datetime(2026, 1, 5, 12, 0)  # a Monday noon: inside the default comfort period


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("node")
    key = Ed25519PrivateKey.generate()
    cfg = LinkConfig.model_validate({
        "security": {"fleet_keys": [{"name": "ops", "public_key":
                                     public_key_b64(key.public_key())}],
                     "max_command_bytes": 4096},
        "home_assistant": {"enabled": True, "trust_commands": True},
    })
    agent, world = build_sim_agent(AgentConfig(), load_scenario("winter-week"))
    link = FleetLink(cfg, NODE, open_store(tmp), clock=Clock(wall=lambda: NOW,
                                                              mono=lambda: 100.0))
    bridge = LinkBridge(agent, link)
    yield Node(link, bridge, key)
    world.close()


def assert_refused(node: Node, topic: str, payload: bytes, *words: str,
                   response_topic: str | None = None) -> CommandResult:
    before = node.snapshot()
    errors = node.link.stats.callback_errors
    node.inject(topic, payload, response_topic)
    commands, results = node.process()
    assert commands == [], f"accepted: {commands}"
    assert len(results) == 1, results
    r = results[0]
    assert r.status is ResultStatus.ERROR and r.reason and r.reason.startswith("refused: ")
    for w in words:
        assert w in r.reason, (w, r.reason)
    assert node.snapshot() == before
    assert node.link.stats.callback_errors == errors
    return r


# ------------------------------------------------------------------ the harness can see changes


def test_a_valid_command_is_accepted_and_changes_state(node: Node) -> None:
    before = node.snapshot()
    env = node.envelope({"cmd": "mode", "mode": "eco"})
    node.inject(f"{PREFIX}/cmd/mode", json.dumps(env).encode())
    commands, results = node.process()
    assert [c.name for c in commands] == ["mode"]
    assert results[0].status is ResultStatus.OK and results[0].state is not None
    assert results[0].state.mode is Mode.ECO
    assert node.snapshot() != before
    env = node.envelope({"cmd": "mode", "mode": "auto"})
    node.inject(f"{PREFIX}/cmd/mode", json.dumps(env).encode())
    assert node.process()[1][0].status is ResultStatus.OK


# ------------------------------------------------------------------ generated garbage

INBOUND = [f"{PREFIX}/cmd/{c.value}" for c in CommandName] + [
    f"qrad/v1/fleet/cmd/{c.value}" for c in CommandName] + [
    f"{PREFIX}/cmd/reboot", "qrad/v1/fleet/cmd/selfdestruct",
    f"{PREFIX}/ha/set/temperature", f"{PREFIX}/ha/set/mode", f"{PREFIX}/ha/set/preset"]


def _valid_ha(topic: str, payload: bytes) -> bool:
    try:
        text = payload.decode().strip()
    except UnicodeDecodeError:
        return False
    if topic.endswith("/mode"):
        return text in ("heat", "off", "auto")
    if topic.endswith("/temperature"):
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and 5 <= value <= 28
    return False


@HYPO
@given(topic=st.sampled_from(INBOUND), payload=st.binary(max_size=600))
def test_garbage_bytes_are_refused(node: Node, topic: str, payload: bytes) -> None:
    assume(not _valid_ha(topic, payload))
    assert_refused(node, topic, payload)


def _json_values(finite: bool) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers(-2**53, 2**53)
        | st.floats(allow_nan=False, allow_infinity=not finite) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=4),
        max_leaves=12,
    )


json_values = _json_values(finite=False)


@HYPO
@given(topic=st.sampled_from(INBOUND[:16]), value=json_values)
def test_json_that_is_not_an_envelope_is_refused(node: Node, topic: str, value: Any) -> None:
    payload = json.dumps(value).encode()
    assume(len(payload) <= 4096)
    assert_refused(node, topic, payload)


BODIES: dict[str, dict[str, Any]] = {
    "setpoint": {"cmd": "setpoint", "target_c": 21.5},
    "mode": {"cmd": "mode", "mode": "comfort"},
    "schedule": {"cmd": "schedule", "periods": [{"days": "mon-fri", "start": "07:00",
                                                 "end": "09:00"}]},
    "override": {"cmd": "override", "target_c": 22.0, "duration_s": 3600},
    "config": {"cmd": "config", "patch": {"pid": {"kp": 1.5}}},
    "drain": {"cmd": "drain", "reason": "maintenance"},
    "resume": {"cmd": "resume"},
    "identify": {"cmd": "identify", "duration_s": 10},
}


@HYPO
@given(name=st.sampled_from(sorted(BODIES)), data=st.data())
def test_wrongly_typed_fields_are_refused_before_any_check(node: Node, name: str,
                                                           data: st.DataObject) -> None:
    """A field's value replaced by one of another JSON type (or a field removed, or one
    added): refused by validation, signature or not."""
    env = node.envelope(BODIES[name])
    where = data.draw(st.sampled_from(["envelope", "body"]))
    target = env if where == "envelope" or len(env["body"]) == 1 else env["body"]
    keys = [k for k in target if k != "cmd"] or ["cmd"]
    field = data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["retype", "remove", "add"]))
    if action == "retype":
        original = target[field]
        value = data.draw(json_values)
        assume(type(value) is not type(original) and not (
            isinstance(original, float) and isinstance(value, int)
            and not isinstance(value, bool)))
        target[field] = value
    elif action == "remove":
        assume(not (target is env["body"] and field in ("reason", "duration_s")))  # optional
        assume(not (target is env and field == "sig"))
        del target[field]
    else:
        target[data.draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in target))] = 1
    payload = json.dumps(env).encode()
    assume(len(payload) <= 4096)
    assert_refused(node, f"{PREFIX}/cmd/{name}", payload)


def test_oversized_is_refused_unread(node: Node) -> None:
    env = node.envelope({"cmd": "drain", "reason": "x" * 100})
    payload = json.dumps(env).encode() + b" " * 5000  # valid JSON, but over 4096 bytes
    assert_refused(node, f"{PREFIX}/cmd/drain", payload, "oversized", "4096")


def test_duplicate_keys_and_nan_are_refused(node: Node) -> None:
    env = node.envelope({"cmd": "setpoint", "target_c": 21.0})
    text = json.dumps(env)
    # a second target_c after the signed one: a parser keeping the last would act on 27
    doubled = text.replace('"target_c": 21.0', '"target_c": 21.0, "target_c": 27.0')
    assert_refused(node, f"{PREFIX}/cmd/setpoint", doubled.encode(), "duplicate key")
    nan = text.replace('"target_c": 21.0', '"target_c": NaN')
    assert_refused(node, f"{PREFIX}/cmd/setpoint", nan.encode(), "NaN")


# ------------------------------------------------------------------ addressing


def test_misaddressed_commands_are_refused(node: Node) -> None:
    for_other = node.envelope({"cmd": "resume"}, node="node-2")
    assert_refused(node, f"{PREFIX}/cmd/resume", json.dumps(for_other).encode(),
                   "misaddressed", "node-2")
    broadcast = node.envelope({"cmd": "resume"}, node="*")
    assert_refused(node, f"{PREFIX}/cmd/resume", json.dumps(broadcast).encode(),
                   "misaddressed", "fleet topic")
    to_me = node.envelope({"cmd": "resume"})
    assert_refused(node, "qrad/v1/fleet/cmd/resume", json.dumps(to_me).encode(),
                   "misaddressed", "'*'")
    wrong_topic = node.envelope({"cmd": "drain"})
    assert_refused(node, f"{PREFIX}/cmd/resume", json.dumps(wrong_topic).encode(),
                   "cmd/drain")


def test_unknown_command_topic_is_refused(node: Node) -> None:
    env = node.envelope({"cmd": "resume"})
    r = assert_refused(node, f"{PREFIX}/cmd/reboot", json.dumps(env).encode(),
                       "unknown command", "setpoint")
    assert r.id == env["id"]


# ------------------------------------------------------------------ signatures


def test_unsigned_is_refused_when_signatures_are_required(node: Node) -> None:
    env = node.envelope({"cmd": "resume"}, key=None)
    assert "sig" not in env
    assert_refused(node, f"{PREFIX}/cmd/resume", json.dumps(env).encode(), "unsigned")


@HYPO
@given(data=st.data())
def test_forged_commands_are_refused(node: Node, data: st.DataObject) -> None:
    how = data.draw(st.sampled_from(["other_key", "changed_body", "changed_seq",
                                     "flipped_sig", "moved_node"]))
    if how == "other_key":
        env = node.envelope({"cmd": "mode", "mode": "off"}, key=Ed25519PrivateKey.generate())
    else:
        env = node.envelope({"cmd": "mode", "mode": "off"})
        if how == "changed_body":
            env["body"]["mode"] = data.draw(st.sampled_from(["eco", "boost", "frost"]))
        elif how == "changed_seq":
            env["seq"] += data.draw(st.integers(1, 10**6))
        elif how == "moved_node":
            env["node"] = NODE  # unchanged, but re-signing is what an attacker cannot do
            env["expires_at"] += 1.0
        else:
            sig = bytearray(env["sig"].encode())
            i = data.draw(st.integers(0, len(sig) - 2))  # the last char holds padding bits
            sig[i] = ord("A") if sig[i] != ord("A") else ord("B")
            env["sig"] = sig.decode()
    assert_refused(node, f"{PREFIX}/cmd/mode", json.dumps(env).encode(), "bad signature")


def test_signature_survives_reformatting() -> None:
    """The node re-serialises what it parsed: spacing and key order of the wire form do not
    matter, 21.0 and 21 are the same number."""
    key = Ed25519PrivateKey.generate()
    env = sign_command(key, NODE, {"cmd": "setpoint", "target_c": 21.0}, seq=7, now=NOW)
    wire = json.dumps(dict(reversed(list(env.items()))), indent=3)
    parsed = json.loads(wire.replace("21.0", "21"))
    assert verify(key.public_key(), parsed)
    parsed["body"]["target_c"] = 21.5
    assert not verify(key.public_key(), parsed)


# ------------------------------------------------------------------ time and replays


@HYPO
@given(kind=st.sampled_from(["expired", "future", "too_long"]),
       amount=st.floats(1, 10**6))
def test_expired_future_and_long_lived_are_refused(node: Node, kind: str, amount: float) -> None:
    words: tuple[str, ...]
    if kind == "expired":
        env = node.envelope({"cmd": "resume"}, issued=NOW - 300 - amount, ttl=300)
        words = ("expired",)
    elif kind == "future":
        env = node.envelope({"cmd": "resume"}, issued=NOW + 300 + amount, ttl=300)
        words = ("future", "clock")
    else:
        env = node.envelope({"cmd": "resume"}, issued=NOW - 1, ttl=86400 + amount)
        words = ("longer than this node allows",)
    assert_refused(node, f"{PREFIX}/cmd/resume", json.dumps(env).encode(), *words)


def test_replayed_and_old_sequence_numbers_are_refused(node: Node) -> None:
    env = node.envelope({"cmd": "identify", "duration_s": 5}, seq=50_000_000)
    node.inject(f"{PREFIX}/cmd/identify", json.dumps(env).encode())
    commands, results = node.process()
    assert [c.name for c in commands] == ["identify"] and results[0].status is ResultStatus.OK
    assert_refused(node, f"{PREFIX}/cmd/identify", json.dumps(env).encode(), "replayed",
                   "50000000")
    older = node.envelope({"cmd": "identify", "duration_s": 5}, seq=49_999_999)
    assert_refused(node, f"{PREFIX}/cmd/identify", json.dumps(older).encode(), "replayed")


def test_home_assistant_values_are_validated(node: Node) -> None:
    assert_refused(node, f"{PREFIX}/ha/set/temperature", b"99", "target_c")
    assert_refused(node, f"{PREFIX}/ha/set/temperature", b"true", "not a temperature")
    assert_refused(node, f"{PREFIX}/ha/set/mode", b"cool", "heat, off, auto")
    node.inject(f"{PREFIX}/ha/set/mode", b"heat")
    commands, results = node.process()
    assert commands[0].source == "home_assistant" and results[0].state is not None
    assert results[0].state.mode is Mode.COMFORT
    node.inject(f"{PREFIX}/ha/set/mode", b"auto")
    node.process()


def test_a_failing_command_changes_nothing(node: Node) -> None:
    """Valid and signed, but the result would be an invalid config: refused as a whole."""
    before = node.snapshot()
    env = node.envelope({"cmd": "config", "patch": {
        "pid": {"kp": 2.0}, "thermostat": {"eco_c": 25.0}}})  # eco above comfort
    node.inject(f"{PREFIX}/cmd/config", json.dumps(env).encode())
    commands, results = node.process()
    assert len(commands) == 1 and results[0].status is ResultStatus.ERROR
    assert results[0].reason and "eco_c" in results[0].reason
    after = node.snapshot()
    assert after.pop("seqs") != before.pop("seqs")  # only the sequence number moved on
    assert after == before
    env = node.envelope({"cmd": "config", "patch": {"node": {"id": "evil"}}})
    node.inject(f"{PREFIX}/cmd/config", json.dumps(env).encode())
    _, results = node.process()
    assert results[0].reason and "not changeable by the fleet: node.id" in results[0].reason


def test_an_exception_in_a_callback_does_not_kill_anything(node: Node) -> None:
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise RuntimeError("parser bug")

    original = node.link.parse_inbound
    node.link.parse_inbound = broken  # type: ignore[method-assign]
    try:
        node.inject(f"{PREFIX}/cmd/resume", b"{}")  # must not raise into paho
    finally:
        node.link.parse_inbound = original  # type: ignore[method-assign]
    assert calls == 1 and node.link.stats.callback_errors == 1
    node.link.stats.callback_errors = 0
    env = node.envelope({"cmd": "resume"})
    node.inject(f"{PREFIX}/cmd/resume", json.dumps(env).encode())
    assert node.process()[1][0].status is ResultStatus.OK


# ------------------------------------------------------------------ canonical JSON, keys, CLI

# RFC 8785 appendix B: IEEE 754 doubles and the text JCS (ECMAScript) gives them
JCS_NUMBERS = [
    ("0000000000000000", "0"), ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"), ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"), ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"), ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"), ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"), ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"), ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"), ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), JCS_NUMBERS)
def test_canonical_numbers_follow_rfc8785(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical_json(value) == text.encode()


def test_canonical_objects_and_strings_follow_rfc8785() -> None:
    assert canonical_json({"b": [1, 2.0, None, True], "a": "\u20ac$\u000f\nA'B\"\\/"}) == (
        '{"a":"€$\\u000f\\nA\'B\\"\\\\/","b":[1,2,null,true]}'.encode()
    )
    assert canonical_json({"\u00e9": 1, "z": 2, "\U0001f600": 3, "\ufb01": 4}) == (
        '{"z":2,"é":1,"\U0001f600":3,"\ufb01":4}'.encode()  # UTF-16 order: surrogates first
    )
    with pytest.raises(ValueError, match="NaN"):
        canonical_json(float("nan"))


@given(_json_values(finite=True))
def test_canonical_json_is_stable_under_reparsing(value: Any) -> None:
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once


def test_keygen_and_sign_tools(tmp_path: Path) -> None:
    pair = keygen(tmp_path / "fleet.pem")
    assert os.stat(tmp_path / "fleet.pem").st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="exists"):
        keygen(tmp_path / "fleet.pem")
    key = load_private_key(tmp_path / "fleet.pem")
    assert public_key_b64(key.public_key()) == pair.public_b64
    assert key_id(public_key_from_text(pair.public_b64)) == pair.key_id
    assert 'public_key = "' + pair.public_b64 in pair.config_snippet("ops")
    env = sign_command(key, NODE, {"cmd": "setpoint", "target_c": 20}, seq=3, now=NOW)
    assert Envelope.model_validate_json(json.dumps(env)).seq == 3
    assert verify(key.public_key(), env) and sign(key, env) == env["sig"]
    with pytest.raises(ValueError):
        sign_command(key, NODE, {"cmd": "setpoint", "target_c": 99}, seq=3)


def test_qrad_fleet_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet_main(["keygen", "--out", str(tmp_path / "k.pem"), "--name", "ops"]) == 0
    snippet = capsys.readouterr().out
    assert "[[link.security.fleet_keys]]" in snippet and 'name = "ops"' in snippet
    assert fleet_main(["keygen", "--out", str(tmp_path / "k.pem")]) == 1
    assert "exists" in capsys.readouterr().err
    assert fleet_main(["sign", "--key", str(tmp_path / "k.pem"), "--node", NODE, "--cmd",
                       "override", "--body", '{"target_c": 22, "duration_s": 600}',
                       "--seq", "9"]) == 0
    env = json.loads(capsys.readouterr().out)
    pub = snippet.split('public_key = "')[1].split('"')[0]
    assert env["seq"] == 9 and verify(public_key_from_text(pub), env)
    assert fleet_main(["sign", "--key", str(tmp_path / "k.pem"), "--node", NODE, "--cmd",
                       "override", "--body", '{"target_c": 22}']) == 1
    assert "duration_s" in capsys.readouterr().err


# ------------------------------------------------------------------ the AsyncAPI document


def test_asyncapi_document_is_current() -> None:
    from qrad_agent.link.asyncapi import DOC_PATH, render

    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/asyncapi.yaml is out of date: run `qrad-agent asyncapi -o docs/asyncapi.yaml`")


def test_asyncapi_document_is_whole() -> None:
    """Every reference resolves, every operation names a channel message, every payload
    model of the contract is in it."""
    from qrad_agent.link.asyncapi import build

    doc = build()
    assert doc["asyncapi"] == "3.0.0"

    def resolve(ref: str) -> Any:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def refs(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)

    found = list(refs(doc))
    assert len(found) > 50
    for ref in found:
        resolve(ref)  # KeyError if dangling
    for name, op in doc["operations"].items():
        channel = resolve(op["channel"]["$ref"])
        for m in op["messages"]:
            assert m["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), name
            assert resolve(m["$ref"]) in channel["messages"].values()
    schemas = doc["components"]["schemas"]
    for model in ("Envelope", "CommandResult", "State", "Meta", "TelemetryBatch", "Event",
                  "StatusMessage", "SetpointBody", "ConfigBody"):
        assert model in schemas
    assert schemas["Envelope"]["properties"]["body"]["discriminator"]["propertyName"] == "cmd"


def test_asyncapi_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from qrad_agent.link.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "a.yaml"
    args = parser.parse_args(["asyncapi", "-o", str(out)])
    assert args.func(args) == 0
    assert args.func(parser.parse_args(["asyncapi", "--check", str(out)])) == 0
    out.write_text(out.read_text().replace("3.0.0", "2.6.0", 1))
    assert args.func(parser.parse_args(["asyncapi", "--check", str(out)])) == 1
    assert "out of date" in capsys.readouterr().err
