"""server.workers = N (SPEC §4, §6): N processes on one port, one summed /metrics,
reload and drain reaching every worker, a crashed worker restarted."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from procs import (
    CLIENT_KEY,
    MODEL,
    Notify,
    Proxy,
    SimThread,
    child_env,
    config_toml,
    http_get,
    listen_backlogs,
    port_refuses,
    queued_requests,
    somaxconn,
    status_lines,
    wait_for,
    wrk_through_sigterm,
)
from prometheus_client.parser import text_string_to_metric_families

from lrproxy.workers import stop_queueing


def _children(pid: int) -> set[int]:
    """PIDs whose parent is `pid` (from /proc, no extra tools)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d))
    return out


def _two_workers(proxy: Proxy) -> set[int]:
    """The supervisor's two worker processes, once both are there."""
    return wait_for(lambda: c if len(c := _children(proxy.pid)) == 2 else None, 10,
                    "two workers")


def _ready(proxy: Proxy, notify: Notify) -> set[int]:
    """The two workers, once the supervisor has told systemd READY=1."""
    assert notify.wait_for("READY", 30)["READY"] == "1"
    return _two_workers(proxy)


def _stop_all(proxy: Proxy) -> None:
    """Stop the supervisor, then kill any worker it left, by PID (taken before the stop:
    after it, they are init's children)."""
    kids = _children(proxy.pid)
    proxy.stop()
    for p in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _end(proxy: Proxy, notify: Notify) -> None:
    """Stop the supervisor, then any worker it left (by PID), and the notify socket."""
    _stop_all(proxy)
    notify.close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(v.decode().partition("=")[::2] for v in raw.split(b"\0") if v)


def _metric(port: int, name: str) -> float:
    status, body = http_get(port, "/metrics")
    assert status == 200
    total = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


def test_two_workers_serve_sum_metrics_reload_restart_and_drain(tmp_path: Path, sim: SimThread) -> None:
    """Two workers share the port; /metrics sums both; SIGHUP reaches both; a killed worker is
    replaced; SIGTERM stops all with exit 0, READY=1 only once every worker is ready."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server=(
        'workers = 2\nmetrics_listen = "127.0.0.1:0"\n')))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--loop=asyncio"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        workers = _ready(proxy, notify)
        port, mport = proxy.wait_port(), proxy.metrics_port()
        started = [ln for ln in proxy.stderr.splitlines() if "listening on" in ln]
        assert len(started) == 2 and all("(asyncio)" in ln for ln in started)  # its --loop
        # each worker's socket keeps the backlog one process has (aiohttp's default: 128)
        assert listen_backlogs(port) == [min(1024, somaxconn())] * 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                               max_retries=0, timeout=20)
        n = 40
        for _ in range(n):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert _metric(mport, "lrproxy_requests_total") == n
        assert sim.chat_requests() == n
        # A worker (re)starting creates its metric file, then sizes it: a scrape between
        # the two still sums the others (it was a 500)
        prom_dir = _environ(next(iter(workers)))["PROMETHEUS_MULTIPROC_DIR"]
        (Path(prom_dir) / "counter_4242424.db").touch()
        assert _metric(mport, "lrproxy_requests_total") == n
        (Path(prom_dir) / "counter_4242424.db").unlink()

        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 15)["READY"] == "1"
        wait_for(lambda: proxy.stderr.count("config reloaded") == 2, 10, "both workers reloaded")
        # each names the operator's file, not the supervisor's private copy it read
        assert proxy.stderr.count(f"config reloaded from {cfg}") == 2, proxy.stderr

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(c := _children(proxy.pid)) == 2 and victim not in c, 15,
                 "a replacement worker")
        wait_for(lambda: proxy.stderr.count("listening on") >= 3, 15, "the replacement listening")
        for _ in range(n):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        # The dead worker's counts stay in the sum: nothing counted is lost with it.
        assert _metric(mport, "lrproxy_requests_total") == 2 * n

        current = _children(proxy.pid)
        proxy.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", 10)["STOPPING"] == "1"
        assert proxy.wait(40) == 0
        assert not any(Path(f"/proc/{p}").exists() and "zombie" not in
                       Path(f"/proc/{p}/status").read_text().lower() for p in current)
    finally:
        _end(proxy, notify)


def _series(port: int, name: str) -> dict[str, float]:
    """One labelled gauge's samples from /metrics, by their one label's value."""
    status, body = http_get(port, "/metrics")
    assert status == 200
    return {next(iter(s.labels.values())): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name == name}


def test_two_workers_gauges_follow_the_config(tmp_path: Path, sim: SimThread) -> None:
    """With workers, /metrics shows the gauges of the accepted config only: not a dead
    worker's old figure, nor an upstream or region a reload removed (SPEC §5)."""
    cfg = tmp_path / "lrproxy.toml"

    def write(intensity: float, upstream: str, region: str) -> None:
        cfg.write_text(config_toml(sim.base_url, 0, intensity=intensity, extra_server=(
            'workers = 2\nmetrics_listen = "127.0.0.1:0"\n')).replace(
            'name = "sim"', f'name = "{upstream}"').replace('"r1"', f'"{region}"').replace(
            "[regions.r1]", f"[regions.{region}]"))

    write(300, "sim", "r1")
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        workers = _ready(proxy, notify)
        mport = proxy.metrics_port()
        assert _series(mport, "lrproxy_grid_intensity_g_per_kwh") == {"r1": 300}
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(c := _children(proxy.pid)) == 2 and victim not in c, 15,
                 "a replacement worker")
        wait_for(lambda: proxy.stderr.count("listening on") >= 3, 15, "the replacement listening")
        write(100, "sim", "r1")  # lower: the dead worker's 300 would win a max
        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 15)["READY"] == "1"
        wait_for(lambda: _series(mport, "lrproxy_grid_intensity_g_per_kwh") == {"r1": 100},
                 10, "the reloaded intensity alone")
        write(100, "sim2", "r2")
        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 15)["READY"] == "1"
        wait_for(lambda: _series(mport, "lrproxy_grid_intensity_g_per_kwh") == {"r2": 100},
                 10, "the renamed region alone")
        assert _series(mport, "lrproxy_upstream_usable") == {"sim2": 1}
        # the workers' reloads dropped no series of their own (multiprocess mode cannot:
        # it would warn in plain text amid the JSON log)
        assert "Warning" not in proxy.stderr, proxy.stderr
    finally:
        _end(proxy, notify)


