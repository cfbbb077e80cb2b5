"""Process and cgroup helpers shared by the tests that run real processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie burns nothing and counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or cond}")
        time.sleep(0.01)


def remove_cgroup(d: Path) -> None:
    """Thaw ``d``, kill what is in it and remove it (retrying while the dead leave)."""
    for name, value in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
        if (d / name).exists():
            (d / name).write_text(value)
    try:
        for pid in (d / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
    except (OSError, ValueError):
        pass
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
