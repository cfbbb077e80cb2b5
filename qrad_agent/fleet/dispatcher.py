"""The reference dispatcher: answers radiators' work requests from a SQLite job queue.

One process (``qrad-fleet dispatcher``), two threads: paho's network thread only queues what
arrives; the dispatcher thread owns the queue (``fleet/queue.py``) and does everything else,
so no lock guards the database.

- ``{node}/work/request``: requests that arrived together are placed together
  (``placement.place``: high priority to the radiators wanting most heat); each node gets one
  signed ``assign`` envelope on its ``work/assign`` with its jobs and leases, or an empty one
  with ``retry_after_s`` so it does not ask again at once.
- ``{node}/jobs/{job}/status``: applied to the job (renew the lease, done, requeue); a
  success that voids a lease held elsewhere sends that radiator a signed ``cancel``.
- ``{node}/status``: ``lost`` (the node's will) is counted, and requeues nothing: the
  will says the broker lost the connection, not that the radiator stopped its jobs. It
  kills them only when its own lease lapses (the lease runs from the last status the broker
  took, so it ends before the one kept here), so the leases decide when a job may run
  elsewhere (docs/decisions/0014-chaos.md).
- every ``tick_s``: leases that lapsed are requeued; none lapses while the dispatcher is
  disconnected, and each runs whole again from a reconnect (``Dispatcher.__init__``).

Several dispatchers can share the load: they subscribe through the MQTT 5 shared
subscription group ``$share/{group}/...`` (each message goes to one of them) and share the
queue file (each lease is a guarded UPDATE, so no job is leased twice). Give each its own
signing key: a radiator refuses an envelope whose ``seq`` is not above the last it accepted
from that key, and two signers' clocks interleave.

The node id comes from the topic, never from the payload: the broker's ACL lets a node
publish only below its own id, so the topic is what was authenticated.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError

from qrad_agent.fleet.placement import FleetState, Request, Transition, Verdict
from qrad_agent.fleet.queue import Assignment, FleetQueue
from qrad_agent.jobs.spec import JobStatus, WorkRequestMessage
from qrad_agent.link.messages import NodeStatus, StatusMessage, strict_json
from qrad_agent.link.security import make_envelope

log = logging.getLogger(__name__)

PREFIX = "qrad/v1"
_LISTENING, _DEAF = "$connected", "$disconnected"  # on the inbox; no topic is like them
# The broker keeps the dispatcher's session (its subscriptions and the statuses and requests
# sent to it) while it reconnects: a radiator back before it (after a broker restart, say)
# reports a result, the broker takes it and the radiator forgets it; without the session the
# result was dropped, the lease lapsed and the finished job ran again. Short, because
# Mosquitto hands shared-subscription messages to offline members too: the session of a
# dispatcher that does not come back (another client id) takes its share for this long.
SESSION_EXPIRY_S = 60


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    client_id: str = ""

    @classmethod
    def from_url(cls, url: str, **extra: Any) -> BrokerConfig:
        """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883)."""
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        return cls(host=u.hostname or "127.0.0.1", port=u.port or (8883 if tls else 1883),
                   tls=tls, username=unquote(u.username) if u.username else None,
                   password=unquote(u.password) if u.password else None, **extra)


def connect_client(cfg: BrokerConfig, client_id: str, *, session_expiry: int = 0,
                   on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
                   on_connect: Callable[..., None] | None = None) -> mqtt.Client:
    """A started paho MQTT 5 client (its own network thread, reconnecting on its own)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)
    if cfg.tls:
        c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key)
    if cfg.username is not None:
        c.username_pw_set(cfg.username, cfg.password)
    if on_message is not None:
        c.on_message = on_message
    if on_connect is not None:
        c.on_connect = on_connect
    c.reconnect_delay_set(1, 30)
    c.on_socket_open = _no_delay
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry
    # clean only at the first connect: a reconnect resumes the session, so what the broker
    # queued for it meanwhile (with session_expiry > 0) arrives
    c.connect_async(cfg.host, cfg.port, keepalive=30,
                    clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
    c.loop_start()
    return c


def _checked(payload: bytes) -> bytes:
    """``payload`` if the agent's strict parser takes it (no NaN or Infinity, no integer
    beyond 2^53, no lone surrogate, no duplicate key), else ``ParseError`` naming why: the
    dispatcher takes from radiators only what a radiator would take."""
    strict_json(payload)
    return payload


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # an assignment goes out just after the PUBACKs of the statuses that came with its
    # request: with Nagle's algorithm it waited for the broker's delayed ACK (~40 ms)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Signer:
    """Signs work envelopes with a sequence number that only grows (microseconds, bumped
    when two fall in the same one)."""

    def __init__(self, key: Ed25519PrivateKey | None, ttl_s: float = 120.0) -> None:
        self.key = key
        self.ttl_s = ttl_s
        self._last = 0
        self._lock = threading.Lock()

    def envelope(self, node: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            seq = self._last
        return make_envelope(self.key, node, body, seq=seq,
                             issued_at=float(round(time.time(), 3)), ttl_s=self.ttl_s,
                             command_id=uuid.uuid4().hex[:16])


@dataclass
class DispatcherStats:
    requests: int = 0
    assigned: int = 0
    empty_answers: int = 0
    reports: int = 0
    bad_messages: int = 0
    expired: int = 0
    lost_nodes: int = 0
    cancels_sent: int = 0
    errors: list[str] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        broker: BrokerConfig,
        db_path: Path | str,
        signing_key: Ed25519PrivateKey | None,
        *,
        prefix: str = PREFIX,
        group: str = "dispatchers",
        retry_after_s: float = 2.0,
        tick_s: float = 0.5,
        envelope_ttl_s: float = 120.0,
        client_id: str | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
    ) -> None:
        self.broker = broker
        self.session_expiry_s = session_expiry_s
        self.queue = FleetQueue.open(db_path)
        self.signer = Signer(signing_key, envelope_ttl_s)
        self.prefix = prefix
        self.group = group
        self.retry_after_s = retry_after_s
        self.tick_s = tick_s
        self.client_id = client_id or broker.client_id or f"dispatcher-{uuid.uuid4().hex[:8]}"
        self.stats = DispatcherStats()
        self._inbox: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self.connected = threading.Event()
        # Leases lapse only while the dispatcher can hear the radiators renew them: not while
        # it is disconnected, and each lease runs whole again from a reconnect (what the
        # radiators sent meanwhile, kept in the session, renews it then). Otherwise a cut of
        # the dispatcher's own link requeued jobs their radiators still ran.
        self._listening = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Dispatcher:
        self._client = connect_client(self.broker, self.client_id, on_message=self._on_message,
                                      on_connect=self._on_connect,
                                      session_expiry=self.session_expiry_s)
        self._client.on_disconnect = self._on_disconnect
        self._thread = threading.Thread(target=self._run, name="qrad-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self.queue.db.close()

    def run_forever(self) -> None:
        """For the CLI: start, and run until interrupted."""
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> Dispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ network thread

    def _filters(self) -> list[str]:
        nodes = f"{self.prefix}/nodes/+"
        share = f"$share/{self.group}"
        return [f"{share}/{nodes}/work/request", f"{share}/{nodes}/jobs/+/status",
                f"{share}/{nodes}/status"]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("dispatcher: the broker refused the connection: %s", reason)
            return
        client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._filters()])
        self._inbox.put((_LISTENING, b""))  # before what the session kept: it follows
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        self._inbox.put((_DEAF, b""))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload)))

    # ------------------------------------------------------------------ dispatcher thread

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, next_tick - time.monotonic())
            items: list[tuple[str, bytes]] = []
            try:
                first = self._inbox.get(timeout=wait)
                if first is not None:
                    items.append(first)
                while True:  # everything that arrived together is handled together
                    more = self._inbox.get_nowait()
                    if more is not None:
                        items.append(more)
            except queue.Empty:
                pass
            try:
                self.handle(items)
                if time.monotonic() >= next_tick:
                    self.tick()
                    next_tick = time.monotonic() + self.tick_s
            except Exception as exc:
                log.exception("dispatcher: handling failed")
                self.stats.errors = [*self.stats.errors[-9:], repr(exc)]

    def handle(self, items: list[tuple[str, bytes]]) -> None:
        requests: list[tuple[str, WorkRequestMessage]] = []
        statuses: list[JobStatus] = []
        for topic, payload in items:
            if topic in (_LISTENING, _DEAF):
                self._listening = topic == _LISTENING
                if self._listening:
                    self.queue.extend_leases()
                continue
            where = self._classify(topic)
            if where is None:
                continue
            kind, node = where
            try:
                if kind == "request":
                    req = WorkRequestMessage.model_validate_json(_checked(payload))
                    if req.node != node:
                        raise ValueError(f"request for {req.node} on {node}'s topic")
                    requests.append((node, req))
                elif kind == "status":
                    status = JobStatus.model_validate_json(_checked(payload))
                    if status.node != node:
                        raise ValueError(f"status from {status.node} on {node}'s topic")
                    statuses.append(status)
                elif kind == "node":
                    st = StatusMessage.model_validate_json(_checked(payload))
                    if st.status is NodeStatus.LOST:
                        # not requeued here (module docstring): a radiator cut off, not
                        # dead, still runs its jobs until its lease lapses
                        self.stats.lost_nodes += 1
                        log.info("dispatcher: %s is lost; its jobs are requeued when their "
                                 "leases lapse", node)
            except (ValidationError, ValueError) as exc:
                self.stats.bad_messages += 1
                log.warning("dispatcher: ignoring a bad message on %s: %s", topic, exc)
        if not statuses and not requests:
            return
        # what arrived together is one durable commit (one sync): the statuses, then the
        # placements; what it calls for (cancels, assignments) goes out once it is on disk
        with self.queue.db.transaction(durable=True):
            transitions = self.queue.report_many(statuses) if statuses else []
            answers = self._place(requests) if requests else None
        self._after_reports(statuses, transitions)
        if answers is not None:
            self._answer(*answers)

    def tick(self) -> None:
        if not self._listening:
            return  # nobody could renew a lease now (see __init__)
        ids = self.queue.expire()
        if ids:
            self.stats.expired += len(ids)
            log.info("dispatcher: leases lapsed, requeued: %s", ids)

    def _classify(self, topic: str) -> tuple[str, str] | None:
        head = f"{self.prefix}/nodes/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) == 3 and parts[1:] == ["work", "request"]:
            return "request", parts[0]
        if len(parts) == 4 and parts[1] == "jobs" and parts[3] == "status":
            return "status", parts[0]
        if len(parts) == 2 and parts[1] == "status":
            return "node", parts[0]
        return None

    def _after_reports(self, statuses: list[JobStatus], transitions: list[Transition]) -> None:
        self.stats.reports += len(statuses)
        for status, t in zip(statuses, transitions, strict=True):
            if t.cancel is not None:
                other, _attempt = t.cancel
                self.send_cancel(other, [status.job], "done elsewhere")
            if t.verdict is Verdict.DONE:
                log.debug("dispatcher: %s %s", status.job, t.state.value)

    def _place(self, requests: list[tuple[str, WorkRequestMessage]]
               ) -> tuple[dict[str, WorkRequestMessage], list[Assignment]]:
        now = time.time()
        # the latest request of each node stands for it
        latest: dict[str, WorkRequestMessage] = {}
        for node, req in requests:
            latest[node] = req
        self.stats.requests += len(requests)
        held = [Request(node, r.id, r.free_slots, r.heat_budget_w,
                        now + max(0.0, r.expires_at - r.at), r.max_cores, r.max_memory_mb,
                        r.max_timeout_s) for node, r in latest.items()]
        return latest, self.queue.lease(held, now)

    def _answer(self, latest: dict[str, WorkRequestMessage],
                assignments: list[Assignment]) -> None:
        by_node: dict[str, list[dict[str, Any]]] = {}
        for a in assignments:
            by_node.setdefault(a.node, []).append(a.spec.model_dump(mode="json"))
        for node, req in latest.items():
            jobs = by_node.get(node, [])
            body: dict[str, Any] = {"cmd": "assign", "request": req.id, "jobs": jobs}
            if not jobs:
                body["retry_after_s"] = self.retry_after_s
                self.stats.empty_answers += 1
            self.stats.assigned += len(jobs)
            # chunks: one envelope carries at most 64 specs
            for i in range(0, max(1, len(jobs)), 64):
                part = dict(body, jobs=jobs[i:i + 64])
                self._publish(node, part)

    def send_cancel(self, node: str, jobs: list[str], reason: str | None = None) -> None:
        body: dict[str, Any] = {"cmd": "cancel", "jobs": jobs}
        if reason:
            body["reason"] = reason[:200]
        self.stats.cancels_sent += 1
        self._publish(node, body)

    def _publish(self, node: str, body: dict[str, Any]) -> None:
        import json

        env = self.signer.envelope(node, body)
        if self._client is None:
            return
        self._client.publish(f"{self.prefix}/nodes/{node}/work/assign",
                             json.dumps(env, separators=(",", ":")), qos=1)

    # ------------------------------------------------------------------ for people and tests

    def counts(self) -> dict[str, int]:
        return self.queue.counts()

    def done(self) -> bool:
        c = self.queue.counts()
        return not any(c.get(s.value, 0) for s in FleetState if not s.final)
