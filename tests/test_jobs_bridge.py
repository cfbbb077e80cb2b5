"""The jobs bridge's outbound side: of each attempt's statuses in one batch, only the latest
goes to the fleet (a job taken and started at once is acknowledged by ``running``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.core.models import Plan
from qrad_agent.jobs.bridge import JobsBridge
from qrad_agent.jobs.ledger import Ledger
from qrad_agent.jobs.sandbox import Sandbox
from qrad_agent.jobs.scheduler import JobScheduler
from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.link.client import FleetLink
from qrad_agent.link.security import make_envelope, public_key_b64
from qrad_agent.link.settings import LinkConfig
from qrad_agent.store.db import open_store
from qrad_agent.store.outbox import Kind

NODE = "rad-1"
TRUE = os.path.realpath("/bin/true")
SLEEP = os.path.realpath("/bin/sleep")


def test_one_status_per_attempt_and_batch_and_none_lost() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="qrad-bridge-", dir="/tmp"))
    os.chmod(tmp, 0o711)  # the job user passes through to its work directory
    key = Ed25519PrivateKey.generate()
    link = FleetLink(LinkConfig.model_validate({"security": {"fleet_keys": [
        {"name": "d", "public_key": public_key_b64(key.public_key())}]}}), NODE,
        open_store(tmp / "state"))
    jc = JobsConfig(allow=[TRUE, SLEEP], filler="none", work_dir=tmp / "jobs")
    sched = JobScheduler(jc, NODE, Ledger(link.outbox.db), Sandbox(jc, jc.work_root(tmp)),
                         slots=1)
    allocator = SimpleNamespace(urgent_cores=0)
    jobs = JobsBridge(SimpleNamespace(controller=SimpleNamespace(allocator=allocator)), link,
                      sched)
    jobs.start()
    try:
        sched.apply(Plan(1, 1_000_000, 1.0))
        specs = [{"job": "now", "argv": [SLEEP, "30"], "priority": "high"},
                 {"job": "later", "argv": [TRUE]}]
        env = make_envelope(key, NODE, {"cmd": "assign", "request": "r1", "jobs": specs},
                            seq=1, issued_at=time.time(), ttl_s=60, command_id="c1")
        jobs._on_assign(link.topics.node_topic("work/assign"), json.dumps(env).encode())
        rows = link.outbox.pending((Kind.JOB,), 0, 100)
        sent = {json.loads(r.payload)["job"]: json.loads(r.payload)["state"] for r in rows}
        # one slot: "now" was taken and started in one step (accepted superseded by
        # running); "later" waits, acknowledged as accepted
        assert sent == {"now": "running", "later": "accepted"}
        assert len(rows) == 2
        # high-priority work is here: the allocator is told (fewer, faster slots: 0018)
        jobs.service()
        assert allocator.urgent_cores == 2  # the cores of all the jobs here
        # the superseded status is delivered with the later one: nothing undelivered is left
        # once both rows are confirmed
        for r in rows:
            link.outbox.delete([r.id])
        for rid in list(jobs._sent):
            s = jobs._sent.pop(rid)
            sched.delivered(s.job, s.attempt, s.seq)
        assert [(u.job, u.state.value) for u in sched.ledger.undelivered()] == []
    finally:
        sched.restore()
        link.outbox.db.close()
        shutil.rmtree(tmp, ignore_errors=True)
