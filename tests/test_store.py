"""The local state database: WAL, boot counter, sequence numbers, overlay, outbox bounds,
and what a full disk does (degrades telemetry, never events, never control)."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrad_agent.store.db import Database, StoreError, open_store
from qrad_agent.store.kv import KeyValue
from qrad_agent.store.outbox import Kind, Outbox


def test_database_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    db = open_store(tmp_path / "state")
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    kv = KeyValue(db)
    assert kv.bump_boot() == 1
    assert kv.bump_boot() == 2
    kv.set("draining", True)
    db.close()
    kv2 = KeyValue(open_store(tmp_path / "state"))
    assert kv2.bump_boot() == 3
    assert kv2.get("draining") is True
    assert kv2.get("missing", "dflt") == "dflt"


def test_command_seq_only_grows_and_is_kept(tmp_path: Path) -> None:
    kv = KeyValue(open_store(tmp_path))
    assert kv.accept_command_seq("k1", 5) is None
    assert kv.accept_command_seq("k1", 5) == 5  # equal is a replay
    assert kv.accept_command_seq("k1", 4) == 5
    assert kv.accept_command_seq("k2", 1) is None  # per key
    assert kv.accept_command_seq("k1", 6) is None
    kv.db.close()
    kv2 = KeyValue(open_store(tmp_path))
    assert kv2.command_seq("k1") == 6 and kv2.command_seq("k2") == 1
    assert kv2.command_seq("other") == 0


def test_config_overlay_round_trip(tmp_path: Path) -> None:
    kv = KeyValue(open_store(tmp_path))
    assert kv.config_overlay() == (0, {})
    kv.set_config_overlay(3, {"pid": {"kp": 2.0}})
    assert KeyValue(open_store(tmp_path)).config_overlay() == (3, {"pid": {"kp": 2.0}})


def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    db = open_store(tmp_path)
    kv = KeyValue(db)
    kv.set("a", 1)
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("UPDATE kv SET value = '2' WHERE key = 'a'")
        raise RuntimeError("boom")
    assert kv.get("a") == 1
    with pytest.raises(StoreError, match="write failed"), db.transaction() as conn:
        conn.execute("INSERT INTO no_such_table VALUES (1)")


def test_migrations_carry_triggers_and_literals(tmp_path: Path) -> None:
    db = Database(tmp_path / "t.db")
    db.migrate("t", ["""
        CREATE TABLE t (a TEXT);
        CREATE TABLE log (msg TEXT);
        CREATE TRIGGER t_log AFTER INSERT ON t BEGIN
            INSERT INTO log VALUES ('a;b');
            INSERT INTO log VALUES (new.a);
        END;
        INSERT INTO t VALUES ('x;y')
    """])
    assert db.query("SELECT msg FROM log ORDER BY rowid") == [("a;b",), ("x;y",)]


def test_migrations_refuse_a_newer_database(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    assert db.migrate("thing", ["CREATE TABLE t1 (a)", "CREATE TABLE t2 (b)"]) == 2
    assert db.migrate("thing", ["CREATE TABLE t1 (a)", "CREATE TABLE t2 (b)"]) == 2
    with pytest.raises(StoreError, match="newer than this agent knows"):
        db.migrate("thing", ["CREATE TABLE t1 (a)"])


def _put_tel(ob: Outbox, seq: int, size: int = 200, created: float = 1000.0) -> int | None:
    return ob.put(Kind.TELEMETRY, "t/tel", b"x" * size, created=created, boot=1, seq=seq)


def test_outbox_ids_never_go_back(tmp_path: Path) -> None:
    db = open_store(tmp_path)
    ob = Outbox(db, max_bytes=10**6, max_age_s=86400)
    ids = [rid for rid in (_put_tel(ob, i) for i in range(3)) if rid is not None]
    assert len(ids) == 3 and ids == sorted(ids)
    ob.delete([ids[-1]])  # the newest row acknowledged first
    db.close()
    ob2 = Outbox(open_store(tmp_path), max_bytes=10**6, max_age_s=86400)
    assert ob2.max_id() == ids[-1]
    new = _put_tel(ob2, 3)
    assert new is not None and new > ids[-1]
    assert [r.seq for r in ob2.pending([Kind.TELEMETRY])] == [0, 1, 3]
    assert ob2.total_bytes == sum(int(r[0]) for r in ob2.db.query("SELECT bytes FROM outbox"))


def test_outbox_bound_drops_oldest_telemetry_and_never_events(tmp_path: Path) -> None:
    ob = Outbox(open_store(tmp_path), max_bytes=20_000, max_age_s=86400)
    for i in range(400):
        if i % 40 == 0:
            ob.put(Kind.EVENT, "t/ev", b"e" * 100, created=1000.0, boot=1, seq=i // 40)
        _put_tel(ob, i)
        assert ob.total_bytes <= 20_000 + 400  # never more than one row over the bound
    tel = [r.seq for r in ob.pending([Kind.TELEMETRY], limit=10_000)]
    assert tel == list(range(tel[0], 400))  # the newest, contiguous: oldest went first
    assert tel[0] > 300
    assert [r.seq for r in ob.pending([Kind.EVENT], limit=100)] == list(range(10))
    assert ob.stats().dropped_over_bytes == tel[0]


def test_events_alone_may_exceed_the_bound(tmp_path: Path) -> None:
    ob = Outbox(open_store(tmp_path), max_bytes=16_384, max_age_s=86400)
    for i in range(100):
        assert ob.put(Kind.EVENT, "t/ev", b"e" * 400, created=1000.0, boot=1, seq=i) is not None
    assert len(ob.pending([Kind.EVENT], limit=1000)) == 100
    assert ob.total_bytes > 16_384


def test_outbox_age_bound_is_telemetry_only(tmp_path: Path) -> None:
    ob = Outbox(open_store(tmp_path), max_bytes=10**6, max_age_s=3600)
    _put_tel(ob, 0, created=0.0)
    ob.put(Kind.EVENT, "t/ev", b"{}", created=0.0, boot=1, seq=0)
    ob.put(Kind.RESULT, "t/res", b"{}", created=0.0, boot=1, correlation=b"\x00\x01")
    _put_tel(ob, 1, created=5000.0)  # 5000 s later: the first sample is past max_age_s
    assert [r.seq for r in ob.pending([Kind.TELEMETRY])] == [1]
    assert len(ob.pending([Kind.EVENT, Kind.RESULT])) == 2
    assert ob.pending([Kind.RESULT])[0].correlation == b"\x00\x01"
    assert ob.stats().dropped_over_age == 1


def _fill_disk(db: Database) -> None:
    """Let the database grow by nothing more: the next page it needs is refused, which
    SQLite reports exactly like a full disk (SQLITE_FULL)."""
    pages = db.query("PRAGMA page_count")[0][0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")


def test_full_disk_drops_telemetry_holds_events_in_order(tmp_path: Path) -> None:
    db = open_store(tmp_path)
    ob = Outbox(db, max_bytes=10**8, max_age_s=86400)
    _fill_disk(db)
    dropped = 0
    for i in range(200):
        if _put_tel(ob, i, size=3000) is None:
            dropped += 1
    assert dropped > 0 and ob.stats().dropped_write_failed == dropped
    with pytest.raises(sqlite3.OperationalError, match="full"):
        db.conn.execute("INSERT INTO outbox (kind, topic, payload, created, boot, seq, bytes) "
                        "VALUES ('x', 't', zeroblob(100000), 0, 0, 0, 0)")
    for i in range(30):  # events must not be lost: held in memory, in order
        ob.put(Kind.EVENT, "t/ev", b"e" * 3000, created=1000.0, boot=1, seq=i)
    held = ob.held
    db.conn.execute("PRAGMA max_page_count = 1073741823")  # space again
    ob.retry_held()
    assert ob.held == 0
    events = [r.seq for r in ob.pending([Kind.EVENT], limit=100)]
    assert events == list(range(30)), (held, events)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["tel", "tel", "tel", "ev", "ack"]),
                          st.integers(10, 3000)), max_size=120))
def test_outbox_invariants(tmp_path: Path, ops: list[tuple[str, int]]) -> None:
    db = Database(tmp_path / f"{uuid.uuid4().hex}.db")  # tmp_path is shared by examples
    ob = Outbox(db, max_bytes=20_000, max_age_s=86400)
    tel_seq = ev_seq = 0
    events: list[int] = []
    acked_events: set[int] = set()
    for op, size in ops:
        if op == "tel":
            _put_tel(ob, tel_seq, size)
            tel_seq += 1
        elif op == "ev":
            ob.put(Kind.EVENT, "t/ev", b"e" * size, created=1000.0, boot=1, seq=ev_seq)
            events.append(ev_seq)
            ev_seq += 1
        else:
            rows = ob.pending([Kind.EVENT, Kind.TELEMETRY], limit=3)
            ob.delete([r.id for r in rows])
            acked_events |= {r.seq for r in rows if r.kind is Kind.EVENT}
    stored = db.query("SELECT COALESCE(SUM(bytes), 0) FROM outbox")[0][0]
    assert ob.total_bytes == stored
    tel = [r.seq for r in ob.pending([Kind.TELEMETRY], limit=10_000)]
    assert tel == sorted(tel)
    # over the bound only when nothing droppable is left
    assert ob.total_bytes <= 20_000 or not tel
    kept = [r.seq for r in ob.pending([Kind.EVENT], limit=10_000)]
    assert kept == [e for e in events if e not in acked_events]  # no event lost
    db.close()


def test_full_disk_degrades_telemetry_never_control(tmp_path: Path) -> None:
    """The agent keeps regulating while its database refuses every write."""
    from qrad_agent.config import AgentConfig
    from qrad_agent.link.bridge import LinkBridge
    from qrad_agent.link.client import Clock, FleetLink
    from qrad_agent.link.settings import LinkConfig
    from qrad_agent.sim.run import build_sim_agent
    from qrad_agent.sim.scenario import load_scenario

    base = AgentConfig()
    cfg = base.model_copy(update={"control": base.control.model_copy(
        update={"sensor_period_s": 10.0})})
    agent, world = build_sim_agent(cfg, load_scenario("winter-week"))
    db = open_store(tmp_path)
    clock = Clock(wall=lambda: 1.8e9 + world.t, mono=lambda: world.t)
    link = FleetLink(LinkConfig(), "n1", db, clock=clock)  # never started: no broker
    bridge = LinkBridge(agent, link)
    _fill_disk(db)
    demands = []
    for _ in range(720):  # two simulated hours
        world.step(10.0)
        decision = agent.service(world.t, world.local)
        bridge.service(world.t, world.local, decision)
        assert decision is not None
        demands.append(decision.demand)
    assert agent.stats.ticks == 720
    assert link.outbox.stats().dropped_write_failed > 0
    assert max(demands) > 0.1  # it regulated: heat was asked for and planned
    world.close()


def _open_and_migrate(path: str, barrier: Any) -> None:
    from qrad_agent.store.db import Database

    barrier.wait()  # every process opens the new file at the same moment
    Database(path).migrate("race", ["CREATE TABLE t1 (x INTEGER)",
                                    "CREATE TABLE t2 (y INTEGER)"])


def test_processes_opening_one_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    # the dispatcher and `qrad-fleet submit` share one queue file: opening it (WAL switch)
    # and migrating it must not fail for whoever comes second
    import multiprocessing as mp

    for round_ in range(8):
        path = str(tmp_path / f"q{round_}.db")
        barrier = mp.Barrier(4)
        procs = [mp.Process(target=_open_and_migrate, args=(path, barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"round {round_}"