def test_supervisor_reload_that_fails_unexpectedly_still_ends_ready(
    tmp_path: Path, sim: SimThread,
) -> None:
    """A reload the supervisor cannot even attempt (here its private copy's directory
    is in the way) is refused and logged, and systemd still gets READY=1 after
    RELOADING=1 (SPEC §6), or `systemctl reload` would hang."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--log-format", "plain", "--no-access-log"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path, TMPDIR=str(tmp)))
    try:
        assert notify.wait_for("READY", 30)["READY"] == "1"
        port = proxy.wait_port()
        [run] = list(tmp.iterdir())
        blocker = run / "candidate"
        if blocker.exists():
            blocker.rmdir()
        blocker.write_text("not a directory")
        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 10)["READY"] == "1"
        wait_for(lambda: "reload refused" in proxy.stderr, 5, "the refusal logged")
        assert "Traceback" not in proxy.stderr
        assert _chat_on_a_new_connection(port) == 200
    finally:
        _end(proxy, notify)


def test_two_workers_hold_a_keys_rate_together(tmp_path: Path, sim: SimThread) -> None:
    """A key's rate_per_s holds for the service, not per worker (buckets.SharedBuckets):
    at 0.5 a second (a burst of 1), requests on 12 new connections, which the kernel
    spreads over both workers, get one 200 and 429s, not one 200 per worker."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n").replace(
        '{ name = "ops", sha256', '{ name = "ops", rate_per_s = 0.5, sha256'))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        assert notify.wait_for("READY", 30)["READY"] == "1"
        port = proxy.wait_port()
        t0 = time.monotonic()
        got = [_chat_on_a_new_connection(port) for _ in range(12)]
        elapsed = time.monotonic() - t0
        assert set(got) <= {200, 429}, got
        assert 1 <= got.count(200) <= 1 + int(0.5 * elapsed), (got, elapsed)
    finally:
        _end(proxy, notify)


