"""The fleet link: one MQTT 5 connection (paho-mqtt 2.x, callback API version 2).

Two threads, one owner of state:

- The *network thread* (started by :meth:`FleetLink.start`) connects, reconnects with
  exponential backoff and full jitter, runs paho's loop, parses inbound payloads and puts
  everything on a queue. On a fresh connection it also publishes the birth messages it has
  cached (``status`` online, the last ``meta``, ``state`` and Home Assistant discovery) and
  subscribes: those must follow the CONNACK at once, whatever the loop is doing. Every
  callback is guarded: an exception is logged and counted, never raised into paho.
- The *control loop* calls :meth:`FleetLink.poll` every turn. It drains the queue: verifies
  commands (signature, expiry, replay: ``link/security.py``), records sequence numbers,
  deletes acknowledged outbox rows, and publishes what is due. It gets back the commands to
  apply, and answers each with :meth:`FleetLink.reply`.

Delivery: telemetry samples, events and command results are committed to the outbox
(``store/outbox.py``) before they are published, and deleted on PUBACK. After a reconnect
what was stored meanwhile is replayed oldest first, events and results before telemetry,
at ``outbox.replay_bytes_per_s`` at most; replayed telemetry batches say
``historical: true``. Telemetry of one boot is always published in ``seq`` order: live
samples wait behind the backlog. Inbound commands are acknowledged (PUBACK, manual ack) only
after their sequence number is on disk.

Sessions: the first connect after a start is a clean start; reconnects resume the session
(MQTT 5 session expiry ``broker.session_expiry_s``), so commands sent during a short outage
still arrive, and the fleet's subscriptions on the node's messages are the broker's concern.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError

from qrad_agent import __version__
from qrad_agent.core.models import Mode
from qrad_agent.link.messages import (
    CommandBody,
    CommandName,
    CommandResult,
    Envelope,
    Event,
    EventKind,
    HaAction,
    HaMode,
    HaState,
    Meta,
    ModeBody,
    NodeStatus,
    ParseError,
    ResultStatus,
    SetpointBody,
    Severity,
    State,
    StatusMessage,
    TelemetrySample,
    Topics,
    describe,
    strict_json,
)
from qrad_agent.link.security import CommandVerifier, Refused
from qrad_agent.link.settings import LinkConfig
from qrad_agent.store.db import Database, StoreError
from qrad_agent.store.kv import KeyValue
from qrad_agent.store.outbox import Kind, Outbox, OutboxRow

log = logging.getLogger("qrad_agent.link")

_COMMAND_NAMES = frozenset(c.value for c in CommandName)
LOOP_TIMEOUT_S = 0.05  # the network thread's select timeout: bounds the PUBACK delay
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code
# job statuses nobody subscribed to: sent again, doubling, at most this far apart (well
# inside a lease: the dispatcher gives each lease a whole run again when it reconnects)
UNHEARD_RETRY_S = (1.0, 4.0)
MAX_REPLY_TOPIC = 512
MAX_CORRELATION = 256
REMEMBERED_COMMANDS = 256  # ids of accepted commands, to recognise a broker redelivery


@dataclass(frozen=True)
class Clock:
    """Wall clock for message timestamps and outbox ages; monotonic clock for the telemetry
    period. Injected so a simulated radiator-day runs in seconds. Network pacing (backoff,
    replay rate) always uses real time: the broker lives in real time."""

    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class Command:
    """A command that passed every check; apply it and answer with :meth:`FleetLink.reply`."""

    body: CommandBody
    id: str
    source: str  # "fleet", "broadcast" or "home_assistant"
    key: str  # the fleet key's name, "unsigned" or "home_assistant"
    reply_topic: str
    correlation: bytes | None = None
    envelope: Envelope | None = None

    @property
    def name(self) -> str:
        return self.body.cmd


@dataclass
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    last_error: str = ""
    received: int = 0
    accepted: int = 0
    refused: int = 0
    callback_errors: int = 0
    published: int = 0
    acked: int = 0
    rejected_by_broker: int = 0
    unheard: int = 0  # acks of job statuses that no subscriber got (kept, sent again)
    replayed_batches: int = 0
    refusals: list[str] = field(default_factory=list)  # the last few reasons, for people


# ------------------------------------------------------------------ queue items


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    gen: int  # connection generation: acks for an older connection are not sent
    mid: int
    qos: int
    response_topic: str | None
    correlation: bytes | None
    dup: bool = False  # MQTT DUP flag: the broker may be sending it a second time
    parsed: Any = None  # the JSON value, when it parsed
    envelope: Envelope | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Acked:
    mid: int
    failure: str | None
    unheard: bool = False  # PUBACK "No matching subscribers": nobody got it


@dataclass(frozen=True)
class _Connected:
    gen: int
    session_present: bool


@dataclass(frozen=True)
class _Disconnected:
    reason: str


_QueueItem = _Inbound | _Acked | _Connected | _Disconnected

NodeHandler = Callable[[str, bytes], None]


class _HandlerFailed(Exception):
    """A node-topic handler raised: the message stays unacknowledged."""


class _Bucket:
    """Token bucket in bytes over real time; holds up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def available(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def take(self, n: int) -> bool:
        if self.available() >= n:
            self.tokens -= n
            return True
        return False


def backoff_delay(failures: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max_s, min_s * 2**failures)]. Spreads a fleet's
    reconnects over the whole window instead of synchronising them."""
    cap = min(max_s, min_s * (2.0 ** min(failures, 32)))
    return rng.uniform(0.0, cap)


class FleetLink:
    """The node's side of the MQTT contract. One per process: constructing it counts a boot.

    ``clock`` gives message timestamps and the telemetry period (the simulator's clock in a
    simulation); ``wake`` is called from the network thread whenever something was queued,
    so a control loop that sleeps can poll at once (command latency); ``simulated`` makes
    unsigned commands acceptable unless the config says otherwise.
    """

    def __init__(
        self,
        cfg: LinkConfig,
        node_id: str,
        db: Database,
        *,
        simulated: bool = False,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        version: str = __version__,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.clock = clock or Clock()
        self.rng = rng or random.Random()
        self.version = version
        self.wake = wake
        self.topics = Topics(cfg.topics.prefix, node_id, cfg.home_assistant.discovery_prefix)
        self.kv = KeyValue(db)
        self.outbox = Outbox(db, cfg.outbox.max_bytes, cfg.outbox.max_age_s)
        self.verifier = CommandVerifier(cfg.security, node_id, self.kv, simulated=simulated)
        self.boot = self.kv.bump_boot()
        self.stats = LinkStats()

        self._inbox: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        self._birth_lock = threading.Lock()
        self._meta: bytes | None = None
        self._meta_key: bytes | None = None
        self._state: bytes | None = None
        self._state_key: bytes | None = None
        self._state_obj: State | None = None
        self._ha_configs: list[tuple[str, bytes]] = []
        self._gen = 0  # written by the network thread only
        self._connected = False  # the control loop's view, from the queue
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket_open = False
        self._failures = 0
        self._refused = False  # the broker refused the current attempt (CONNACK failure)
        self._tel_seq = 0
        self._event_seq = 0
        self._ha_cmd_seq = 0
        self._inflight: dict[int, list[int]] = {}  # paho mid -> outbox row ids
        self._cursor_other = 0  # highest event/result/job row id handed to paho
        self._cursor_tel = 0  # same for telemetry
        # Job statuses the broker acknowledged with "No matching subscribers" (no dispatcher
        # was subscribed, e.g. it was still reconnecting after a broker restart): kept in the
        # outbox and sent again from row ``_resend_from`` at ``_resend_at`` (real time). A
        # status is delivered only when a dispatcher got it: the jobs bridge renews leases
        # and forgets results on that, and a result nobody heard made the job run again.
        self._job_rows: set[int] = set()  # JOB row ids handed to paho
        self._resend_from: int | None = None
        self._resend_at = 0.0
        self._unheard_streak = 0
        self._backlog_mark = 0  # rows up to this id were stored before this connection
        self._next_live_at = self.clock.mono() + cfg.telemetry.period_s
        self._ha_dirty = False
        self._last_sample: TelemetrySample | None = None
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._handlers: dict[str, NodeHandler] = {}  # topic filter -> handler
        self._bucket = _Bucket(
            cfg.outbox.replay_bytes_per_s,
            max(cfg.outbox.batch_bytes, cfg.outbox.replay_bytes_per_s),
        )
        self._client = self._make_client()
        if cfg.home_assistant.enabled:
            self._ha_configs = self._ha_discovery()

    # ================================================================ lifecycle

    def start(self) -> None:
        """Start the network thread; it connects (and keeps reconnecting) on its own."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="qrad-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained), disconnect cleanly (so the broker drops the will),
        stop the network thread. Unsent messages stay in the outbox for the next start."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        if self._client.is_connected():
            try:
                info = self._client.publish(
                    self.topics.status, self._status(NodeStatus.OFFLINE), qos=1, retain=True
                )
                info.wait_for_publish(timeout=max(0.1, timeout / 2))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline status: %s", exc)
        self._stopping.set()
        try:
            self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0))
        except Exception as exc:  # a socket already gone is fine: we are leaving
            log.debug("disconnect: %s", exc)
        self._thread.join(max(0.1, deadline - time.monotonic()))
        self._thread = None
        self._connected = False

    def is_connected(self) -> bool:
        return self._client.is_connected()

    @property
    def connected(self) -> bool:
        """Connected as far as the control loop knows (after :meth:`poll` saw the CONNACK)."""
        return self._connected

    # ================================================================ control-loop API

    def poll(self) -> list[Command]:
        """Drain what the network thread queued; publish what is due. Control loop only."""
        commands: list[Command] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                if isinstance(item, _Inbound):
                    cmd = self._inbound(item)
                    if cmd is not None:
                        commands.append(cmd)
                elif isinstance(item, _Acked):
                    self._acked(item)
                elif isinstance(item, _Connected):
                    self._on_connected_ctl(item)
                else:
                    self._connected = False
            except Exception:  # one bad item must not stop the loop or lose the others
                self.stats.callback_errors += 1
                log.exception("failed to handle %s", type(item).__name__)
        self.flush()
        return commands

    def reply(self, cmd: Command, result: CommandResult) -> None:
        """Send ``result`` to the command's ResponseTopic (with its CorrelationData) or to
        ``cmd/result``. Goes through the outbox: results are never dropped."""
        self._put_result(result, cmd.reply_topic, cmd.correlation)

    def result(
        self, cmd: Command | None, status: ResultStatus, reason: str | None = None,
        state: State | None = None,
    ) -> CommandResult:
        return CommandResult(
            node=self.node_id,
            id=cmd.id if cmd else None,
            cmd=cmd.name if cmd else None,
            status=status,
            reason=reason,
            at=self.clock.wall(),
            state=state,
        )

    def set_meta(self, meta: Meta) -> None:
        """Retained ``meta``: published now if it changed, and again after every reconnect."""
        data = meta.to_json()
        key = meta.model_copy(update={"at": 0.0}).to_json()
        with self._birth_lock:
            if self._meta is not None and key == self._meta_key:
                return
            self._meta, self._meta_key = data, key
        self._publish_retained(self.topics.meta, data)

    def set_state(self, state: State) -> None:
        """Retained ``state``: published when anything but its timestamp changed."""
        key = state.model_copy(update={"at": 0.0}).to_json()
        if key == self._state_key:
            return
        data = state.to_json()
        with self._birth_lock:
            self._state, self._state_key, self._state_obj = data, key, state
        self._ha_dirty = True
        self._publish_retained(self.topics.state, data)

    def add_sample(self, sample: TelemetrySample) -> int:
        """Store one telemetry sample (numbered here, per boot); returns its seq."""
        seq = self._tel_seq
        self._tel_seq += 1
        s = sample.model_copy(update={"seq": seq})
        self._last_sample = s
        self.outbox.put(
            Kind.TELEMETRY, self.topics.telemetry, s.to_json(), created=s.at, boot=self.boot,
            seq=seq,
        )
        return seq

    def event(
        self,
        kind: EventKind,
        message: str,
        severity: Severity = Severity.INFO,
        data: dict[str, str | int | float | bool | None] | None = None,
    ) -> Event:
        """Store an event (never dropped) and publish it as soon as possible."""
        ev = Event(
            node=self.node_id, boot=self.boot, seq=self._event_seq, at=self.clock.wall(),
            kind=kind, severity=severity, message=message[:500], data=data or {},
        )
        self._event_seq += 1
        self.outbox.put(
            Kind.EVENT, self.topics.events, ev.to_json(), created=ev.at, boot=self.boot,
            seq=ev.seq,
        )
        self.flush()
        return ev

    def subscribe_node(self, leaf: str, handler: NodeHandler) -> None:
        """Before :meth:`start`: messages on ``{prefix}/nodes/{node}/{leaf}`` (a topic filter,
        e.g. ``work/assign``) go to ``handler(topic, payload)`` in :meth:`poll`, in the
        control loop. The PUBACK is sent only after the handler returns, so what it commits
        (a job in the ledger) is on disk first; if it raises, the message stays
        unacknowledged and the broker sends it again after the next reconnect."""
        self._handlers[self.topics.node_topic(leaf)] = handler

    def send_stored(self, kind: Kind, leaf: str, payload: bytes) -> int | None:
        """Store-and-forward ``payload`` on ``{prefix}/nodes/{node}/{leaf}`` (for job
        reports: ``Kind.JOB``, never dropped). Returns the outbox row id, or None when it
        could not be written (telemetry is then dropped; other kinds are held)."""
        rid = self.outbox.put(Kind(kind), self.topics.node_topic(leaf), payload,
                              created=self.clock.wall(), boot=self.boot)
        self.flush()
        return rid

    def publish_now(self, leaf: str, payload: bytes, *, expiry_s: int | None = None) -> bool:
        """Publish on ``{prefix}/nodes/{node}/{leaf}`` now (QoS 1), not stored: for what is
        worthless later, such as a work request, which ``expiry_s`` (MQTT 5 message expiry)
        keeps the broker from delivering late. False when not connected."""
        if not self._connected or not self._client.is_connected():
            return False
        props = None
        if expiry_s is not None:
            props = _properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry_s
        try:
            info = self._client.publish(self.topics.node_topic(leaf), payload, qos=1,
                                        properties=props)
        except (ValueError, RuntimeError) as exc:
            log.error("cannot publish on %s: %s", leaf, exc)
            return False
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def flush(self) -> None:
        """Publish what is due: held rows to disk, then events/results, then telemetry.
        A database that cannot be read only delays publishing; it never raises."""
        try:
            if self.outbox.held:
                self.outbox.retry_held()
            if not self._connected or not self._client.is_connected():
                return
            if self._resend_from is not None and time.monotonic() >= self._resend_at:
                self._cursor_other = min(self._cursor_other, self._resend_from - 1)
                self._resend_from = None
            self._flush_priority()
            self._flush_telemetry()
            self._flush_ha_state()
        except StoreError as exc:
            log.warning("outbox not flushed this time: %s", exc)

    # ================================================================ inbound (control loop)

    def _inbound(self, item: _Inbound) -> Command | None:
        self.stats.received += 1
        ack = True
        try:
            return self._handle(item)
        except _HandlerFailed:
            ack = False
            return None
        finally:
            if ack and item.qos > 0:
                self._acks.put((item.gen, item.mid, item.qos))

    def _handle(self, item: _Inbound) -> Command | None:
        where = self.topics.classify(item.topic)
        if where is None:
            for pattern, handler in self._handlers.items():
                if mqtt.topic_matches_sub(pattern, item.topic):
                    try:
                        handler(item.topic, item.payload)
                    except Exception as exc:
                        self.stats.callback_errors += 1
                        log.exception("handler for %s failed; the message stays "
                                      "unacknowledged", item.topic)
                        raise _HandlerFailed from exc
                    return None
            log.debug("ignoring a message on %s", item.topic)
            return None
        kind, name = where
        if kind == "ha_status":
            if item.payload.strip() == b"online" and self.cfg.home_assistant.enabled:
                self._publish_ha_discovery()
            return None
        if kind == "node" and name == "result":
            return None  # results are ours or another requester's: never answer them
        reply_topic = self._reply_topic(item.response_topic)
        if kind == "ha_set":
            return self._ha_command(name, item)
        guessed_id = _guess_id(item.parsed)
        if name not in _COMMAND_NAMES:
            return self._refuse(
                item, reply_topic, guessed_id, None,
                f"unknown command {name[:40]!r}; allowed: "
                f"{', '.join(c.value for c in CommandName)}",
            )
        if item.error is not None or item.envelope is None:
            return self._refuse(item, reply_topic, guessed_id, name, item.error or "unreadable")
        env = item.envelope
        if item.dup and env.id in self._recent:
            # the broker resent it because our PUBACK did not reach it (a reconnect in
            # between); it was applied and answered. A replay without DUP is refused below.
            log.info("command %s delivered again by the broker; already handled", env.id)
            return None
        assert isinstance(item.parsed, dict)
        try:
            accepted = self.verifier.check(
                item.parsed, env, broadcast=kind == "fleet", topic_command=name,
                now=self.clock.wall(),
            )
        except Refused as exc:
            return self._refuse(item, reply_topic, env.id, name, str(exc))
        self._remember(env.id)
        self.stats.accepted += 1
        return Command(
            body=env.body, id=env.id, source="broadcast" if kind == "fleet" else "fleet",
            key=accepted.key, reply_topic=reply_topic, correlation=item.correlation,
            envelope=env,
        )

    def _ha_command(self, what: str, item: _Inbound) -> Command | None:
        self._ha_cmd_seq += 1
        cid = f"ha-{self.boot}-{self._ha_cmd_seq}"
        reply = self.topics.cmd_result
        ha = self.cfg.home_assistant
        if not ha.enabled or not ha.trust_commands:
            return self._refuse(
                item, reply, cid, what[:40],
                "Home Assistant commands are not accepted on this node "
                "(link.home_assistant.trust_commands = false): they are unsigned",
            )
        if item.error is not None:
            return self._refuse(item, reply, cid, what[:40], item.error)
        text = item.payload.decode("utf-8", "replace").strip()
        body: CommandBody
        try:
            if what == "temperature":
                value = strict_json(item.payload)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ParseError(f"{text[:40]!r} is not a temperature; send a number in °C")
                body = SetpointBody.model_validate_json(
                    json.dumps({"cmd": "setpoint", "target_c": value})
                )
            elif what == "mode":
                modes = {HaMode.HEAT.value: Mode.COMFORT, HaMode.OFF.value: Mode.OFF,
                         HaMode.AUTO.value: Mode.AUTO}
                if text not in modes:
                    raise ParseError(
                        f"mode {text[:40]!r} is not one Home Assistant may set; allowed: "
                        f"{', '.join(modes)}"
                    )
                body = ModeBody(cmd="mode", mode=modes[text])
            else:
                raise ParseError(
                    f"unknown Home Assistant command {what[:40]!r}; allowed: temperature, mode"
                )
        except ValidationError as exc:
            return self._refuse(item, reply, cid, what[:40], describe(exc))
        except ParseError as exc:
            return self._refuse(item, reply, cid, what[:40], str(exc))
        self.stats.accepted += 1
        return Command(body=body, id=cid, source="home_assistant", key="home_assistant",
                       reply_topic=reply)

    def _refuse(
        self, item: _Inbound, reply_topic: str, cid: str | None, name: str | None, reason: str
    ) -> Command | None:
        self.stats.refused += 1
        self.stats.refusals = [*self.stats.refusals[-9:], reason]
        log.warning("refused a command on %s: %s", item.topic, reason)
        result = CommandResult(
            node=self.node_id, id=cid, cmd=name, status=ResultStatus.ERROR,
            reason=f"refused: {reason}"[:500], at=self.clock.wall(),
        )
        self._put_result(result, reply_topic, item.correlation)
        return None

    def _reply_topic(self, requested: str | None) -> str:
        if requested and len(requested) <= MAX_REPLY_TOPIC and "+" not in requested \
                and "#" not in requested and "\x00" not in requested \
                and any(requested.startswith(p) for p in self.cfg.topics.reply_prefixes):
            return requested
        if requested:
            log.info("ResponseTopic %r is outside %s; answering on %s", requested[:80],
                     self.cfg.topics.reply_prefixes, self.topics.cmd_result)
        return self.topics.cmd_result

    def _remember(self, cid: str) -> None:
        self._recent[cid] = None
        while len(self._recent) > REMEMBERED_COMMANDS:
            self._recent.popitem(last=False)

    # ================================================================ outbound (control loop)

    def _put_result(self, result: CommandResult, topic: str, correlation: bytes | None) -> None:
        self.outbox.put(
            Kind.RESULT, topic, result.to_json(), created=result.at, boot=self.boot,
            correlation=correlation,
        )
        self.flush()

    def _room(self) -> int:
        return self.cfg.outbox.max_inflight - len(self._inflight)

    def _send(self, topic: str, payload: bytes, ids: list[int],
              correlation: bytes | None = None) -> bool:
        props = None
        if correlation is not None:
            props = _properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        try:
            info = self._client.publish(topic, payload, qos=1, retain=False, properties=props)
        except (ValueError, RuntimeError) as exc:
            log.error("cannot publish on %s: %s", topic, exc)
            return False
        # NO_CONN: the connection dropped just now; paho keeps the message and sends it after
        # the reconnect, so it is in flight all the same
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish on %s not queued: %s", topic, mqtt.error_string(info.rc))
            return False
        self._inflight[info.mid] = ids
        self.stats.published += 1
        return True

    def _flush_priority(self) -> None:
        kinds = (Kind.EVENT, Kind.RESULT, Kind.JOB)
        while self._room() > 0:
            rows = self.outbox.pending(kinds, self._cursor_other, self._room())
            if not rows:
                return
            flying = {i for ids in self._inflight.values() for i in ids}
            for row in rows:
                if row.id in flying:  # sent again from before it (unheard): not twice
                    self._cursor_other = row.id
                    continue
                if row.id <= self._backlog_mark and not self._bucket.take(len(row.payload)):
                    return
                if not self._send(row.topic, row.payload, [row.id], row.correlation):
                    return
                if row.kind is Kind.JOB:
                    self._job_rows.add(row.id)
                self._cursor_other = row.id

    def _flush_telemetry(self) -> None:
        now = self.clock.mono()
        batch_bytes = self.cfg.outbox.batch_bytes
        sent_live = False
        rows_per_batch = max(64, batch_bytes // 100)  # samples are a few hundred bytes
        while self._room() > 0:
            if self._cursor_tel < self._backlog_mark and self._bucket.available() < batch_bytes:
                break  # replaying and the rate says wait: do not even read the rows
            rows = self.outbox.pending((Kind.TELEMETRY,), self._cursor_tel, rows_per_batch)
            if not rows:
                break
            historical = rows[0].id <= self._backlog_mark
            group: list[OutboxRow] = []
            size = 0
            full = False
            for r in rows:
                if r.boot != rows[0].boot or (r.id <= self._backlog_mark) != historical:
                    full = True
                    break
                if group and size + len(r.payload) + 1 > batch_bytes:
                    full = True
                    break
                group.append(r)
                size += len(r.payload) + 1
            if not historical and now < self._next_live_at and not full:
                break  # live samples leave once per telemetry period
            if historical and not self._bucket.take(size):
                break
            payload = b"".join((
                b'{"v":1,"node":', json.dumps(self.node_id).encode(), b',"boot":',
                str(group[0].boot).encode(), b',"historical":',
                b"true" if historical else b"false", b',"samples":[',
                b",".join(r.payload for r in group), b"]}",
            ))
            if not self._send(self.topics.telemetry, payload, [r.id for r in group]):
                break
            self._cursor_tel = group[-1].id
            if historical:
                self.stats.replayed_batches += 1
            else:
                sent_live = True
        if sent_live or (now >= self._next_live_at):
            self._next_live_at = now + self.cfg.telemetry.period_s
            if self.cfg.home_assistant.enabled:
                self._ha_dirty = True

    def _acked(self, item: _Acked) -> None:
        ids = self._inflight.pop(item.mid, None)
        if ids is None:
            return  # a retained message (status, meta, state): nothing stored
        self.stats.acked += 1
        if item.failure is not None:
            self.stats.rejected_by_broker += 1
            log.error("the broker refused %d stored message(s): %s; they are dropped "
                      "(check the ACL for this node)", len(ids), item.failure)
        jobs = [i for i in ids if i in self._job_rows]
        self._job_rows.difference_update(jobs)
        if jobs and item.unheard:
            self._unheard(jobs)
            ids = [i for i in ids if i not in jobs]
        elif jobs:
            self._unheard_streak = 0
        self.outbox.delete(ids)

    def _unheard(self, ids: list[int]) -> None:
        """Job statuses no dispatcher got (no subscriber): kept, sent again later."""
        self.stats.unheard += 1
        lo, hi = UNHEARD_RETRY_S
        delay = min(hi, lo * 2.0 ** min(self._unheard_streak, 16))
        self._unheard_streak += 1
        first = min(ids)
        self._resend_from = first if self._resend_from is None else min(self._resend_from,
                                                                         first)
        self._resend_at = time.monotonic() + delay
        log.log(logging.WARNING if self._unheard_streak == 1 else logging.DEBUG,
                "no dispatcher is subscribed to job statuses; %d kept, sent again in %.0f s",
                len(ids), delay)

    def _on_connected_ctl(self, item: _Connected) -> None:
        self._connected = True
        self._backlog_mark = self.outbox.max_id()
        log.info("connected to %s:%d (session %s)", self.cfg.broker.host,
                 self.cfg.broker.effective_port(),
                 "resumed" if item.session_present else "new")

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        if not self._client.is_connected():
            return  # the network thread publishes the cached value after the next CONNACK
        try:
            self._client.publish(topic, payload, qos=1, retain=True)
        except (ValueError, RuntimeError) as exc:
            log.error("cannot publish on %s: %s", topic, exc)

    # ================================================================ Home Assistant

    def _ha_discovery(self) -> list[tuple[str, bytes]]:
        t = self.topics
        ha = self.cfg.home_assistant
        if "." in self.node_id:
            log.warning("node id %r contains '.', which Home Assistant does not accept in "
                        "discovery topics: the entities will not appear", self.node_id)
        obj = "qrad_" + self.node_id.replace(".", "_")
        device = {
            "identifiers": [obj],
            "name": ha.name or self.node_id,
            "manufacturer": "qrad-agent",
            "model": "compute radiator",
            "sw_version": self.version,
        }
        availability = [{
            "topic": t.status,
            "value_template": "{{ 'online' if value_json.status == 'online' else 'offline' }}",
        }]
        climate: dict[str, Any] = {
            "name": None,
            "unique_id": f"{obj}_climate",
            "device": device,
            "availability": availability,
            "qos": 1,
            "modes": [m.value for m in HaMode],
            "temperature_unit": "C",
            "precision": 0.1,
            "temp_step": 0.5,
            "min_temp": 5,
            "max_temp": 28,
            "current_temperature_topic": t.ha_state,
            "current_temperature_template": "{{ value_json.room_c }}",
            "temperature_state_topic": t.ha_state,
            "temperature_state_template": "{{ value_json.target_c }}",
            "mode_state_topic": t.ha_state,
            "mode_state_template": "{{ value_json.mode }}",
            "action_topic": t.ha_state,
            "action_template": "{{ value_json.action }}",
        }
        if ha.trust_commands:
            climate["temperature_command_topic"] = t.ha_set("temperature")
            climate["mode_command_topic"] = t.ha_set("mode")
        configs = [(t.ha_discovery("climate", "thermostat"), climate)]
        sensors = [
            ("humidity", "Humidity", "humidity", "%", "measurement", "humidity_pct"),
            ("co2", "CO2", "carbon_dioxide", "ppm", "measurement", "co2_ppm"),
            ("power", "Power", "power", "W", "measurement", "power_w"),
            ("energy", "Energy", "energy", "kWh", "total_increasing", "energy_kwh"),
        ]
        for object_id, name, device_class, unit, state_class, key in sensors:
            configs.append((t.ha_discovery("sensor", object_id), {
                "name": name,
                "unique_id": f"{obj}_{object_id}",
                "device": device,
                "availability": availability,
                "qos": 1,
                "state_topic": t.ha_state,
                "value_template": f"{{{{ value_json.{key} }}}}",
                "device_class": device_class,
                "unit_of_measurement": unit,
                "state_class": state_class,
            }))
        return [(topic, json.dumps(payload, sort_keys=True).encode())
                for topic, payload in configs]

    def ha_discovery_messages(self) -> list[tuple[str, bytes]]:
        return list(self._ha_configs)

    def _publish_ha_discovery(self) -> None:
        for topic, payload in self._ha_configs:
            self._publish_retained(topic, payload)
        self._ha_dirty = True

    def _flush_ha_state(self) -> None:
        if not self.cfg.home_assistant.enabled or not self._ha_dirty:
            return
        state = self._state_obj
        if state is None:
            return
        self._ha_dirty = False
        self._publish_retained(self.topics.ha_state, self.ha_state(state).to_json())

    def ha_state(self, state: State) -> HaState:
        s = self._last_sample
        if state.mode is Mode.OFF:
            mode, action = HaMode.OFF, HaAction.OFF
        else:
            mode = HaMode.AUTO if state.mode is Mode.AUTO else HaMode.HEAT
            heating = s is not None and s.plan is not None and s.plan.slots > 0 \
                and s.plan.quota > 0 and (s.demand or 0.0) > 0
            action = HaAction.HEATING if heating else HaAction.IDLE
        return HaState(
            room_c=s.room_c if s else None,
            target_c=state.target_c,
            mode=mode,
            action=action,
            humidity_pct=s.humidity_pct if s else None,
            co2_ppm=s.co2_ppm if s else None,
            power_w=s.power_w if s else None,
            energy_kwh=round(s.energy_wh / 1000.0, 4) if s and s.energy_wh is not None else None,
        )

    # ================================================================ the network thread

    def _status(self, status: NodeStatus) -> bytes:
        return StatusMessage(
            node=self.node_id, status=status, boot=self.boot, at=self.clock.wall(),
            version=self.version,
        ).to_json()

    def _make_client(self) -> mqtt.Client:
        b = self.cfg.broker
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.node_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        c.suppress_exceptions = True
        c.connect_timeout = b.connect_timeout_s
        # room for our window plus the retained messages of a birth, so paho never queues
        # behind its own limit (our window is the only flow control)
        c.max_inflight_messages_set(self.cfg.outbox.max_inflight + 16)
        c.max_queued_messages_set(0)
        if b.tls.enabled:
            ctx = ssl.create_default_context(
                cafile=str(b.tls.ca_file) if b.tls.ca_file else None
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if b.tls.cert_file is not None and b.tls.key_file is not None:
                ctx.load_cert_chain(str(b.tls.cert_file), str(b.tls.key_file))
            c.tls_set_context(ctx)
        if b.auth.username is not None:
            c.username_pw_set(b.auth.username, b.auth.read_password())
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_subscribe = self._cb_subscribe
        c.on_socket_open = self._cb_socket_open
        return c

    def _cb_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Commands and their results are small and latency matters (a person is waiting):
        # without TCP_NODELAY a second small packet waits for the delayed ACK of the first
        with self._guard("socket open"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _set_will(self) -> None:
        props = _properties(PacketTypes.WILLMESSAGE)
        if self.cfg.broker.will_delay_s:
            props.WillDelayInterval = self.cfg.broker.will_delay_s
        self._client.will_set(
            self.topics.status, self._status(NodeStatus.LOST), qos=1, retain=True,
            properties=props,
        )

    def _run(self) -> None:
        b = self.cfg.broker
        first = True
        while True:
            if not self._socket_open:
                if self._stopping.is_set():
                    break
                if not first:
                    delay = backoff_delay(self._failures, b.reconnect_min_s, b.reconnect_max_s,
                                          self.rng)
                    self._failures += 1
                    if self._stopping.wait(delay):
                        break
                self._refused = False
                try:
                    self._set_will()
                    if first:
                        props = _properties(PacketTypes.CONNECT)
                        props.SessionExpiryInterval = b.session_expiry_s
                        self._client.connect(
                            b.host, b.effective_port(), keepalive=b.keepalive_s,
                            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props,
                        )
                    else:
                        self._client.reconnect()
                    self._socket_open = True
                except Exception as exc:  # refused, unreachable, TLS failure: try again later
                    self.stats.connect_failures += 1
                    self.stats.last_error = f"cannot connect to {b.host}:{b.effective_port()}: " \
                        f"{exc}"
                    log.log(logging.WARNING if self._failures < 3 else logging.DEBUG,
                            "%s", self.stats.last_error)
                finally:
                    first = False
                continue
            try:
                rc = self._client.loop(timeout=LOOP_TIMEOUT_S)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("the MQTT loop failed; reconnecting")
                rc = MQTTErrorCode.MQTT_ERR_UNKNOWN
            self._send_acks()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._socket_open = False
                if not self._stopping.is_set() and not self._refused:
                    # (a refused CONNACK already said why; the closed socket adds nothing)
                    self.stats.last_error = f"connection lost: {mqtt.error_string(rc)}"
        self._socket_open = False

    def _send_acks(self) -> None:
        while True:
            try:
                gen, mid, qos = self._acks.get_nowait()
            except queue.Empty:
                return
            if gen == self._gen:  # after a reconnect the broker redelivers instead
                try:
                    self._client.ack(mid, qos)
                except Exception as exc:
                    log.debug("ack %d: %s", mid, exc)

    def _enqueue(self, item: _QueueItem) -> None:
        self._inbox.put(item)
        if self.wake is not None:
            try:
                self.wake()
            except Exception:
                log.exception("the wake-up hook failed")

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception:
            self.stats.callback_errors += 1
            log.exception("error in the MQTT %s callback (ignored)", what)

    def _cb_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        with self._guard("connect"):
            if reason.is_failure:
                self._refused = True
                self.stats.connect_failures += 1
                self.stats.last_error = f"the broker refused the connection: {reason}"
                log.error("%s (node id %s)", self.stats.last_error, self.node_id)
                return
            self._gen += 1
            self._failures = 0
            self.stats.connects += 1
            opts = SubscribeOptions(qos=1, noLocal=True)
            subs = [(self.topics.cmd_filter, opts), (self.topics.fleet_cmd_filter, opts)]
            if self.cfg.home_assistant.enabled:
                subs.append((self.topics.ha_status, SubscribeOptions(qos=1)))
                subs.append((self.topics.ha_set_filter, opts))
            subs.extend((pattern, opts) for pattern in self._handlers)
            client.subscribe(subs)
            client.publish(self.topics.status, self._status(NodeStatus.ONLINE), qos=1,
                           retain=True)
            with self._birth_lock:
                births = [(self.topics.meta, self._meta), (self.topics.state, self._state)]
            births += list(self._ha_configs)
            for topic, payload in births:
                if payload is not None:
                    client.publish(topic, payload, qos=1, retain=True)
            self._enqueue(_Connected(self._gen, flags.session_present))

    def _cb_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        with self._guard("disconnect"):
            self.stats.disconnects += 1
            if not self._stopping.is_set():
                log.warning("disconnected from the broker: %s", reason)
            self._enqueue(_Disconnected(str(reason)))

    def _cb_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties) -> None:
        with self._guard("publish"):
            self._enqueue(_Acked(mid, str(reason) if reason.is_failure else None,
                                 unheard=reason.value == NO_MATCHING_SUBSCRIBERS))

    def _cb_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        with self._guard("subscribe"):
            for r in reasons:
                if r.is_failure:
                    self.stats.last_error = f"a subscription was refused by the broker: {r}"
                    log.error("%s; check the ACL for node %s", self.stats.last_error,
                              self.node_id)

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._guard("message"):
            self._enqueue(self.parse_inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos,
                                             msg.properties))

    def parse_inbound(self, topic: str, payload: bytes, mid: int, qos: int,
                      properties: Properties | None) -> _Inbound:
        """What the network thread does with a message: size check, JSON, envelope model.
        No state is read or written here."""
        response_topic = getattr(properties, "ResponseTopic", None) if properties else None
        correlation = getattr(properties, "CorrelationData", None) if properties else None
        if not isinstance(response_topic, str):
            response_topic = None
        if not isinstance(correlation, bytes | bytearray) or len(correlation) > MAX_CORRELATION:
            correlation = None
        base = _Inbound(
            topic, payload, self._gen, mid, qos, response_topic,
            bytes(correlation) if correlation is not None else None,
        )
        limit = self.cfg.security.max_command_bytes
        if len(payload) > limit:
            return replace(base, error=f"oversized: {len(payload)} bytes, the limit is {limit} "
                                       "(link.security.max_command_bytes)")
        where = self.topics.classify(topic)
        if where is None or where[0] not in ("node", "fleet"):
            return base
        try:
            parsed = strict_json(payload)
        except ParseError as exc:
            return replace(base, error=str(exc))
        if not isinstance(parsed, dict):
            return replace(base, parsed=parsed, error="the payload must be a JSON object (an "
                           f"envelope), not {type(parsed).__name__}")
        try:
            env = Envelope.model_validate_json(payload)
        except ValidationError as exc:
            return replace(base, parsed=parsed,
                           error=f"not a valid command envelope: {describe(exc)}")
        return replace(base, parsed=parsed, envelope=env)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _guess_id(parsed: Any) -> str | None:
    if isinstance(parsed, dict):
        cid = parsed.get("id")
        if isinstance(cid, str) and 0 < len(cid) <= 64:
            return cid
    return None


def python_version() -> str:
    return ".".join(str(p) for p in sys.version_info[:3])
