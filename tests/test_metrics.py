"""The Prometheus endpoint: the text exposition format, checked line by line, and the figures
against the status socket of the same running agent."""

from __future__ import annotations

import http.client
import math
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from qrad_agent.ops.metrics import CONTENT_TYPE, MetricsServer, render_metrics
from qrad_agent.ops.settings import MetricsConfig
from qrad_agent.ops.status_server import SnapshotBox
from tests.test_runner_lifecycle import AgentProcess

# the text format 0.0.4: a metric name, optional labels with escaped values, a float
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")
HELP = re.compile(rf"^# HELP ({NAME}) \S.*$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse(text: str) -> dict[str, list[tuple[str, float]]]:
    """Every sample by family, checking the format strictly as it goes."""
    assert text.endswith("\n")
    families: dict[str, list[tuple[str, float]]] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if m := HELP.match(line):
            assert m.group(1) not in helped, f"HELP twice: {line}"
            helped.add(m.group(1))
            continue
        if m := TYPE.match(line):
            name = m.group(1)
            assert name in helped and name not in families, f"TYPE out of order: {line}"
            typed[name] = m.group(2)
            families[name] = []
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert name in typed, f"sample before its TYPE: {line}"
        if typed[name] == "counter":
            assert name.endswith("_total"), name
        v = float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
        families[name].append((labels, v))
    assert all(families.values()), "a family with no samples must not be announced"
    return families


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    a = AgentProcess(tmp_path_factory.mktemp("metrics"), "--metrics-port", str(port),
                     speed=60)
    try:
        a.wait_running()
        yield a, port
    finally:
        a.stop()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def one(families: dict[str, list[tuple[str, float]]], name: str, labels: str = "") -> float:
    for got, v in families[name]:
        if labels in got:
            return v
    raise AssertionError(f"no {name} with {labels}: {families[name]}")


def test_endpoint_serves_the_agents_figures(agent: tuple[AgentProcess, int]) -> None:
    proc, port = agent
    status, ctype, body = scrape(port)
    assert status == 200 and ctype == CONTENT_TYPE
    m = parse(body)
    doc = proc.status()
    assert one(m, "qrad_up") == 1 and one(m, "qrad_loop_healthy") == 1
    assert one(m, "qrad_info", 'node="qrad-sim"') == 1
    assert one(m, "qrad_room_temperature_celsius") == pytest.approx(
        doc["room"]["temperature_c"], abs=0.5)
    assert one(m, "qrad_sensor_ok", 'sensor="room"') == 1
    assert one(m, "qrad_plan_frequency_hertz") % 1000 == 0
    assert one(m, "qrad_power_watts", f'source="{doc["power"]["source"]}"') > 0
    assert one(m, "qrad_lever_available", 'lever="cpufreq"') == 1
    assert 0 <= one(m, "qrad_demand_ratio") <= 1
    # counters only go up
    first = one(m, "qrad_ticks_total")
    time.sleep(0.6)
    again = parse(scrape(port)[2])
    assert one(again, "qrad_ticks_total") > first
    assert one(again, "qrad_sensor_reads_total", 'sensor="room"') >= one(
        m, "qrad_sensor_reads_total", 'sensor="room"')


def test_other_paths_are_not_found(agent: tuple[AgentProcess, int]) -> None:
    status, _, body = scrape(agent[1], "/")
    assert status == 404 and "/metrics" in body


def test_render_escapes_labels_and_skips_what_is_unknown() -> None:
    doc = {
        "state": "starting",
        "agent": {"version": "1", "node": 'a"b\\c\nd', "simulated": False},
        "loop": {"healthy": False, "last_tick_age_s": None},
        "readings": {"r1": {"role": "room", "quality": "crc_error", "temperature_c": None,
                            "counters": {"reads": 5, "errors": {"crc_error": 2}}}},
        "power": {"watts": float("nan"), "source": None},
        "counters": {"ticks": 0},
    }
    m = parse(render_metrics(doc))
    assert one(m, "qrad_info", r'node="a\"b\\c\nd"') == 1
    assert one(m, "qrad_up") == 0 and one(m, "qrad_loop_healthy") == 0
    assert one(m, "qrad_sensor_errors_total", 'quality="crc_error"') == 2
    assert math.isnan(one(m, "qrad_power_watts", 'source="unknown"'))
    assert "qrad_room_temperature_celsius" not in m, "no value: no sample, no family"
    assert "qrad_sensor_temperature_celsius" not in m


def test_server_on_a_free_port_and_loopback_only() -> None:
    box = SnapshotBox()
    server = MetricsServer(box, "127.0.0.1", 0)
    server.start()
    try:
        status, _, body = scrape(server.port)
        assert status == 200 and "qrad_up 0" in body, "before the first tick: starting"
    finally:
        server.close()
    with pytest.raises(ValidationError, match="not a loopback address"):
        MetricsConfig(host="0.0.0.0")
    assert MetricsConfig(host="::1").host == "::1"
    assert MetricsConfig(host="localhost").enabled is False


def test_metrics_port_in_use_does_not_stop_the_agent(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        a = AgentProcess(tmp_path, "--metrics-port", str(port), speed=60)
        try:
            a.wait_running()
        finally:
            a.stop()
    assert "no metrics endpoint" in a.stderr()