def test_two_workers_on_port_0_share_one_port(tmp_path: Path, sim: SimThread) -> None:
    """`listen` with port 0 (any free one) and 2 workers: one port, the first socket's,
    for both workers and in the supervisor's line; not a port of its own for each."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        ready = notify.wait_for("READY", 30)
        port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", ready["STATUS"]).group(1))  # type: ignore[union-attr]
        assert port != 0
        lines = [ln for ln in proxy.stderr.splitlines() if "listening on" in ln]
        assert len(lines) == 2 and all(f"127.0.0.1:{port}/" in ln for ln in lines), lines
        assert len(listen_backlogs(port)) == 2
        assert _chat_on_a_new_connection(port) == 200
    finally:
        _end(proxy, notify)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_two_workers_refuse_new_connections_while_they_drain(
    tmp_path: Path, sim: SimThread, sig: signal.Signals
) -> None:
    """SIGTERM (or SIGINT, the same: SPEC §6) with 2 workers: new connections are
    refused at once, as with one process,
    while a request in flight finishes (the supervisor's copies of the listening sockets
    would otherwise queue them until every worker has exited, then reset them)."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    result: dict[str, Any] = {}

    def slow() -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                               max_retries=0, timeout=20)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"sim": {"headers_delay_s": 2.5}})
        result["text"], result["ended"] = r.choices[0].message.content, time.monotonic()

    try:
        assert notify.wait_for("READY", 30)["READY"] == "1"
        port = proxy.wait_port()  # (for `slow` too)
        before = sim.chat_requests()
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        wait_for(lambda: sim.chat_requests() > before, 5, "the slow request upstream")
        proxy.signal(sig)
        wait_for(lambda: port_refuses(port), 2, "new connections to be refused")
        refused_at = time.monotonic()
        t.join(10)
        assert result.get("text"), "the request in flight did not finish"
        assert result["ended"] > refused_at  # refused while it was still in flight
        assert proxy.wait(20) == 0
    finally:
        _end(proxy, notify)


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_two_workers_answer_the_connections_queued_before_sigterm(
    tmp_path: Path, sim: SimThread, loop: str
) -> None:
    """With 2 workers, connections queued on the workers' sockets when SIGTERM came (both
    workers stopped: SIGSTOP) are each answered, not reset as the sockets close."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", f"--loop={loop}"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        workers = _ready(proxy, notify)
        port = proxy.wait_port()
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        try:
            socks = queued_requests(port, 12)  # SO_REUSEPORT spreads them over both
            proxy.signal(signal.SIGTERM)  # the supervisor closes its copies of the sockets
            time.sleep(0.3)
        finally:
            for w in workers:
                os.kill(w, signal.SIGCONT)
        assert status_lines(socks) == [b"HTTP/1.1 200 OK"] * 12
        assert proxy.wait(20) == 0
    finally:
        _end(proxy, notify)


def test_sigterm_while_the_workers_start_answers_what_queued(tmp_path: Path, sim: SimThread) -> None:
    """SIGTERM as soon as the port listens, the workers still starting: the supervisor
    tells each once it serves (a worker ended before its handler is there would take
    its socket's queued connections with it, reset), so each queued request is answered
    and the exit is 0."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        port = proxy.wait_port()  # (the supervisor's line, as its workers start)
        wait_for(lambda: not port_refuses(port), 15, "the supervisor's sockets")
        socks = queued_requests(port, 12)
        proxy.signal(signal.SIGTERM)
        assert status_lines(socks) == [b"HTTP/1.1 200 OK"] * 12
        assert proxy.wait(30) == 0
    finally:
        _stop_all(proxy)


def _stuck_workers(tmp_path: Path, sim: SimThread, grace: float) -> tuple[Proxy, Path]:
    """Two workers that hang as they start, their intensity feed a FIFO no one writes
    (as a hung mount would): the supervisor and the FIFO, once they are stuck on it."""
    fifo = tmp_path / "feed.json"
    os.mkfifo(fifo)
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=grace, extra_server="workers = 2\n")
                   .replace("pue = 1.0", f'pue = 1.0\nintensity_feed = "{fifo}"'))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        proxy.wait_port()  # (the supervisor's line, as its workers start)
        wait_for(lambda: len(_children(proxy.pid)) == 2, 15, "two workers")
    except BaseException:
        _stop_all(proxy)
        raise
    time.sleep(1.0)  # stuck on the FIFO by now
    return proxy, fifo


def test_sigterm_with_a_worker_stuck_in_its_start_ends_within_the_grace(
    tmp_path: Path, sim: SimThread
) -> None:
    """Workers that hang as they start (their intensity feed a FIFO no one writes, as a
    hung mount would): a stop waits a few seconds for their READY, tells them anyway,
    and kills what has not ended by shutdown_grace_s + 5 s from the SIGTERM. (It used to
    wait 30 s for the READY first, and the workers only noted the SIGTERM.)"""
    proxy, _ = _stuck_workers(tmp_path, sim, grace=1)
    try:
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(1 + 5 + 5) == 1  # not READY, then killed: not a clean stop
        assert time.monotonic() - t0 < 1 + 5 + 1.5  # shutdown_grace_s + 5 s, and a margin
        assert "still starting" in proxy.stderr
        assert proxy.stderr.count("killed") == 2, proxy.stderr  # each worker, logged
    finally:
        _stop_all(proxy)


def _feed_json() -> str:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return json.dumps({"zone": "FR", "carbonIntensity": 150, "datetime": now, "updatedAt": now})


