"""``qrad-agent doctor``: checks a board from the config to the running service, and says
for each problem what to do about it.

Each check gives ``pass``, ``warn`` (works, but degraded or unverifiable), ``fail`` (the
radiator cannot do its job as configured) or ``skip`` (not configured here), a one-line
finding and, when not passing, the fix. The exit status is 1 when any check fails.

The board under test is a :class:`Board`: the real one (``/dev``, ``/sys``, the serial port,
the network, the kernel clock, the status socket), or a simulated one (``--sim``): emulated
I2C chips, an emulated cpufreq tree and cgroup hierarchy in a temp dir, an emulated meter.
Problems can be injected into the simulated board (``--inject``), one per check, so each
failure and its fix can be seen (and tested) without breaking a real radiator.

Doctor only looks: sensors are read, levers are discovered but never applied, no cgroup is
created, the broker gets a connect and a clean disconnect under a client id of its own
(``<node>-doctor``: the node's id would push the running agent off the broker).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qrad_agent.config import SYSFS_SENSOR_KINDS, AgentConfig, ConfigError, load_config
from qrad_agent.core.models import Quality, Role
from qrad_agent.ops.settings import OpsConfig
from qrad_agent.ops.status_server import (
    SNAPSHOT_VERSION,
    SnapshotBox,
    StatusServer,
    StatusUnavailable,
    fetch_status,
)

if TYPE_CHECKING:
    from qrad_agent.link.settings import LinkConfig
    from qrad_agent.metering.modbus import InstrumentLike
    from qrad_agent.sensors.cli import ReadSession
    from qrad_agent.sysfs import Sysfs

DEFAULT_CONFIG = Path("/etc/qrad-agent/qrad-agent.toml")
SERVICE_USER = "qrad-agent"
MIB = 1024 * 1024
DISK_FAIL_BYTES = 64 * MIB  # below this SQLite cannot checkpoint its WAL safely
DISK_WARN_BYTES = 256 * MIB
PROBE_TIMEOUT_S = 5.0

PROBLEMS = {
    "missing-bus": "the I2C bus of the room sensors has no device node",
    "unhealthy-sensor": "the first room sensor fails (bad CRC where the chip has one, else "
                        "it stops answering)",
    "unwritable-lever": "the cpufreq limits are read-only",
    "no-cgroup": "no cgroup hierarchy is mounted",
    "no-meter": "the configured meter does not answer (one is configured if none is)",
    "broker-down": "nothing listens where the broker should be",
    "low-disk": "the state directory's filesystem is nearly full",
    "clock-unsynced": "the kernel clock is not synchronised",
    "stale-service": "the agent answers but its control loop has stalled",
}


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    summary: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "summary": self.summary,
                "fix": self.fix}


@dataclass(frozen=True)
class ClockState:
    synchronised: bool | None  # None: cannot tell
    how: str


@dataclass
class Board:
    """What doctor inspects. The defaults are the real board."""

    simulated: bool = False
    dev_root: Path = Path("/dev")
    sysfs_root: Path | None = None  # None: the config's actuators.cpufreq.sysfs_root
    cpufreq_sysfs: Sysfs | None = None  # an emulated tree instead of Sysfs(sysfs_root)
    status_socket: Path | None = None  # None: from the config
    instrument_factory: Callable[[Any], InstrumentLike] | None = None
    clock: Callable[[], ClockState] = field(default=lambda: kernel_clock())
    disk_usage: Callable[[Path], tuple[int, int, int]] = field(default=lambda p: _disk_usage(p))
    service_user: str = SERVICE_USER
    broker_address: tuple[str, int] | None = None  # instead of the configured host and port
    state_dir: Path | None = None  # instead of node.state_dir
    sensor_session: Callable[[AgentConfig], ReadSession] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()
        self.closers.clear()


def _disk_usage(path: Path) -> tuple[int, int, int]:
    total, used, free = shutil.disk_usage(path)
    return total, used, free


# -- the checks ---------------------------------------------------------------------------------


def run_checks(
    config_path: Path | str | None,
    board: Board,
    *,
    link: LinkConfig | None = None,
    cfg: AgentConfig | None = None,
) -> list[Finding]:
    """Every check, in the order a technician would work through them.

    ``cfg`` replaces the file (the simulated board may have adapted it); ``link`` the
    config's ``[link]`` section, while the config has none.
    """
    findings: list[Finding] = []
    if cfg is None:
        cfg_finding, cfg = check_config(config_path, board.simulated)
        findings.append(cfg_finding)
    else:
        shown = str(config_path) if config_path else "built-in config"
        findings.append(Finding("config", Status.PASS, f"{shown} is valid"))
    if cfg is None:
        findings.append(Finding("checks", Status.SKIP,
                                "board checks skipped: they need a valid config"))
        findings.append(check_service(board, status_socket(None, board)))
        return findings
    if link is None:
        found = getattr(cfg, "link", None)
        link = found if found is not None and hasattr(found, "broker") else None
    findings += check_i2c(cfg, board)
    findings += check_sensors(cfg, board)
    levers, cgroup = check_levers(cfg, board)
    findings += levers
    findings.append(cgroup)
    findings.append(check_meter(cfg, board))
    findings.append(check_broker(cfg, link, board))
    findings.append(check_clock(board, link))
    findings.append(check_disk(cfg, board, link))
    service, doc = service_status(board, status_socket(cfg, board))
    findings.append(service)
    if doc is not None:
        mismatch = compare_levers(doc, [*levers, cgroup])
        if mismatch is not None:
            findings.append(mismatch)
    return findings


def compare_levers(doc: dict[str, Any], found: list[Finding]) -> Finding | None:
    """Levers doctor can use from here but the running agent cannot: the service's sandbox
    (ReadWritePaths=, DeviceAllow=) or its user's permissions differ from this shell's."""
    served = doc.get("levers")
    if not isinstance(served, dict):
        return None
    usable_here = {f.check.removeprefix("lever ") for f in found
                   if f.status is Status.PASS and f.check.startswith("lever ")}
    if any(f.check == "worker cgroup" and f.status is Status.PASS for f in found):
        usable_here |= {"quota", "freeze"}
    blocked = {name: lv.get("why_not", "") for name, lv in served.items()
               if name in usable_here and isinstance(lv, dict) and lv.get("available") is False}
    if not blocked:
        return None
    return Finding(
        "service levers", Status.FAIL,
        "the running agent cannot use what doctor can from here: "
        + "; ".join(f"{k}: {v}" for k, v in sorted(blocked.items())),
        "the service runs as qrad-agent inside its sandbox: check the permissions the "
        "tmpfiles snippet and udev rule give (`systemd-tmpfiles --create qrad-agent.conf`), "
        "ReadWritePaths= and Delegate= in the unit, then `systemctl restart qrad-agent`",
    )


def status_socket(cfg: AgentConfig | None, board: Board) -> Path:
    """Where the agent serves status: the board's override, else the config's ``[ops]``."""
    if board.status_socket is not None:
        return board.status_socket
    ops = getattr(cfg, "ops", None)
    if not isinstance(ops, OpsConfig):
        ops = OpsConfig()
    return ops.socket_path(board.simulated)


def check_config(path: Path | str | None, simulated: bool) -> tuple[Finding, AgentConfig | None]:
    if path is None:
        if simulated:
            return Finding("config", Status.PASS, "built-in config (simulated board)"), \
                AgentConfig()
        path = DEFAULT_CONFIG
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        missing = not Path(path).exists()
        fix = (f"install a config at {path} (scripts/install.sh puts an example there), or "
               "name one with -c") if missing else \
            "correct the keys named above (`qrad-agent config schema` lists every key and " \
            "its allowed values), then `qrad-agent config validate FILE`"
        return Finding("config", Status.FAIL, f"{path}: " + "; ".join(exc.problems), fix), None
    return Finding("config", Status.PASS, f"{path} is valid"), cfg


def _i2c_buses(cfg: AgentConfig) -> list[int]:
    return sorted({s.bus for s in cfg.sensors if s.kind not in SYSFS_SENSOR_KINDS})


def check_i2c(cfg: AgentConfig, board: Board) -> list[Finding]:
    buses = _i2c_buses(cfg)
    if not buses:
        return [Finding("i2c", Status.SKIP, "no I2C sensors configured")]
    out = []
    for n in buses:
        dev = board.dev_root / f"i2c-{n}"
        name = f"i2c bus {n}"
        if not dev.exists():
            present = sorted(p.name for p in board.dev_root.glob("i2c-*"))
            out.append(Finding(
                name, Status.FAIL,
                f"{dev} does not exist (present: {', '.join(present) or 'no I2C buses'})",
                "enable the I2C interface (Raspberry Pi: `raspi-config nonint do_i2c 0`, or "
                "dtparam=i2c_arm=on in the boot config) and load i2c-dev (`modprobe i2c-dev`; "
                "add it to /etc/modules); or set the sensors' bus to one that exists",
            ))
            continue
        if not os.access(dev, os.R_OK | os.W_OK):
            out.append(Finding(
                name, Status.FAIL, f"{dev} exists but this user may not open it",
                "run doctor as root or as a member of the device's group "
                f"({_group_of(dev)})",
            ))
            continue
        verdict = _service_user_access(dev, board.service_user, os.R_OK | os.W_OK)
        if verdict:
            out.append(Finding(
                name, Status.FAIL, f"{dev} is usable here, but {verdict}",
                f"the unit gives the service SupplementaryGroups=i2c; make sure {dev} belongs "
                "to group i2c with mode 0660 (Raspberry Pi OS does this; elsewhere a udev rule "
                "KERNEL==\"i2c-[0-9]*\", GROUP=\"i2c\", MODE=\"0660\")",
            ))
            continue
        out.append(Finding(name, Status.PASS, f"{dev} present and permitted"))
    return out


def _group_of(path: Path) -> str:
    gid = path.stat().st_gid
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _service_user_access(path: Path, user: str, want: int) -> str:
    """Why the service user cannot access ``path`` ("" if it can, or if the user does not
    exist: then nothing can be said). Looks at the mode bits, as the kernel would, with the
    unit's SupplementaryGroups=i2c counted in."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return ""
    if pw.pw_uid == 0:
        return ""
    st = path.stat()
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    with contextlib.suppress(KeyError):
        groups.add(grp.getgrnam("i2c").gr_gid)
    mode = st.st_mode
    if st.st_uid == pw.pw_uid:
        bits = (mode >> 6) & 7
    elif st.st_gid in groups:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    if bits & want == want:
        return ""
    return f"the service user {user} may not read and write it (mode {stat.filemode(mode)}, " \
           f"group {_group_of(path)})"


