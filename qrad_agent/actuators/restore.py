"""Crash-safe memory of the settings a lever found before it changed them.

A lever calls ``remember`` before its first write, and the record is on disk (temp file,
fsync, rename, fsync of the directory) before that write happens. So however the agent stops
(clean exit, exception, SIGKILL, power cut), the next start knows what to put back.

The first value remembered for a key wins: after a crash the live setting holds the agent's
own value, and taking that as the original would lose the board's real one for good.

A reboot resets sysfs to what the kernel and the boot scripts chose, so originals recorded
under another boot are dropped instead of being written over that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from qrad_agent.atomic import fsync_dir, write_json

log = logging.getLogger(__name__)

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_FORMAT = 1


def current_boot_id() -> str:
    """The kernel's id of this boot, or "" where the kernel does not offer one."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


class RestoreRecord:
    """Originals per lever, as ``{lever: {key: value}}``; keys are the lever's own names
    (the cpufreq levers use sysfs paths relative to the sysfs root)."""

    def __init__(self, path: Path, boot_id: str | None = None) -> None:
        self.path = Path(path)
        # "" switches the reboot check off (no boot id on this system, or a test wants that)
        self._boot_id = current_boot_id() if boot_id is None else boot_id
        self._unreadable: OSError | None = None
        self._levers = self._load()

    def remember(self, lever: str, key: str, value: str) -> None:
        """Record ``value`` as the original of ``key`` unless one is recorded already."""
        self.remember_all(lever, {key: value})

    def remember_all(self, lever: str, values: Mapping[str, str]) -> None:
        """``remember`` for several keys with one write to disk."""
        held = self._levers.get(lever, {})
        new = {k: str(v) for k, v in values.items() if k not in held}
        if not new:
            return
        updated = dict(self._levers)
        updated[lever] = {**held, **new}
        self._store(updated)
        self._levers = updated

    def originals(self, lever: str) -> dict[str, str]:
        return dict(self._levers.get(lever, {}))

    def forget(self, lever: str) -> None:
        if lever not in self._levers:
            return
        updated = {name: keys for name, keys in self._levers.items() if name != lever}
        self._store(updated)
        self._levers = updated

    # -- disk ----------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, str]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            # It may hold originals we cannot see: never overwrite it, so no lever changes
            # anything this run (every remember() fails) rather than lose them.
            log.error("restore record %s cannot be read: %s", self.path, exc)
            self._unreadable = exc
            return {}
        try:
            doc = json.loads(text)
            levers = _validated(doc)
        except ValueError as exc:
            # Keep the evidence and start clean: refusing to start would leave the board
            # worse off than not restoring a setting we can no longer read.
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("restore record %s is unreadable (%s); moved to %s", self.path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return {}
        recorded_boot = doc.get("boot_id", "")
        if self._boot_id and recorded_boot and recorded_boot != self._boot_id:
            log.info(
                "restore record %s is from an earlier boot; the kernel has reset those "
                "settings since, so nothing is restored",
                self.path,
            )
            return {}
        return levers

    def _store(self, levers: dict[str, dict[str, str]]) -> None:
        if self._unreadable is not None:
            raise OSError(
                self._unreadable.errno,
                f"the record could not be read at start ({self._unreadable.strerror}), "
                "so it is not overwritten",
                str(self.path),
            )
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        if not levers:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            fsync_dir(directory)
            return
        doc = {"format": _FORMAT, "boot_id": self._boot_id, "levers": levers}
        write_json(self.path, doc, indent=1, sort_keys=True)


def _validated(doc: object) -> dict[str, dict[str, str]]:
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"expected a JSON object with format {_FORMAT}")
    levers = doc.get("levers")
    if not isinstance(levers, dict):
        raise ValueError("'levers' must be an object of lever name -> {key: value}")
    out: dict[str, dict[str, str]] = {}
    for name, keys in levers.items():
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in keys.items()
        ):
            raise ValueError(f"lever {name!r} must map setting names to string values")
        out[str(name)] = dict(keys)
    return out


def remember_originals(
    record: RestoreRecord | None, lever: str, values: Mapping[str, str],
    held: dict[str, str], what: str = "settings",
) -> dict[str, str]:
    """Save ``values`` as ``lever``'s originals before its first write: in the record when
    there is one (durably: a crash must not lose them), else in ``held``. Returns the
    originals in force. A record that cannot be written stops the change (``LeverError``)."""
    from qrad_agent.actuators.base import LeverError

    if record is None:
        for key, value in values.items():
            held.setdefault(key, value)
        return held
    try:
        record.remember_all(lever, values)
    except OSError as exc:
        raise LeverError(
            f"cannot save the original {what} to {record.path}: {exc}; nothing was changed"
        ) from exc
    return record.originals(lever)


def put_back(
    record: RestoreRecord | None,
    lever: str,
    held: Mapping[str, str],
    write: Callable[[dict[str, str]], None],
) -> None:
    """Restore a lever's originals: the record's first (what a crashed run saw before it
    changed anything), else those ``held`` in memory; then clear the record.

    A record that cannot be cleared after the settings went back raises ``LeverError``: the
    next start would otherwise "restore" them again over whatever the board has by then.
    """
    from qrad_agent.actuators.base import LeverError

    values = (record.originals(lever) if record is not None else {}) or dict(held)
    if not values:
        return
    write(values)
    if record is None:
        return
    try:
        record.forget(lever)
    except OSError as exc:
        raise LeverError(
            f"{lever}: settings restored, but the record {record.path} could not be cleared: "
            f"{exc}"
        ) from exc