def test_workers_told_to_stop_as_they_start_serve_what_queued_then_end(
    tmp_path: Path, sim: SimThread
) -> None:
    """SIGTERM while both workers hang in their start (a FIFO feed): the supervisor tells
    them after its wait for READY; each notes it before its imports are done, and once
    it comes free serves what queued on its socket and drains at once (not the full
    grace, nor until it is killed): every queued request is answered, the exit is 0,
    nothing is killed."""
    proxy, fifo = _stuck_workers(tmp_path, sim, grace=20)
    assert proxy.port is not None
    try:
        socks = queued_requests(proxy.port, 8)
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        time.sleep(4.0)  # past the supervisor's wait for READY: both are told
        with open(fifo, "w") as f:  # (one writer frees every reader blocked in open)
            f.write(_feed_json())
        assert status_lines(socks) == [b"HTTP/1.1 200 OK"] * 8
        assert proxy.wait(15) == 0, proxy.stderr
        assert time.monotonic() - t0 < 15  # drained at once: not the 20 s grace
        assert "killed" not in proxy.stderr
    finally:
        _stop_all(proxy)


def _two_workers_logging_plain(tmp_path: Path, sim: SimThread) -> tuple[Proxy, Notify]:
    """A supervisor of 2 workers in front of `sim` on port 0, logging plain lines,
    started (not yet ready), with its notify socket."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n"))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    return proxy, notify


def test_sigterm_while_a_worker_restarts_resets_no_new_connection(
    tmp_path: Path, sim: SimThread
) -> None:
    """One worker dies; while its successor starts, SIGTERM: the serving worker drains,
    and the supervisor closes its copy of that worker's socket as it tells it, so new
    connections are refused (their SYNs dropped until the sockets close: stop_queueing),
    never queued on a socket no one will accept from (reset at the end)."""
    proxy, notify = _two_workers_logging_plain(tmp_path, sim)
    try:
        workers = _ready(proxy, notify)
        port = proxy.wait_port()
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(c := _children(proxy.pid)) == 2 and victim not in c, 15,
                 "a replacement worker")
        proxy.signal(signal.SIGTERM)  # the replacement is still starting

        def late(i: int) -> int | str:
            time.sleep(0.2 + i * 0.03)  # after the serving worker has closed its listener
            return _chat_on_a_new_connection(port, timeout=10)

        with ThreadPoolExecutor(16) as ex:  # at once: while the successor still starts
            got = list(ex.map(late, range(16)))
        assert set(got) <= {200, "ConnectionRefusedError"}, got
        assert proxy.wait(30) == 0
    finally:
        _end(proxy, notify)


def test_sigterm_while_a_worker_waits_for_its_restart_answers_its_queue(
    tmp_path: Path, sim: SimThread
) -> None:
    """A serving worker dies; during its restart backoff (0.5 s) its socket, held open,
    queues the connections the kernel hashes to it. SIGTERM then: the supervisor starts
    its successor at once to serve that queue and drain, rather than closing the socket
    on them (they used to be reset)."""
    proxy, notify = _two_workers_logging_plain(tmp_path, sim)
    try:
        victim = sorted(_ready(proxy, notify))[0]
        port = proxy.wait_port()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: f"(pid {victim}) exited with -9; restarting in 0.5s" in proxy.stderr,
                 5, "the supervisor to note the death", step=0.005)
        socks = queued_requests(port, 16)  # SO_REUSEPORT hashes some to the dead one's
        proxy.signal(signal.SIGTERM)
        assert status_lines(socks) == [b"HTTP/1.1 200 OK"] * 16
        assert "was down at the stop" in proxy.stderr
        assert proxy.wait(20) == 0, proxy.stderr
    finally:
        _end(proxy, notify)


def _running_with(arg: str) -> list[int]:
    """PIDs of live processes with `arg` in their command line (orphans included)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if arg.encode() in cmd and state != "Z":
                out.append(int(d))
    return out