_SENSOR_FIXES = {
    Quality.MISSING: "check the wiring (SDA, SCL, power, ground) and the address: "
                     "`qrad-agent sensors scan --bus {bus}` lists what answers",
    Quality.IO_ERROR: "the chip answered before and now fails on the bus: check connectors and "
                      "cable length; `qrad-agent sensors read --watch 2` shows whether it "
                      "comes and goes",
    Quality.CRC_ERROR: "the answers arrive damaged: shorten or shield the cable, check the "
                       "pull-up resistors, keep it away from the power supply",
    Quality.WRONG_CHIP: "the chip at that address is not the configured kind: "
                        "`qrad-agent sensors scan` names it; correct the kind in the config",
    Quality.OUT_OF_RANGE: "the value is outside what the chip can measure: replace the sensor",
    Quality.STUCK: "the chip repeats one value: power-cycle or replace it",
    Quality.STALE: "the chip has no new measurement: check that it is powered and converting",
    Quality.IMPLAUSIBLE_RATE: "the value jumps faster than a room can change: check that the "
                              "sensor is not near the exhaust or in a draught",
}


def check_sensors(cfg: AgentConfig, board: Board) -> list[Finding]:
    if not cfg.sensors:
        return [Finding("sensors", Status.FAIL, "no sensors configured: the agent cannot "
                        "regulate a room it cannot measure",
                        "add the room sensors (`qrad-agent sensors scan` prints config "
                        "entries)")]
    from qrad_agent.sensors.cli import ReadSession

    with tempfile.TemporaryDirectory(prefix="qrad-doctor-") as tmp:
        session = (board.sensor_session(cfg) if board.sensor_session is not None
                   else ReadSession(cfg, False, Path(tmp)))
        session.round()
        out = []
        for s in cfg.sensors:
            r = session.readings[s.name]
            name = f"sensor {s.name}"
            where = (s.device or "w1") if s.kind == "ds18b20" else (
                "sysfs" if s.kind == "board" else f"bus {s.bus}"
                + (f" 0x{s.address:02x}" if s.address is not None else ""))
            if r.ok:
                value = "" if r.temperature_c is None else f": {r.temperature_c:.2f} °C"
                out.append(Finding(name, Status.PASS, f"{s.kind} ({where}, {s.role.value}) "
                                   f"healthy{value}"))
                continue
            fix = _SENSOR_FIXES.get(r.quality, "see `qrad-agent sensors read`").format(bus=s.bus)
            # a board (CPU) sensor missing leaves the room regulated; a room sensor does not
            status = Status.WARN if s.role is Role.BOARD and r.quality is Quality.MISSING \
                else Status.FAIL
            out.append(Finding(name, status, f"{s.kind} ({where}) {r.quality.value}: "
                               f"{r.detail}", fix))
    return out


