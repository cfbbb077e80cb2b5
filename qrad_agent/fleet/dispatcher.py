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
- ``{node}/status``: ``lost`` (the node's will) requeues every job it held.
- every ``tick_s``: leases that lapsed are requeued.

Several dispatchers can share the load: they subscribe through the MQTT 5 shared
subscription group ``$share/{group}/...`` (each message goes to one of them) and share the
queue file (each lease is a guarded UPDATE, so no job is leased twice). Give each its own
signing key: a radiator refuses an envelope whose ``seq`` is not above the last it accepted
from that key, and two signers' clocks interleave.

The node id comes from the topic, never from the payload: the broker's ACL lets a node
publish only below its own id, so the topic is what was authenticated.
"""

from __future__ import annotations

import logging
import queue
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

from qrad_agent.fleet.placement import FleetState, Request, Verdict
from qrad_agent.fleet.queue import FleetQueue
from qrad_agent.jobs.spec import JobStatus, WorkRequestMessage
from qrad_agent.link.messages import NodeStatus, StatusMessage
from qrad_agent.link.security import make_envelope

log = logging.getLogger(__name__)

PREFIX = "qrad/v1"


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
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry
    c.connect_async(cfg.host, cfg.port, keepalive=30, clean_start=True, properties=props)
    c.loop_start()
    return c


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
    ) -> None:
        self.broker = broker
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

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Dispatcher:
        self._client = connect_client(self.broker, self.client_id, on_message=self._on_message,
                                      on_connect=self._on_connect)
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
        self.connected.set()

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
        for topic, payload in items:
            where = self._classify(topic)
            if where is None:
                continue
            kind, node = where
            try:
                if kind == "request":
                    req = WorkRequestMessage.model_validate_json(payload)
                    if req.node != node:
                        raise ValueError(f"request for {req.node} on {node}'s topic")
                    requests.append((node, req))
                elif kind == "status":
                    self._report(node, JobStatus.model_validate_json(payload))
                elif kind == "node":
                    st = StatusMessage.model_validate_json(payload)
                    if st.status is NodeStatus.LOST:
                        self.stats.lost_nodes += 1
                        ids = self.queue.node_lost(node)
                        if ids:
                            log.info("dispatcher: %s is lost; requeued %s", node, ids)
            except (ValidationError, ValueError) as exc:
                self.stats.bad_messages += 1
                log.warning("dispatcher: ignoring a bad message on %s: %s", topic, exc)
        if requests:
            self._answer(requests)

    def tick(self) -> None:
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

    def _report(self, node: str, status: JobStatus) -> None:
        if status.node != node:
            raise ValueError(f"status from {status.node} on {node}'s topic")
        self.stats.reports += 1
        t = self.queue.report(status)
        if t.cancel is not None:
            other, _attempt = t.cancel
            self.send_cancel(other, [status.job], "done elsewhere")
        if t.verdict is Verdict.DONE:
            log.debug("dispatcher: %s %s", status.job, t.state.value)

    def _answer(self, requests: list[tuple[str, WorkRequestMessage]]) -> None:
        now = time.time()
        # the latest request of each node stands for it
        latest: dict[str, WorkRequestMessage] = {}
        for node, req in requests:
            latest[node] = req
        self.stats.requests += len(requests)
        held = [Request(node, r.id, r.free_slots, r.heat_budget_w,
                        now + max(0.0, r.expires_at - r.at), r.max_cores, r.max_memory_mb,
                        r.max_timeout_s) for node, r in latest.items()]
        assignments = self.queue.lease(held, now)
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