@pytest.mark.parametrize("taken", ["listen", "listen_reuseport", "metrics_listen"])
def test_two_workers_a_taken_port_leaves_nothing_behind(tmp_path: Path, taken: str) -> None:
    """workers = 2 with the API or the /metrics address in use: one `cannot listen on` line,
    exit 1 as with one process, no worker left running and no temporary directory left.
    A holder with SO_REUSEPORT (another instance's workers) is no exception: joining its
    group would split the traffic between the two."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cfg = tmp_path / "lrproxy.toml"
    with socket.socket() as holder:  # the taken port: the holder's, on port 0; the other, 0
        if taken == "listen_reuseport":
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        port, mport = (0, busy) if taken == "metrics_listen" else (busy, 0)
        cfg.write_text(config_toml("http://127.0.0.1:9/v1", port, extra_server=(
            f'workers = 2\nmetrics_listen = "127.0.0.1:{mport}"\n')))
        proxy = Proxy(["serve", "--config", str(cfg), "--log-format", "plain", "--no-access-log"],
                      tmp_path, env=child_env(TMPDIR=str(tmp)))
        try:
            assert proxy.wait(30) == 1
            assert proxy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{busy}"), proxy.stderr
            assert len(proxy.stderr.splitlines()) == 1, proxy.stderr
            # workers run `serve --config` on the supervisor's copy, under TMPDIR
            assert _running_with(str(cfg)) == [] and _running_with(str(tmp)) == []
            assert list(tmp.iterdir()) == []
        finally:
            proxy.stop()
            for pid in {*_running_with(str(cfg)), *_running_with(str(tmp))}:
                os.kill(pid, signal.SIGKILL)


def test_two_workers_end_with_their_supervisor(tmp_path: Path, sim: SimThread) -> None:
    """A supervisor killed by SIGKILL takes its workers with it: none goes on serving the
    old config on the port, outside any /metrics."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=2, extra_server="workers = 2\n"))
    tmp = tmp_path / "tmp"  # where the killed supervisor leaves its directory
    tmp.mkdir()
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(TMPDIR=str(tmp)))
    workers: set[int] = set()
    try:
        workers = wait_for(lambda: w if len(w := _children(proxy.pid)) == 2 else None, 30,
                           "two workers")
        wait_for(lambda: proxy.stderr.count("listening on") == 2, 30, "both listening")
        port = proxy.wait_port()
        assert _chat_on_a_new_connection(port) == 200
        proxy.proc.kill()
        proxy.wait(5)
        wait_for(lambda: not any(_alive(p) for p in workers), 10, "the workers to end")
        assert port_refuses(port)
    finally:
        proxy.stop()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_workers_keep_their_files_in_the_runtime_directory(
    tmp_path: Path, sim: SimThread
) -> None:
    """Under systemd the supervisor's directory (metrics files, notify socket, the config
    copy) goes in $RUNTIME_DIRECTORY (/run/lrproxy), which no /tmp cleaning ages away,
    and is removed at stop."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=2, extra_server="workers = 2\n"))
    run = tmp_path / "run"
    run.mkdir()
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(RUNTIME_DIRECTORY=str(run)))
    try:
        wait_for(lambda: proxy.stderr.count("listening on") == 2, 30, "both listening")
        port = proxy.wait_port()
        (made,) = run.iterdir()
        assert made.name.startswith("lrproxy-metrics-") and (made / "config").is_dir()
        assert _chat_on_a_new_connection(port) == 200
    finally:
        proxy.stop()
    assert not any(run.iterdir())


def _alive(pid: int) -> bool:
    """`pid` runs (a zombie, or a process gone, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _chat_answer(port: int, timeout: float) -> tuple[int, bytes]:
    """One chat completion on a connection of its own (the kernel picks a worker's socket
    per connection): its status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/api/v1/chat/completions",
                     json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
                     {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _chat_on_a_new_connection(port: int, timeout: float = 3.0) -> int | str:
    """`_chat_answer`'s status, or the name of the error (a timeout: nobody accepted)."""
    try:
        return _chat_answer(port, timeout)[0]
    except OSError as e:
        return type(e).__name__


def test_two_workers_keep_what_waits_for_a_restart_across_a_workers_restart(
    tmp_path: Path, sim: SimThread
) -> None:
    """A reload that changes what a running process cannot (timeouts.client_header here)
    is said once, by the supervisor, and a worker restarted after it (a crash) keeps the
    value the service started with, as the other does: one setting service-wide until
    the service restarts. (Each worker said it, and the successor took the new value.)"""
    cfg = tmp_path / "lrproxy.toml"
    start = config_toml(sim.base_url, 0, extra_server="workers = 2\n").replace(
        "[timeouts]\n", "[timeouts]\nclient_header = 8\n")
    cfg.write_text(start)
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    socks: list[socket.socket] = []
    try:
        victim = sorted(_ready(proxy, notify))[0]
        port = proxy.wait_port()
        cfg.write_text(start.replace("client_header = 8", "client_header = 1"))
        proxy.signal(signal.SIGHUP)
        assert [notify.wait_for(k, 10)[k] for k in ("RELOADING", "READY")] == ["1", "1"]
        kept = [ln for ln in proxy.stderr.splitlines() if "kept until a restart" in ln]
        assert len(kept) == 1 and kept[0].endswith(": timeouts.client_header"), proxy.stderr
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: proxy.stderr.count("listening on") >= 3, 15, "the replacement listening")
        for _ in range(12):  # headers begun, never ended: both workers' header timer
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        time.sleep(3)  # past the reloaded 1 s, well before the 8 s the service runs with
        for s in socks:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing sent back (no 408), not closed
                s.recv(1024)
        assert len(kept) == len([ln for ln in proxy.stderr.splitlines()
                                 if "kept until a restart" in ln])
    finally:
        for s in socks:
            s.close()
        _end(proxy, notify)