_LEVER_FIXES = {
    "cpufreq": "install the udev rule systemd/99-qrad-agent.rules (scripts/install.sh does), "
               "which gives group qrad-agent write access to scaling_max_freq; or set "
               "actuators.cpufreq.enabled = false on a board without cpufreq",
    "intel_pstate": "install the udev rule systemd/99-qrad-agent.rules (scripts/install.sh "
                    "does) for max_perf_pct",
    "slots": "fix actuators.workers.command (an executable, absolute path) and cwd",
    "rapl": "the firmware may lock the limit (ENODATA): set actuators.rapl.enabled = false",
    "duty_cycle": "the duty cycle needs worker slots: fix actuators.workers first",
}
_CGROUP_FIX = (
    "run under the shipped unit (Delegate=yes) with actuators.cgroups.parent = "
    "\"system.slice/qrad-agent.service\" and agent_leaf = \"agent\" on cgroup v2; "
    "elsewhere run as root; or set actuators.cgroups.enabled = false (no quota, no freezer)"
)


def _not_wanted(why: str) -> bool:
    return why.startswith(("disabled in config", "not needed", "not used"))


def check_levers(cfg: AgentConfig, board: Board) -> tuple[list[Finding], Finding]:
    from qrad_agent.actuators import open_levers

    root = board.sysfs_root or cfg.actuators.cpufreq.sysfs_root
    levers, inventory = open_levers(cfg.actuators, root, None, sysfs=board.cpufreq_sysfs)
    del levers  # discovered, never applied: doctor only looks
    out = []
    cgroup_parts = []
    for info in inventory:
        if info.name in ("quota", "freeze"):
            cgroup_parts.append(info)
            continue
        name = f"lever {info.name}"
        if info.available:
            out.append(Finding(name, Status.PASS, "available and writable"))
        elif _not_wanted(info.why_not):
            out.append(Finding(name, Status.SKIP, info.why_not))
        else:
            out.append(Finding(name, Status.FAIL, info.why_not,
                               _LEVER_FIXES.get(info.name, "see `qrad-agent actuators show`")))
    if not cfg.actuators.cgroups.enabled:
        return out, Finding("worker cgroup", Status.SKIP,
                            "disabled in config (actuators.cgroups.enabled = false)")
    usable = [i for i in cgroup_parts if i.available]
    if len(usable) == len(cgroup_parts):
        group = usable[0].range.get("group", "") if usable else ""
        return out, Finding("worker cgroup", Status.PASS,
                            f"quota and freezer usable ({group})")
    problems = "; ".join(f"{i.name}: {i.why_not}" for i in cgroup_parts if not i.available)
    if usable:
        return out, Finding("worker cgroup", Status.WARN, f"partly usable: {problems}",
                            _CGROUP_FIX)
    return out, Finding("worker cgroup", Status.FAIL, problems, _CGROUP_FIX)


