"""The agent's end of the job spawner (``spawner_server.py``, its own small process).

:meth:`Spawner.launch` asks for a job to be started and returns its pid once the program is
executing; :meth:`Spawner.reap` returns how a started pid ended (the spawner is its parent
and reports every exit). Started at the first launch; started again, with a warning, if it
died. The jobs of a spawner that died are reparented to init: their exit statuses are lost,
and :meth:`reap` says so (``Exit.status`` None) once the caller knows the process is gone.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVER = Path(__file__).with_name("spawner_server.py")
REPLY_TIMEOUT_S = 10.0  # a launch waits this long for the spawner's answer


class SpawnError(Exception):
    """A job could not be started; ``exec_failed``: the program could not be executed (the
    sandbox was set up), else the set-up or the spawner itself failed."""


    def __init__(self, message: str, exec_failed: bool = False, uncertain: bool = False) -> None:
        super().__init__(message)
        self.exec_failed = exec_failed
        self.uncertain = uncertain  # the spawner was lost mid-launch: the job may have started


@dataclass(frozen=True, slots=True)
class Exit:
    status: int | None  # the wait status; None: lost with a spawner that died
    cpu_s: float | None


@dataclass(frozen=True, slots=True)
class Launch:
    exe: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str  # stdout and stderr, merged; created by the child
    procs: list[str]  # cgroup.procs files the child joins
    limits: list[tuple[int, int, int]]
    nice: int
    ids: tuple[int, int] | None  # (uid, gid) to drop to
    umask: int = 0o077


class _Process:
    """One running spawner process and its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SERVER), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.buf = b""
        self.children: set[int] = set()
        self.alive = True
        self._finalizer = weakref.finalize(self, _close, self.sock, self.proc)

    def close(self) -> None:
        self.alive = False
        self._finalizer()


def _close(sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    sock.close()  # the spawner sees the end of its input and exits
    try:
        proc.wait(2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Spawner:
    def __init__(self) -> None:
        self._p: _Process | None = None
        self._exits: dict[int, Exit] = {}
        self._orphans: set[int] = set()  # started by a spawner that died, not reported
        self._next_id = 0
        self._lock = threading.Lock()

    def launch(self, req: Launch) -> int:
        """Start ``req``; its pid once it executes. Raises :class:`SpawnError`."""
        result = self.launch_many([req])[0]
        if isinstance(result, SpawnError):
            raise result
        return result

    def launch_many(self, reqs: list[Launch]) -> list[int | SpawnError]:
        """Start each of ``reqs`` (their set-ups run side by side); for each, its pid once it
        executes, or why it did not start."""
        with self._lock:
            p = self._ensure()
            ids = []
            lines = []
            for req in reqs:
                self._next_id += 1
                ids.append(self._next_id)
                lines.append(json.dumps(
                    {"id": self._next_id, "exe": req.exe, "argv": req.argv, "env": req.env,
                     "cwd": req.cwd, "log": req.log, "procs": req.procs,
                     "limits": [list(limit) for limit in req.limits], "nice": req.nice,
                     "ids": list(req.ids) if req.ids is not None else None,
                     "umask": req.umask}, separators=(",", ":")).encode() + b"\n")
            try:
                p.sock.sendall(b"".join(lines))
            except OSError as exc:
                self._lost(p)
                lost = SpawnError(f"the job spawner is gone ({exc.strerror or exc})",
                                  uncertain=True)
                return [lost for _ in reqs]
            answers: dict[int, int | SpawnError] = {}
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while len(answers) < len(ids):
                for msg in self._read(p, deadline - time.monotonic()):
                    rid = msg.get("id")
                    if rid in ids and "pid" in msg:
                        pid = int(msg["pid"])
                        p.children.add(pid)
                        answers[rid] = pid
                    elif rid in ids:
                        answers[rid] = SpawnError(str(msg.get("error")), bool(msg.get("exec")))
                if len(answers) == len(ids):
                    break
                if not p.alive:
                    why = "the job spawner died while starting the job"
                elif time.monotonic() >= deadline:
                    # they may still start: the caller kills whatever carries their tokens
                    self._lost(p)
                    why = f"the job spawner did not answer in {REPLY_TIMEOUT_S:g} s"
                else:
                    continue
                for rid in ids:
                    answers.setdefault(rid, SpawnError(why, uncertain=True))
            return [answers[rid] for rid in ids]

    def reap(self, pid: int, gone: Callable[[], bool], wait_s: float = 0.0) -> Exit | None:
        """How ``pid`` ended, or None while it runs (waiting up to ``wait_s`` for its end).
        ``gone`` tells whether the process is no longer there: for the job of a spawner that
        died, that is all anyone will learn (``Exit(None, None)``)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                p = self._p
                if p is not None and p.alive:
                    self._read(p, 0.0)
                ended = self._exits.pop(pid, None)
                if ended is not None:
                    return ended
                if pid in self._orphans and gone():
                    self._orphans.discard(pid)
                    return Exit(None, None)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if p is None or not p.alive:
                    time.sleep(min(left, 0.005))  # an orphan: init reaps it, we watch
                else:
                    self._read(p, min(left, 0.05))

    def fileno(self) -> int | None:
        """The socket the spawner reports on: readable when a job ended (a loop waits on it,
        then calls :meth:`poll`); None while no spawner runs."""
        p = self._p
        return p.sock.fileno() if p is not None and p.alive else None

    def poll(self) -> None:
        """Take in what the spawner reported (job ends), without waiting."""
        with self._lock:
            p = self._p
            if p is not None and p.alive:
                self._read(p, 0.0)

    @property
    def pid(self) -> int | None:
        """The spawner process's pid while one runs."""
        p = self._p
        return p.proc.pid if p is not None and p.alive else None

    def close(self) -> None:
        with self._lock:
            if self._p is not None:
                self._p.close()
                self._p = None

    # -- inside ------------------------------------------------------------------------------
    def _ensure(self) -> _Process:
        if self._p is not None and self._p.alive:
            return self._p
        if self._p is not None:
            log.warning("jobs: the job spawner (pid %d) died; starting another",
                        self._p.proc.pid)
        try:
            self._p = _Process()
        except OSError as exc:
            raise SpawnError(f"cannot start the job spawner: {exc.strerror or exc}") from None
        return self._p

    def _read(self, p: _Process, timeout: float) -> list[dict[str, Any]]:
        """Messages that arrive within ``timeout`` (what is there at once when 0); exits are
        kept for :meth:`reap`, the rest returned."""
        out: list[dict[str, Any]] = []
        try:
            ready, _, _ = select.select([p.sock], [], [], max(0.0, timeout))
            while ready:
                data = p.sock.recv(1 << 16)
                if not data:
                    self._lost(p)
                    break
                p.buf += data
                ready, _, _ = select.select([p.sock], [], [], 0.0)
        except OSError:
            self._lost(p)
        while b"\n" in p.buf:
            line, p.buf = p.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                log.error("jobs: unreadable message from the job spawner: %r", line[:200])
                continue
            if "exit" in msg:
                pid = int(msg["exit"])
                p.children.discard(pid)
                self._exits[pid] = Exit(int(msg["status"]), float(msg["cpu_s"]))
            else:
                out.append(msg)
        return out

    def _lost(self, p: _Process) -> None:
        if not p.alive:
            return
        log.error("jobs: lost the job spawner (pid %d); the exit statuses of its %d running "
                  "job(s) are lost with it", p.proc.pid, len(p.children))
        self._orphans |= p.children
        p.children.clear()
        p.close()