def test_two_workers_a_refused_reload_does_not_reach_a_restarted_worker(
    tmp_path: Path, sim: SimThread
) -> None:
    """A reload refused (the bad file stays on disk), then a worker dies: its successor
    starts from the config last accepted, every new connection is answered, the refusal is
    logged once and counted, and SIGTERM still exits 0."""
    cfg = tmp_path / "lrproxy.toml"
    good = config_toml(sim.base_url, 0, extra_server=(
        'workers = 2\nmetrics_listen = "127.0.0.1:0"\n'))
    cfg.write_text(good)
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        workers = _ready(proxy, notify)
        port, mport = proxy.wait_port(), proxy.metrics_port()
        cfg.write_text(good.replace("connect = 2\n", 'connect = "soon"\n'))
        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 10)["READY"] == "1"
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(c := _children(proxy.pid)) == 2 and victim not in c, 15,
                 "a replacement worker")
        wait_for(lambda: proxy.stderr.count("listening on") >= 3, 15, "the replacement listening")
        assert [_chat_on_a_new_connection(port) for _ in range(12)] == [200] * 12
        assert "before it was ready" not in proxy.stderr
        # Refused by the supervisor, not by each worker: one line, one count.
        refusals = [ln for ln in proxy.stderr.splitlines() if "reload refused" in ln]
        assert refusals == ["error: reload refused, the old config stays: "
                            "lrproxy.toml: timeouts.connect: expected a number (got 'soon')"]
        assert _metric(mport, "lrproxy_config_reloads_total") == 1  # the error; ok is 0

        proxy.signal(signal.SIGTERM)
        assert proxy.wait(40) == 0
    finally:
        _end(proxy, notify)


def _eco_on_a_new_connection(port: int) -> tuple[float, str]:
    """`_chat_answer`'s grid intensity and accuracy."""
    eco = json.loads(_chat_answer(port, 5)[1])["lowrouter"]["eco"]
    return eco["grid_intensity_g_per_kwh"], eco["accuracy"]


