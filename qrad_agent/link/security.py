"""Signed commands: Ed25519 over a canonical form, expiry, replay protection, addressing.

The canonical form
------------------
``sig`` signs the envelope object *without* its ``sig`` member, serialised by the JSON
Canonicalization Scheme, RFC 8785 (JCS), and encoded as UTF-8:

- object members sorted by key (keys here are ASCII, so code-point order is JCS order);
- no whitespace; ``,`` and ``:`` as separators;
- strings with only the escapes JSON requires: ``\\"``, ``\\\\``, ``\\b \\f \\n \\r \\t`` and
  ``\\u00xx`` (lowercase hex) for other control characters; everything else as is;
- numbers as ECMAScript prints them: ``21`` (not ``21.0``), ``21.5``, ``1e-7``, ``1e+21``.

Any JCS library in any language produces the same bytes, so a fleet backend need not be
written in Python. The verifier re-serialises the *parsed* message, so how the sender spaced
or ordered its JSON does not matter; duplicate keys, NaN and Infinity are refused before.

The signature is the 64-byte Ed25519 signature in base64url without padding (86 chars).
Public keys are configured as the raw 32-byte key in base64 (what ``qrad-fleet keygen``
prints); a key is known by its id, the first 16 hex digits of the SHA-256 of the raw key.

Checks, in order; the first that fails refuses the command with its reason, and nothing
(not even the sequence number) changes:
1. the envelope is well-formed (``link/messages.py``);
2. addressed to this node on its own topic, or ``"*"`` on the fleet topic, and the command
   in the body is the one named by the topic;
3. not issued in the future (beyond ``max_clock_skew_s``), not expired, not valid for longer
   than ``max_lifetime_s``;
4. signed by one of the configured fleet keys (or unsigned, only when signatures are not
   required);
5. ``seq`` above the last one accepted from that key, which is then stored durably
   *before* the command is acted upon. One counter per key serves the node and broadcast
   topics alike, so a fleet signs with a counter that only grows (``qrad-fleet sign`` uses
   the time in microseconds).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qrad_agent.link.messages import BROADCAST, Envelope
from qrad_agent.link.settings import SecurityConfig
from qrad_agent.store.db import StoreError
from qrad_agent.store.kv import KeyValue

UNSIGNED_KEY_ID = "unsigned"


class Refused(Exception):
    """A command the node will not act on; ``str()`` is the reason, for a person."""


# ------------------------------------------------------------------ canonical JSON (RFC 8785)


def canonical_json(value: Any) -> bytes:
    """``value`` (parsed JSON: dict, list, str, int, float, bool, None) in JCS form."""
    out: list[str] = []
    _emit(value, out)
    return "".join(out).encode("utf-8")


def _string(s: str) -> str:
    # The standard library's encoder writes strings exactly as JCS asks (\b \f \n \r \t,
    # \" and \\ by name, other control characters as lowercase \u00xx, everything else as
    # itself) and does it in C: a signed assignment of many jobs is mostly strings.
    return _encode_string(s)


_encode_string = json.JSONEncoder(ensure_ascii=False).encode


def _number(x: float) -> str:
    """ECMAScript Number::toString, which JCS prescribes."""
    if not math.isfinite(x):
        raise ValueError("NaN and Infinity have no JSON form")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + _number(-x)
    # shortest round-trip digits and the decimal exponent, from Python's repr
    mantissa, _, exp_text = repr(x).partition("e")
    exp = int(exp_text) if exp_text else 0
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    point = len(int_part.lstrip("0")) + exp if int_part.strip("0") else exp - (
        len(frac_part) - len(frac_part.lstrip("0"))
    )
    digits = digits.rstrip("0") or "0"
    k, n = len(digits), point  # value = 0.digits * 10^n
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    head = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{head}e{sign}{abs(e)}"


def _emit(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        # JCS numbers are doubles: a larger integer is written as the double it becomes.
        # (Inbound messages never get here with one: strict_json refuses them.)
        out.append(str(value) if abs(value) <= 2**53 else _number(float(value)))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise ValueError(f"{type(value).__name__} has no JSON form")


def _utf16_key(key: str) -> bytes:
    # JCS orders keys by UTF-16 code units; this differs from code points only above U+FFFF
    return key.encode("utf-16-be")


# ------------------------------------------------------------------ keys and signatures


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64any(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not."""
    t = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(t + "=" * (-len(t) % 4), validate=True)


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """A public key from the raw 32 bytes in base64, or from a PEM SubjectPublicKeyInfo."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(stripped.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM key is not an Ed25519 public key")
        return key
    try:
        raw = _b64any(stripped)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "not an Ed25519 public key: expected the 32-byte key in base64 (as `qrad-fleet "
            "keygen` prints it) or a PEM public key"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS #8) file, as ``qrad-fleet keygen`` writes."""
    data = Path(path).read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def signing_input(envelope: Mapping[str, Any]) -> bytes:
    """The bytes ``sig`` signs: the canonical JSON of the envelope without ``sig``."""
    return canonical_json({k: v for k, v in envelope.items() if k != "sig"})


def sign(private_key: Ed25519PrivateKey, envelope: Mapping[str, Any]) -> str:
    return b64url(private_key.sign(signing_input(envelope)))


