"""The access log's writer (log.py): whole lines, and none lost to a full stdout."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pty
import re
import socket
import sys
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from lrproxy import log

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # Linux fcntl: a pipe's capacity
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="sizes a pipe with Linux's fcntl")


@pytest.fixture(params=["blocking", "non-blocking"])
def pipe_stdout(request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """stdout is the write end of a small pipe, blocking (as a pipe or journald's socket
    is, unless someone says otherwise) or not; (read fd, write fd). The read end is
    non-blocking, for `_drain`. The loggers and log.py's state are restored afterwards."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # the least it takes: a page
    os.set_blocking(w, request.param == "blocking")
    os.set_blocking(r, False)
    with _as_stdout(w, monkeypatch):
        yield r, w
        _drain(r)
    os.close(r)


@pytest.fixture(params=["file", "pipe", "socket", "terminal"])
def any_stdout(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """stdout is each kind it is in practice (`>> file`, `| tool` or a container's pipe,
    journald's stream socket, a terminal), blocking as each is by default; (read fd,
    write fd), the read end non-blocking."""
    if request.param == "file":
        w = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        r = os.open(tmp_path / "out", os.O_RDONLY | os.O_NONBLOCK)
    elif request.param == "pipe":
        r, w = os.pipe()
    elif request.param == "socket":
        a, b = socket.socketpair()
        r, w = a.detach(), b.detach()
    else:
        r, w = pty.openpty()
        tty.setraw(w)  # no "\n" -> "\r\n"
    os.set_blocking(r, False)
    with _as_stdout(w, monkeypatch):
        yield r, w
    os.close(r)


@contextlib.contextmanager
def _as_stdout(w: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """stdout is `w` (closed at the end), as the CLI sets up logging, for the block."""
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate)
             for lg in (logging.getLogger(log.MAIN), logging.getLogger(log.ACCESS))]
    state = (log._direct_fd, log._flush_s)
    out = os.fdopen(w, "w", closefd=False)
    monkeypatch.setattr(sys, "stdout", out)
    log.setup_logging("warning", access=True, access_flush_ms=5)
    # pytest (9.2 and later) attaches its capture handlers to the access logger during
    # the test, which sends lines through logging instead of stdout: give log.py a logger
    # of its own that nothing else knows.
    bare = logging.Logger(log.ACCESS, logging.INFO)
    monkeypatch.setattr(log, "_access", bare)
    try:
        yield
    finally:
        log.close_access(wait_s=0)
        log._direct_fd, log._flush_s = state
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        out.close()
        os.close(w)


@contextlib.contextmanager
def _warnings() -> Iterator[list[int]]:
    """The counts of the "lines dropped" warnings logged inside the block."""
    counts: list[int] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if m := re.fullmatch(r"access log: (\d+) lines dropped.*", record.getMessage()):
                counts.append(int(m[1]))

    main = logging.getLogger(log.MAIN)
    handler = Catch()
    main.addHandler(handler)
    try:
        yield counts
    finally:
        main.removeHandler(handler)


def _drain(fd: int) -> bytes:
    got = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(got)
        if not data:
            return b"".join(got)
        got.append(data)


def _line(i: int) -> dict[str, object]:
    return {"request_id": f"r{i}", "status": 200, "pad": "x" * (i % 300)}


def _log_unread(fields: list[dict[str, object]]) -> None:
    """Access lines for `fields`, as an event loop writes them, while nobody reads
    stdout: each call returns at once, whatever the pipe holds."""

    async def run() -> None:
        for f in fields:
            log.access_line(f)
        await asyncio.sleep(0.05)  # the flush timers run

    done = threading.Event()
    thread = threading.Thread(target=lambda: (asyncio.run(run()), done.set()), daemon=True)
    thread.start()
    # Without the writer thread, a blocking stdout would hold this up for good.
    assert done.wait(10), "access_line() waited for stdout"
    thread.join(5)


def _read_until_idle(r: int) -> bytes:
    """What a reader gets once it reads on until the writer has nothing left."""
    got = []
    for _ in range(2000):
        got.append(_drain(r))
        w = log._writer
        if w is None or not w.queue:  # (None: the loop wrote every line itself)
            break
        time.sleep(0.005)
    else:
        raise AssertionError("the writer did not catch up")
    got.append(_drain(r))
    return b"".join(got)


