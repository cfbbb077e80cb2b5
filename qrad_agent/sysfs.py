"""The agent's only door to sysfs-like trees (cpufreq, hwmon, thermal, powercap, w1, cgroups).

Drivers take a ``Sysfs`` and name paths relative to its root, so the same driver reads
``/sys`` on a board and a tree in a temporary directory in tests. Emulators of kernel
behaviour (clamping, read-back) subclass it and react to writes, as the kernel does.
"""

from __future__ import annotations

import glob as _glob
import os
from pathlib import Path


class Sysfs:
    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str:
        return self.path(rel).read_text().strip()

    def read_int(self, rel: str) -> int:
        return int(self.read(rel))

    def write(self, rel: str, value: str | int) -> None:
        # sysfs attributes take one write of the whole value; no truncating rewrite dance
        with open(self.path(rel), "w") as f:
            f.write(f"{value}\n")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def writable(self, rel: str) -> bool:
        return os.access(self.path(rel), os.W_OK)

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` under the root, sorted naturally."""
        base = str(self.root).rstrip("/")
        found = _glob.glob(f"{base}/{pattern.lstrip('/')}")
        rels = [p[len(base):].lstrip("/") for p in found]
        return sorted(rels, key=_natural_key)


def _natural_key(s: str) -> list[object]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