def verify(public_key: Ed25519PublicKey, envelope: Mapping[str, Any]) -> bool:
    sig = envelope.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        raw = _b64any(sig)
        public_key.verify(raw, signing_input(envelope))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


# ------------------------------------------------------------------ the checks


@dataclass(frozen=True)
class TrustedKey:
    name: str
    key: Ed25519PublicKey
    id: str


@dataclass(frozen=True)
class Accepted:
    envelope: Envelope
    key: str  # the signing key's name, or "unsigned"


class CommandVerifier:
    """Runs the checks of the module doc on one parsed envelope. Not thread-safe: the control
    loop calls it (it writes the sequence numbers)."""

    def __init__(
        self, cfg: SecurityConfig, node_id: str, kv: KeyValue, *, simulated: bool = False
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.kv = kv
        self.require_signed = cfg.signed_required(simulated)
        self.keys: list[TrustedKey] = []
        for fk in cfg.fleet_keys:
            pub = public_key_from_text(fk.public_key)
            self.keys.append(TrustedKey(fk.name, pub, key_id(pub)))

    def check(
        self,
        raw: Mapping[str, Any],
        envelope: Envelope,
        *,
        broadcast: bool,
        topic_command: str,
        now: float,
    ) -> Accepted:
        """Accept ``envelope`` (``raw`` is the same message as parsed JSON, for the
        signature) or raise :class:`Refused`. ``now`` is the wall clock in Unix seconds."""
        self._address(envelope, broadcast, topic_command)
        self._time(envelope, now)
        trusted = self._signature(raw, envelope)
        seq_key = trusted.id if trusted is not None else UNSIGNED_KEY_ID
        try:
            last = self.kv.accept_command_seq(seq_key, envelope.seq)
        except StoreError as exc:
            raise Refused(
                f"cannot record the command's sequence number on this node ({exc}); "
                "nothing was changed, retry later"
            ) from exc
        if last is not None:
            who = f"key {trusted.name!r}" if trusted is not None else "unsigned commands"
            raise Refused(
                f"replayed or out of order: seq {envelope.seq} is not above {last}, the last "
                f"accepted from {who}; sign again with a higher seq"
            )
        return Accepted(envelope, trusted.name if trusted is not None else UNSIGNED_KEY_ID)

    def _address(self, env: Envelope, broadcast: bool, topic_command: str) -> None:
        if broadcast and env.node != BROADCAST:
            raise Refused(
                f"misaddressed: a command on the fleet topic must have node '*', not "
                f"{env.node!r}"
            )
        if not broadcast and env.node != self.node_id:
            raise Refused(
                f"misaddressed: this is node {self.node_id!r}, the command is for "
                f"{env.node!r}" + (" (broadcasts go on the fleet topic)" if env.node == "*"
                                   else "")
            )
        if env.body.cmd != topic_command:
            raise Refused(
                f"the topic says {topic_command!r} but the body is a {env.body.cmd!r} command; "
                f"publish it on cmd/{env.body.cmd}"
            )

    def _time(self, env: Envelope, now: float) -> None:
        skew = self.cfg.max_clock_skew_s
        if env.issued_at > now + skew:
            raise Refused(
                f"issued {env.issued_at - now:.0f} s in the future (more than the allowed "
                f"clock skew of {skew:.0f} s): check the clocks of the fleet and of this node "
                f"(NTP); node time is {now:.0f}"
            )
        if now >= env.expires_at:
            raise Refused(
                f"expired {now - env.expires_at:.0f} s ago (expires_at {env.expires_at:.0f}, "
                f"node time {now:.0f}); issue a new command"
            )
        lifetime = env.expires_at - env.issued_at
        if lifetime > self.cfg.max_lifetime_s:
            raise Refused(
                f"valid for {lifetime:.0f} s, longer than this node allows "
                f"({self.cfg.max_lifetime_s:.0f} s, security.max_lifetime_s); "
                "use a shorter expiry"
            )

    def _signature(self, raw: Mapping[str, Any], env: Envelope) -> TrustedKey | None:
        if env.sig is None:
            if self.require_signed:
                raise Refused(
                    "unsigned: this node accepts only commands signed by a fleet key "
                    f"({len(self.keys)} configured); sign it with `qrad-fleet sign`"
                )
            return None
        for trusted in self.keys:
            if verify(trusted.key, raw):
                return trusted
        if not self.keys:
            raise Refused(
                "signed, but this node has no fleet keys configured "
                "(link.security.fleet_keys) to check the signature with"
            )
        raise Refused(
            f"bad signature: not made by any of the {len(self.keys)} fleet key(s) this node "
            "trusts over this exact message (was it changed after signing?)"
        )


def make_envelope(
    private_key: Ed25519PrivateKey | None,
    node: str,
    body: Mapping[str, Any],
    *,
    seq: int,
    issued_at: float,
    ttl_s: float,
    command_id: str,
) -> dict[str, Any]:
    """A command envelope as a JSON-ready dict, signed when a key is given."""
    env: dict[str, Any] = {
        "id": command_id,
        "node": node,
        "issued_at": issued_at,
        "expires_at": issued_at + ttl_s,
        "seq": seq,
        "body": dict(body),
    }
    if private_key is not None:
        env["sig"] = sign(private_key, env)
    return env


def trusted_key_ids(keys: Sequence[TrustedKey]) -> dict[str, str]:
    return {k.name: k.id for k in keys}