@pytest.mark.parametrize("broken", ["invalid", "missing", "named by a reload"])
def test_two_workers_a_restarted_worker_keeps_the_last_good_feed_reading(
    tmp_path: Path, sim: SimThread, broken: str,
) -> None:
    """The feed file breaks (bad JSON, or gone; or a file a reload named, first read by
    the reload itself, then bad JSON), then a worker dies: its successor keeps the last
    good reading the workers read, as the other worker and one process do (README), not
    the static figure: every request is charged it, measured."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def feed(name: str, value: int) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"zone": "FR", "carbonIntensity": value, "datetime": now,
                                    "updatedAt": now}))
        return path

    def config(path: Path) -> str:
        return (config_toml(sim.base_url, 0, intensity=290, extra_server="workers = 2\n")
                .replace("pue = 1.0\n", f'pue = 1.0\nintensity_feed = "{path}"\n'
                         "intensity_max_age_s = 3600\n"))

    live, value = feed("r1.json", 160), 160
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config(live))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        workers = _ready(proxy, notify)
        port = proxy.wait_port()
        assert {_eco_on_a_new_connection(port) for _ in range(6)} == {(160, "measured")}
        if broken == "named by a reload":
            live, value = feed("other.json", 200), 200
            cfg.write_text(config(live))
            proxy.signal(signal.SIGHUP)
            assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
            assert notify.wait_for("READY", 15)["READY"] == "1"
            assert {_eco_on_a_new_connection(port) for _ in range(6)} == {(200, "measured")}
        if broken == "missing":
            live.unlink()
        else:
            live.write_text("{not json")
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(c := _children(proxy.pid)) == 2 and victim not in c, 15,
                 "a replacement worker")
        wait_for(lambda: proxy.stderr.count("listening on") >= 3, 15, "the replacement listening")
        assert {_eco_on_a_new_connection(port) for _ in range(12)} == {(value, "measured")}
        assert "the last good reading the workers read stays" in proxy.stderr
    finally:
        _end(proxy, notify)


def test_two_workers_say_a_feed_change_once(tmp_path: Path, sim: SimThread) -> None:
    """What a feed file holds is logged by the first worker only, as warnings about the
    config are: a stale reading at the start and a refused file at a reload are one line
    each, not one per worker (they read the same file)."""
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 7200))
    feed = tmp_path / "r1.json"
    feed.write_text(json.dumps({"zone": "FR", "carbonIntensity": 150, "datetime": old,
                                "updatedAt": old}))
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, intensity=290, extra_server="workers = 2\n")
                   .replace("pue = 1.0\n", f'pue = 1.0\nintensity_feed = "{feed}"\n'))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain"],
                  tmp_path, env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        _ready(proxy, notify)
        assert proxy.stderr.count("listening on") == 2  # (both workers have read it)
        assert proxy.stderr.count(f"no reading in {feed} newer than") == 1, proxy.stderr
        feed.write_text("{not json")
        proxy.signal(signal.SIGHUP)  # (each worker's reload reads the feeds at once)
        assert notify.wait_for("RELOADING", 10)["RELOADING"] == "1"
        assert notify.wait_for("READY", 15)["READY"] == "1"
        wait_for(lambda: proxy.stderr.count("config reloaded") == 2, 10, "both reloads")
        assert proxy.stderr.count(f"refused: {feed}: not JSON") == 1, proxy.stderr
    finally:
        _end(proxy, notify)


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:port (the kernel's table, /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1] == local and r.split()[3] == "0A")


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_two_workers_a_worker_that_cannot_start_gets_no_connections(
    tmp_path: Path, sim: SimThread, loop: str
) -> None:
    """A successor that cannot start (its upstream key file is gone): its socket is closed
    and it says so, new connections all go to the other worker; once the file is back the
    next retry listens on a new socket and serves; SIGTERM exits 0."""
    key = tmp_path / "upstream.key"
    key.write_text("sk-upstream\n")
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 2\n").replace(
        'models = {', f'api_key_file = "{key}"\nmodels = {{', 1))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", "--log-format", "plain",
                   f"--loop={loop}"], tmp_path)
    try:
        port = proxy.wait_port(30)
        proxy.wait_healthy(30)
        workers = _two_workers(proxy)
        wait_for(lambda: "2 workers serving" in proxy.stderr, 15, "both workers ready")
        key.unlink()
        os.kill(sorted(workers)[0], signal.SIGKILL)
        wait_for(lambda: "before it was ready" in proxy.stderr, 15, "a failed start")
        failed = next(ln for ln in proxy.stderr.splitlines() if "before it was ready" in ln)
        assert "exited with 78 before it was ready (a config or credential problem" in failed
        assert "socket is closed" in failed
        assert _listeners(port) == 1
        assert [_chat_on_a_new_connection(port) for _ in range(12)] == [200] * 12

        key.write_text("sk-upstream\n")
        wait_for(lambda: proxy.stderr.count("listening on") == 3, 20, "a successor listening")
        assert _listeners(port) == 2
        assert [_chat_on_a_new_connection(port) for _ in range(12)] == [200] * 12
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(40) == 0
    finally:
        _stop_all(proxy)


def test_workers_warn_of_the_config_once(tmp_path: Path, sim: SimThread) -> None:
    """A warning about the config (here: lowrouter/auto has no model) is said once, by
    the first worker, not once per worker: they read the same file. (Three workers: with
    two, a check of "not the second" would pass as well.)"""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server="workers = 3\n",
                               auto=False))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    try:
        notify.wait_for("READY", 30)
        assert len([ln for ln in proxy.stderr.splitlines() if "listening on" in ln]) == 3
        said = [ln for ln in proxy.stderr.splitlines() if "lowrouter/auto" in ln]
        assert len(said) == 1, said
    finally:
        _end(proxy, notify)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_and_sigusr2_are_ignored_with_a_warning(
        tmp_path: Path, sim: SimThread, workers: int) -> None:
    """SIGUSR1 (nginx's "reopen the logs", which a logrotate postrotate copied from nginx
    sends) and SIGUSR2 ended lrproxy at once, mid-request, with no drain and no word:
    each process (supervisor and workers) now says it ignores them and serves on."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server=(
        f"workers = {workers}\n" if workers > 1 else "")))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        proxy.wait_healthy()
        pids = [proxy.pid, *(_two_workers(proxy) if workers > 1 else ())]
        if workers > 1:
            wait_for(lambda: proxy.stderr.count("listening on") == 2, 30, "workers")
        for pid in pids:
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                os.kill(pid, sig)
        for sig in ("SIGUSR1", "SIGUSR2"):
            wait_for(lambda s=sig: proxy.stderr.count(f"{s} ignored") == len(pids), 10,
                     f"{sig} said ignored by each process")
        assert proxy.proc.poll() is None
        with openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.wait_port()}/api/v1",
                           api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
            for _ in range(4):
                client.chat.completions.create(model=MODEL,
                                               messages=[{"role": "user", "content": "hi"}])
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
    finally:
        _stop_all(proxy)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk (Debian's wrk: .ci/run installs it)")
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_a_stream_of_new_connections_loses_none(
    tmp_path: Path, sim: SimThread, workers: int
) -> None:
    """wrk's 64 clients sending, and connecting again at once, when SIGTERM comes: every
    connection the kernel accepted for the proxy gets an answer; the others are refused,
    which a client may retry elsewhere. Closing a listening socket resets what is queued
    on it, and under such a stream something always is (a worker's socket closing last
    gets every connect meanwhile): new SYNs are dropped first, while the queue is
    emptied, so nothing more queues."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server=f"workers = {workers}\n"))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        proxy.wait_healthy()
        got = wrk_through_sigterm(proxy.wait_port(), proxy, tmp_path)
        assert proxy.wait(20) == 0
        assert got["200"] > 100, got  # it was serving when the signal came
        assert got["write"] > 0, got  # and then stopped listening: connects refused
        assert got["read"] == got["timeout"] == got["other"] == 0, got
    finally:
        _stop_all(proxy)


def test_stop_queueing_drops_new_connects_and_keeps_those_made() -> None:
    """stop_queueing: a connect to the socket after it is not made (its SYNs are dropped,
    so nothing queues for a close to reset), while a connection queued before it is
    accepted afterwards and carries bytes both ways."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as lsock:
        port = lsock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as before:
            stop_queueing([lsock])
            late = socket.socket()
            late.settimeout(0.5)
            with late, pytest.raises(TimeoutError):
                late.connect(("127.0.0.1", port))
            lsock.settimeout(5)
            conn, _ = lsock.accept()
            with conn:
                before.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert before.recv(4) == b"pong"


def _stat(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()


def _cpu_s(pids: Iterable[int]) -> float:
    """User and system CPU seconds of `pids`, from /proc, as Prometheus clients read it."""
    return sum(int(_stat(p)[11]) + int(_stat(p)[12]) for p in pids) / os.sysconf("SC_CLK_TCK")


def _rss(pids: Iterable[int]) -> int:
    return sum(int(_stat(p)[21]) for p in pids) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("workers", [1, 2])
def test_process_metrics_are_the_whole_services(
    tmp_path: Path, sim: SimThread, workers: int
) -> None:
    """/metrics has the process_* series every Prometheus client exports, and python_info.
    With workers they are the service's: the supervisor's and every worker's, read here
    from /proc; a killed worker's CPU time stays in the counter, which never goes back."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, extra_server=(
        f'workers = {workers}\nmetrics_listen = "127.0.0.1:0"\n')))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        proxy.wait_healthy()
        mport = proxy.metrics_port()
        pids = {proxy.pid} | (_two_workers(proxy) if workers == 2 else set())
        for _ in range(20):
            _chat_on_a_new_connection(proxy.wait_port())

        def scrape(name: str) -> float:
            return _metric(mport, name)

        lo = _cpu_s(pids)
        cpu = scrape("process_cpu_seconds_total")
        assert lo - 1e-6 <= cpu <= _cpu_s(pids) + 1e-6, (lo, cpu)  # (sums of ticks / 100)
        rss = (_rss(pids), scrape("process_resident_memory_bytes"), _rss(pids))
        assert 0.9 * min(rss[0], rss[2]) <= rss[1] <= 1.1 * max(rss[0], rss[2]), rss
        assert scrape("process_open_fds") >= 5 * len(pids)
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime "))
        started = boot + int(_stat(proxy.pid)[19]) / os.sysconf("SC_CLK_TCK")
        assert scrape("process_start_time_seconds") == pytest.approx(started, abs=0.02)
        assert scrape("python_info") == 1
        if workers == 1:
            return
        victim = min(pids - {proxy.pid})
        dead = _cpu_s([victim])
        os.kill(victim, signal.SIGKILL)
        pids = {proxy.pid} | wait_for(
            lambda: c if len(c := _children(proxy.pid)) == 2 and victim not in c else None,
            15, "a replacement worker")
        lo = _cpu_s(pids) + dead
        after = scrape("process_cpu_seconds_total")
        # (the dead one's time as its parent reaped it: its last ticks, rounded apart)
        assert lo - 1e-6 <= after <= _cpu_s(pids) + dead + 0.03, (lo, after, dead)
        assert after >= cpu  # never back (the replacement may not have a tick yet)
    finally:
        _stop_all(proxy)


def _private_netns() -> str | None:
    """Why a test needing a network namespace of its own and a TUN device cannot run."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "no unshare(1) or ip(8)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@pytest.mark.skipif(_private_netns() is not None, reason=str(_private_netns()))
def test_stop_queueing_keeps_a_connection_whose_handshake_ends_after_it() -> None:
    """A connection whose SYN came before stop_queueing and whose final ACK (and request)
    after it, one round trip later: its client saw connect() succeed and sent a POST.
    stop_queueing drops only new connections' SYNs; the ACK completes the connection,
    which is accepted (and answered, as those queued before), not left half made to be
    reset when the socket closes. (A client emulated over TUN in a network namespace of
    its own: tests/tunclient.py.)"""
    script = str(Path(__file__).with_name("tunclient.py"))
    got = subprocess.run(["unshare", "-n", sys.executable, script], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             p for p in (os.environ.get("PYTHONPATH"),
                                         str(Path(__file__).parents[1])) if p)})
    if "Operation not permitted" in got.stderr:
        pytest.skip(f"no network namespace: {got.stderr.strip()}")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[0] == "ACCEPTED", got.stdout
    assert "RESET" not in got.stdout, got.stdout
