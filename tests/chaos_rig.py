"""The chaos rig (issue 9): a real Mosquitto, the reference dispatcher and three radiator
agents, each a process of its own, run a batch of jobs while faults are injected on a
schedule drawn from a seed:

- ``broker``: Mosquitto is stopped (SIGTERM, it saves its persistence file) or killed
  (SIGKILL), kept down a moment, and started again on the same port;
- ``kill``: one agent is SIGKILLed, kept down a moment, and started again on its state;
- ``cut``: the network between one agent and the broker is cut, then healed. Each agent
  reaches the broker through a TCP proxy of the rig's own (``TcpProxy``, loopback only;
  docs/decisions/0014-chaos.md says why not network namespaces). A cut either blackholes
  the link (nothing passes, nobody is told, as when a cable is pulled) or resets it (every
  connection dies with an RST and new ones are refused, as when a NAT or a proxy restarts).

Faults come one at a time, spread over the run by the jobs' progress: fault ``i`` of ``F``
waits until ``(i+1)/(F+1)`` of the jobs are done, and for the previous fault's recovery. The
jobs are queued in ``F+1`` waves, the next one just before each fault, so that every fault
finds jobs placed and running (queued all at once, the last faults found the work done).

What is measured, from what really happened rather than from what was reported:

- Each job (``JOB_CODE``) takes an exclusive ``flock`` on a lock file of its job id, then
  appends a ``start`` line and, when its work is over, an ``end`` line to one shared log
  (O_APPEND: lines never interleave). A start that found the lock taken is a second attempt
  running while another one of the same job still lives: the kernel says so, not a clock.
- The rig opens a pidfd on every job process it sees start, so it knows when each attempt
  really ended, killed or not; overlapping attempts of one job are "running twice", each
  with its duration and the fault that caused it.
- A watcher (an MQTT client with a persistent session) records every telemetry batch:
  recovery after a fault is the time until a sample taken after the fault ended arrives;
  the telemetry gap of a fault is the silence a fleet saw from that radiator; samples
  missing are holes in each boot's ``seq``.
- The dispatcher's queue says which jobs succeeded and whether their result came with them.

Generalised helpers here that ``tests/test_jobs_e2e.py`` could use too: ``nobody_job_env``
(a job environment whose jobs run as ``nobody``), ``DispatcherProc`` (the dispatcher as a
process, through the ``qrad-fleet`` CLI).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from qrad_agent.fleet.keys import keygen
from qrad_agent.fleet.placement import FleetState
from qrad_agent.fleet.queue import FleetQueue
from qrad_agent.jobs.spec import JobSpec, parse_spec
from tests.mqtt_broker import Broker
from tests.test_jobs_e2e import REPO, AgentProc
from tests.test_jobs_sandbox import JobEnv

NODES = ("rad-a", "rad-b", "rad-c")
# Jobs run as ``nobody``, not as the default job user ``qrad-job``: the sandbox tests count
# the processes of ``qrad-job`` and must not see this rig's jobs.
CHAOS_JOB_USER = "nobody"

# argv: log, lock directory, seconds of work. The lock is held until the process dies, so
# a second attempt that starts while the first still lives finds it taken ("alone" 0).
JOB_CODE = (
    "import fcntl, os, sys, time\n"
    "log, locks, work = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
    "j, a = os.environ['QRAD_JOB_ID'], os.environ['QRAD_JOB_ATTEMPT']\n"
    "lk = os.open(f'{locks}/{j}', os.O_RDWR | os.O_CREAT, 0o666)\n"
    "try:\n"
    "    fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    alone = 1\n"
    "except BlockingIOError:\n"
    "    alone = 0\n"
    "out = os.open(log, os.O_WRONLY | os.O_APPEND)\n"
    "def mark(kind):\n"
    "    os.write(out, f'{kind} {j} {a} {os.getpid()} {time.monotonic():.6f} {alone} "
    "{os.getcwd()}\\n'.encode())\n"
    "mark('start')\n"
    "time.sleep(work)\n"
    "mark('end')\n"
)


# ------------------------------------------------------------------ plan and figures


@dataclass(frozen=True)
class ChaosPlan:
    jobs: int = 80
    broker_restarts: int = 3
    agent_kills: int = 2
    net_cuts: int = 1
    seed: int = 1
    work_s: tuple[float, float] = (0.05, 0.4)  # most jobs
    long_share: float = 0.08  # so that a fault finds jobs running
    long_s: tuple[float, float] = (1.5, 3.0)
    lease_s: float = 6.0
    broker_down_s: tuple[float, float] = (0.1, 1.0)
    agent_down_s: tuple[float, float] = (0.2, 2.0)
    cut_s: tuple[float, float] = (1.0, 9.0)
    settle_s: float = 0.3  # after a recovery, before the next fault
    recover_timeout_s: float = 30.0
    timeout_s: float = 600.0  # the whole run
    retry_after_s: float = 0.2
    max_attempts: int = 3  # the queue's default
    broker_modes: tuple[str, ...] = ("graceful", "crash")  # drawn from for each restart
    cut_modes: tuple[str, ...] = ("blackhole", "reset")  # drawn from for each cut

    @property
    def faults(self) -> int:
        return self.broker_restarts + self.agent_kills + self.net_cuts


@dataclass
class Fault:
    kind: str  # "broker", "kill", "cut"
    target: str  # "broker" or a node
    how: str  # broker: graceful/crash; kill: sigkill; cut: blackhole/reset
    down_s: float
    affected: tuple[str, ...]
    started: float = math.nan  # monotonic
    started_wall: float = math.nan
    ended: float = math.nan  # the fault was removed: broker listening, agent started, healed
    ended_wall: float = math.nan
    recovered: dict[str, float] = field(default_factory=dict)  # node -> fresh telemetry
    gaps: dict[str, float] = field(default_factory=dict)  # node -> telemetry silence

    def recovery_s(self) -> float | None:
        """Until every affected radiator's telemetry resumed (None: not all did)."""
        if any(n not in self.recovered for n in self.affected):
            return None
        return max(self.recovered[n] - self.ended for n in self.affected)


