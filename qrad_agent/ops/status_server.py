"""The local status socket: one JSON document per connection, for ``qrad-agent status``,
``top``, ``events``, ``jobs`` and ``doctor``.

The control loop builds a snapshot after its beats and *publishes* it (one reference swap);
the server thread only serialises the latest published snapshot. So the server never reads
the agent's live state, and the loop stays the one thread that mutates it. A loop that hangs
stops publishing: the server still answers, and the ages it adds at serve time
(``loop.last_tick_age_s``, ``loop.healthy``) show the hang.

The socket lives in the runtime directory (``/run/qrad-agent``, made by systemd). Connecting
to a Unix socket needs write permission on it, so "group-readable" here means mode 0660:
members of the service's group (technicians) may ask, nobody else can.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qrad_agent.agent import Agent
    from qrad_agent.sim.world import SimWorld

log = logging.getLogger("qrad_agent.status")

SNAPSHOT_VERSION = 1
CLIENT_TIMEOUT_S = 2.0  # a client that does not read its answer in this time is dropped
MAX_DOCUMENT = 8 * 1024 * 1024


class StatusUnavailable(Exception):
    """The status socket could not be asked; the message says why and what to do.

    ``kind``: ``absent`` (no socket), ``refused`` (nobody listens), ``denied``, ``hung``
    (connected, no answer in time) or ``garbled`` (an answer that is not the status)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class SnapshotBox:
    """The latest snapshot, handed from the loop to the server thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._doc: Mapping[str, Any] = {"version": SNAPSHOT_VERSION, "state": "starting"}
        self._at = time.monotonic()
        self.published = 0

    def publish(self, doc: Mapping[str, Any]) -> None:
        """Hand over ``doc``; the caller must not change it afterwards (a new dict each time)."""
        with self._lock:
            self._doc, self._at = doc, time.monotonic()
            self.published += 1

    def current(self) -> tuple[Mapping[str, Any], float]:
        with self._lock:
            return self._doc, self._at

    def document(self) -> dict[str, Any]:
        """The snapshot as served: plus the ages measured now, which a hung loop cannot
        update itself (so a stall shows even though the loop publishes nothing)."""
        doc, at = self.current()
        now = time.monotonic()
        out = dict(doc)
        out["served_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        out["snapshot_age_s"] = round(now - at, 3)
        loop = doc.get("loop")
        if isinstance(loop, Mapping):
            loop = dict(loop)
            last = loop.get("last_tick_monotonic")
            late = loop.get("late_after_s")
            if isinstance(last, int | float):
                age = now - last
                loop["last_tick_age_s"] = round(age, 3)
                if isinstance(late, int | float) and doc.get("state") == "running":
                    loop["healthy"] = age <= late
            out["loop"] = loop
        return out

    def render(self) -> bytes:
        return (json.dumps(self.document(), default=str) + "\n").encode()


class StatusServer:
    """Serves ``box`` on a Unix stream socket at ``path`` from a daemon thread."""

    def __init__(self, path: Path, box: SnapshotBox, mode: int = 0o660) -> None:
        self.path = Path(path)
        self.box = box
        self.mode = mode
        self.served = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._wake_r = self._wake_w = -1

    def start(self) -> None:
        """Bind and serve. Raises ``OSError`` with a message naming the path and the fix."""
        d = self.path.parent
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create {d} for the status socket: "
                          f"{exc.strerror} (the unit's RuntimeDirectory= makes it)") from None
        if (self.path.exists() or self.path.is_symlink()) and _answers(self.path):
            raise OSError(errno.EADDRINUSE, f"another agent already serves status at "
                          f"{self.path}; stop it, or give this one another socket")
        # bind under a temporary name and rename over the final one: the path is never
        # missing for a client (a stale socket from a crash is replaced in one step), and
        # the mode is set before anyone can connect
        tmp = d / f".{self.path.name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            sock.listen(16)
            os.replace(tmp, self.path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OSError(exc.errno, f"cannot serve status at {self.path}: "
                          f"{exc.strerror or exc}") from None
        # the thread sleeps in select() until a client or close() (through this pipe) wakes
        # it: no timeout to poll, so an idle agent costs no wake-ups here
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="status-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        listening = self._sock.fileno()
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select([listening, self._wake_r], [], [])
                if listening not in readable:
                    continue  # woken by close()
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the client left before accept(), or a signal
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: try again rather than spin
                continue
            with conn:
                try:
                    conn.settimeout(CLIENT_TIMEOUT_S)  # blocking again, with a limit
                    conn.sendall(self.box.render())
                    self.served += 1
                except OSError as exc:
                    log.debug("status client went away: %s", exc)
                except Exception:  # a snapshot that does not serialise is a bug to see
                    log.exception("cannot serve the status snapshot")

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(2.0)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            # only our own socket is removed: another agent may have replaced it since
            with contextlib.suppress(OSError):
                if not _answers(self.path):
                    self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def fetch_status(path: Path, timeout: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """Ask the agent at ``path``; raises ``StatusUnavailable`` saying why and what to do."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise StatusUnavailable(
                f"no status socket at {path}: the agent is not running (systemctl status "
                "qrad-agent), or it serves elsewhere (ops.status_socket, --socket)",
                "absent") from None
        except PermissionError:
            raise StatusUnavailable(
                f"permission denied on {path}: run as root or as a member of the agent's "
                "group (usermod -aG qrad-agent $USER, then log in again)", "denied") from None
        except ConnectionRefusedError:
            raise StatusUnavailable(
                f"nothing listens on {path}: the agent stopped or crashed (journalctl -u "
                "qrad-agent -e)", "refused") from None
        except TimeoutError:
            raise StatusUnavailable(
                f"the agent at {path} did not accept within {timeout:g} s", "hung") from None
        except OSError as exc:
            raise StatusUnavailable(f"cannot connect to {path}: {exc.strerror or exc}",
                                    "refused") from None
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_DOCUMENT:
                    raise StatusUnavailable(f"the answer from {path} exceeds "
                                            f"{MAX_DOCUMENT} bytes; is it the agent?", "garbled")
        except TimeoutError:
            raise StatusUnavailable(
                f"the agent at {path} accepted but did not answer within {timeout:g} s "
                "(stopped, or hung: journalctl -u qrad-agent -e)", "hung") from None
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise StatusUnavailable(f"{path} answered something that is not JSON: {exc}",
                                "garbled") from None
    if not isinstance(doc, dict):
        raise StatusUnavailable(f"{path} answered JSON that is not an object", "garbled")
    return doc