def _ids(data: bytes) -> list[object]:
    """The request ids of `data`, which must be whole JSON lines."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", data[-200:]
    return [orjson.loads(ln)["request_id"] for ln in lines[:-1]]


def test_stdout_with_room_is_written_by_the_loop_itself(any_stdout: tuple[int, int]) -> None:
    """A stdout that takes the lines at once is written from the event loop: no thread is
    woken for them (a switch to it and back, under the GIL, cost a request at one
    connection ~0.2 ms), and stdout keeps its blocking mode, which it shares."""
    r, w = any_stdout
    blocking = os.get_blocking(w)
    n = 40  # 2 flushes of a PIPE_BUF or more (a terminal holds ~8 KiB)
    _log_unread([_line(i) for i in range(n)])
    assert log._writer is None
    assert _ids(_read_until_idle(r)) == [f"r{i}" for i in range(n)]
    assert os.get_blocking(w) == blocking


def test_full_socket_keeps_lines_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """journald's socket, full: what the loop could not send waits in the writer, and
    lines logged meanwhile wait behind it, even when the socket has room for them before
    the writer's turn comes: all come out once, whole, in order."""
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    r, w = a.detach(), b.detach()
    os.set_blocking(r, False)
    turn = threading.Event()  # the writer thread's writes wait for it
    write = os.write

    def writer_waits(fd: int, data: bytes) -> int:
        if threading.current_thread().name == "lrproxy-access-log":
            turn.wait(10)
        return write(fd, data)

    monkeypatch.setattr(os, "write", writer_waits)
    with _as_stdout(w, monkeypatch):
        n = 400
        _log_unread([_line(i) for i in range(n)])
        assert log._writer is not None and log._writer.queue  # the socket is full
        got = [_drain(r)]  # room, while the writer still holds lines
        _log_unread([_line(i) for i in range(n, n + 20)])
        turn.set()
        got.append(_read_until_idle(r))
        log.close_access(wait_s=1)
        got.append(_drain(r))
    os.close(r)
    assert _ids(b"".join(got)) == [f"r{i}" for i in range(n + 20)]


def test_full_stdout_keeps_lines_until_it_drains(pipe_stdout: tuple[int, int]) -> None:
    """Lines written while nobody reads stdout are not lost, and requests do not wait
    for it: they wait, in the writer, and go out whole once the reader catches up, none
    twice, none cut."""
    r, w = pipe_stdout
    n = 10 * fcntl.fcntl(w, F_GETPIPE_SZ) // 150  # lines of ~200 B: 13 times what it holds
    with _warnings() as reported:
        _log_unread([_line(i) for i in range(n)])
        assert log._writer is not None and log._writer.queue  # the pipe is full
        data = _read_until_idle(r)
    lines = data.split(b"\n")
    assert lines[-1] == b""
    docs = [orjson.loads(ln) for ln in lines[:-1]]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(n)]
    assert not reported


def test_backlog_is_bounded_and_drops_are_reported(pipe_stdout: tuple[int, int]) -> None:
    """Past the backlog's bound new lines are dropped, counted, and a warning says how
    many once stdout takes lines again; what is written stays whole lines."""
    r, w = pipe_stdout
    line_len = len(orjson.dumps(_line(299))) + 1
    n = log._MAX_BACKLOG // line_len + 500  # more than the backlog holds
    with _warnings() as reported:
        _log_unread([_line(299)] * n)
        data = _read_until_idle(r)
        wait_for_report = time.monotonic() + 5
        while not reported and time.monotonic() < wait_for_report:
            time.sleep(0.01)
        assert reported  # as soon as stdout took lines again
        log.close_access(wait_s=1)
    written = data.count(b"\n")
    assert all(orjson.loads(ln)["request_id"] == "r299" for ln in data.split(b"\n")[:-1])
    assert written < n
    assert written * line_len <= log._MAX_BACKLOG + fcntl.fcntl(w, F_GETPIPE_SZ)
    assert sum(reported) == n - written