@dataclass(frozen=True)
class Attempt:
    job: str
    attempt: int
    pid: int
    node: str
    start: float  # monotonic, written by the job
    end: float | None  # the job's own end line (its work is complete)
    exit: float | None  # when its process was gone (pidfd), None if never seen alive
    alone: bool  # it got its job's lock

    @property
    def until(self) -> float:
        """The end of the attempt's life, as well as known."""
        for t in (self.exit, self.end):
            if t is not None:
                return t
        return self.start


@dataclass(frozen=True)
class Overlap:
    job: str
    first: Attempt
    second: Attempt
    seconds: float
    cause: str

    def describe(self) -> str:
        f, s = self.first, self.second
        return (f"{self.job}: attempt {f.attempt} on {f.node} (pid {f.pid}, lock "
                f"{'held' if f.alone else 'missed'}) and attempt {s.attempt} on {s.node} "
                f"(pid {s.pid}, lock {'held' if s.alone else 'missed'}) overlapped "
                f"{self.seconds:.2f} s; cause: {self.cause}")


@dataclass
class ChaosFigures:
    plan: ChaosPlan
    submitted: int = 0
    states: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # not succeeded at the end
    lost_why: list[str] = field(default_factory=list)  # each lost job's state and reason
    results_delivered: int = 0  # succeeded, exit 0, with the result's output
    work_done: int = 0  # jobs with at least one complete run
    work_done_more_than_once: int = 0  # run to completion again later (at least once)
    done_again_by: dict[str, int] = field(default_factory=dict)  # the fault in between
    overlaps: list[Overlap] = field(default_factory=list)
    lock_collisions: int = 0  # starts that found the job's lock taken
    attempts: dict[int, int] = field(default_factory=dict)  # fleet attempt -> jobs
    faults: list[Fault] = field(default_factory=list)
    samples_missing: int = 0
    missing_by: dict[str, int] = field(default_factory=dict)  # fault kind around each hole
    samples_received: int = 0
    total_s: float = 0.0
    jobs_s: float = 0.0  # from the first start to the last success
    leftover_processes: int = 0  # job processes alive at the very end
    notes: list[str] = field(default_factory=list)

    @property
    def running_twice(self) -> int:
        return len({o.job for o in self.overlaps})

    def recoveries(self, kind: str) -> list[float]:
        return [r for f in self.faults if f.kind == kind
                for r in [f.recovery_s()] if r is not None]

    def unrecovered(self) -> list[Fault]:
        return [f for f in self.faults if f.recovery_s() is None]

    def gaps(self) -> list[float]:
        return [g for f in self.faults for g in f.gaps.values()]

    def report(self) -> str:
        p = self.plan
        lines = [
            f"chaos: {p.jobs} jobs, {p.broker_restarts} broker restarts, {p.agent_kills} agent "
            f"SIGKILLs, {p.net_cuts} network cuts, seed {p.seed}, 3 agents",
            f"  jobs lost (not succeeded)     {len(self.lost)}  {self.states}",
            f"  running twice at once         {self.running_twice} jobs "
            f"({len(self.overlaps)} overlapping pairs; {self.lock_collisions} lock collisions)",
            f"  results delivered             {self.results_delivered} / {self.submitted}",
            f"  work done (>= 1 complete run) {self.work_done} / {self.submitted}; done again "
            f"later: {self.work_done_more_than_once} {self.done_again_by}",
            f"  fleet attempts per job        {dict(sorted(self.attempts.items()))}",
            f"  telemetry samples             {self.samples_received} received, "
            f"{self.samples_missing} missing (seq holes) {self.missing_by}",
        ]
        gaps = self.gaps()
        if gaps:
            lines.append(f"  telemetry gap at a fault      max {max(gaps):.2f} s, p50 "
                         f"{statistics.median(gaps):.2f} s ({len(gaps)} radiator-faults)")
        for kind, name in (("broker", "broker restart"), ("kill", "agent SIGKILL"),
                           ("cut", "network cut")):
            rs = self.recoveries(kind)
            n = sum(1 for f in self.faults if f.kind == kind)
            if n:
                text = (f"max {max(rs):.2f} s, p50 {statistics.median(rs):.2f} s"
                        if rs else "none recovered")
                lines.append(f"  time to recover, {name:<15}{text} ({len(rs)}/{n} recovered)")
        lines.append(f"  total {self.total_s:.1f} s; jobs from first start to last success "
                     f"{self.jobs_s:.1f} s ({self.submitted / max(self.jobs_s, 1e-9):.1f} jobs/s)")
        if self.leftover_processes:
            lines.append(f"  job processes left alive at the end: {self.leftover_processes}")
        for o in self.overlaps:
            lines.append(f"  overlap: {o.describe()}")
        lines.extend(f"  lost: {why}" for why in self.lost_why)
        for f in self.unrecovered():
            lines.append(f"  not recovered: {f.kind} {f.target} ({f.how}); "
                         f"resumed: {sorted(f.recovered)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------ the job environment


def nobody_job_env(base: Path) -> JobEnv:
    """A job environment below ``base`` whose jobs run as ``nobody`` (when the rig runs as
    root), with an interpreter every user may run."""
    os.chmod(base, 0o711)
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    return JobEnv(base, base / "jobs", shared, python,
                  CHAOS_JOB_USER if os.geteuid() == 0 else None)


@contextlib.contextmanager
def job_env_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="qrad-chaos-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ the dispatcher process


class DispatcherProc:
    """``qrad-fleet dispatcher`` as a process of its own, on a queue file and a key file."""

    def __init__(self, workdir: Path, broker_port: int, db: Path, key: Path,
                 retry_after_s: float) -> None:
        self.log = workdir / "dispatcher.log"
        self.argv = [sys.executable, "-c",
                     "import sys; from qrad_agent.fleet.cli import main; "
                     "sys.exit(main(sys.argv[1:]))",
                     "dispatcher", "--broker", f"mqtt://127.0.0.1:{broker_port}", "--db",
                     str(db), "--key", str(key), "--retry-after", str(retry_after_s)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DispatcherProc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=out)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(2)  # SIGINT: run_forever stops cleanly
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------ the network proxy


class _Pipe:
    """One proxied connection: the agent's socket and the broker's, with what is on its way
    in either direction."""

    LIMIT = 256 * 1024

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connecting = True
        self.up = bytearray()  # client -> broker
        self.down = bytearray()  # broker -> client
        self.client_eof = False
        self.upstream_eof = False
        self.up_shut = False
        self.down_shut = False


def _reset(sock: socket.socket) -> None:
    """Close with an RST (linger 0), as a middlebox that drops its state does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """A loopback TCP proxy to the broker that can cut the network, in one thread.

    ``cut("blackhole")``: nothing is forwarded or accepted any more; bytes on their way wait,
    and so do new connections (in the listen backlog), as behind a pulled cable; a side that
    gave up meanwhile learns it only after :meth:`heal`. ``cut("reset")``: every connection
    is reset (RST to both ends) and new ones are reset at once until healed."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0), backlog=64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.state = "open"
        self.connections = 0
        self.resets = 0
        self._pipes: list[_Pipe] = []
        self._cmds: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._done = threading.Event()
        self._applied = threading.Condition()
        self._generation = 0
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- control (any thread) --
    def cut(self, how: str) -> None:
        assert how in ("blackhole", "reset"), how
        self._command(how)

    def heal(self) -> None:
        self._command("open")

    def close(self) -> None:
        self._command("close")
        self._thread.join(5)

    def _command(self, cmd: str) -> None:
        with self._applied:
            target = self._generation + 1
            self._cmds.put(cmd)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._applied.wait_for(lambda: self._generation >= target or self._done.is_set(),
                                   timeout=5)

    # -- the proxy's thread --
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            while True:
                if not self._take_commands():
                    return
                sel.close()
                sel = selectors.DefaultSelector()
                sel.register(self._wake_r, selectors.EVENT_READ, None)
                if self.state != "blackhole":
                    sel.register(self._listener, selectors.EVENT_READ, "listen")
                if self.state == "open":
                    for p in self._pipes:
                        self._interest(sel, p)
                for key, mask in sel.select(0.2):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.data == "listen":
                        self._accept()
                    else:
                        pipe, sock = key.data
                        if pipe in self._pipes:
                            self._serve(pipe, sock, mask)
        finally:
            sel.close()
            for p in self._pipes:
                _reset(p.client)
                _reset(p.upstream)
            self._listener.close()
            self._done.set()
            with self._applied:
                self._applied.notify_all()

    def _take_commands(self) -> bool:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True
            if cmd == "close":
                return False
            self.state = cmd
            if cmd == "reset":
                for p in self._pipes:
                    _reset(p.client)
                    _reset(p.upstream)
                    self.resets += 1
                self._pipes.clear()
            with self._applied:
                self._generation += 1
                self._applied.notify_all()

    def _interest(self, sel: selectors.BaseSelector, p: _Pipe) -> None:
        c = 0
        if not p.client_eof and len(p.up) < _Pipe.LIMIT:
            c |= selectors.EVENT_READ
        if p.down:
            c |= selectors.EVENT_WRITE
        u = 0
        if p.connecting:
            u = selectors.EVENT_WRITE
        else:
            if not p.upstream_eof and len(p.down) < _Pipe.LIMIT:
                u |= selectors.EVENT_READ
            if p.up:
                u |= selectors.EVENT_WRITE
        if c:
            sel.register(p.client, c, (p, p.client))
        if u:
            sel.register(p.upstream, u, (p, p.upstream))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self.state == "reset":
                _reset(client)
                self.resets += 1
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = upstream.connect_ex(self.upstream)
            if rc not in (0, errno.EINPROGRESS):
                _reset(client)  # the broker is down: the agent sees its connect fail
                upstream.close()
                continue
            self.connections += 1
            self._pipes.append(_Pipe(client, upstream))

    def _drop(self, p: _Pipe) -> None:
        _reset(p.client)
        _reset(p.upstream)
        if p in self._pipes:
            self._pipes.remove(p)

    def _serve(self, p: _Pipe, sock: socket.socket, mask: int) -> None:
        try:
            if sock is p.upstream and p.connecting:
                err = p.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._drop(p)
                    return
                p.connecting = False
                return
            if mask & selectors.EVENT_READ:
                data = sock.recv(65536)
                if sock is p.client:
                    if data:
                        p.up += data
                    else:
                        p.client_eof = True
                else:
                    if data:
                        p.down += data
                    else:
                        p.upstream_eof = True
            if mask & selectors.EVENT_WRITE:
                if sock is p.client and p.down:
                    n = p.client.send(p.down)
                    del p.down[:n]
                elif sock is p.upstream and p.up:
                    n = p.upstream.send(p.up)
                    del p.up[:n]
            # half-closes pass through once what came before them has
            if p.client_eof and not p.up and not p.up_shut and not p.connecting:
                p.upstream.shutdown(socket.SHUT_WR)
                p.up_shut = True
            if p.upstream_eof and not p.down and not p.down_shut:
                p.client.shutdown(socket.SHUT_WR)
                p.down_shut = True
            if p.up_shut and p.down_shut:
                p.client.close()
                p.upstream.close()
                self._pipes.remove(p)
        except OSError:
            self._drop(p)  # a reset on one side resets the other


# ------------------------------------------------------------------ the telemetry watcher


@dataclass(frozen=True)
class TelemetryArrival:
    node: str
    boot: int
    at: float  # monotonic, on arrival
    historical: bool
    seqs: tuple[int, ...]
    walls: tuple[float, ...]  # each sample's own timestamp
    newest_wall: float  # the latest sample's own timestamp


class Watcher:
    """Records every telemetry batch, with a persistent session (what the broker queues for
    it while it is away arrives later) and a fast reconnect."""

    def __init__(self, host: str, port: int) -> None:
        self.arrivals: list[TelemetryArrival] = []
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chaos-watcher",
                             protocol=MQTTProtocolVersion.MQTTv5)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.02, 0.2)  # type: ignore[arg-type]
        self.connected = threading.Event()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.c.connect(host, port, keepalive=5, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        self.c.loop_start()
        if not self.connected.wait(5):
            raise RuntimeError("the chaos watcher could not connect")

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        # again after every connect: a broker that lost its state lost the subscription too
        c.subscribe([("qrad/v1/nodes/+/telemetry", SubscribeOptions(qos=1))])
        self.connected.set()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        at = time.monotonic()
        try:
            batch = json.loads(msg.payload)
            samples = batch["samples"]
            arrival = TelemetryArrival(
                str(batch["node"]), int(batch["boot"]), at, bool(batch["historical"]),
                tuple(int(s["seq"]) for s in samples), tuple(float(s["at"]) for s in samples),
                max(float(s["at"]) for s in samples))
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.arrivals.append(arrival)

    def snapshot(self) -> list[TelemetryArrival]:
        with self._lock:
            return list(self.arrivals)

    def fresh_since(self, node: str, wall: float) -> float | None:
        """When the first batch holding a sample taken after ``wall`` arrived."""
        for a in self.snapshot():
            if a.node == node and a.newest_wall >= wall:
                return a.at
        return None

    def last_before(self, node: str, t: float) -> float | None:
        last = None
        for a in self.snapshot():
            if a.node == node and a.at < t:
                last = a.at
        return last

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# ------------------------------------------------------------------ job processes


class JobWatch:
    """Tails the jobs' shared log and holds a pidfd on every job process it sees start, so
    the moment each one is gone is known, however it ended."""

    _WORK_DIR = re.compile(r"/work-([^/]+)/")

    def __init__(self, log: Path) -> None:
        self.log = log
        self.starts: dict[tuple[str, int, int], tuple[float, bool, str]] = {}
        self.ends: dict[tuple[str, int, int], float] = {}
        self.exits: dict[tuple[str, int, int], float] = {}
        self._fds: dict[int, tuple[str, int, int]] = {}
        self._poll = select.poll()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-jobwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.log, "rb") as f:
            pending = b""
            while not self._stop.is_set():
                chunk = f.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._line(line.decode(errors="replace"))
                for fd, _ in self._poll.poll(10):
                    self._exited(fd)
            for fd in list(self._fds):  # still alive at the end: their life goes on
                os.close(fd)

    def _line(self, line: str) -> None:
        parts = line.split(" ", 6)
        if len(parts) != 7:
            return
        kind, job, attempt, pid, t, alone, cwd = parts
        key = (job, int(attempt), int(pid))
        m = self._WORK_DIR.search(cwd + "/")
        node = m.group(1) if m else "?"
        with self._lock:
            if kind == "start":
                self.starts[key] = (float(t), alone == "1", node)
                self._open_pidfd(key)
            elif kind == "end":
                self.ends[key] = float(t)

    def _open_pidfd(self, key: tuple[str, int, int]) -> None:
        job, attempt, pid = key
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.exits[key] = time.monotonic()  # gone before it was seen: at the latest now
            return
        # the pid may have been reused by now: it must still be this job's process
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if (f"QRAD_JOB_ID={job}".encode() not in env
                or f"QRAD_JOB_ATTEMPT={attempt}".encode() not in env):
            os.close(fd)
            self.exits[key] = time.monotonic()
            return
        self._fds[fd] = key
        self._poll.register(fd, select.POLLIN)

    def _exited(self, fd: int) -> None:
        with self._lock:
            key = self._fds.pop(fd, None)
            self._poll.unregister(fd)
            os.close(fd)
            if key is not None:
                self.exits[key] = time.monotonic()

    def alive(self) -> int:
        with self._lock:
            return len(self._fds)

    def kill_leftovers(self) -> None:
        """SIGKILL the job processes still alive, through their pidfds (never a reused
        pid)."""
        with self._lock:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)

    def attempts(self) -> list[Attempt]:
        with self._lock:
            return [Attempt(job, attempt, pid, node, start, self.ends.get((job, attempt, pid)),
                            self.exits.get((job, attempt, pid)), alone)
                    for (job, attempt, pid), (start, alone, node) in self.starts.items()]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def overlaps(attempts: list[Attempt], faults: list[Fault], now: float) -> list[Overlap]:
    """Pairs of runs of one job whose lives overlapped, each with the fault that explains it
    (the earlier run's radiator was killed or cut off before the later one started)."""
    by_job: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_job.setdefault(a.job, []).append(a)
    out = []
    for job, runs in by_job.items():
        runs.sort(key=lambda a: a.start)
        for i, first in enumerate(runs):
            for second in runs[i + 1:]:
                seconds = min(_until(first, now), _until(second, now)) - second.start
                if seconds <= 0 and second.alone:
                    continue
                out.append(Overlap(job, first, second, max(0.0, seconds),
                                   _cause(first, second, faults)))
    return out