def check_meter(cfg: AgentConfig, board: Board) -> Finding:
    meter_cfg = cfg.metering.meter
    if meter_cfg is None:
        return Finding("meter", Status.SKIP, "not configured ([metering.meter])")
    from qrad_agent.metering.modbus import ModbusMeter

    meter = ModbusMeter(meter_cfg, instrument_factory=board.instrument_factory)
    try:
        reading = meter.read(time.monotonic())
    finally:
        meter.close()
    where = f"{meter_cfg.model} at {meter_cfg.port} (slave {meter_cfg.slave}, " \
            f"{meter_cfg.baudrate} baud)"
    if reading.ok and reading.watts is not None:
        return Finding("meter", Status.PASS, f"{where} answers: {reading.watts:.1f} W")
    return Finding(
        "meter", Status.FAIL, f"{where}: {reading.quality.value}: {reading.detail}",
        "check the RS-485 wiring (A to A, B to B, termination), the port name "
        "(/dev/serial/by-id/… survives replugging), slave id and baud rate against the "
        "meter's menu; stop the agent if it holds the port",
    )


# -- broker -------------------------------------------------------------------------------------


_CONNACK = {
    1: "unacceptable protocol version", 2: "client identifier rejected",
    3: "server unavailable", 4: "bad user name or password", 5: "not authorised",
}