# -- what the agent is doing, as a document ------------------------------------------------


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _optional(agent: Agent, *names: str) -> Any:
    """The ``status()`` of an optional part of the agent (link, outbox, jobs): the first of
    ``names`` the agent has with such a method."""
    for name in names:
        view = getattr(getattr(agent, name, None), "status", None)
        if callable(view):
            try:
                return view()
            except Exception as exc:  # a broken optional part must not break the status
                return {"error": f"{type(exc).__name__}: {exc}"}
    return None


JOB_PHASES = ("running", "suspended", "queued")


def _jobs(view: Any) -> list[Any]:
    """Jobs as a list of ``{id, state}``: a list as given, or the scheduler's read-back
    (job ids by phase)."""
    if isinstance(view, list):
        return view
    if isinstance(view, Mapping):
        return [{"id": job, "state": phase} for phase in JOB_PHASES
                for job in view.get(phase) or []]
    return []


def agent_view(agent: Agent, world: SimWorld | None = None) -> dict[str, Any]:
    """The agent's state for people: everything ``status`` shows. Built in the loop thread."""
    base = agent.status()  # the agent's own summary; extended, not repeated, below
    d = agent.stats.last_decision
    room = agent.stats.last_room
    readings: dict[str, Any] = {}
    for s in agent.sensors:
        r = agent.readings.get(s.name)
        readings[s.name] = {
            "role": s.role.value,
            "quality": r.quality.value if r else None,
            "temperature_c": _r(r.temperature_c) if r else None,
            "humidity_pct": _r(r.humidity_pct, 1) if r else None,
            "co2_ppm": _r(r.co2_ppm, 0) if r else None,
            "detail": r.detail if r else "not polled yet",
            "counters": s.counters_dict(),
        }
    levers: dict[str, Any] = {}
    for info in agent.inventory:
        levers[info.name] = {"available": info.available, "why_not": info.why_not,
                             "range": dict(info.range)}
    for lever in agent.levers:
        entry = levers.setdefault(lever.name, {"available": True, "why_not": ""})
        try:
            entry["read_back"] = lever.read_back()
        except Exception as exc:  # reading back is for people; a failure is shown, not fatal
            entry["read_back_error"] = f"{type(exc).__name__}: {exc}"
    thermostat = getattr(agent.controller, "thermostat", None)
    mode = getattr(thermostat, "mode", None)
    override = getattr(thermostat, "override", None)
    plan = d.plan if d else None
    pid = getattr(agent.controller, "pid", None)
    link = _optional(agent, "link", "link_bridge")
    outbox = _optional(agent, "outbox")
    jobs = _optional(agent, "jobs", "jobs_bridge")
    return {
        "room": {
            "temperature_c": _r(room.temperature_c),
            "healthy": room.healthy,
            "configured": room.configured,
        },
        "readings": readings,
        "thermostat": {
            "mode": str(mode) if mode is not None else None,
            "target_c": d.target_c if d else None,
            "reason": d.reason if d else None,
            "comfort_now": d.comfort_now if d else None,
            "override": {"target_c": override[0]} if override else None,
        },
        "controller": {
            "name": getattr(agent.controller, "name", None),
            **{k: getattr(pid, k, None) for k in ("kp", "ki", "kd", "integral")},
        },
        "demand": _r(d.demand, 4) if d else None,
        "plan": None if plan is None else {
            "slots": plan.slots, "freq_khz": plan.freq_khz, "quota": plan.quota,
            "text": plan.describe(),
        },
        "levers": levers,
        "power": _power(agent, world),
        "jobs": _jobs(jobs),
        "jobs_detail": jobs if isinstance(jobs, Mapping) else None,
        "safety": base.get("safety"),
        "link": link if link is not None else {"state": "not configured"},
        "outbox": outbox if outbox is not None else {"depth": None, "state": "not configured"},
        "counters": {
            "ticks": agent.stats.ticks, "polls": agent.stats.polls,
            "lever_errors": agent.stats.lever_errors,
        },
        "safety_events": base.get("events", []),
    }


def _power(agent: Agent, world: SimWorld | None) -> dict[str, Any]:
    """Watts and where they come from: the agent's power reading (meter, RAPL or model), else
    the power model applied to the plan. On the simulator the physics' own figure is added
    (``simulator_watts``): what the agent believes next to what the room receives."""
    out: dict[str, Any] | None = None
    reading = getattr(agent, "last_power", None)
    as_dict = getattr(reading, "as_dict", None)
    if callable(as_dict):
        got = as_dict()
        if isinstance(got, dict):
            out = got
            total = getattr(getattr(agent, "energy", None), "total_wh", None)
            if isinstance(total, int | float):
                out["energy_wh"] = round(total, 1)
    if out is None:
        d = agent.stats.last_decision
        if d is None:
            out = {"watts": None, "source": None}
        else:
            model = agent.controller.allocator.model
            out = {"watts": round(model.watts(d.plan), 1), "source": "model",
                   "detail": "estimated from the plan (no power reading in the agent)"}
    if world is not None:
        out["simulator_watts"] = round(world.lever_power_w(), 1)
        out["simulator_energy_wh"] = round(world.energy_wh, 1)
    return out
