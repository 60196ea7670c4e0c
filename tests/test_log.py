"""The access log's writer (log.py): whole lines, and none lost to a full stdout."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sys
from collections.abc import Iterator

import orjson
import pytest

from lrproxy import log

F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's capacity


@pytest.fixture
def pipe_stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """stdout is the write end of a small non-blocking pipe; (read fd, write fd).

    The loggers and log.py's state are restored afterwards."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate)
             for lg in (logging.getLogger(log.MAIN), logging.getLogger(log.ACCESS))]
    state = (log._direct_fd, log._flush_s)
    out = os.fdopen(w, "w", closefd=False)
    monkeypatch.setattr(sys, "stdout", out)
    log.setup_logging("warning", access=True, access_flush_ms=5)
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


def test_full_nonblocking_stdout_keeps_lines_until_it_drains(
    pipe_stdout: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    """Lines written while nobody reads a non-blocking stdout are not lost: they wait and
    go out whole once the reader catches up, none twice, none cut."""
    r, _ = pipe_stdout
    n = 200  # ~40 KiB against a 4 KiB pipe

    async def run() -> bytes:
        for i in range(n):
            log.access_line(_line(i))
        assert log._blocked  # the pipe filled up and nobody read it
        got = []
        for _ in range(400):
            await asyncio.sleep(0.01)
            got.append(_drain(r))
            if not log._lines:
                break
        return b"".join(got)

    data = asyncio.run(run())
    lines = data.split(b"\n")
    assert lines[-1] == b""
    docs = [orjson.loads(ln) for ln in lines[:-1]]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(n)]
    assert not log._blocked and log._dropped == 0


def test_backlog_is_bounded_and_drops_are_reported(pipe_stdout: tuple[int, int]) -> None:
    """Past the backlog's bound new lines are dropped, counted, and a warning says how
    many once stdout takes lines again; what is written stays whole lines."""
    r, _ = pipe_stdout
    err_r, err_w = os.pipe()
    main = logging.getLogger(log.MAIN)
    handler = logging.StreamHandler(os.fdopen(err_w, "w"))
    main.addHandler(handler)
    line_len = len(orjson.dumps(_line(299))) + 1
    n = log._MAX_BACKLOG // line_len + 500  # more than the backlog holds

    async def run() -> bytes:
        for _ in range(n):
            log.access_line(_line(299))
        assert log._dropped > 0
        got = []
        for _ in range(1000):
            await asyncio.sleep(0.005)
            got.append(_drain(r))
            if not log._lines:
                break
        return b"".join(got)

    try:
        data = asyncio.run(run())
        handler.flush()
    finally:
        main.removeHandler(handler)
        handler.stream.close()
    warning = os.read(err_r, 65536).decode()
    os.close(err_r)
    written = data.count(b"\n")
    assert all(orjson.loads(ln)["request_id"] == "r299" for ln in data.split(b"\n")[:-1])
    assert written < n and written * line_len <= log._MAX_BACKLOG + 4096
    assert f"access log: {n - written} lines dropped" in warning
