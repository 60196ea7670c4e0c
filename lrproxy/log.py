"""Logger names and the JSON line format (SPEC §6).

One logger per concern: `lrproxy.access` writes one JSON line per request on stdout,
`lrproxy` writes everything else (start, reload, errors) on stderr. Lines never hold
keys or message text.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import math
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson

ACCESS: Final = "lrproxy.access"
MAIN: Final = "lrproxy"


# sd-daemon(3)'s priority prefixes, which journald reads off a line (and strips): without
# them every line of a service's stderr is logged at info, and `journalctl -p warning`
# shows none of its warnings.
_SYSLOG_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                           logging.ERROR: 3, logging.CRITICAL: 2}


def with_priority(text: str, levelno: int) -> str:
    """`text` with its syslog priority before each line, as journald reads it."""
    prefix = f"<{_SYSLOG_PRIORITY.get(levelno, 6)}>"
    return prefix + text.replace("\n", "\n" + prefix)  # (journald files each line alone)


def to_journal(stream: Any, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` writes to the journal: systemd names its stream in JOURNAL_STREAM
    (`device:inode`), to be compared with the descriptor's (systemd.exec(5))."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (AttributeError, ValueError, OSError):  # (no descriptor: a test's stream)
        return False


class _Formatter(logging.Formatter):
    """With `journal`, each line begins with its priority, for journald."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def _line(self, record: logging.LogRecord, line: str) -> str:
        return with_priority(line, record.levelno) if self.journal else line


class JsonFormatter(_Formatter):
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
        return self._line(record, orjson.dumps(doc).decode())


