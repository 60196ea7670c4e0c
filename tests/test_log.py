"""The access log's writer (log.py): whole lines, and none lost to a full stdout."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from lrproxy import log

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # Linux fcntl: a pipe's capacity
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="sizes a pipe with Linux's fcntl")


@pytest.fixture
def pipe_stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """stdout is the write end of a small non-blocking pipe; (read fd, write fd).

    The loggers and log.py's state are restored afterwards."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # the least it takes: a page
    os.set_blocking(w, False)
    os.set_blocking(r, False)
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
        yield r, w
    finally:
        log.flush_access()
        log._lines.clear()
        log._size, log._blocked, log._dropped = 0, False, 0
        log._direct_fd, log._flush_s = state
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        out.close()
        os.close(r)
        os.close(w)


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


def _log_then_drain(r: int, fields: list[dict[str, object]]) -> bytes:
    """Access lines for `fields` while nobody reads stdout (it fills up), then what a
    reader gets once it reads on until the writer has nothing left."""

    async def run() -> bytes:
        for f in fields:
            log.access_line(f)
        assert log._blocked  # the pipe filled up and nobody read it
        got = []
        for _ in range(1000):
            await asyncio.sleep(0.005)
            got.append(_drain(r))
            if not log._lines:
                break
        return b"".join(got)

    return asyncio.run(run())


def test_full_nonblocking_stdout_keeps_lines_until_it_drains(
    pipe_stdout: tuple[int, int]
) -> None:
    """Lines written while nobody reads a non-blocking stdout are not lost: they wait and
    go out whole once the reader catches up, none twice, none cut."""
    r, w = pipe_stdout
    n = 10 * fcntl.fcntl(w, F_GETPIPE_SZ) // 150  # lines of ~200 B: 13 times what it holds
    data = _log_then_drain(r, [_line(i) for i in range(n)])
    lines = data.split(b"\n")
    assert lines[-1] == b""
    docs = [orjson.loads(ln) for ln in lines[:-1]]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(n)]
    assert not log._blocked and log._dropped == 0


def test_backlog_is_bounded_and_drops_are_reported(pipe_stdout: tuple[int, int]) -> None:
    """Past the backlog's bound new lines are dropped, counted, and a warning says how
    many once stdout takes lines again; what is written stays whole lines."""
    r, w = pipe_stdout
    err_r, err_w = os.pipe()
    main = logging.getLogger(log.MAIN)
    handler = logging.StreamHandler(os.fdopen(err_w, "w"))
    main.addHandler(handler)
    line_len = len(orjson.dumps(_line(299))) + 1
    n = log._MAX_BACKLOG // line_len + 500  # more than the backlog holds
    try:
        data = _log_then_drain(r, [_line(299)] * n)
        handler.flush()
    finally:
        main.removeHandler(handler)
        handler.stream.close()
    warning = os.read(err_r, 65536).decode()
    os.close(err_r)
    written = data.count(b"\n")
    assert all(orjson.loads(ln)["request_id"] == "r299" for ln in data.split(b"\n")[:-1])
    assert written < n
    assert written * line_len <= log._MAX_BACKLOG + fcntl.fcntl(w, F_GETPIPE_SZ)
    reported = [int(k) for k in re.findall(r"access log: (\d+) lines dropped", warning)]
    assert reported and sum(reported) == n - written  # as they happen, and the rest at the end
    assert not log._blocked and log._dropped == 0


def test_exit_waits_a_moment_for_a_full_stdout_then_reports_the_rest(
    pipe_stdout: tuple[int, int]
) -> None:
    """At exit, lines a full stdout has not taken get up to `wait_s`: a reader that
    catches up in time gets them all; without one they are counted and reported."""
    r, w = pipe_stdout
    n = 10 * fcntl.fcntl(w, F_GETPIPE_SZ) // 150
    for i in range(n):  # no event loop: each line is tried at once
        log.access_line(_line(i))
    assert log._blocked
    got: list[bytes] = []
    done = threading.Event()

    def reader() -> None:  # catches up 0.1 s into the exit's wait
        time.sleep(0.1)
        while not done.is_set():
            got.append(_drain(r))
            time.sleep(0.005)

    thread = threading.Thread(target=reader)
    thread.start()
    log.close_access(wait_s=5)
    done.set()
    thread.join(5)
    got.append(_drain(r))
    ids = [orjson.loads(ln)["request_id"] for ln in b"".join(got).split(b"\n")[:-1]]
    assert ids == [f"r{i}" for i in range(n)]

    err_r, err_w = os.pipe()
    main = logging.getLogger(log.MAIN)
    handler = logging.StreamHandler(os.fdopen(err_w, "w"))
    main.addHandler(handler)
    try:
        for i in range(n):
            log.access_line(_line(i))
        assert log._blocked
        log.close_access(wait_s=0.2)  # nobody reads
        handler.flush()
    finally:
        main.removeHandler(handler)
        handler.stream.close()
    written = _drain(r).count(b"\n")
    warning = os.read(err_r, 65536).decode()
    os.close(err_r)
    reported = [int(k) for k in re.findall(r"access log: (\d+) lines dropped", warning)]
    assert sum(reported) == n - written > 0 and not log._lines