def done_again_causes(attempts: list[Attempt], faults: list[Fault]) -> dict[str, int]:
    """For each job run to completion more than once: the fault that was on at some time
    between its first complete run's start and the next run's start ("kill"/"cut" on that
    run's radiator, "broker (graceful)" or "broker (crash)"), or "none"."""
    by_job: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_job.setdefault(a.job, []).append(a)
    out: Counter[str] = Counter()
    for runs in by_job.values():
        runs.sort(key=lambda a: a.start)
        done = [a for a in runs if a.end is not None]
        if len(done) < 2:
            continue
        first = done[0]
        later = next(a for a in runs if a.start > first.start)
        kind = next((f"{f.kind} ({f.how})" if f.kind == "broker" else f.kind for f in faults
                     if (f.kind == "broker" or f.target == first.node)
                     and f.started <= later.start and first.start <= f.ended), "none")
        out[kind] += 1
    return dict(out)


def _until(a: Attempt, now: float) -> float:
    """The end of a run's life; ``now`` for one still alive."""
    return a.until if a.exit is not None or a.end is not None else now


def _cause(first: Attempt, second: Attempt, faults: list[Fault]) -> str:
    for f in faults:
        if f.target != first.node or not first.start <= f.started <= second.start:
            continue
        if f.kind == "kill":
            return (f"{first.node} was SIGKILLed {f.started - first.start:.2f} s into the "
                    "first run; its job process lived on while the fleet re-ran the job")
        if f.kind == "cut":
            return (f"the network of {first.node} was cut ({f.how}) "
                    f"{f.started - first.start:.2f} s into the first run")
    for f in faults:
        if f.kind == "broker" and first.start <= f.started <= second.start:
            return f"the broker was restarted ({f.how}) between the two starts"
    return "no fault explains it"