def mqtt_connect_packet(client_id: str, username: str | None, password: str | None,
                        keepalive: int = 10) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session (every MQTT 5 broker takes 3.1.1 too)."""

    def text(s: str) -> bytes:
        b = s.encode()
        return len(b).to_bytes(2, "big") + b

    flags = 0x02  # clean session
    payload = text(client_id)
    if username is not None:
        flags |= 0x80
        payload += text(username)
        if password is not None:
            flags |= 0x40
            payload += text(password)
    variable = text("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    body = variable + payload
    length = b""
    n = len(body)
    while True:  # the remaining length, 7 bits a byte
        byte, n = n & 0x7F, n >> 7
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x10" + length + body


def probe_broker(
    host: str, port: int, *, tls: ssl.SSLContext | None, client_id: str,
    username: str | None, password: str | None, timeout: float,
) -> tuple[bool, str]:
    """Connect, say CONNECT, read CONNACK, disconnect. (ok, what happened)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return False, f"cannot reach {host}:{port}: {exc.strerror or exc}"
    sock: socket.socket = raw
    with contextlib.ExitStack() as stack:
        stack.callback(raw.close)
        if tls is not None:
            try:
                sock = tls.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                return False, f"TLS: the broker's certificate was refused: {exc.verify_message}"
            except (ssl.SSLError, OSError) as exc:
                return False, f"TLS handshake with {host}:{port} failed: {exc}"
            stack.callback(sock.close)
        try:
            sock.sendall(mqtt_connect_packet(client_id, username, password))
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    break
                answer += chunk
        except OSError as exc:
            return False, f"{host}:{port} accepted the connection but not MQTT: " \
                          f"{exc.strerror or exc}"
        if len(answer) < 4 or answer[0] != 0x20:
            return False, f"{host}:{port} closed the connection without a CONNACK " \
                          "(not an MQTT broker, or TLS expected?)"
        code = answer[3]
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT: no will, a clean goodbye
        if code != 0:
            return False, f"the broker refused the connection: {_CONNACK.get(code, code)}"
    secure = "TLS, " if tls is not None else ""
    who = f"as {username}" if username else "anonymously"
    return True, f"{host}:{port} accepted an MQTT connection ({secure}{who})"