def test_a_reader_that_lags_gets_no_drop_report_per_write(pipe_stdout: tuple[int, int]) -> None:
    """A stdout that takes lines, but fewer than come (a journald that is behind, a
    slow `| grep`), is told of the drops every _REPORT_S at most while the backlog
    stays, not after each write it takes (a warning per 4 KiB: ~20 a second here, on
    a stderr that is often the same journald); once it has caught up, the rest in one
    warning, the counts exact."""
    r, _w = pipe_stdout
    line_len = len(orjson.dumps(_line(299))) + 1
    n = log._MAX_BACKLOG // line_len + 500  # more than the backlog holds
    got = []
    with _warnings() as reported:
        _log_unread([_line(299)] * n)
        for _ in range(20):  # more lines come than a page holds, and a page is read
            _log_unread([_line(299)] * 50)
            n += 50
            with contextlib.suppress(BlockingIOError):
                got.append(os.read(r, 4096))
            time.sleep(0.01)
        assert log._writer is not None and log._writer.queue  # still behind
        assert len(reported) <= 1
        got.append(_read_until_idle(r))
        wait_for_report = time.monotonic() + 5
        while len(reported) < 2 and time.monotonic() < wait_for_report:
            time.sleep(0.01)
        log.close_access(wait_s=1)
    written = b"".join(got).count(b"\n")
    assert len(reported) <= 2 and sum(reported) == n - written > 0


def test_exit_waits_a_moment_for_a_full_stdout_then_reports_the_rest(
    pipe_stdout: tuple[int, int]
) -> None:
    """At exit, lines a full stdout has not taken get up to `wait_s`: a reader that
    catches up in time gets them all; without one they are counted and reported."""
    r, w = pipe_stdout
    n = 10 * fcntl.fcntl(w, F_GETPIPE_SZ) // 150
    for i in range(n):  # no event loop: each line is handed over at once
        log.access_line(_line(i))
    assert log._writer is not None and log._writer.queue
    got: list[bytes] = []
    done = threading.Event()

    def reader() -> None:  # catches up 0.1 s into the exit's wait
        time.sleep(0.1)
        while not done.is_set():
            got.append(_drain(r))
            time.sleep(0.005)

    thread = threading.Thread(target=reader)
    thread.start()
    with _warnings() as reported:
        log.close_access(wait_s=5)
    done.set()
    thread.join(5)
    got.append(_drain(r))
    ids = [orjson.loads(ln)["request_id"] for ln in b"".join(got).split(b"\n")[:-1]]
    assert ids == [f"r{i}" for i in range(n)]
    assert not reported

    with _warnings() as reported:
        for i in range(n):
            log.access_line(_line(i))
        log.close_access(wait_s=0.2)  # nobody reads
    written = _drain(r).count(b"\n")
    assert sum(reported) == n - written > 0 and log._writer is None


def test_closed_stdout_drops_lines_and_says_so(pipe_stdout: tuple[int, int]) -> None:
    """A stdout whose reader has gone (EPIPE) costs requests nothing: its lines are
    dropped, and counted in one warning, not one per line."""
    r, _w = pipe_stdout
    nul = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nul, r)  # the pipe's only reader goes away (r reads /dev/null now)
    os.close(nul)
    with _warnings() as reported:
        _log_unread([_line(i) for i in range(50)])
        log.close_access(wait_s=1)
    assert sum(reported) == 50 and len(reported) <= 2


def test_lines_to_the_journal_carry_their_priority(tmp_path: Path) -> None:
    """Under systemd, whose JOURNAL_STREAM names the stream stderr is (device:inode),
    each line begins with its syslog priority, which journald takes off it, so that
    `journalctl -p warning` finds the warnings; elsewhere, no prefix."""
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert log.to_journal(stream, env)
        assert not log.to_journal(stream, {}) and not log.to_journal(other, env)
        assert not log.to_journal(stream, {"JOURNAL_STREAM": "junk"})
    for level, prefix in ((logging.DEBUG, "<7>"), (logging.INFO, "<6>"),
                          (logging.WARNING, "<4>"), (logging.ERROR, "<3>")):
        rec = logging.LogRecord(log.MAIN, level, __file__, 1, "feed %s", ("a",), None)
        name = logging.getLevelName(level).lower()
        assert log.PlainFormatter(journal=True).format(rec) == f"{prefix}{name}: feed a"
        assert log.PlainFormatter().format(rec) == f"{name}: feed a"
        line = log.JsonFormatter(journal=True).format(rec)
        assert line.startswith(prefix) and orjson.loads(line[3:])["msg"] == "feed a"


def test_every_line_of_a_traceback_carries_its_priority() -> None:
    """journald files each line on its own: a traceback's lines carry the record's
    priority too, so that `journalctl -p err` shows them with their first line."""
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord(log.MAIN, logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    lines = log.PlainFormatter(journal=True).format(rec).split("\n")
    assert len(lines) > 3 and all(ln.startswith("<3>") for ln in lines), lines
    assert lines[0] == "<3>error: failed" and lines[-1] == "<3>ValueError: boom"
