"""The agent's life as a service: the agent runs as a real process (`python -m qrad_agent run
--sim`) with NOTIFY_SOCKET pointing at a datagram socket of the test, and gets real signals.

Also the pieces in-process where a process cannot show them: a loop whose ticks fail (the
watchdog must stop), a restore that overruns its bound, the notify client, the stop flag
and the journald log format.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from qrad_agent.config import AgentConfig
from qrad_agent.ops.logging import OneLineFormatter, configure, event, under_journald
from qrad_agent.ops.notify import Notifier, notify_address
from qrad_agent.ops.settings import OpsConfig
from qrad_agent.ops.status_server import StatusUnavailable, fetch_status
from qrad_agent.runner import (
    EXIT_FAILED,
    Lifecycle,
    StopFlag,
    run_realtime,
    run_service,
)
from qrad_agent.sim.run import build_sim_agent
from qrad_agent.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]


# -- helpers shared with the other ops tests ----------------------------------------------------


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: collects every datagram."""

    def __init__(self, abstract: bool = True, directory: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"qrad-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            assert directory is not None
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def all(self) -> list[dict[str, str]]:
        with self._lock:
            return [m for _, m in self.messages]

    def wait_for(self, pred: Callable[[dict[str, str]], bool], timeout: float = 10.0,
                 after: int = 0) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.all()
            for i in range(after, len(msgs)):
                if pred(msgs[i]):
                    return i, msgs[i]
            time.sleep(0.02)
        raise AssertionError(f"no matching notification within {timeout} s; got {self.all()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


class AgentProcess:
    """`qrad-agent run --sim` as a real process with its own status socket."""

    def __init__(self, workdir: Path, *args: str, speed: float = 600.0,
                 env: dict[str, str] | None = None, config: Path | None = None) -> None:
        self.workdir = workdir
        self.socket = workdir / "status.sock"
        self.stderr_path = workdir / f"agent-{uuid.uuid4().hex[:6]}.err"
        cmd = [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", str(speed),
               "--status-socket", str(self.socket), *args]
        if config is not None:
            cmd += ["-c", str(config)]
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                 "JOURNAL_STREAM")}
        full_env.update(env or {})
        self._err = open(self.stderr_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=self._err, text=True)

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        return fetch_status(self.socket, timeout)

    def wait_running(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode}: "
                                     f"{self.stderr()}")
            try:
                doc = self.status()
                if doc.get("state") == "running":
                    return doc
                last = str(doc.get("state"))
            except StatusUnavailable as exc:
                last = str(exc)
            time.sleep(0.05)
        raise AssertionError(f"agent not running within {timeout} s ({last}): {self.stderr()}")

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
                    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.status()
            if pred(doc):
                return doc
            time.sleep(0.05)
        raise AssertionError(f"status never matched within {timeout} s; last: "
                             f"{json.dumps(doc)[:2000]}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the agent did not exit within {timeout} s of "
                                 f"{signal.Signals(sig).name}: {self.stderr()}") from None
        finally:
            self._err.close()
        return code, time.monotonic() - started

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    n = NotifyListener()
    yield n
    n.close()


# -- the service as a real process ---------------------------------------------------------------


def test_ready_after_first_tick_watchdog_status_then_stopping_and_restore(
        tmp_path: Path, listener: NotifyListener) -> None:
    agent = AgentProcess(tmp_path, env={"NOTIFY_SOCKET": listener.env_value,
                                        "WATCHDOG_USEC": "1000000"})
    try:
        i_ready, ready = listener.wait_for(lambda m: m.get("READY") == "1", timeout=20)
        # READY comes with the first tick's summary, and nothing was said before it
        assert i_ready == 0, listener.all()
        assert "target" in ready["STATUS"] and "slots" in ready["STATUS"], ready
        doc = agent.wait_running()
        assert doc["counters"]["ticks"] >= 1
        # keep-alives at least every WATCHDOG_USEC / 2 while healthy
        listener.wait_for(lambda m: m.get("WATCHDOG") == "1", after=i_ready)
        time.sleep(1.2)
        stamps = [t for t, m in listener.messages if m.get("WATCHDOG") == "1"]
        assert len(stamps) >= 3
        assert max(b - a for a, b in itertools.pairwise(stamps)) < 0.5
        # the lever caps the frequency while running; read back its hardware maximum
        cpufreq = doc["levers"]["cpufreq"]
        top = cpufreq["range"]["max_khz"]
        running = agent.wait_status(
            lambda d: d["levers"]["cpufreq"]["read_back"]["freq_khz"] < top)
        assert running["plan"]["freq_khz"] < top
        n_before = len(listener.all())
        code, took = agent.stop(signal.SIGTERM)
    finally:
        if agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
    assert code == 0, agent.stderr()
    assert took < OpsConfig().stop_timeout_s
    i_stop, stopping = listener.wait_for(lambda m: m.get("STOPPING") == "1", after=n_before)
    assert "SIGTERM" in stopping.get("STATUS", "")
    _, final = listener.wait_for(lambda m: "levers restored" in m.get("STATUS", ""),
                                 after=i_stop)
    # read back from the emulated kernel after the restore: cap lifted, no slots running
    assert f"cpufreq.freq_khz={top}" in final["STATUS"], final
    assert "slots.running=0" in final["STATUS"], final
    assert not agent.socket.exists(), "the status socket is removed on exit"
    log = agent.stderr()
    assert "levers restored" in log and "reason=SIGTERM" in log