def check_broker(cfg: AgentConfig, link: LinkConfig | None, board: Board) -> Finding:
    if link is None:
        return Finding("broker", Status.SKIP, "not configured (no [link] section)")
    if not link.enabled:
        return Finding("broker", Status.SKIP, "link disabled (link.enabled = false)")
    b = link.broker
    host, port = board.broker_address or (b.host, b.effective_port())
    context: ssl.SSLContext | None = None
    if b.tls.enabled:
        try:
            context = ssl.create_default_context(
                cafile=str(b.tls.ca_file) if b.tls.ca_file else None)
            if b.tls.cert_file is not None and b.tls.key_file is not None:
                context.load_cert_chain(str(b.tls.cert_file), str(b.tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            return Finding("broker", Status.FAIL, f"cannot load the TLS files: {exc}",
                           "check link.broker.tls.ca_file, cert_file and key_file: they must "
                           "exist and be readable by the service user")
    try:
        password = b.auth.read_password()
    except OSError as exc:
        return Finding("broker", Status.FAIL,
                       f"cannot read link.broker.auth.password_file: {exc.strerror or exc}",
                       "make the file readable by the service user (chmod 0640, group "
                       "qrad-agent)")
    ok, what = probe_broker(
        host, port, tls=context, client_id=f"{cfg.node.id}-doctor",
        username=b.auth.username, password=password,
        timeout=min(b.connect_timeout_s, PROBE_TIMEOUT_S),
    )
    if ok:
        return Finding("broker", Status.PASS, what)
    if "refused the connection" in what:
        fix = "check link.broker.auth (user name, password) and the broker's ACL for " \
              f"{cfg.node.id}"
    elif what.startswith("TLS"):
        fix = "check link.broker.tls.ca_file (the CA that signed the broker), the broker's " \
              "host name against its certificate, and the board's clock"
    else:
        fix = "check link.broker.host and port, the network (ping, DNS), the firewall, and " \
              "that the broker runs"
    return Finding("broker", Status.FAIL, what, fix)


# -- clock, disk, service -----------------------------------------------------------------------

TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


def kernel_clock() -> ClockState:
    """Whether the kernel clock is synchronised, whatever keeps it so (systemd-timesyncd,
    chrony, ntpd all clear the kernel's STA_UNSYNC). Falls back to timesyncd's flag file and
    ``timedatectl`` where adjtimex is not allowed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = ctypes.create_string_buffer(1024)  # struct timex, modes = 0: read only
        state = libc.adjtimex(buf)
        if state >= 0:
            return ClockState(state != TIME_ERROR, "kernel (adjtimex)")
    except (OSError, AttributeError):
        pass
    if Path("/run/systemd/timesync/synchronized").exists():
        return ClockState(True, "systemd-timesyncd")
    try:
        res = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=5)
        if res.returncode == 0 and res.stdout.strip() in ("yes", "no"):
            return ClockState(res.stdout.strip() == "yes", "timedatectl")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ClockState(None, "no way to ask")


def check_clock(board: Board, link: LinkConfig | None) -> Finding:
    state = board.clock()
    fix = "enable time synchronisation (`timedatectl set-ntp true`, or chrony) and check that " \
          "the board reaches an NTP server (UDP 123)"
    if state.synchronised:
        return Finding("clock", Status.PASS, f"synchronised ({state.how})")
    if state.synchronised is None:
        return Finding("clock", Status.WARN, f"cannot tell whether the clock is synchronised "
                       f"({state.how})", fix)
    # signed commands expire and TLS certificates have dates: with the link on, a wrong clock
    # locks the radiator out of its fleet; without it only time stamps and schedules suffer
    linked = link is not None and link.enabled
    return Finding("clock", Status.FAIL if linked else Status.WARN,
                   f"not synchronised ({state.how})"
                   + ("; TLS and command expiry depend on it" if linked else
                      "; the weekly schedule follows this clock"), fix)


def check_disk(cfg: AgentConfig, board: Board, link: LinkConfig | None) -> Finding:
    state_dir = board.state_dir or Path(cfg.node.state_dir)
    probe = state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        _, _, free = board.disk_usage(probe)
    except OSError as exc:
        return Finding("disk", Status.WARN, f"cannot measure {probe}: {exc.strerror or exc}")
    outbox = link.outbox.max_bytes if link is not None and link.enabled else 0
    want = max(DISK_WARN_BYTES, outbox + DISK_FAIL_BYTES)
    note = "" if state_dir.exists() else " (the directory does not exist yet: the unit's " \
                                         "StateDirectory= creates it)"
    text = f"{free / MIB:.0f} MiB free for {state_dir}{note}"
    fix = f"free space on the filesystem holding {state_dir} (`journalctl --vacuum-size=100M`, " \
          "`apt-get clean`)" + (", or lower link.outbox.max_bytes" if outbox else "")
    if free < DISK_FAIL_BYTES:
        return Finding("disk", Status.FAIL, f"only {text}; the agent needs "
                       f"{DISK_FAIL_BYTES // MIB} MiB to keep its state", fix)
    if free < want:
        return Finding("disk", Status.WARN, f"{text}; below the {want // MIB} MiB advised", fix)
    return Finding("disk", Status.PASS, text)


def check_service(board: Board, path: Path) -> Finding:
    return service_status(board, path)[0]


def service_status(board: Board, path: Path) -> tuple[Finding, dict[str, Any] | None]:
    """The service check, and the status document when the agent answered."""
    try:
        doc = fetch_status(path)
    except StatusUnavailable as exc:
        if board.simulated and exc.kind in ("absent", "refused"):
            return Finding("service", Status.WARN, f"no simulated agent answers: {exc}",
                           "start one: `qrad-agent run --sim` (doctor --sim then checks it)"
                           ), None
        return Finding("service", Status.FAIL, str(exc),
                       "`systemctl start qrad-agent`, and `journalctl -u qrad-agent -e` for why "
                       "it stopped"), None
    return _judge_service(doc), doc


def _judge_service(doc: dict[str, Any]) -> Finding:
    loop = doc.get("loop") if isinstance(doc.get("loop"), dict) else {}
    assert isinstance(loop, dict)
    state = doc.get("state")
    age = loop.get("last_tick_age_s")
    pid = (doc.get("agent") or {}).get("pid")
    if state == "running" and loop.get("healthy") is False:
        shown = f"{age:.0f} s" if isinstance(age, int | float) else "long"
        why = loop.get("last_error") or "no error recorded: a tick may be hanging"
        return Finding("service", Status.FAIL,
                       f"agent (pid {pid}) answers but its control loop is stalled: last tick "
                       f"{shown} ago (allowed {loop.get('late_after_s')} s); {why}",
                       "`journalctl -u qrad-agent -e` shows what it waits for; the watchdog "
                       "restarts it (`systemctl restart qrad-agent` to do it now)")
    if state != "running":
        return Finding("service", Status.WARN, f"agent (pid {pid}) is {state}",
                       "wait a control period and ask again; if it stays so, "
                       "`journalctl -u qrad-agent -e`")
    failures = (doc.get("counters") or {}).get("tick_failures", 0)
    shown = f"{age:.1f} s" if isinstance(age, int | float) else "?"
    text = f"agent (pid {pid}) running, last tick {shown} ago"
    if failures:
        return Finding("service", Status.WARN, f"{text}, but {failures} control beats failed",
                       "`journalctl -u qrad-agent -e` shows the errors")
    return Finding("service", Status.PASS, text)


# -- the simulated board ------------------------------------------------------------------------


class _SimMeter:
    """An Eastron meter as minimalmodbus reads it: float registers, or silence."""

    def __init__(self, answering: bool, watts: float = 95.0) -> None:
        self.answering = answering
        self.values = {0x0000: 230.1, 0x0006: watts / 230.1, 0x000C: watts, 0x0048: 12.5}

    def _get(self, address: int) -> float:
        if not self.answering:
            import minimalmodbus

            raise minimalmodbus.NoResponseError("No communication with the instrument (no "
                                                "answer)")
        return self.values.get(address, 0.0)

    def read_float(self, registeraddress: int, functioncode: int = 3,
                   number_of_registers: int = 2, byteorder: int = 0) -> float:
        return self._get(registeraddress)

    def read_long(self, registeraddress: int, functioncode: int = 3, signed: bool = False,
                  byteorder: int = 0, number_of_registers: int = 2) -> int:
        return int(self._get(registeraddress))

    def read_register(self, registeraddress: int, number_of_decimals: int = 0,
                      functioncode: int = 3, signed: bool = False) -> int | float:
        return self._get(registeraddress)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on leaving: nothing listens there


@contextlib.contextmanager
def sim_board(
    cfg: AgentConfig, problems: set[str] | frozenset[str] = frozenset(),
    status_socket: Path | None = None,
) -> Iterator[tuple[Board, AgentConfig]]:
    """A simulated board for ``cfg`` with ``problems`` (names from ``PROBLEMS``) injected.
    Yields the board and the config to check (a problem may need a part configured)."""
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        raise ValueError(f"unknown problems {unknown}; allowed: {', '.join(PROBLEMS)}")
    from qrad_agent.sensors.cli import ReadSession
    from qrad_agent.sim.cpufreq import make_cpufreq_tree

    tmp = Path(tempfile.mkdtemp(prefix="qrad-doctor-sim-"))
    board = Board(simulated=True, status_socket=status_socket)
    board.closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        s = cfg.sim
        # devices: a node per bus the sensors use, unless the bus is to be missing
        dev = tmp / "dev"
        dev.mkdir()
        room_buses = [x.bus for x in cfg.sensors
                      if x.kind not in SYSFS_SENSOR_KINDS and x.role is Role.ROOM]
        missing_bus = room_buses[0] if "missing-bus" in problems and room_buses else None
        for n in _i2c_buses(cfg):
            if n != missing_bus:
                (dev / f"i2c-{n}").touch(mode=0o660)
        board.dev_root = dev
        # levers: cpufreq as the kernel lays it out, and a cgroup v2 hierarchy with cpu
        sysroot = tmp / "sys"
        table = list(range(s.min_freq_khz, s.max_freq_khz + 1, s.freq_step_khz))
        tree = make_cpufreq_tree(sysroot, s.cores, s.min_freq_khz, s.max_freq_khz, table)
        board.closers.append(tree.close)
        if "unwritable-lever" in problems:
            for f in sysroot.glob("devices/system/cpu/cpufreq/policy*/scaling_m*_freq"):
                f.chmod(0o444)
        cg = sysroot / "fs" / "cgroup"
        cg.mkdir(parents=True)
        if "no-cgroup" not in problems:
            (cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
            (cg / "cgroup.subtree_control").write_text("\n")
            (cg / "cgroup.procs").write_text("")
        board.sysfs_root, board.cpufreq_sysfs = sysroot, tree
        # the meter: an emulated one answers where the config names one
        if "no-meter" in problems and cfg.metering.meter is None:
            from qrad_agent.actuators.settings import ModbusMeterConfig

            meter = ModbusMeterConfig(port="/dev/ttyUSB0")
            cfg = cfg.model_copy(update={
                "metering": cfg.metering.model_copy(update={"meter": meter})})
        answering = "no-meter" not in problems
        board.instrument_factory = lambda _cfg: _SimMeter(answering)
        if "broker-down" in problems:
            board.broker_address = ("127.0.0.1", _closed_port())
        synced = "clock-unsynced" not in problems
        board.clock = lambda: ClockState(synced, "simulated board")
        board.state_dir = tmp / "state"
        board.state_dir.mkdir()
        if "low-disk" in problems:
            board.disk_usage = lambda p: (8 * 1024 * MIB, 8 * 1024 * MIB - 10 * MIB, 10 * MIB)

        def session(c: AgentConfig) -> ReadSession:
            rs = ReadSession(c, True, tmp / "sensors")
            sim = rs.sim_sensors
            assert sim is not None
            for x in c.sensors:
                if missing_bus is not None and x.bus == missing_bus \
                        and x.kind not in SYSFS_SENSOR_KINDS:
                    sim.inject(x.name, "disconnect")
            if "unhealthy-sensor" in problems:
                first = next((x for x in c.sensors if x.role is Role.ROOM), None)
                if first is not None:
                    chip = sim.chip(first.name)
                    faults: frozenset[str] = getattr(chip, "FAULTS", frozenset())
                    sim.inject(first.name, "bad_crc" if "bad_crc" in faults else "nack")
            return rs

        (tmp / "sensors").mkdir()
        board.sensor_session = session
        if "stale-service" in problems:
            board.status_socket = _serve_stale(board, tmp / "stale.sock", cfg)
        yield board, cfg
    finally:
        board.close()


def _serve_stale(board: Board, path: Path, cfg: AgentConfig) -> Path:
    """A status socket whose agent ticked last ten minutes ago and never since."""
    box = SnapshotBox()
    box.publish({
        "version": SNAPSHOT_VERSION, "state": "running",
        "agent": {"pid": os.getpid(), "node": cfg.node.id, "simulated": True},
        "loop": {"healthy": True, "last_tick_monotonic": time.monotonic() - 600.0,
                 "late_after_s": 3 * cfg.control.period_s + 10.0, "last_error": None},
        "counters": {"tick_failures": 0},
    })
    server = StatusServer(path, box)
    server.start()
    board.closers.append(server.close)
    return path


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status is Status.FAIL for f in findings) else 0
