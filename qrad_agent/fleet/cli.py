"""``qrad-fleet``: the operator's side: signing keys and signed commands, the reference
dispatcher and its job queue, and a look at the fleet. Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ dispatcher and jobs


def _broker(args: argparse.Namespace) -> Any:
    from qrad_agent.fleet.dispatcher import BrokerConfig

    return BrokerConfig.from_url(args.broker, ca=args.ca, cert=args.cert, key=args.cert_key)


def _key(path: str | None) -> Any:
    from qrad_agent.fleet.keys import load_private_key

    return load_private_key(path) if path else None


def cmd_dispatcher(args: argparse.Namespace) -> int:
    import logging

    from qrad_agent.fleet.dispatcher import Dispatcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        key = _key(args.key)
        disp = Dispatcher(_broker(args), args.db, key, group=args.group,
                          retry_after_s=args.retry_after, prefix=args.prefix)
    except (OSError, ValueError) as exc:
        print(f"qrad-fleet dispatcher: {exc}", file=sys.stderr)
        return 1
    if key is None:
        print("qrad-fleet dispatcher: no --key: assignments go out unsigned (only nodes with "
              "require_signed = false take them)", file=sys.stderr)
    disp.run_forever()
    return 0


def _load_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.argv:
        if args.file:
            raise ValueError("give a job file or -- ARGV..., not both")
        return [{"argv": list(args.argv)}]
    if not args.file:
        raise ValueError("give a job file (JSON or TOML) or -- ARGV...")
    text = Path(args.file).read_text()
    data: Any = tomllib.loads(text) if args.file.endswith(".toml") else json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("jobs"), list):
        data = data["jobs"]
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{args.file}: a job is an object (or a list of them, or jobs = [...])")
    return items


def cmd_submit(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.queue import FleetQueue, QueueError
    from qrad_agent.jobs.spec import SpecError, parse_spec

    try:
        items = _load_specs(args)
        specs = []
        stem = args.id or f"job-{uuid.uuid4().hex[:8]}"
        for i, item in enumerate(items):
            for n in range(args.count):
                one = dict(item)
                if "job" not in one or args.count > 1:
                    base = one.get("job", stem if len(items) == 1 else f"{stem}-{i}")
                    one["job"] = base if args.count == 1 else f"{base}-{n}"
                if args.priority:
                    one["priority"] = args.priority
                specs.append(parse_spec(one))
        q = FleetQueue.open(args.db)
        q.submit_many(specs, max_attempts=args.max_attempts)
    except (SpecError, QueueError, OSError, ValueError) as exc:
        print(f"qrad-fleet submit: {exc}", file=sys.stderr)
        return 1
    for spec in specs:
        print(spec.job)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.placement import FleetState
    from qrad_agent.fleet.queue import FleetQueue

    q = FleetQueue.open(args.db)
    states = [FleetState(s) for s in args.state] if args.state else None
    rows = q.list(states, limit=args.limit)
    if args.json:
        print(json.dumps([{"job": j.job_id, "state": j.state.value, "attempt": j.attempt,
                           "node": j.node, "priority": j.spec.priority.value,
                           "reason": j.reason, "result": j.result.model_dump(mode="json")
                           if j.result else None} for j in rows], indent=2))
        return 0
    print(f"{'JOB':24} {'STATE':10} {'PRIO':10} {'ATT':>3} {'NODE':16} REASON")
    for j in rows:
        node = j.node or (j.result.node if j.result else "") or ""
        print(f"{j.job_id:24} {j.state.value:10} {j.spec.priority.value:10} {j.attempt:>3} "
              f"{node:16} {j.reason or ''}")
    counts = q.counts()
    print("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no jobs")
    return 0


def _publish_once(args: argparse.Namespace, topic: str, payload: str,
                  timeout: float = 10.0) -> str | None:
    """Connect, publish ``payload`` (QoS 1) and wait for the broker's PUBACK; None when done,
    else what went wrong."""
    import threading

    from qrad_agent.fleet.dispatcher import connect_client

    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        connected.set()

    c = connect_client(_broker(args), f"qrad-fleet-{uuid.uuid4().hex[:8]}",
                       on_connect=on_connect)
    try:
        if not connected.wait(timeout):
            return f"cannot connect to {args.broker} within {timeout:.0f} s"
        if refused:
            return f"the broker refused the connection: {refused[0]}"
        info = c.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            return f"cannot publish on {topic}: {exc}"
        if not info.is_published():
            return f"the broker did not confirm the message on {topic} within {timeout:.0f} s"
        return None
    finally:
        c.disconnect()
        c.loop_stop()


def cmd_cancel(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.dispatcher import Signer
    from qrad_agent.fleet.queue import FleetQueue, QueueError

    q = FleetQueue.open(args.db)
    try:
        state, node = q.cancel(args.job)
    except QueueError as exc:
        print(f"qrad-fleet cancel: {exc}", file=sys.stderr)
        return 1
    if node is None:
        print(f"{args.job}: {state.value}")
        return 0
    if not args.broker:
        print(f"{args.job}: {state.value} (held by {node}); no --broker: the radiator was not "
              "told, the job ends when its lease lapses", file=sys.stderr)
        return 0
    try:
        env = Signer(_key(args.key)).envelope(node, {"cmd": "cancel", "jobs": [args.job]})
    except (OSError, ValueError) as exc:
        print(f"qrad-fleet cancel: {exc}", file=sys.stderr)
        return 1
    error = _publish_once(args, f"{args.prefix}/nodes/{node}/work/assign", json.dumps(env))
    if error is not None:
        print(f"qrad-fleet cancel: {args.job}: {state.value}, but {node} was not told: {error}; "
              "the job ends when its lease lapses", file=sys.stderr)
        return 1
    print(f"{args.job}: {state.value}; {node} told to kill it")
    return 0


def _collect(args: argparse.Namespace, filters: list[str], seconds: float
             ) -> list[tuple[str, bytes]]:
    from qrad_agent.fleet.dispatcher import connect_client

    got: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(f, 1) for f in filters])

    c = connect_client(_broker(args), f"qrad-fleet-{uuid.uuid4().hex[:8]}",
                       on_message=lambda cl, u, m: got.put((m.topic, bytes(m.payload))),
                       on_connect=on_connect)
    time.sleep(seconds)  # retained messages arrive right after the subscription
    c.disconnect()
    c.loop_stop()
    out = []
    while not got.empty():
        out.append(got.get())
    return out


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes: dict[str, dict[str, Any]] = {}
    head = f"{args.prefix}/nodes/"
    for topic, payload in _collect(args, [f"{head}+/status", f"{head}+/state"], args.wait):
        node, _, leaf = topic[len(head):].partition("/")
        try:
            nodes.setdefault(node, {})[leaf] = json.loads(payload)
        except ValueError:
            continue
    print(f"{'NODE':20} {'STATUS':8} {'MODE':8} {'TARGET':>6} DRAINING")
    for node, d in sorted(nodes.items()):
        st, state = d.get("status", {}), d.get("state", {})
        target = state.get("target_c")
        print(f"{node:20} {st.get('status', '?'):8} {state.get('mode', '?'):8} "
              f"{'' if target is None else target:>6} {state.get('draining', '')}")
    return 0


def cmd_cmd(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.keys import sign_command

    try:
        body = json.loads(args.body) if args.body else {}
        if not isinstance(body, dict):
            raise ValueError("--body must be a JSON object")
        node = "*" if args.all else args.node
        if not node:
            raise ValueError("give a NODE or --all")
        env = sign_command(_key(args.key), node, {"cmd": args.name, **body})
    except ValidationError as exc:
        print(f"qrad-fleet cmd: not a valid command: {describe(exc, limit=10)}",
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"qrad-fleet cmd: {exc}", file=sys.stderr)
        return 1
    topic = (f"{args.prefix}/fleet/cmd/{args.name}" if args.all
             else f"{args.prefix}/nodes/{node}/cmd/{args.name}")
    error = _publish_once(args, topic, json.dumps(env))
    if error is not None:
        print(f"qrad-fleet cmd: {error}", file=sys.stderr)
        return 1
    print(f"sent {args.name} ({env['id']}) on {topic}; results on cmd/result")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from qrad_agent.fleet.dispatcher import connect_client

    node = args.node or "+"
    filters = [f"{args.prefix}/nodes/{node}/telemetry", f"{args.prefix}/nodes/{node}/events"]

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(f, 1) for f in filters])

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        leaf = msg.topic.rsplit("/", 1)[-1]
        who = data.get("node", "?")
        if leaf == "events":
            print(f"{who:16} event {data.get('kind')}: {data.get('message')}", flush=True)
            return
        for s in data.get("samples", [])[-1:]:
            jobs = s.get("jobs_running")  # left out by a radiator that does not count them
            print(f"{who:16} room {s.get('room_c')} target {s.get('target_c')} "
                  f"power {s.get('power_w')} W" + ("" if jobs is None else f" jobs {jobs}"),
                  flush=True)

    c = connect_client(_broker(args), f"qrad-fleet-{uuid.uuid4().hex[:8]}",
                       on_message=on_message, on_connect=on_connect)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        c.disconnect()
        c.loop_stop()
    return 0


def _broker_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required,
                   help="mqtt://[user[:pass]@]host[:port] or mqtts://...")
    p.add_argument("--ca", help="CA certificate (TLS)")
    p.add_argument("--cert", help="client certificate (TLS)")
    p.add_argument("--cert-key", help="client certificate's key (TLS)")
    p.add_argument("--prefix", default="qrad/v1", help="topic prefix")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrad-fleet",
        description="Operate a fleet of compute radiators over MQTT: signing keys, signed "
        "commands, the reference job dispatcher and its queue.",
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

    dp = sub.add_parser("dispatcher", help="run the reference dispatcher (SQLite job queue)")
    _broker_args(dp)
    dp.add_argument("--db", required=True, help="the job queue (SQLite file)")
    dp.add_argument("--key", help="private key to sign assignments with (from keygen)")
    dp.add_argument("--group", default="dispatchers",
                    help="shared subscription group: dispatchers in one group share the work")
    dp.add_argument("--retry-after", type=float, default=5.0,
                    help="seconds a radiator waits after an empty answer")
    dp.set_defaults(func=cmd_dispatcher)

    sb = sub.add_parser("submit", help="queue jobs: a JSON/TOML job file, or -- ARGV...",
                        usage="qrad-fleet submit --db DB [options] (FILE | -- ARGV...)")
    sb.add_argument("--db", required=True)
    sb.add_argument("file", nargs="?", help="job spec(s): an object, a list, or jobs = [...]")
    sb.add_argument("--count", type=int, default=1, help="this many copies (ids get -N)")
    sb.add_argument("--priority", choices=("high", "low", "background"))
    sb.add_argument("--id", help="job id (or stem of the ids)")
    sb.add_argument("--max-attempts", type=int, default=3)
    # "-- ARGV...": split off in main() before parsing, so neither FILE nor the options
    # can swallow any of it
    sb.set_defaults(func=cmd_submit, argv=[])

    jb = sub.add_parser("jobs", help="list the queue")
    jb.add_argument("--db", required=True)
    jb.add_argument("--state", action="append",
                    choices=("queued", "leased", "cancelling", "succeeded", "failed",
                             "cancelled"))
    jb.add_argument("--limit", type=int)
    jb.add_argument("--json", action="store_true")
    jb.set_defaults(func=cmd_jobs)

    cn = sub.add_parser("cancel", help="cancel a job (a radiator running it kills it)")
    cn.add_argument("--db", required=True)
    cn.add_argument("job")
    cn.add_argument("--key", help="private key to sign the cancel with")
    _broker_args(cn, required=False)
    cn.set_defaults(func=cmd_cancel)

    nd = sub.add_parser("nodes", help="the radiators, from their retained status and state")
    _broker_args(nd)
    nd.add_argument("--wait", type=float, default=1.0, help="seconds to collect")
    nd.set_defaults(func=cmd_nodes)

    cm = sub.add_parser("cmd", help="send a signed command to a node or to all")
    _broker_args(cm)
    cm.add_argument("node", nargs="?")
    cm.add_argument("--all", action="store_true", help="broadcast to the fleet")
    cm.add_argument("name", choices=("setpoint", "mode", "schedule", "override", "config",
                                     "drain", "resume", "identify"))
    cm.add_argument("--body", help="the command's fields as a JSON object")
    cm.add_argument("--key", help="private key (from keygen); without it: unsigned")
    cm.set_defaults(func=cmd_cmd)

    wt = sub.add_parser("watch", help="live telemetry and events")
    _broker_args(wt)
    wt.add_argument("--node", help="one node (default: all)")
    wt.set_defaults(func=cmd_watch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    job_argv: list[str] | None = None
    if "--" in given and "submit" in given[:given.index("--")]:
        # submit's "-- ARGV...": everything after the first "--" is the job's argv
        at = given.index("--")
        job_argv = given[at + 1:]
        args = parser.parse_args(given[:at])
        if args.command != "submit":
            job_argv = None
            args = parser.parse_args(given)
    else:
        args = parser.parse_args(given)
    if job_argv is not None:
        if not job_argv:
            parser.error("submit: nothing after --: give the program and its arguments")
        args.argv = job_argv
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    if args.command == "sign" and not args.unsigned and not args.key:
        parser.error("sign needs --key FILE (or --unsigned)")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