def test_sigint_stops_too_and_no_watchdog_without_watchdog_usec(
        tmp_path: Path, listener: NotifyListener) -> None:
    agent = AgentProcess(tmp_path, env={"NOTIFY_SOCKET": listener.env_value})
    try:
        listener.wait_for(lambda m: m.get("READY") == "1", timeout=20)
        time.sleep(0.5)
        code, _ = agent.stop(signal.SIGINT)
    finally:
        if agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
    assert code == 0
    assert not any("WATCHDOG" in m for m in listener.all()), "systemd did not ask for it"
    listener.wait_for(lambda m: m.get("STOPPING") == "1")


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(
        tmp_path: Path, listener: NotifyListener) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[thermostat]\nmode = "comfort"\n[pid]\nkp = 1.0\n')
    agent = AgentProcess(tmp_path, env={"NOTIFY_SOCKET": listener.env_value}, config=cfg)
    try:
        doc = agent.wait_running()
        assert doc["thermostat"]["mode"] == "comfort" and doc["thermostat"]["target_c"]
        assert doc["controller"]["kp"] == 1.0
        ticks = doc["counters"]["ticks"]

        # valid: mode and PID gains apply at once; the control period needs a restart
        cfg.write_text('[thermostat]\nmode = "off"\n[pid]\nkp = 2.5\n[control]\nperiod_s = 20\n')
        n = len(listener.all())
        agent.send(signal.SIGHUP)
        doc = agent.wait_status(lambda d: d["counters"]["reloads"] == 1)
        assert doc["thermostat"]["mode"] == "off"
        doc = agent.wait_status(lambda d: d["thermostat"]["target_c"] is None)
        assert doc["controller"]["kp"] == 2.5
        assert doc["loop"]["period_s"] == 10.0, "period_s needs a restart: kept"
        last = doc["config"]["last_reload"]
        assert last["ok"] and set(last["applied"]) == {"pid", "thermostat"}
        assert last["restart_needed"] == ["control"]
        i, _ = listener.wait_for(lambda m: m.get("RELOADING") == "1", after=n)
        listener.wait_for(lambda m: m.get("READY") == "1", after=i)

        # invalid: refused whole, the running config kept, the agent goes on ticking
        cfg.write_text('[thermostat]\nmode = "warm"\n[pid]\nkp = 9.0\n')
        agent.send(signal.SIGHUP)
        doc = agent.wait_status(lambda d: d["counters"]["reloads_refused"] == 1)
        assert doc["thermostat"]["mode"] == "off" and doc["controller"]["kp"] == 2.5
        refused = [e for e in doc["events"] if e["kind"] == "reload_refused"]
        assert refused and "thermostat.mode" in refused[-1]["message"]
        later = agent.wait_status(lambda d: d["counters"]["ticks"] > doc["counters"]["ticks"])
        assert later["counters"]["ticks"] > ticks and later["loop"]["healthy"]
        code, _ = agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
    assert code == 0
    log = agent.stderr()
    assert "reload=refused" in log and "thermostat.mode" in log
    assert "reload=applied" in log and "control need a restart" in log


def test_journald_lines_have_priorities_and_no_timestamps(tmp_path: Path) -> None:
    # JOURNAL_STREAM names the stream's device and inode, as systemd sets it
    err = tmp_path / "journal.err"
    err.touch()
    st = err.stat()
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", "600",
             "--duration", "1", "--status-socket", str(tmp_path / "s.sock")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=f,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert proc.wait(30) == 0
    lines = err.read_text().splitlines()
    assert lines and all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines
    assert not any(line[3:7].isdigit() for line in lines), "no time stamps under journald"
    assert any(line.startswith("<6>qrad_agent: ready") for line in lines), lines


