"""Real Mosquitto brokers for tests, and a paho client that plays the fleet.

Each :class:`Broker` runs its own ``mosquitto`` process on a free loopback port with a config
file in a temp dir (never the system service), and can be stopped gracefully (it saves its
persistence file), killed, and restarted on the same port. :func:`make_pki` writes a CA,
a server certificate for 127.0.0.1/localhost and client certificates whose CN is the
identity, all generated here with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def require_mosquitto() -> None:
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed (scripts/test installs it: apt-get install "
                    "mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process. ``conf`` is the body of its config; the listener, persistence
    location and log file are filled in here unless ``raw_conf`` is given whole."""

    def __init__(
        self,
        workdir: Path,
        *,
        conf: str = "allow_anonymous true\n",
        persistence: bool = False,
        raw_conf: str | None = None,
        port: int | None = None,
    ) -> None:
        require_mosquitto()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = self.dir / "mosquitto.log"
        self.conf_file = self.dir / "mosquitto.conf"
        if raw_conf is None:
            raw_conf = (
                f"listener {self.port} 127.0.0.1\n"
                f"persistence {'true' if persistence else 'false'}\n"
                f"persistence_location {self.dir}/\n"
                "autosave_interval 0\n"
                f"log_dest file {self.log}\n"
                "log_type error\nlog_type warning\nlog_type notice\n"
                "max_queued_messages 100000\n"
                "set_tcp_nodelay true\n"
                + conf
            )
        if os.geteuid() == 0:
            raw_conf = "user root\n" + raw_conf  # mosquitto would drop to a user that cannot
            # read the temp dir
        self.conf_file.write_text(raw_conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Broker:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this broker is running already (a second start would leak it)")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}"
                                   f"{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any
    at: float = field(default_factory=time.monotonic)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the agent does


class FleetClient:
    """A paho MQTT 5 client with its own network thread, collecting what it receives."""

    def __init__(
        self,
        broker_host: str,
        port: int,
        client_id: str = "fleet",
        *,
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        session_expiry: int = 0,
        tls: Callable[[mqtt.Client], None] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.history: list[Received] = []  # everything ever received, for find()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
        if tls is not None:
            tls(self.c)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.suback: queue.Queue[list[Any]] = queue.Queue()
        self.puback: dict[int, Any] = {}
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.suback.put(rcs)
        self.c.on_publish = self._on_publish
        self.c.on_socket_open = _no_delay
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        self.c.connect(broker_host, port, keepalive=10, clean_start=clean_start,
                       properties=props)
        self.c.loop_start()
        if not self.connected.wait(5):
            raise RuntimeError(f"fleet client {client_id} could not connect: {self.refused}")

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refused.append(str(reason))
        else:
            self.connected.set()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        r = Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties)
        self.history.append(r)
        self.messages.put(r)

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        self.puback[mid] = reason

    def fast_reconnect(self) -> None:
        """Reconnect within half a second after losing the broker (paho takes floats here
        at run time; its annotation says int)."""
        self.c.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]

    def subscribe(self, *filters: str, qos: int = 1) -> list[Any]:
        self.c.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters])
        return self.suback.get(timeout=5)

    def publish(self, topic: str, payload: bytes | str, *, response_topic: str | None = None,
                correlation: bytes | None = None, retain: bool = False, qos: int = 1,
                wait: bool = True) -> Any:
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait and qos > 0:
            info.wait_for_publish(5)
        return info

    def expect(self, match: Callable[[Received], bool] | str, timeout: float = 5.0,
               ) -> Received:
        """The next received message that matches (a topic, or a predicate); others are
        dropped."""
        pred = (lambda r: r.topic == match) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout} s")
            try:
                r = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if pred(r):
                return r

    def find(self, match: Callable[[Received], bool], timeout: float = 5.0) -> Received:
        """The latest message received so far (or within ``timeout``) that matches."""
        deadline = time.monotonic() + timeout
        while True:
            for r in reversed(list(self.history)):
                if match(r):
                    return r
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching message within {timeout} s")
            time.sleep(0.01)

    def clear(self) -> None:
        """Forget what is queued (history keeps it)."""
        while True:
            try:
                self.messages.get_nowait()
            except queue.Empty:
                return

    def drain(self, settle: float = 0.2, limit: float = 30.0) -> list[Received]:
        """Everything received until nothing arrived for ``settle`` seconds (or ``limit``)."""
        out = []
        end = time.monotonic() + limit
        while time.monotonic() < end:
            try:
                out.append(self.messages.get(timeout=settle))
            except queue.Empty:
                return out
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# ------------------------------------------------------------------ certificates


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(directory: Path, clients: Iterable[str], *, ca_name: str = "qrad test CA") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
        )
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    crt, key = leaf("localhost", server=True)
    (directory / "server.crt").write_bytes(crt)
    (directory / "server.key").write_bytes(key)
    for name in clients:
        crt, key = leaf(name, server=False)
        (directory / f"{name}.crt").write_bytes(crt)
        (directory / f"{name}.key").write_bytes(key)
        os.chmod(directory / f"{name}.key", 0o600)
    return Pki(directory, directory / "ca.crt", directory / "server.crt",
               directory / "server.key")
