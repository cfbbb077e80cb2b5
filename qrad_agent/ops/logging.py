"""Logging that reads well in the journal and on a terminal.

- Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with the syslog
  priority as ``<N>``, which journald turns into the entry's level, and carries no time
  stamp: the journal stamps every entry itself, and a second one only costs width.
- On a terminal or in a file: ``time level logger: message``.
- One event, one line: newlines in a message or a traceback are written as ``\\n``, so the
  journal never splits an event into entries that lose their context.
- Context as ``key=value`` after the message (logfmt quoting), from ``extra={"ctx": {...}}``
  or :func:`event`: searchable with ``journalctl -g 'reload=refused'``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" prefix
_PRIORITY = {
    logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7,
}


def under_journald(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd connected us to.

    ``JOURNAL_STREAM`` is inherited by children whose stderr may go elsewhere (a shell
    started from the service), so the device and inode it names are checked against the
    stream, as systemd.exec(5) recommends."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def format_value(value: Any) -> str:
    """A logfmt value: bare when it is one plain word, else double-quoted with escapes."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    if text and all(c.isalnum() or c in "-_./:@%+,°" for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_context(ctx: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in ctx.items())


class OneLineFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        fmt = "%(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # message, then the traceback on lines of its own
        ctx = getattr(record, "ctx", None)
        if isinstance(ctx, Mapping) and ctx:
            head, sep, tail = text.partition("\n")
            text = f"{head} {format_context(ctx)}{sep}{tail}"
        text = text.replace("\n", "\\n")
        if self.journald:
            level = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            # the logger's name as context: the level is in the prefix
            return f"<{level}>{record.name}: {text}"
        return text


def configure(verbose: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Set up the root logger for the CLI and the service: one handler on stderr."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(under_journald(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


def event(logger: logging.Logger, level: int, message: str, **ctx: Any) -> None:
    """Log ``message`` with ``key=value`` context: ``event(log, INFO, "reloaded", path=p)``."""
    logger.log(level, message, extra={"ctx": ctx})