class PlainFormatter(_Formatter):
    """For the journal: it stamps lines itself, so no time, just level and message."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + orjson.dumps(fields).decode()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self._line(record, line)


# Access lines wait up to this long (`--access-log-flush-ms`) on the event loop, then go
# to stdout in writes of at most PIPE_BUF bytes: whole lines, so that workers sharing one
# stdout pipe never interleave inside a line. The loop writes them itself when stdout
# takes them at once (_Sink); what it does not take goes to a thread of their own
# (_Writer), which waits for stdout, so that a stalled reader never holds up requests.
ACCESS_FLUSH_MS: Final = 100
_PIPE_BUF: Final = 4096


def setup_logging(level: str = "info", fmt: str = "json", access: bool = True,
                  access_flush_ms: int = ACCESS_FLUSH_MS) -> None:
    """Configure the two loggers; called once by the CLI (tests inject their own handlers)."""
    for stream in (sys.stdout, sys.stderr):
        _append_if_file(stream)
    main = logging.getLogger(MAIN)
    main.handlers.clear()
    err = logging.StreamHandler(sys.stderr)
    journal = to_journal(sys.stderr)
    err.setFormatter(JsonFormatter(journal) if fmt == "json" else PlainFormatter(journal))
    main.addHandler(err)
    main.setLevel(level.upper())
    main.propagate = False
    acc = logging.getLogger(ACCESS)
    acc.handlers.clear()
    acc.propagate = False
    global _direct_fd, _flush_s, _sink
    _close_sink()
    if access:
        # The access line is the one log write per request: it goes to stdout by
        # os.write rather than through logging's records and handlers (15-30 µs), and
        # lines are gathered for `access_flush_ms`: a write to a file costs ~13 µs here
        # when writes come a millisecond apart, ~2 µs each when they come together.
        try:
            sys.stdout.flush()
            _direct_fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # stdout closed (`>&-`): no lines
            _direct_fd = None
        else:
            _sink = _Sink.of(_direct_fd)
        _flush_s = max(0, access_flush_ms) / 1000  # the CLI calls close_access() at its end
        acc.setLevel(logging.INFO)
    else:
        _direct_fd = None
        acc.setLevel(logging.CRITICAL + 1)


def _append_if_file(stream: Any) -> None:
    """A stdout or stderr that is a regular file opened without O_APPEND (`serve >
    file`, systemd's `StandardOutput=file:`) gets it, as nginx opens its logs: else,
    once logrotate's `copytruncate` (the rotation for a program with no log file to
    reopen) empties the file, each write lands at the old offset, and the file begins
    with a hole of NUL bytes as long as all that was rotated away. Only a file's flag:
    no other writer of a log file wants its own offset."""
    try:
        fd = stream.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_APPEND:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
    except (AttributeError, OSError, ValueError):  # closed (`>&-`), or no descriptor
        pass


_access = logging.getLogger(ACCESS)
_direct_fd: int | None = None
_flush_s = ACCESS_FLUSH_MS / 1000
_lines: list[bytes] = []  # access lines gathered on the loop, _size bytes: one write
_size = 0
_timer: asyncio.TimerHandle | None = None
# Lines handed to the writer wait for a stdout whose reader lags up to this many bytes;
# lines past it are dropped, counted, and reported.
_MAX_BACKLOG: Final = 1 << 20
_REPORT_S: Final = 10.0


def access_line(fields: dict[str, Any]) -> None:
    """One JSON line; through logging when something (a test) attached handlers."""
    global _size, _timer
    if _direct_fd is not None and not _access.handlers:
        line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        if _size + len(line) > _PIPE_BUF:
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
    """Hand the access lines gathered so far to the writer (at the flush time, when more
    would pass PIPE_BUF, and at exit): one write of whole lines."""
    global _size, _timer, _writer
    if _timer is not None:
        _timer.cancel()
        _timer = None
    if not _lines or _direct_fd is None:
        return
    data = _lines[0] if len(_lines) == 1 else b"".join(_lines)
    count = len(_lines)
    _lines.clear()
    _size = 0
    # Written here, on the loop, when stdout takes it all at once: waking the writer
    # thread costs the loop a switch to it and back (the GIL), ~0.15 ms a flush here.
    # Not while the writer still holds lines: theirs go first.
    if _sink is not None and (_writer is None or not _writer.queued):
        n = _sink.write(data)
        if n == len(data):
            return
        data = data[n:]  # the rest of a short write: the writer waits for room
    if _writer is None or _writer.fd != _direct_fd:
        if _writer is not None:  # (stdout changed: tests)
            _writer.close(1.0)
        _writer = _Writer(_direct_fd)
    _writer.put(data, count)


class _Sink:
    """Writes to stdout without ever waiting: a regular file takes a write at once (as
    nginx writes its access log); a pipe, terminal or socket (journald's) is written by
    a descriptor of our own that does not block (stdout itself is shared, and its flags
    with it), returning what it took, 0 when full."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._own: int | None = None  # our descriptor, when not stdout's
        self._sock: socket.socket | None = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        elif not stat.S_ISREG(mode):  # a pipe, FIFO or terminal: opened anew, non-blocking
            self._own = os.open(f"/proc/self/fd/{fd}",
                                os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)

    @classmethod
    def of(cls, fd: int) -> _Sink | None:
        """The sink for `fd`, or None where none can be had (no /proc, a pipe of another
        user's): the writer thread then takes every line."""
        try:
            return cls(fd)
        except OSError:
            return None

    def write(self, data: bytes) -> int:
        """How many bytes of `data` stdout took now (a pipe takes up to PIPE_BUF whole or
        nothing). Errors (a reader gone) are left to the writer, which reports them."""
        try:
            if self._sock is not None:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            return os.write(self.fd if self._own is None else self._own, data)
        except OSError:  # BlockingIOError: full
            return 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._own is not None:
            os.close(self._own)
        self._sock = self._own = None


class _Writer:
    """The thread that writes access lines to stdout. A stdout whose reader stalls (a
    pipe nobody reads, `| less`, a busy journald) holds up this thread, never the event
    loop: lines wait up to _MAX_BACKLOG bytes, then are dropped, counted and reported
    (when stdout takes lines again, every _REPORT_S while it takes none, at exit)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.cond = threading.Condition()
        self.queue: collections.deque[tuple[bytes, int]] = collections.deque()  # (data, lines)
        self.queued = 0  # bytes in queue
        self.dropped = 0  # lines dropped, not reported yet
        self.closing = False
        self.reported = Seldom(_REPORT_S)
        self.thread = threading.Thread(target=self._run, name="lrproxy-access-log", daemon=True)
        self.thread.start()

    def put(self, data: bytes, count: int) -> None:
        with self.cond:
            if self.queued + len(data) > _MAX_BACKLOG:
                self.dropped += count
                return
            self.queue.append((data, count))
            self.queued += len(data)
            self.cond.notify()

    def _run(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                data, count = self.queue[0]
            while not poll.poll(_REPORT_S * 1000):  # stdout takes nothing
                self._report(force=False)
            with self.cond:
                if not self.queue or self.queue[0][0] is not data:
                    continue  # close() gave up on it, and counted it as dropped
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:  # a non-blocking stdout filled since the poll
                continue
            except OSError:  # stdout closed: losing log lines must not fail requests
                n = 0
            with self.cond:
                if self.queue and self.queue[0][0] is data:  # (not dropped by close())
                    if not n:
                        self.dropped += sum(c for _, c in self.queue)
                        self.queue.clear()
                        self.queued = 0
                    elif n < len(data):  # a short write (a socket): its rest goes first
                        self.queue[0] = (data[n:], count)
                        self.queued -= n
                    else:
                        self.queue.popleft()
                        self.queued -= n
                caught_up = not self.queue
            # Said at once when stdout has taken all that waited; while a backlog stays
            # (a reader that lags), every _REPORT_S at most, as while it takes none.
            self._report(force=bool(n) and caught_up)

    def _report(self, force: bool) -> None:
        """Say how many lines were dropped, if any, and when due."""
        with self.cond:
            if not self.dropped or not self.reported.due(force):
                return
            dropped, self.dropped = self.dropped, 0
        logging.getLogger(MAIN).warning(
            "access log: %d lines dropped: stdout did not take them in time", dropped)

    def close(self, wait_s: float) -> None:
        """Write what is queued, waiting up to `wait_s` for stdout to take it; what is
        still queued then counts as dropped, and the drops are reported."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(wait_s)
        with self.cond:
            self.dropped += sum(c for _, c in self.queue)
            self.queue.clear()
            self.queued = 0
        self._report(force=True)


_writer: _Writer | None = None
_sink: _Sink | None = None


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


def close_access(wait_s: float = 1.0) -> None:
    """At exit: write what is left, giving a stdout that takes nothing up to `wait_s`;
    what it has not taken then is counted as dropped and reported."""
    global _writer
    flush_access()
    w, _writer = _writer, None
    if w is not None:
        w.close(wait_s)
    _close_sink()


def _close_sink() -> None:
    """Close the sink of the stdout logging was set up for (it goes with that stdout)."""
    global _sink
    if _sink is not None:
        _sink.close()
        _sink = None


def _forked() -> None:
    """A forked child has no writer thread, and its parent's lines are not its own."""
    global _writer, _timer, _size
    _writer, _timer, _size = None, None, 0
    _lines.clear()


os.register_at_fork(after_in_child=_forked)