def telemetry_holes(arrivals: list[TelemetryArrival], faults: list[Fault],
                    ) -> tuple[int, int, dict[str, int]]:
    """(samples received, samples missing, missing by the fault during which the hole
    fell: "broker", "kill", "cut", or "none") from holes in each boot's ``seq``."""
    walls: dict[tuple[str, int], dict[int, float]] = {}
    for a in arrivals:
        walls.setdefault((a.node, a.boot), {}).update(zip(a.seqs, a.walls, strict=True))
    received = sum(len(w) for w in walls.values())
    missing = 0
    by: Counter[str] = Counter()
    for (node, _boot), seen in walls.items():
        order = sorted(seen)
        for lo, hi in zip([-1, *order], order, strict=False):
            n = hi - lo - 1
            if n <= 0:
                continue
            missing += n
            t0 = seen[lo] if lo >= 0 else seen[hi] - 1e9
            t1 = seen[hi]
            # the fault that was on (or just over) while the samples in the hole were taken
            hit = next((f.kind for f in faults if f.kind == "broker" or node in f.affected
                        if f.started_wall <= t1 and t0 <= f.ended_wall + 5.0), "none")
            by[hit] += n
    return received, missing, dict(by)


# ------------------------------------------------------------------ the run


def _spec(env: JobEnv, log: Path, locks: Path, job: str, work_s: float, priority: str,
          lease_s: float) -> JobSpec:
    return parse_spec({"job": job, "priority": priority,
                       "argv": [env.python, "-I", "-S", "-c", JOB_CODE, str(log), str(locks),
                                f"{work_s:.3f}"],
                       "timeout_s": 120.0, "lease_s": lease_s})


