"""Between the fleet link and the job scheduler: the radiator's half of the pull protocol.

Runs in the control loop, like everything that touches the agent (the link calls the
``work/assign`` handler from ``FleetLink.poll``, in the loop too). Call :meth:`start` before
the link starts (it subscribes), :meth:`service` every loop turn after the agent and the
``LinkBridge``, and :meth:`stop` after ``agent.stop()`` (which returns every live job) and
before the link stops.

What goes where:

- ``work/assign`` (in): a signed envelope whose body is ``assign`` (job specs, or none with
  ``retry_after_s``) or ``cancel`` (job ids). The envelope goes through the link's
  ``CommandVerifier`` (address, expiry, signature, replay) exactly as a command does. A
  refused envelope changes nothing; each job in it that this radiator does not already know
  is answered ``returned`` with the refusal's reason, so the fleet may place it elsewhere.
  Each spec is then checked alone: one that does not parse is ``failed``/``invalid_spec``.
  An accepted spec is in the ledger before the handler returns, and the link sends the
  PUBACK only after that.
- ``jobs/{job}/status`` (out): the acknowledgement of every offer, every report the
  scheduler produces, and after each (re)connect the ledger's undelivered statuses; all
  through the outbox (store-and-forward, never dropped).
- ``work/request`` (out): published now with an MQTT message expiry; never stored, since a
  stale request is worse than none (the scheduler asks again after its interval).

Delivery and leases: the outbox deletes a row when the broker's PUBACK arrives, so a row
that has left the outbox is a status the broker took. Only then is ``scheduler.delivered``
called, which marks it in the ledger and runs the lease from the moment it was sent. A
status sent during an outage therefore does not stretch the lease: the fleet has not heard
it, and may place the job elsewhere when the lease lapses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from qrad_agent.core.jobs import Conditions
from qrad_agent.core.models import Mode
from qrad_agent.jobs.scheduler import JobScheduler
from qrad_agent.jobs.spec import (
    JobState,
    JobStatus,
    Reason,
    SpecError,
    parse_spec,
    salvage_key,
)
from qrad_agent.link.client import FleetLink
from qrad_agent.link.messages import (
    WORK_BODIES,
    AssignBody,
    CancelBody,
    Envelope,
    ParseError,
    describe,
    strict_json,
)
from qrad_agent.link.security import Refused
from qrad_agent.store.db import StoreError
from qrad_agent.store.outbox import Kind

log = logging.getLogger(__name__)

ASSIGN_LEAF = "work/assign"
REQUEST_LEAF = "work/request"
MAX_ASSIGN_BYTES = 2 * 1024 * 1024  # 64 specs with their bounded inline inputs fit

# the verifier's refusals, by how their text begins, as a reason code for job statuses
_REFUSAL_CODES = (
    ("unsigned", "unsigned"),
    ("bad signature", "bad_signature"),
    ("signed, but", "no_fleet_keys"),
    ("expired", "expired"),
    ("replayed", "replayed"),
    ("misaddressed", "misaddressed"),
    ("issued", "not_yet_valid"),
    ("valid for", "lifetime_too_long"),
    ("the topic says", "wrong_topic"),
    ("cannot record", "store_error"),
)


class _Draining(Protocol):
    @property
    def draining(self) -> bool: ...


@dataclass
class BridgeStats:
    assignments: int = 0
    refused_envelopes: int = 0
    offered: int = 0
    cancels: int = 0
    published: int = 0
    requests: int = 0
    requests_unsent: int = 0
    republished: int = 0
    refusals: list[str] = field(default_factory=list)  # the last few, for people


@dataclass(frozen=True, slots=True)
class _Sent:
    job: str
    attempt: int
    seq: int
    at: float  # scheduler clock when handed to the outbox


class JobsBridge:
    def __init__(
        self,
        agent: Any,
        link: FleetLink,
        scheduler: JobScheduler,
        *,
        link_bridge: _Draining | None = None,
        season_warm: Callable[[], bool] | None = None,
    ) -> None:
        self.agent = agent
        self.link = link
        self.scheduler = scheduler
        self.link_bridge = link_bridge
        self.season_warm = season_warm or (lambda: False)
        self.stats = BridgeStats()
        self._sent: dict[int, _Sent] = {}  # outbox row id -> the status it carries
        self._held: list[JobStatus] = []  # acknowledgements not yet in the outbox
        self._was_connected = False
        self._started = False
        self._dirty = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Before ``link.start()``: subscribe to work/assign; recover the ledger (a crashed
        run's jobs are reported ``interrupted`` or queued again)."""
        if self._started:
            return
        self.link.subscribe_node(ASSIGN_LEAF, self._on_assign)
        self.scheduler.start()  # its recovery reports come out of take_reports()
        self._started = True

    def stop(self) -> None:
        """After ``agent.stop()``: what the scheduler reported while stopping goes into the
        outbox (published now if still connected, else after the next start)."""
        self._publish_reports()
        self._flush()

    # ------------------------------------------------------------------ every loop turn

    def service(self, now: float | None = None) -> None:
        """One loop turn. Never raises: control must go on whatever the jobs do."""
        try:
            self._service()
        except Exception:
            log.exception("jobs bridge service failed (control continues)")

    def _service(self) -> None:
        sched = self.scheduler
        sched.set_conditions(self.conditions())
        power = getattr(self.agent, "last_power", None)
        sched.account(sched.clock(), getattr(power, "watts", None))
        sched.step()
        allocator = getattr(getattr(self.agent, "controller", None), "allocator", None)
        if allocator is not None and hasattr(allocator, "urgent_cores"):
            allocator.urgent_cores = sched.urgent_cores()  # read at the next control tick
        connected = self.link.connected
        if connected and not self._was_connected:
            self._republish()
        self._was_connected = connected
        self._publish_reports()
        self._flush()
        self._publish_request()
        self._check_delivered()

    def _flush(self) -> None:
        if self._dirty:
            self._dirty = False
            self.link.flush()

    def conditions(self) -> Conditions:
        th = getattr(getattr(self.agent, "controller", None), "thermostat", None)
        mode = getattr(th, "mode", None)
        verdict = getattr(getattr(self.agent, "stats", None), "last_verdict", None)
        return Conditions(
            mode_off=mode is Mode.OFF,
            season_warm=self.season_warm(),
            draining=bool(self.link_bridge.draining) if self.link_bridge is not None else False,
            heat_forbidden=bool(verdict is not None and verdict.stopped),
        )

    # ------------------------------------------------------------------ out

    def _status(self, status: JobStatus) -> None:
        # stored like send_stored does, but flushed once per batch (see _flush): a batch of
        # acknowledgements costs one outbox read instead of one per status
        link = self.link
        rid = link.outbox.put(Kind.JOB, link.topics.node_topic(f"jobs/{status.job}/status"),
                              status.to_json(), created=link.clock.wall(), boot=link.boot)
        self._dirty = True
        self.stats.published += 1
        if rid is not None and status.seq > 0:
            self._sent[rid] = _Sent(status.job, status.attempt, status.seq,
                                    self.scheduler.clock())

    def _publish_reports(self) -> None:
        """Into the outbox: of each attempt's statuses since the last call, only the latest.
        A later status says all an earlier one did (``running`` acknowledges the job as
        ``accepted`` does, and the delivery of a status stands for every earlier one), so a
        job taken and started in one step costs the fleet one message, not two."""
        batch, self._held = [*self._held, *self.scheduler.take_reports()], []
        latest: dict[tuple[str, int], JobStatus] = {}
        for status in batch:
            latest[(status.job, status.attempt)] = status
        for status in latest.values():
            self._status(status)

    def _publish_request(self) -> None:
        req = self.scheduler.take_request()
        if req is None:
            return
        ttl = max(1, int(req.expires_at - req.at))
        if self.link.publish_now(REQUEST_LEAF, req.to_json(), expiry_s=ttl):
            self.stats.requests += 1
        else:
            self.stats.requests_unsent += 1  # asked again after the interval

    def _republish(self) -> None:
        """After a (re)connect: statuses the fleet has not confirmed, unless one of their
        rows is still on its way through the outbox."""
        waiting = {(s.job, s.attempt) for s in self._sent.values()}
        try:
            undelivered = self.scheduler.ledger.undelivered()
        except StoreError as exc:
            log.warning("jobs: cannot read undelivered statuses now: %s", exc)
            return
        for status in undelivered:
            if status.key not in waiting:
                self._status(status)
                self.stats.republished += 1

    def _check_delivered(self) -> None:
        if not self._sent:
            return
        ids = list(self._sent)
        present: set[int] = set()
        try:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = self.link.outbox.db.query(
                    f"SELECT id FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
                present.update(int(r[0]) for r in rows)
        except StoreError as exc:
            log.warning("jobs: cannot read the outbox now: %s", exc)
            return
        gone = [rid for rid in ids if rid not in present]
        if not gone:
            return
        try:
            with self.scheduler.ledger.db.transaction():  # one commit for the lot
                for rid in gone:
                    sent = self._sent[rid]
                    self.scheduler.delivered(sent.job, sent.attempt, sent.seq, sent.at)
        except StoreError as exc:
            log.warning("jobs: deliveries not recorded (sent again later): %s", exc)
        for rid in gone:
            self._sent.pop(rid, None)

    # ------------------------------------------------------------------ in

    def _on_assign(self, topic: str, payload: bytes) -> None:
        """The link's handler for work/assign (control loop). Raises only when what must be
        durable could not be written: the message then stays unacknowledged."""
        self.stats.assignments += 1
        if len(payload) > MAX_ASSIGN_BYTES:
            self._refuse_envelope(None, "too_big",
                                  f"{len(payload)} bytes; at most {MAX_ASSIGN_BYTES}")
            return
        try:
            parsed = strict_json(payload)
        except ParseError as exc:
            self._refuse_envelope(None, "invalid_envelope", str(exc))
            return
        try:
            env = Envelope.model_validate_json(payload)
        except ValidationError as exc:
            self._refuse_envelope(parsed, "invalid_envelope",
                                  f"not a valid work envelope: {describe(exc)}")
            return
        if env.body.cmd not in WORK_BODIES or not isinstance(parsed, dict):
            self._refuse_envelope(parsed, "wrong_topic",
                                  f"a {env.body.cmd!r} command belongs on cmd/{env.body.cmd}; "
                                  "work/assign carries assign and cancel")
            return
        try:
            self.link.verifier.check(parsed, env, broadcast=False, topic_command=env.body.cmd,
                                     now=self.link.clock.wall())
        except Refused as exc:
            text = str(exc)
            code = next((c for prefix, c in _REFUSAL_CODES if text.startswith(prefix)),
                        "refused")
            self._refuse_envelope(parsed, code, text)
            return
        body = env.body
        if isinstance(body, CancelBody):
            self._cancel(body)
        elif isinstance(body, AssignBody):
            self._assign(body)
        self._publish_reports()
        self._flush()

    def _assign(self, body: AssignBody) -> None:
        if not body.jobs:
            self.scheduler.answered(body.retry_after_s)
            return
        specs = []
        for raw in body.jobs:
            try:
                spec = parse_spec(raw)
            except SpecError as exc:
                key = salvage_key(raw)
                log.warning("jobs: refused a spec (%s): %s", key, exc)
                self._remember(f"invalid spec {key}: {exc}")
                if key is not None and self.scheduler.ledger.get(*key) is None:
                    self._status(JobStatus(
                        node=self.link.node_id, job=key[0], attempt=key[1],
                        state=JobState.FAILED, at=self.link.clock.wall(),
                        reason=Reason.INVALID_SPEC.value, detail=str(exc)[:500]))
                continue
            specs.append(spec)
        if not specs:
            return
        # one durable transaction for the lot, then one scheduler step. StoreError
        # propagates: nothing was acknowledged, the broker sends it again
        took = False
        for ack in self.scheduler.offer_many(specs):
            self.stats.offered += 1
            took = took or ack.state is JobState.ACCEPTED
            self._held.append(ack)  # goes out with the step's reports: see _publish_reports
        if took:
            self.scheduler.answered(None, took_work=True)

    def _cancel(self, body: CancelBody) -> None:
        for job_id in body.jobs:
            self.stats.cancels += 1
            status = self.scheduler.cancel(job_id)
            if status is not None and status.state is not JobState.CANCELLED:
                # it had ended already: say how, so the fleet's record closes
                self._status(status)

    def _refuse_envelope(self, parsed: Any, code: str, detail: str) -> None:
        """Nothing changes; jobs named in it that this radiator does not hold are answered
        ``returned`` with the reason (a job it holds keeps its recorded state: a replay of a
        real assignment must not undo it)."""
        self.stats.refused_envelopes += 1
        self._remember(f"{code}: {detail}")
        log.warning("jobs: refused a work/assign message: %s", detail)
        body = parsed.get("body") if isinstance(parsed, dict) else None
        if not isinstance(body, dict) or body.get("cmd") != "assign":
            return
        jobs = body.get("jobs")
        if not isinstance(jobs, list):
            return
        for raw in jobs[:64]:
            key = salvage_key(raw) if isinstance(raw, dict) else None
            if key is None or self.scheduler.ledger.get(*key) is not None:
                continue
            self._status(JobStatus(
                node=self.link.node_id, job=key[0], attempt=key[1], state=JobState.RETURNED,
                at=self.link.clock.wall(), reason=code,
                detail=f"assignment refused: {detail}"[:500]))
        self._flush()

    def _remember(self, text: str) -> None:
        self.stats.refusals = [*self.stats.refusals[-9:], text[:300]]

    # ------------------------------------------------------------------ for people

    def status(self) -> dict[str, Any]:
        return {**self.scheduler.read_back(), "in_flight": len(self._sent),
                "refused_envelopes": self.stats.refused_envelopes,
                "last_refusals": list(self.stats.refusals)}
