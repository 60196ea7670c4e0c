"""Logger names and the JSON line format (SPEC §6).

One logger per concern: `lrproxy.access` writes one JSON line per request on stdout,
`lrproxy` writes everything else (start, reload, errors) on stderr. Lines never hold
keys or message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
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


# Access lines wait up to this long (`--access-log-flush-ms`), then go out together in
# writes of at most PIPE_BUF bytes: whole lines, so that workers sharing one stdout pipe
# never interleave inside a line.
ACCESS_FLUSH_MS: Final = 100
_PIPE_BUF: Final = 4096


def setup_logging(level: str = "info", fmt: str = "json", access: bool = True,
                  access_flush_ms: int = ACCESS_FLUSH_MS) -> None:
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
    global _direct_fd, _flush_s
    if access:
        # The access line is the one log write per request: it goes to stdout by
        # os.write rather than through logging's records and handlers (15-30 µs), and
        # lines are gathered for `access_flush_ms`: a write to a file costs ~13 µs here
        # when writes come a millisecond apart, ~2 µs each when they come together.
        sys.stdout.flush()
        _direct_fd = sys.stdout.fileno()
        _flush_s = max(0, access_flush_ms) / 1000  # the CLI calls close_access() at its end
        acc.setLevel(logging.INFO)
    else:
        _direct_fd = None
        acc.setLevel(logging.CRITICAL + 1)


_access = logging.getLogger(ACCESS)
_direct_fd: int | None = None
_flush_s = ACCESS_FLUSH_MS / 1000
_lines: list[bytes] = []  # access lines not written yet, _size bytes
_size = 0
_timer: asyncio.TimerHandle | None = None
# A non-blocking stdout whose reader lags (EAGAIN) keeps its lines until the loop says it
# has room, up to this many bytes; lines past it are dropped, counted, and reported.
_MAX_BACKLOG: Final = 1 << 20
_blocked = False
_dropped = 0


def access_line(fields: dict[str, Any]) -> None:
    """One JSON line; through logging when something (a test) attached handlers."""
    global _size, _timer, _dropped
    if _direct_fd is not None and not _access.handlers:
        line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        if _size + len(line) > _PIPE_BUF:
            if _blocked:  # stdout is full: _writable() goes on; hold what fits
                if _size + len(line) > _MAX_BACKLOG:
                    _dropped += 1
                    return
            else:
                flush_access()
        _lines.append(line)
        _size += len(line)
        if _timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a refused request at shutdown): at once
                flush_access()
                return
            _timer = loop.call_later(_flush_s, flush_access)
        return
    _access.info("", extra={"fields": fields})


def flush_access() -> None:
    """Write the access lines gathered so far (at the flush time, when they would pass
    PIPE_BUF together, and at exit), in writes of whole lines of at most PIPE_BUF."""
    global _size, _timer, _blocked, _dropped
    if _timer is not None:
        _timer.cancel()
        _timer = None
    if not _lines or _direct_fd is None:
        return
    lines, i = _lines, 0
    try:
        while i < len(lines):
            j, size = i + 1, len(lines[i])
            while j < len(lines) and size + len(lines[j]) <= _PIPE_BUF:
                size += len(lines[j])
                j += 1
            data = lines[i] if j == i + 1 else b"".join(lines[i:j])
            n = os.write(_direct_fd, data)
            if not n:  # nothing taken, no error: nothing to wait for either
                raise OSError("stdout took no bytes")
            if n < len(data):  # a short write (a socket, a signal): its rest goes first
                lines[i:j] = [data[n:]]
            else:
                i = j
    except BlockingIOError:  # a non-blocking stdout is full: the rest waits
        pass
    except OSError:  # stdout closed: losing log lines must not fail requests
        _dropped += len(lines) - i
        i = len(lines)
    del lines[:i]
    _size = sum(map(len, lines))
    _blocked = bool(lines)
    if _blocked:
        with contextlib.suppress(RuntimeError):  # no loop at exit: close_access() waits
            asyncio.get_running_loop().add_writer(_direct_fd, _writable, _direct_fd)
    if _dropped:
        _report_drops(force=not _blocked)


def _writable(fd: int) -> None:
    """A full stdout has room again: write on."""
    asyncio.get_running_loop().remove_writer(fd)
    flush_access()


class Seldom:
    """Whether a log line that a condition repeats (per read, connection or request) is
    due: at most once per `period` seconds, unless forced."""

    __slots__ = ("_last", "period")

    def __init__(self, period: float) -> None:
        self.period, self._last = period, -math.inf

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return False
        self._last = now
        return True


_drops_report: Final = Seldom(10.0)


def _report_drops(force: bool) -> None:
    """Say how many access lines were dropped: when stdout takes lines again, at exit,
    and every 10 s while it stays full (a reader that never catches up)."""
    global _dropped
    if not _drops_report.due(force):
        return
    logging.getLogger(MAIN).warning(
        "access log: %d lines dropped while stdout took none", _dropped)
    _dropped = 0


def close_access(wait_s: float = 1.0) -> None:
    """At exit: write what is left; a full non-blocking stdout gets up to `wait_s` to
    take it (polled: its blocking flag is shared with other processes), then what is
    still left counts as dropped and is reported."""
    global _dropped, _size, _blocked
    flush_access()
    if _direct_fd is None:
        return
    end = time.monotonic() + wait_s
    while _lines and (left := end - time.monotonic()) > 0:
        poll = select.poll()
        poll.register(_direct_fd, select.POLLOUT)
        poll.poll(left * 1000)
        flush_access()
    if _lines:
        _dropped += len(_lines)
        _lines.clear()
        _size, _blocked = 0, False
    if _dropped:
        _report_drops(force=True)
