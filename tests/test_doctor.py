"""`qrad-agent doctor`: a healthy simulated board passes; each injected problem fails the
check it belongs to, with a fix, and leaves the other checks alone. The broker check runs
against a real Mosquitto; the service check against a real agent process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qrad_agent.config import AgentConfig, SensorConfig
from qrad_agent.ops.doctor import (
    PROBLEMS,
    Board,
    Finding,
    Status,
    check_broker,
    exit_code,
    mqtt_connect_packet,
    run_checks,
    sim_board,
)
from qrad_agent.ops.status_server import SnapshotBox, StatusServer
from tests.test_runner_lifecycle import REPO, AgentProcess

if TYPE_CHECKING:
    from qrad_agent.link.settings import LinkConfig


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path_factory.mktemp("doctor-agent"), speed=60)
    try:
        a.wait_running()
        yield a
    finally:
        a.stop()


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def checks_on(problems: set[str], agent: AgentProcess, cfg: AgentConfig | None = None
              ) -> dict[str, Finding]:
    with sim_board(cfg or AgentConfig(), problems, agent.socket) as (board, sim_cfg):
        return by_check(run_checks(None, board, cfg=sim_cfg))


EXPECTED = ["config", "i2c bus 1", "sensor room", "lever slots", "lever duty_cycle",
            "lever cpufreq", "lever rapl", "worker cgroup", "meter", "broker", "clock", "disk",
            "service"]


def test_healthy_simulated_board_passes_every_check(agent: AgentProcess) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qrad_agent", "doctor", "--sim", "--json", "--socket",
         str(agent.socket)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["simulated"] and report["injected"] == []
    found = {c["check"]: c for c in report["checks"]}
    assert list(found) == EXPECTED
    bad = {k: c for k, c in found.items() if c["status"] not in ("pass", "skip")}
    assert not bad, bad
    assert found["sensor room"]["status"] == "pass" and "°C" in found["sensor room"]["summary"]
    assert found["lever cpufreq"]["status"] == "pass"
    assert found["worker cgroup"]["status"] == "pass"
    assert found["service"]["status"] == "pass"
    assert f"pid {agent.proc.pid}" in found["service"]["summary"]
    # not configured on the built-in config: skipped, not failed
    assert found["meter"]["status"] == "skip" and found["broker"]["status"] == "skip"


# each injected problem: the check that must fail (or warn), and a word its fix must hold
PROBLEM_CHECKS = {
    "missing-bus": ("i2c bus 1", Status.FAIL, "modprobe i2c-dev"),
    "unhealthy-sensor": ("sensor room", Status.FAIL, "sensors scan"),
    "unwritable-lever": ("lever cpufreq", Status.FAIL, "udev rule"),
    "no-cgroup": ("worker cgroup", Status.FAIL, "Delegate=yes"),
    "no-meter": ("meter", Status.FAIL, "RS-485"),
    "broker-down": ("broker", Status.FAIL, "firewall"),
    "low-disk": ("disk", Status.FAIL, "free space"),
    "clock-unsynced": ("clock", Status.WARN, "set-ntp"),
    "stale-service": ("service", Status.FAIL, "journalctl"),
}


def test_every_problem_doctor_knows_is_tested() -> None:
    assert set(PROBLEM_CHECKS) == set(PROBLEMS)


@pytest.mark.parametrize("problem", sorted(PROBLEM_CHECKS))
def test_each_injected_problem_fails_its_check_with_a_fix(problem: str,
                                                         agent: AgentProcess) -> None:
    check, status, fix_word = PROBLEM_CHECKS[problem]
    if problem == "broker-down":
        from qrad_agent.link.settings import LinkConfig

        with sim_board(AgentConfig(), {problem}, agent.socket) as (board, cfg):
            found = by_check(run_checks(None, board, cfg=cfg, link=LinkConfig(enabled=True)))
    else:
        found = checks_on({problem}, agent)
    f = found[check]
    assert f.status is status, f
    assert fix_word in f.fix, f
    # the others stay healthy: only the board's actual fault is reported
    others = {k: v for k, v in found.items() if v.status in (Status.FAIL, Status.WARN)
              and k != check}
    if problem == "missing-bus":  # the sensor on the missing bus cannot answer either
        assert set(others) == {"sensor room"} and others["sensor room"].status is Status.FAIL
        assert "missing" in others["sensor room"].summary
    else:
        assert not others, others


def test_unhealthy_sensor_with_crc_reads_as_crc_error(agent: AgentProcess) -> None:
    cfg = AgentConfig(sensors=[
        SensorConfig(name="air", kind="sht3x", address=0x44),
        SensorConfig(name="wall", kind="tmp102", address=0x48),
    ])
    found = checks_on({"unhealthy-sensor"}, agent, cfg)
    assert found["sensor air"].status is Status.FAIL
    assert "crc_error" in found["sensor air"].summary and "pull-up" in found["sensor air"].fix
    assert found["sensor wall"].status is Status.PASS


def test_doctor_cli_reports_injected_problems_and_refuses_them_on_a_real_board(
        agent: AgentProcess) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "qrad_agent", "doctor", "--sim", "--inject", "low-disk",
         "--inject", "no-cgroup", "--socket", str(agent.socket)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert any(line.startswith("FAIL  disk") for line in lines), res.stdout
    assert any(line.startswith("FAIL  worker cgroup") for line in lines), res.stdout
    assert sum("fix:" in line for line in lines) >= 2
    assert "2 failed" in lines[-1]
    res = subprocess.run([sys.executable, "-m", "qrad_agent", "doctor", "--inject", "low-disk"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "simulated board only" in res.stderr


def test_invalid_config_fails_first_and_skips_the_board(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[thermostat]\ncomfort_c = 40\n')
    findings = run_checks(bad, Board(simulated=True, status_socket=tmp_path / "none.sock"))
    f = by_check(findings)
    assert f["config"].status is Status.FAIL and "thermostat.comfort_c" in f["config"].summary
    assert "config validate" in f["config"].fix
    assert f["checks"].status is Status.SKIP
    assert exit_code(findings) == 1
    missing = run_checks(tmp_path / "nope.toml", Board(status_socket=tmp_path / "x.sock"))
    assert by_check(missing)["config"].status is Status.FAIL
    assert "install a config" in by_check(missing)["config"].fix


def test_no_agent_fails_on_a_board_and_warns_on_the_simulator(tmp_path: Path) -> None:
    with sim_board(AgentConfig(), set(), tmp_path / "none.sock") as (board, cfg):
        sim = by_check(run_checks(None, board, cfg=cfg))["service"]
        board.simulated = False
        real = by_check(run_checks(None, board, cfg=cfg))["service"]
    assert sim.status is Status.WARN and "run --sim" in sim.fix
    assert real.status is Status.FAIL and "systemctl start qrad-agent" in real.fix


def test_a_hung_agent_fails_the_service_check(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, speed=60)
    try:
        agent.wait_running()
        agent.send(signal.SIGSTOP)  # the whole process: loop and status thread alike
        started = time.monotonic()
        with sim_board(AgentConfig(), set(), agent.socket) as (board, cfg):
            f = by_check(run_checks(None, board, cfg=cfg))["service"]
        assert time.monotonic() - started < 10, "doctor must not hang on a hung agent"
        assert f.status is Status.FAIL and "did not answer" in f.summary, f
    finally:
        agent.send(signal.SIGCONT)
        agent.stop()


# -- the broker, for real ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    from tests.mqtt_broker import Broker, require_mosquitto

    require_mosquitto()
    d = tmp_path_factory.mktemp("broker")
    pw = d / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "node", "s3cret"], check=True,
                   capture_output=True)
    b = Broker(d, conf=f"allow_anonymous false\npassword_file {pw}\n").start()
    try:
        yield b.host, b.port
    finally:
        b.stop()


def _link(host: str, port: int, password: str | None, tmp_path: Path) -> LinkConfig:
    auth = {}
    if password is not None:
        f = tmp_path / "pw"
        f.write_text(password + "\n")
        auth = {"username": "node", "password_file": str(f)}
    from qrad_agent.link.settings import LinkConfig

    return LinkConfig.model_validate({"enabled": True, "broker": {
        "host": host, "port": port, "auth": auth, "connect_timeout_s": 2}})


def test_broker_check_connects_with_credentials(broker: tuple[str, int], tmp_path: Path
                                                ) -> None:
    host, port = broker
    cfg = AgentConfig()
    ok = check_broker(cfg, _link(host, port, "s3cret", tmp_path), Board())
    assert ok.status is Status.PASS and "as node" in ok.summary, ok
    wrong = check_broker(cfg, _link(host, port, "nope", tmp_path), Board())
    assert wrong.status is Status.FAIL and "refused" in wrong.summary, wrong
    assert "link.broker.auth" in wrong.fix
    anonymous = check_broker(cfg, _link(host, port, None, tmp_path), Board())
    assert anonymous.status is Status.FAIL and "not authorised" in anonymous.summary


def test_broker_check_with_tls_against_a_plain_port(broker: tuple[str, int], tmp_path: Path
                                                    ) -> None:
    from qrad_agent.link.settings import LinkConfig

    host, port = broker
    link = LinkConfig.model_validate({"enabled": True, "broker": {
        "host": host, "port": port, "tls": {"enabled": True}, "connect_timeout_s": 2}})
    f = check_broker(AgentConfig(), link, Board())
    assert f.status is Status.FAIL and f.summary.startswith("TLS"), f
    assert "ca_file" in f.fix


def test_connect_packet_is_mqtt_311() -> None:
    pkt = mqtt_connect_packet("n1-doctor", "u", "p")
    assert pkt[0] == 0x10 and pkt[1] == len(pkt) - 2
    assert pkt[2:9] == b"\x00\x04MQTT\x04" and pkt[9] == 0xC2  # user, password, clean
    assert pkt.endswith(b"\x00\x09n1-doctor\x00\x01u\x00\x01p")
    long = mqtt_connect_packet("x" * 200, None, None)
    assert long[1] & 0x80 and long[2] == 1, "remaining length over 127 takes two bytes"


def test_levers_the_service_cannot_use_but_doctor_can_are_named(tmp_path: Path) -> None:
    # what a too-tight sandbox looks like: the agent's own inventory says "no" where the
    # same board, seen from the technician's shell, says "yes"
    box = SnapshotBox()
    box.publish({
        "version": 1, "state": "running", "agent": {"pid": 1},
        "loop": {"last_tick_monotonic": time.monotonic(), "late_after_s": 40.0},
        "counters": {"tick_failures": 0},
        "levers": {"cpufreq": {"available": False, "why_not": "permission denied: run as "
                               "root or install the udev rule"},
                   "quota": {"available": True, "why_not": ""}},
    })
    server = StatusServer(tmp_path / "s.sock", box)
    server.start()
    try:
        with sim_board(AgentConfig(), set(), tmp_path / "s.sock") as (board, cfg):
            found = by_check(run_checks(None, board, cfg=cfg))
    finally:
        server.close()
    assert found["service"].status is Status.PASS
    f = found["service levers"]
    assert f.status is Status.FAIL and "cpufreq: permission denied" in f.summary
    assert "quota" not in f.summary and "ReadWritePaths" in f.fix
