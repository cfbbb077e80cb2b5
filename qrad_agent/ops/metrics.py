"""An optional Prometheus endpoint: ``GET /metrics`` in the text exposition format (0.0.4).

Written by hand rather than with ``prometheus-client``: the figures already exist in the
status snapshot the loop publishes, so all this needs is a formatter and a tiny HTTP server,
and a board gains no dependency. Like the status socket, the server thread only reads the
published snapshot. It listens on loopback only (``ops.metrics.host`` refuses others): it
has no authentication.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from qrad_agent.ops.status_server import SnapshotBox

log = logging.getLogger("qrad_agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    return None


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[dict[str, Any], float]] = []

    def add(self, value: Any, **labels: Any) -> None:
        v = _number(value)
        if v is not None:
            self.samples.append((labels, v))

    def lines(self) -> Iterable[str]:
        if not self.samples:
            return
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, v in self.samples:
            shown = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
            yield f"{self.name}{{{shown}}} {_value(v)}" if shown else f"{self.name} {_value(v)}"


def render_metrics(doc: Mapping[str, Any]) -> str:
    """The status document as Prometheus metrics."""
    fams: dict[str, _Family] = {}

    def fam(name: str, kind: str, help_text: str) -> _Family:
        f = fams.get(name)
        if f is None:
            f = fams[name] = _Family(name, kind, help_text)
        return f

    def get(*path: str) -> Any:
        cur: Any = doc
        for p in path:
            if not isinstance(cur, Mapping):
                return None
            cur = cur.get(p)
        return cur

    agent = get("agent") or {}
    fam("qrad_info", "gauge", "The agent's version and node; always 1.").add(
        1, version=agent.get("version", ""), node=agent.get("node", ""),
        simulated=str(bool(agent.get("simulated"))).lower())
    fam("qrad_up", "gauge", "1 while the agent runs (state running), else 0.").add(
        doc.get("state") == "running")
    fam("qrad_uptime_seconds", "gauge", "Seconds since the agent started.").add(
        agent.get("uptime_s"))
    fam("qrad_loop_healthy", "gauge", "1 while control ticks come on time.").add(
        get("loop", "healthy"))
    fam("qrad_last_tick_age_seconds", "gauge", "Seconds since the last good control tick.").add(
        get("loop", "last_tick_age_s"))
    counters = get("counters") or {}
    for key, help_text in (
        ("ticks", "Control ticks done."),
        ("polls", "Sensor polls done."),
        ("lever_errors", "Lever applications that failed."),
        ("tick_failures", "Control beats that raised an error."),
        ("reloads", "Config reloads applied (SIGHUP)."),
        ("reloads_refused", "Config reloads refused as invalid."),
        ("watchdog_sent", "Watchdog keep-alives sent to systemd."),
    ):
        fam(f"qrad_{key}_total", "counter", help_text).add(counters.get(key))
    fam("qrad_room_temperature_celsius", "gauge", "Room temperature (median of healthy "
        "room sensors).").add(get("room", "temperature_c"))
    fam("qrad_room_sensors_healthy", "gauge", "Room sensors giving ok readings.").add(
        get("room", "healthy"))
    fam("qrad_target_temperature_celsius", "gauge", "The thermostat's target now.").add(
        get("thermostat", "target_c"))
    fam("qrad_demand_ratio", "gauge", "Heat demand applied, 0..1.").add(get("demand"))
    fam("qrad_plan_slots", "gauge", "Worker slots the plan runs.").add(get("plan", "slots"))
    khz = _number(get("plan", "freq_khz"))
    fam("qrad_plan_frequency_hertz", "gauge", "CPU frequency cap of the plan.").add(
        None if khz is None else khz * 1000)
    fam("qrad_plan_quota_ratio", "gauge", "CPU quota share of each slot, 0..1.").add(
        get("plan", "quota"))
    fam("qrad_power_watts", "gauge", "Electrical power of the board = heat output.").add(
        get("power", "watts"), source=get("power", "source") or "unknown")
    fam("qrad_safety_limit_ratio", "gauge", "Cap on demand from the safety supervisor.").add(
        get("safety", "limit"))
    depth = get("outbox", "depth")
    fam("qrad_outbox_depth", "gauge", "Messages waiting in the outbox.").add(depth)
    jobs = doc.get("jobs")
    if isinstance(jobs, list):
        fam("qrad_jobs", "gauge", "Jobs on this node.").add(len(jobs))
    readings = doc.get("readings") or {}
    for name, r in readings.items() if isinstance(readings, Mapping) else ():
        if not isinstance(r, Mapping):
            continue
        role = r.get("role", "")
        fam("qrad_sensor_temperature_celsius", "gauge", "Last ok temperature of each "
            "sensor.").add(r.get("temperature_c"), sensor=name, role=role)
        fam("qrad_sensor_ok", "gauge", "1 if the sensor's last reading was ok.").add(
            r.get("quality") == "ok", sensor=name, role=role)
        c = r.get("counters") or {}
        fam("qrad_sensor_reads_total", "counter", "Polls of each sensor.").add(
            c.get("reads"), sensor=name)
        errors = c.get("errors") or {}
        for quality, n in errors.items() if isinstance(errors, Mapping) else ():
            fam("qrad_sensor_errors_total", "counter", "Bad polls of each sensor, by "
                "quality.").add(n, sensor=name, quality=quality)
    levers = doc.get("levers") or {}
    for name, lv in levers.items() if isinstance(levers, Mapping) else ():
        if isinstance(lv, Mapping):
            fam("qrad_lever_available", "gauge", "1 if the board has the lever.").add(
                lv.get("available"), lever=name)
    lines = [line for f in fams.values() for line in f.lines()]
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    box: SnapshotBox  # set on the subclass made per server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, "text/plain; charset=utf-8", b"not found; metrics are at /metrics\n")
            return
        try:
            body = render_metrics(self.box.document()).encode()
        except Exception:
            log.exception("cannot render metrics")
            self._send(500, "text/plain; charset=utf-8", b"cannot render metrics\n")
            return
        self._send(200, CONTENT_TYPE, body)

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _HTTPServerV6(HTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    def __init__(self, box: SnapshotBox, host: str = "127.0.0.1", port: int = 9810) -> None:
        self.box, self.host, self.port = box, host, port
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handler = type("MetricsHandler", (_Handler,), {"box": self.box})
        server = _HTTPServerV6 if ":" in self.host else HTTPServer
        self._httpd = server((self.host, self.port), handler)
        self._httpd.timeout = 2.0
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.5}, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