def schedule(plan: ChaosPlan, rng: random.Random, nodes: tuple[str, ...] = NODES,
             ) -> list[Fault]:
    kinds = (["broker"] * plan.broker_restarts + ["kill"] * plan.agent_kills
             + ["cut"] * plan.net_cuts)
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        if kind == "broker":
            out.append(Fault(kind, "broker", rng.choice(plan.broker_modes),
                             rng.uniform(*plan.broker_down_s), nodes))
        elif kind == "kill":
            node = rng.choice(nodes)
            out.append(Fault(kind, node, "sigkill", rng.uniform(*plan.agent_down_s), (node,)))
        else:
            node = rng.choice(nodes)
            out.append(Fault(kind, node, rng.choice(plan.cut_modes),
                             rng.uniform(*plan.cut_s), (node,)))
    return out


class ChaosRun:
    """The whole rig; :meth:`run` is the chaos run. Tests of one fault use :meth:`start`
    (``with_agents=False`` to start agents one by one), :meth:`submit` and :meth:`stop`."""

    def __init__(self, plan: ChaosPlan, workdir: Path, env_base: Path,
                 progress: Callable[[str], None] | None = None,
                 nodes: tuple[str, ...] = NODES) -> None:
        self.plan = plan
        self.nodes = nodes
        self.dir = workdir
        self.env = nobody_job_env(env_base)
        self.progress = progress or (lambda s: None)
        self.rng = random.Random(plan.seed)
        self.broker: Broker | None = None
        self.proxies: dict[str, TcpProxy] = {}
        self._waves: list[list[JobSpec]] = []  # jobs not queued yet (see the module doc)
        self.agents: dict[str, AgentProc] = {}
        self.dispatcher: DispatcherProc | None = None
        self.watcher: Watcher | None = None
        self.jobwatch: JobWatch | None = None
        self.queue: FleetQueue | None = None
        self.job_log = self.env.shared / "jobs.log"
        self.locks = self.env.shared / "locks"

    # -- helpers --
    def logs(self) -> list[Path]:
        out = [self.dir / "dispatcher.log"]
        for a in self.agents.values():
            out += [a.log, a.log.with_suffix(".err")]
        return out

    def tails(self, chars: int = 2500) -> str:
        return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
                       for p in self.logs() if p.exists())

    def counts(self) -> dict[str, int]:
        assert self.queue is not None
        return self.queue.counts()

    def final(self) -> int:
        c = self.counts()
        return sum(n for s, n in c.items() if FleetState(s).final)

    def _wait_done(self, n: int, timeout: float) -> bool:
        """Until ``n`` jobs are final."""
        return self._wait(lambda: self.final() >= n, timeout, 0.02)

    def _wait(self, cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(step)
        return True

    # -- setup and teardown --
    def submit(self, job: str, work_s: float, priority: str = "low",
               lease_s: float | None = None) -> None:
        assert self.queue is not None
        self.queue.submit(_spec(self.env, self.job_log, self.locks, job, work_s, priority,
                                self.plan.lease_s if lease_s is None else lease_s),
                          max_attempts=self.plan.max_attempts)

    def start(self, with_agents: bool = True) -> None:
        p = self.plan
        self.job_log.touch()
        os.chmod(self.job_log, 0o666)
        self.locks.mkdir()
        os.chmod(self.locks, 0o1777)
        self.broker = Broker(self.dir / "broker", persistence=True).start()
        key_path = self.dir / "fleet.pem"
        pair = keygen(key_path)
        self.queue = FleetQueue.open(self.dir / "fleet.db")
        prios = ("high", "low", "background")
        specs = []
        for i in range(p.jobs):
            long = self.rng.random() < p.long_share
            work = self.rng.uniform(*(p.long_s if long else p.work_s))
            specs.append(_spec(self.env, self.job_log, self.locks, f"c{i:04d}", work,
                               prios[i % 3], p.lease_s))
        waves = p.faults + 1
        self._waves = [specs[w * len(specs) // waves:(w + 1) * len(specs) // waves]
                       for w in range(waves)]
        self._submit_wave()
        self.jobwatch = JobWatch(self.job_log)
        self.watcher = Watcher(self.broker.host, self.broker.port)
        self.dispatcher = DispatcherProc(self.dir, self.broker.port, self.dir / "fleet.db",
                                         key_path, p.retry_after_s).start()
        for node in self.nodes:
            proxy = TcpProxy(self.broker.port)
            self.proxies[node] = proxy
            agent = AgentProc(self.dir, node, self.broker, [pair.private_key], self.env)
            agent.conf["link"]["broker"]["port"] = proxy.port
            # see CHAOS_JOB_USER: not the sandbox tests' job user
            agent.conf["jobs"]["user"] = CHAOS_JOB_USER
            self.agents[node] = agent
        if with_agents:
            for agent in self.agents.values():
                agent.start()

    def _submit_wave(self) -> None:
        if self._waves and self.queue is not None:
            self.queue.submit_many(self._waves.pop(0), max_attempts=self.plan.max_attempts)

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.watcher is not None:
            self.watcher.close()
        for proxy in self.proxies.values():
            proxy.close()
        if self.broker is not None:
            self.broker.stop()
        if self.jobwatch is not None:
            # what a killed agent left and no restart swept: not to be left behind
            self.jobwatch.kill_leftovers()
            self.jobwatch.stop()
        if self.queue is not None:
            self.queue.db.close()

    # -- faults --
    def inject(self, f: Fault) -> None:
        assert self.broker is not None
        f.started = time.monotonic()
        f.started_wall = time.time()
        if f.kind == "broker":
            if f.how == "graceful":
                self.broker.stop()
            else:
                self.broker.kill()
            time.sleep(f.down_s)
            self.broker.start()
        elif f.kind == "kill":
            agent = self.agents[f.target]
            agent.kill()
            time.sleep(f.down_s)
            agent.start()
        else:
            proxy = self.proxies[f.target]
            proxy.cut(f.how)
            time.sleep(f.down_s)
            proxy.heal()
        f.ended = time.monotonic()
        f.ended_wall = time.time()

    def await_recovery(self, f: Fault) -> None:
        assert self.watcher is not None
        watcher = self.watcher

        def resumed() -> bool:
            for node in f.affected:
                if node not in f.recovered:
                    at = watcher.fresh_since(node, f.ended_wall)
                    if at is not None:
                        f.recovered[node] = at
            return all(n in f.recovered for n in f.affected)

        self._wait(resumed, self.plan.recover_timeout_s)
        for node in f.affected:
            before = watcher.last_before(node, f.started)
            if node in f.recovered and before is not None:
                f.gaps[node] = f.recovered[node] - before

    # -- the whole run --
    def run(self) -> ChaosFigures:
        p = self.plan
        t0 = time.monotonic()
        figures = ChaosFigures(p)
        faults = schedule(p, self.rng, self.nodes)
        figures.faults = faults
        deadline = t0 + p.timeout_s
        self.start()
        try:
            for i, f in enumerate(faults):
                due = (i + 1) * p.jobs // (len(faults) + 1)  # waves 0..i, all of them
                self._wait_done(due, max(1.0, deadline - time.monotonic()))
                self._submit_wave()  # the fault finds these placed and running
                time.sleep(0.05)
                self.progress(f"fault {i + 1}/{len(faults)}: {f.kind} {f.target} ({f.how}, "
                              f"{f.down_s:.2f} s) at {self.final()}/{p.jobs} done, "
                              f"{time.monotonic() - t0:.1f} s")
                self.inject(f)
                self.await_recovery(f)
                time.sleep(p.settle_s)
            if not self._wait(lambda: self.final() >= p.jobs,
                              max(1.0, deadline - time.monotonic()), 0.05):
                figures.notes.append(f"not every job final within {p.timeout_s} s: "
                                     f"{self.counts()}")
            # the runs a killed agent left behind end on their own or at its restart
            assert self.jobwatch is not None
            self._wait(lambda: self.jobwatch is not None and self.jobwatch.alive() == 0, 10.0)
            time.sleep(0.5)  # the last telemetry and log lines
            self.collect(figures, t0)
        finally:
            self.stop()
        return figures

    def collect(self, figures: ChaosFigures, t0: float) -> None:
        assert self.queue is not None and self.jobwatch is not None
        assert self.watcher is not None
        now = time.monotonic()
        jobs = self.queue.list()
        figures.submitted = len(jobs)
        figures.states = self.counts()
        figures.lost = [j.job_id for j in jobs if j.state is not FleetState.SUCCEEDED]
        runs_of: dict[str, list[str]] = {}
        for a in sorted(self.jobwatch.attempts(), key=lambda a: a.start):
            runs_of.setdefault(a.job, []).append(
                f"#{a.attempt} {a.node} {'done' if a.end is not None else 'killed'}")
        figures.lost_why = [f"{j.job_id}: {j.state.value} ({j.reason}: {j.detail}); runs: "
                            f"{', '.join(runs_of.get(j.job_id, [])) or 'none'}"
                            for j in jobs if j.state is not FleetState.SUCCEEDED]
        figures.results_delivered = sum(
            1 for j in jobs if j.state is FleetState.SUCCEEDED and j.result is not None
            and j.result.exit_code == 0 and j.result.output is not None)
        figures.attempts = dict(Counter(j.attempt for j in jobs))
        attempts = self.jobwatch.attempts()
        completed = Counter(a.job for a in attempts if a.end is not None)
        figures.work_done = len(completed)
        figures.work_done_more_than_once = sum(1 for n in completed.values() if n > 1)
        figures.done_again_by = done_again_causes(attempts, figures.faults)
        figures.lock_collisions = sum(1 for a in attempts if not a.alone)
        figures.overlaps = overlaps(attempts, figures.faults, now)
        figures.leftover_processes = self.jobwatch.alive()
        figures.samples_received, figures.samples_missing, figures.missing_by = \
            telemetry_holes(self.watcher.snapshot(), figures.faults)
        starts = [a.start for a in attempts]
        last_success = max((j.updated_at for j in jobs if j.state is FleetState.SUCCEEDED),
                           default=time.time())
        if starts:
            first_start_wall = time.time() - (now - min(starts))
            figures.jobs_s = max(0.0, last_success - first_start_wall)
        figures.total_s = now - t0
