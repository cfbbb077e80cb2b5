"""``qrad-fleet``: the operator's side (keygen and sign today; dispatcher, submit, jobs, nodes
and cmd arrive with the jobs work). Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from qrad_agent import __version__
from qrad_agent.link.messages import describe


def cmd_keygen(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.keys import keygen

    try:
        pair = keygen(Path(args.out), overwrite=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"qrad-fleet keygen: {exc}", file=sys.stderr)
        return 1
    print(f"private key written to {args.out} (keep it secret; mode 0600)", file=sys.stderr)
    print(f"key id {pair.key_id}; add to every node's config:", file=sys.stderr)
    print(pair.config_snippet(args.name), end="")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.keys import load_private_key, sign_command

    try:
        body = json.loads(args.body) if args.body else {}
    except ValueError as exc:
        print(f"qrad-fleet sign: --body is not JSON: {exc}", file=sys.stderr)
        return 1
    if not isinstance(body, dict):
        print("qrad-fleet sign: --body must be a JSON object", file=sys.stderr)
        return 1
    body = {"cmd": args.cmd, **body}
    try:
        key = None if args.unsigned else load_private_key(args.key)
        env = sign_command(key, args.node, body, seq=args.seq, ttl_s=args.ttl, command_id=args.id)
    except ValidationError as exc:
        print(f"qrad-fleet sign: not a valid command: {describe(exc, limit=10)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"qrad-fleet sign: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(env, separators=(",", ":")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrad-fleet",
        description="Operate a fleet of compute radiators over MQTT: signing keys and signed "
        "commands. The dispatcher and the job commands arrive with the jobs work.",
    )
    p.add_argument("--version", action="version", version=f"qrad-fleet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    kg = sub.add_parser("keygen", help="make an Ed25519 fleet signing key pair")
    kg.add_argument("--out", required=True, help="where to write the private key (PEM)")
    kg.add_argument("--name", default="fleet", help="the key's name in node configs")
    kg.add_argument("--force", action="store_true", help="replace an existing key file")
    kg.set_defaults(func=cmd_keygen)

    sg = sub.add_parser(
        "sign",
        help="print a signed command envelope (JSON) to publish on cmd/{name}",
        description="Example: qrad-fleet sign --key fleet.pem --node qrad-0001 --cmd setpoint "
        "--body '{\"target_c\": 21.5}' | mosquitto_pub -t qrad/v1/nodes/qrad-0001/cmd/setpoint "
        "-q 1 -s ...",
    )
    sg.add_argument("--key", help="private key file from keygen")
    sg.add_argument("--unsigned", action="store_true",
                    help="no signature (only nodes with require_signed = false accept it)")
    sg.add_argument("--node", required=True, help="node id, or '*' for a fleet broadcast")
    sg.add_argument("--cmd", required=True,
                    choices=("setpoint", "mode", "schedule", "override", "config", "drain",
                             "resume", "identify"))
    sg.add_argument("--body", help="the command's fields as a JSON object")
    sg.add_argument("--seq", type=int, help="sequence number (default: time in microseconds)")
    sg.add_argument("--ttl", type=float, default=300.0, help="seconds until it expires")
    sg.add_argument("--id", help="command id (default: random)")
    sg.set_defaults(func=cmd_sign)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    if args.command == "sign" and not args.unsigned and not args.key:
        parser.error("sign needs --key FILE (or --unsigned)")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
