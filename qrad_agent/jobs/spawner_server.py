"""The job spawner's own process: forks and execs the jobs the agent asks for.

Why a separate process: forking the agent (tens of MB, several threads) and running Python
between fork and exec costs ~5 ms per job in page-table copies and copy-on-write faults,
with the control loop waiting on it. This process is small (the standard library only,
started with ``-I -S``), so the same fork, set-up and exec take ~1 ms, and the agent is not
the one copied. See docs/decisions/0015-job-spawner.md.

It is run by path (``python -I -S spawner_server.py FD``) and imports nothing of the
package: FD is a stream socket to the agent carrying one JSON object per line.

Agent -> spawner: ``{"id": n, "exe", "argv", "env", "cwd", "log", "procs", "limits",
"nice", "ids", "umask"}``: start a job. The child, in this order: new session, default
signal dispositions, stdin from /dev/null, stdout and stderr to ``log`` (created), joins the
cgroups by writing its pid to each of ``procs``, changes to ``cwd``, sets ``umask`` and
the rlimits ``limits`` ([resource, soft, hard]), drops to ``ids`` ([uid, gid], no
supplementary groups) when given, closes every other descriptor, takes niceness ``nice``,
and execs ``exe`` with ``argv`` and ``env``. Nothing of the job runs before all of that is done.

Spawner -> agent: ``{"id": n, "pid": p}`` once ``exe`` is executing, or ``{"id": n,
"error": text, "exec": bool}`` (``exec``: the exec itself failed, the set-up went through);
and for every child that ends, ``{"exit": pid, "status": wait status, "cpu_s": user +
system seconds of it and its reaped descendants}``.

It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C on the agent's terminal must not take the
jobs' exit statuses with it) and ends when the agent's end of the socket closes. If jobs
still run then, the agent died (a clean stop ends them first): they are killed, each its
session and its cgroups, so that no run outlives its agent while the fleet, once the lease
lapses, runs the job elsewhere. (A detached process outside any cgroup can escape this;
the agent's next start sweeps it by its token.)
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import sys
import time
from typing import Any

_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# dispositions a child must not inherit across exec: ignored ones survive it
_RESET = (*_IGNORED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGQUIT)


def _child(req: dict[str, Any], err_w: int) -> None:
    """Between fork and exec. Never returns: execs, or writes why not and exits."""
    step = "start a new session"
    failed_exec = False
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in _RESET:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        step = "open the job's output file"
        null = os.open("/dev/null", os.O_RDONLY)
        out = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        step = "join the job's cgroup"
        me = str(os.getpid()).encode()
        for path in req["procs"]:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        step = "enter the work directory"
        os.chdir(req["cwd"])
        os.umask(req["umask"])
        step = "set the resource limits"
        for which, soft, hard in req["limits"]:
            resource.setrlimit(which, (soft, hard))
        if req["ids"] is not None:
            step = "switch to the job user"
            uid, gid = req["ids"]
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 16)
        # last, just before the exec (raising niceness needs no privilege): on a busy board
        # a child at nice 19 waits long for a CPU, and the agent waits for its exec
        step = "lower the priority"
        os.setpriority(os.PRIO_PROCESS, 0, req["nice"])
        step = f"execute {req['exe']}"
        failed_exec = True
        os.execve(req["exe"], req["argv"], req["env"])
    except OSError as exc:
        why = f"cannot {step}: {exc.strerror or exc}"
    except BaseException as exc:
        why = f"cannot {step}: {exc!r}"
    os.write(err_w, json.dumps({"error": why, "exec": failed_exec}).encode())
    os._exit(127)


def _fork(req: dict[str, Any]) -> tuple[Any, int, int, list[str]]:
    """Fork the child for ``req``: (request id, pid, read end of its error pipe, the procs
    files of its cgroups)."""
    rid, procs = req["id"], list(req["procs"])
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _child(req, err_w)
    os.close(err_w)
    return rid, pid, err_r, procs


def _outcome(rid: Any, pid: int, err_r: int) -> dict[str, Any]:
    """Wait for the child's exec (its error pipe closes empty) or its failure."""
    chunks = []
    while chunk := os.read(err_r, 65536):
        chunks.append(chunk)
    os.close(err_r)
    if not chunks:
        return {"id": rid, "pid": pid}
    os.waitpid(pid, 0)  # it failed and exited: not a job, so never reported as one
    try:
        failure = json.loads(b"".join(chunks))
    except ValueError:
        failure = {"error": "the child failed before exec", "exec": False}
    return {"id": rid, **failure}


def _exits(live: dict[int, list[str]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        live.pop(pid, None)
        out.append({"exit": pid, "status": status,
                    "cpu_s": round(usage.ru_utime + usage.ru_stime, 6)})


def _kill_jobs(live: dict[int, list[str]]) -> None:
    """The agent is gone: every job still running is killed, with all of its processes."""
    for _ in range(50):  # until nothing is left (a fork may race a kill), 0.5 s at most
        found = False
        for leader, procs in live.items():
            try:
                os.killpg(leader, signal.SIGKILL)  # its session (the leader made it)
                found = True
            except OSError:
                pass
            for path in procs:
                try:
                    with open(path) as f:
                        pids = [int(t) for t in f.read().split()]
                except (OSError, ValueError):
                    continue
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        found = True
                    except OSError:
                        pass
        _exits(live)
        if not found:
            return
        time.sleep(0.01)


def serve(sock: socket.socket) -> int:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    buf = b""
    live: dict[int, list[str]] = {}  # running jobs: leader pid -> its cgroups' procs files

    def send(msg: dict[str, Any]) -> None:
        sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        for msg in _exits(live):
            send(msg)
        if sock.fileno() in ready:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                _kill_jobs(live)
                return 0
            buf += data
            *lines, buf = buf.split(b"\n")
            # every child of the batch forks first, then each is waited for: their set-ups
            # (the cgroup joins above all) run side by side
            forked, replies = [], []
            for line in lines:
                try:
                    forked.append(_fork(json.loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    replies.append({"id": None, "exec": False,
                                    "error": f"bad request to the spawner: {exc!r}"})
            for rid, pid, err_r, procs in forked:
                reply = _outcome(rid, pid, err_r)
                if "pid" in reply:
                    live[pid] = procs
                replies.append(reply)
            for reply in replies:
                send(reply)


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
