"""Fleet signing keys, for operators: make a key pair, sign command envelopes.

The private key stays with the operator or the fleet backend (a PEM file readable only by its
owner); each node's config lists the public key under ``[[link.security.fleet_keys]]``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qrad_agent.link.messages import Envelope
from qrad_agent.link.security import (
    key_id,
    load_private_key,
    make_envelope,
    public_key_b64,
)

__all__ = ["KeyPair", "keygen", "load_private_key", "next_seq", "sign_command"]


class KeyPair:
    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self.private_key = private_key
        self.path = path

    @property
    def public_b64(self) -> str:
        return public_key_b64(self.private_key.public_key())

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    def config_snippet(self, name: str) -> str:
        """The lines an operator pastes into each node's config."""
        return (
            "[[link.security.fleet_keys]]\n"
            f'name = "{name}"\n'
            f'public_key = "{self.public_b64}"\n'
        )


def keygen(path: Path | str, *, overwrite: bool = False) -> KeyPair:
    """Create an Ed25519 key pair; write the private key to ``path`` (PEM, PKCS #8, mode
    0600). Refuses to replace an existing file unless ``overwrite``: losing a fleet key
    means re-keying every node."""
    p = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{p} exists; choose another path, or pass overwrite to replace it (nodes that "
            "trust the old key will refuse commands signed by the new one)"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return KeyPair(key, p)


def next_seq() -> int:
    """A sequence number that only grows: the wall clock in microseconds. Good for one
    signer per key; a backend with several signers per key needs a shared counter."""
    return time.time_ns() // 1000


def sign_command(
    key: Ed25519PrivateKey | None,
    node: str,
    body: Mapping[str, Any],
    *,
    seq: int | None = None,
    ttl_s: float = 300.0,
    now: float | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """A command envelope for ``node`` (``"*"`` for the whole fleet), signed with ``key``
    (None for an unsigned one, which only nodes with ``require_signed = false`` accept).

    The result is validated against the contract before it is returned, so a mistake in the
    body shows here, not as a refusal from the node.
    """
    issued = float(round(time.time() if now is None else now, 3))
    env = make_envelope(
        key,
        node,
        body,
        seq=next_seq() if seq is None else seq,
        issued_at=issued,
        ttl_s=ttl_s,
        command_id=command_id or uuid.uuid4().hex[:16],
    )
    Envelope.model_validate_json(_json(env))
    return env


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=False)