# -- in-process: what a process cannot show ------------------------------------------------------


def _sim_agent() -> tuple[Any, Any]:
    return build_sim_agent(AgentConfig(), load_scenario("winter-week"))


def test_failing_ticks_stop_the_watchdog_and_the_loop_gives_up(listener: NotifyListener
                                                               ) -> None:
    agent, world = _sim_agent()
    real_tick = agent.tick
    calls = {"n": 0}

    def tick(now: float, local: datetime) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("sensor bus wedged")
        return real_tick(now, local)

    agent.tick = tick
    ops = OpsConfig(stall_periods=1.5, stall_grace_s=0.5, give_up_after_s=3.0)
    notifier = Notifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "400000"})
    stop = StopFlag()
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(code=run_service(
        agent, stop, world, 60.0, ops=ops, notifier=notifier,
        status_socket=f"/tmp/qrad-test-{uuid.uuid4().hex[:8]}.sock")))
    t.start()
    try:
        listener.wait_for(lambda m: m.get("READY") == "1")
        i, _ = listener.wait_for(lambda m: m.get("STATUS", "").startswith("UNHEALTHY"),
                                 timeout=10)
        assert "sensor bus wedged" in listener.all()[i]["STATUS"]
        t.join(15)
    finally:
        stop.request("test")
        t.join(5)
        world.close()
    assert result.get("code") == EXIT_FAILED, "no good tick for give_up_after_s: exit 1"
    msgs = listener.all()
    assert not any(m.get("WATCHDOG") == "1" for m in msgs[i:]), "no keep-alive once unhealthy"
    assert any(m.get("WATCHDOG") == "1" for m in msgs[:i]), "keep-alives while it was healthy"
    assert any(m.get("STOPPING") == "1" for m in msgs[i:]), "levers restored on the way out"


def test_a_failing_poll_is_retried_after_a_pause_not_in_a_spin() -> None:
    agent, world = _sim_agent()
    calls = {"n": 0}

    def poll(now: float) -> Any:
        calls["n"] += 1
        raise OSError(5, "Input/output error")

    agent.poll = poll
    life = Lifecycle(agent, OpsConfig(give_up_after_s=0), Notifier({}))
    stop = StopFlag()
    threading.Timer(2.2, stop.request).start()
    try:
        run_realtime(agent, stop, lifecycle=life)  # board mode: the monotonic clock
    finally:
        world.close()
    assert 2 <= calls["n"] <= 4, f"{calls['n']} polls in 2.2 s"
    assert life.tick_failures == calls["n"] and "Input/output error" in life.last_error


def test_hooks_run_every_beat_and_after_the_restore_in_order(tmp_path: Path) -> None:
    agent, world = _sim_agent()
    order: list[str] = []
    beats: list[tuple[float, bool]] = []
    real_stop = agent.stop

    def stop_levers() -> None:
        order.append("levers")
        real_stop()

    def failing() -> None:
        order.append("jobs")
        raise RuntimeError("outbox full")

    agent.stop = stop_levers
    try:
        code = run_service(
            agent, StopFlag(), world, 600.0, max_seconds=0.8, notifier=Notifier({}),
            status_socket=tmp_path / "s.sock",
            on_beat=lambda now, local, d: beats.append((now, d is not None)),
            after_stop=[failing, lambda: order.append("link")])
    finally:
        world.close()
    assert code == 0
    assert order == ["levers", "jobs", "link"], "a failing step does not skip the next"
    times = [t for t, _ in beats]
    assert len(beats) > 50 and times == sorted(times), "every beat, in the world's time"
    assert sum(made for _, made in beats) == agent.stats.ticks, "the decisions go along"


def test_restore_that_overruns_its_bound_exits_anyway() -> None:
    agent, world = _sim_agent()
    try:
        agent.stop = lambda: time.sleep(3.0)
        overran = threading.Event()
        life = Lifecycle(agent, OpsConfig(stop_timeout_s=1.0), Notifier({}),
                         on_overrun=overran.set)
        started = time.monotonic()
        threading.Thread(target=life.shutdown, args=("SIGTERM",), daemon=True).start()
        assert overran.wait(2.5), "the bound must fire while the restore hangs"
        assert 0.9 <= time.monotonic() - started < 2.5
    finally:
        world.close()


