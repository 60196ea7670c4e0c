"""Logger names and the JSON line format (SPEC §6).

One logger per concern: `lrproxy.access` writes one JSON line per request on stdout,
`lrproxy` writes everything else (start, reload, errors) on stderr. Lines never hold
keys or message text.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Final

import orjson

ACCESS: Final = "lrproxy.access"
MAIN: Final = "lrproxy"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class PlainFormatter(logging.Formatter):
    """For the journal: it stamps lines itself, so no time, just level and message."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + orjson.dumps(fields).decode()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json", access: bool = True) -> None:
    """Configure the two loggers; called once by the CLI (tests inject their own handlers)."""
    main = logging.getLogger(MAIN)
    main.handlers.clear()
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    main.addHandler(err)
    main.setLevel(level.upper())
    main.propagate = False
    acc = logging.getLogger(ACCESS)
    acc.handlers.clear()
    acc.propagate = False
    global _direct_fd
    if access:
        # The access line is the one log write per request: it goes to stdout in one
        # os.write (a few µs) rather than through logging's records and handlers (15-30 µs).
        sys.stdout.flush()
        _direct_fd = sys.stdout.fileno()
        acc.setLevel(logging.INFO)
    else:
        _direct_fd = None
        acc.setLevel(logging.CRITICAL + 1)


_access = logging.getLogger(ACCESS)
_direct_fd: int | None = None


def access_enabled() -> bool:
    """Checked before the fields are built, so a disabled access log costs nothing."""
    return _access.isEnabledFor(logging.INFO)


def access_line(fields: dict[str, Any]) -> None:
    """One JSON line; through logging when something (a test) attached handlers."""
    if _direct_fd is not None and not _access.handlers:
        try:  # noqa: SIM105 - contextlib.suppress costs more on this hot path
            os.write(_direct_fd, orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
        except OSError:  # stdout closed or full: losing a log line must not fail a request
            pass
        return
    _access.info("", extra={"fields": fields})