# -- the notify client ------------------------------------------------------------------------


def test_notifier_speaks_to_a_path_socket_and_reads_watchdog_usec(tmp_path: Path) -> None:
    n = NotifyListener(abstract=False, directory=tmp_path)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": n.env_value, "WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_s == 30.0
        assert notifier.ready("up\nand running")
        assert notifier.status("one") and not notifier.status("one"), "unchanged: not resent"
        notifier.reloading()
        notifier.stopping()
        n.wait_for(lambda m: "STOPPING" in m)
        msgs = n.all()
        assert msgs[0] == {"READY": "1", "STATUS": "up and running"}, "one line per value"
        assert msgs[1] == {"STATUS": "one"}
        assert msgs[2]["RELOADING"] == "1" and int(msgs[2]["MONOTONIC_USEC"]) > 0
        assert notifier.sent == 4 and notifier.failed == 0
    finally:
        n.close()


def test_notifier_without_a_manager_or_with_one_it_cannot_reach() -> None:
    silent = Notifier({})
    assert not silent.enabled and not silent.ready() and silent.watchdog_s is None
    assert notify_address("vsock:2:1234") is None
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False
    # WATCHDOG_USEC meant for another process (inherited) is not ours
    other = Notifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None
    gone = Notifier({"NOTIFY_SOCKET": f"@qrad-nobody-{uuid.uuid4().hex}"})
    assert gone.enabled and not gone.watchdog() and gone.failed == 1, "never raises"


def _waited(stop: StopFlag, timeout: float) -> float:
    started = time.monotonic()
    stop.wait(timeout)
    return time.monotonic() - started


def test_stop_flag_wakes_the_loop_for_signals_and_other_threads() -> None:
    stop = StopFlag()
    assert not stop.take_reload()
    assert 0.15 <= _waited(stop, 0.2) < 1.0, "nothing pending: the wait runs its course"
    # signals arrive as the handler: a HUP wakes the loop, which takes one reload
    stop._handler(signal.SIGHUP, None)
    stop._handler(signal.SIGHUP, None)
    assert _waited(stop, 5.0) < 0.5 and not stop.is_set()
    assert stop.take_reload() and not stop.take_reload(), "two HUPs before a turn: one reload"
    assert _waited(stop, 0.2) >= 0.15, "the pipe was drained"
    # a stop request from another thread ends a long wait at once
    threading.Timer(0.2, stop.request, args=("test",)).start()
    assert _waited(stop, 5.0) < 1.0
    assert stop.is_set() and stop.event.is_set() and stop.signal_name == "test"
    # SIGTERM keeps the first reason
    stop._handler(signal.SIGTERM, None)
    assert stop.signal_name == "test"


# -- log lines ----------------------------------------------------------------------------------


def _record(msg: str, level: int = logging.INFO, **ctx: Any) -> logging.LogRecord:
    rec = logging.LogRecord("qrad_agent", level, __file__, 1, msg, (), None)
    if ctx:
        rec.ctx = ctx
    return rec


def test_log_format_one_event_per_line_with_context() -> None:
    journal = OneLineFormatter(journald=True)
    line = journal.format(_record("reload refused", logging.ERROR, path="/etc/a b.toml",
                                  problems="x\ny", ok=False))
    assert line == '<3>qrad_agent: reload refused path="/etc/a b.toml" problems="x\\ny" ok=false'
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("tick failed", logging.ERROR)
        rec.exc_info = sys.exc_info()
    text = journal.format(rec)
    assert "\n" not in text and "ValueError: boom" in text and text.startswith("<3>")
    terminal = OneLineFormatter(journald=False).format(_record("ready", ticks=1))
    assert terminal.endswith("INFO qrad_agent: ready ticks=1") and terminal[:4].isdigit()


def test_journald_detection_checks_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    f = open(tmp_path / "err", "w")  # noqa: SIM115
    try:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not under_journald(f), "inherited by a process whose stderr went elsewhere"
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not under_journald(f)
        assert not under_journald(io.StringIO())
    finally:
        f.close()
    buf = io.StringIO()
    configure(stream=buf)
    try:
        event(logging.getLogger("qrad_agent.test"), logging.WARNING, "hello", n=3)
        assert buf.getvalue().rstrip().endswith("WARNING qrad_agent.test: hello n=3")
    finally:
        logging.getLogger().handlers.clear()
