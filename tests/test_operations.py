"""Operating lrproxy (SPEC §6, issue 7): reload and drain under load from the OpenAI SDK, and
the CLI's exit codes, against `python -m lrproxy` as a real process."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
from procs import (
    BROKEN_KEY,
    CLIENT_KEY,
    MODEL,
    Notify,
    Proxy,
    SimThread,
    broken_toml,
    chat_request_bytes,
    child_env,
    config_toml,
    free_port,
    http_get,
    port_refuses,
    queued_requests,
    status_lines,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from lrproxy import __version__

LRPROXY = [sys.executable, "-m", "lrproxy"]
MESSAGES = [{"role": "user", "content": "hello"}]


def _client(port: int) -> openai.OpenAI:
    # max_retries=0: a retry by the SDK would hide a lost request.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                         max_retries=0, timeout=20)


def _stream(client: openai.OpenAI, sim: dict[str, Any]) -> float:
    """A streamed answer read to its end; its grid intensity (the config it ran on)."""
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_body={"sim": sim}))  # type: ignore[arg-type]
    last = chunks[-1]
    assert last.choices and last.choices[0].finish_reason == "stop", last
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == sim["chunks"]
    return float(last.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"])  # type: ignore[index]


def _plain(client: openai.OpenAI, sim: dict[str, Any]) -> float:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                       extra_body={"sim": sim})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content
    return float(r.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"])  # type: ignore[index]


class _Runner(threading.Thread):
    """Runs one call in a thread; keeps its result or its exception and when it ended."""

    def __init__(self, fn: Any, *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended = 0.0

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # the test looks at it
            self.error = e
        self.ended = time.monotonic()

    def outcome(self, timeout: float) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the request did not end in time"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------------------------
# reload under load


def test_reload_under_load_loses_nothing(tmp_path: Path, sim: SimThread) -> None:
    """SDK streams and plain requests across a good and a bad SIGHUP all end in full."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  env=child_env(NOTIFY_SOCKET=str(notify.path)))
    results: list[tuple[str, float, float, float]] = []  # kind, intensity, began, ended
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(i: int) -> None:
        with _client(port) as client:
            for n in range(40):  # bounded: about 6 s at most
                if stop.is_set():
                    return
                began = time.monotonic()
                try:
                    if (i + n) % 2:
                        value = _stream(client, {"chunks": 5, "chunk_delay_s": 0.02})
                        kind = "stream"
                    else:
                        value = _plain(client, {"headers_delay_s": 0.05})
                        kind = "plain"
                except BaseException as e:
                    with lock:
                        failures.append(e)
                    return
                with lock:
                    results.append((kind, value, began, time.monotonic()))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    try:
        notify.wait_for("READY", 20)
        port = proxy.wait_port()  # (for `load` too: its threads start below)
        for t in threads:
            t.start()
        # One long stream that begins before the reload and ends after it.
        with _client(port) as long_client:
            long = _Runner(_stream, long_client, {"chunks": 10, "chunk_delay_s": 0.1})
            long.start()
            wait_for(lambda: len(results) >= 8 or failures, 10, "load to run")

            cfg.write_text(config_toml(sim.base_url, 0, intensity=200))
            t_hup = time.monotonic()
            proxy.signal(signal.SIGHUP)
            notify.wait_for("RELOADING", 5)
            notify.wait_for("READY", 5)
            t_new = time.monotonic()
            n_good = len(results)
            wait_for(lambda: len(results) >= n_good + 8 or failures, 10, "load after the reload")

            cfg.write_text(broken_toml(sim.base_url, 0))
            proxy.signal(signal.SIGHUP)
            notify.wait_for("RELOADING", 5)
            notify.wait_for("READY", 5)
            n_bad = len(results)
            wait_for(lambda: len(results) >= n_bad + 8 or failures, 10, "load after the bad reload")
            stop.set()
            for t in threads:
                t.join(15)
            assert not any(t.is_alive() for t in threads)
            assert long.outcome(10) in (100, 200)  # in full; which config: see the next test

        assert not failures, failures
        assert {r[0] for r in results} == {"stream", "plain"}
        assert all(v == 100 for _, v, _, ended in results if ended < t_hup)
        # Begun after the good reload: its config, the refused one changed nothing.
        assert all(v == 200 for _, v, began, _ in results if began > t_new)
        assert sum(1 for r in results if r[2] > t_new) >= 8
        refused = [ln for ln in proxy.stderr.splitlines() if BROKEN_KEY in ln]
        assert len(refused) == 1 and "lrproxy.toml" in refused[0]

        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
        access = [json.loads(ln) for ln in proxy.stdout.splitlines() if ln.strip()]
        chats = [a for a in access if a.get("model") == MODEL]
        assert len(chats) == len(results) + 1  # + the long stream
        assert all(a["status"] == 200 for a in chats)
    finally:
        stop.set()
        proxy.stop()
        notify.close()


def test_stream_in_flight_finishes_on_its_config(tmp_path: Path, sim: SimThread) -> None:
    """A stream in flight across a reload that renames its region ends in full, on its old config."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        with _client(port) as client:
            chunks = iter(client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                extra_body={"sim": {"chunks": 5, "chunk_delay_s": 0.15}}))
            first = next(chunks)
            cfg.write_text(config_toml(sim.base_url, 0, intensity=200).replace("r1", "r2"))
            proxy.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in proxy.stderr, 5, "the reload")
            upstream = [r for r in list(sim.sim.requests) if r.path.endswith("/chat/completions")]
            assert upstream[-1].finished_at is None  # the reload came while it streamed
            rest = list(chunks)
        assert first.choices[0].delta.role == "assistant"
        last = rest[-1]
        assert last.choices[0].finish_reason == "stop"
        lr = last.model_extra["lowrouter"]  # type: ignore[index]
        assert lr["route"]["region"] == "r1"
        assert lr["eco"]["grid_intensity_g_per_kwh"] == 100
    finally:
        proxy.stop()


def test_request_in_flight_across_a_reload_that_renames_its_upstream(
    tmp_path: Path, sim: SimThread
) -> None:
    """A request whose body is still arriving when a reload renames its only upstream is
    answered on the config it began with (SPEC §6), not with a 500."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        body = json.dumps({"model": MODEL, "messages": MESSAGES}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.putrequest("POST", "/api/v1/chat/completions")
        for k, v in {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json",
                     "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders(body[:10])  # the headers and a first piece of the body
        time.sleep(0.2)
        cfg.write_text(config_toml(sim.base_url, 0).replace('name = "sim"', 'name = "sim2"'))
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in proxy.stderr, 5, "the reload")
        conn.send(body[10:])
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        assert resp.status == 200, doc
        assert resp.headers["X-LowRouter-Upstream"] == "sim"
        assert doc["lowrouter"]["route"]["upstream"] == "sim"
        assert _upstream_of_a_request(port) == "sim2"  # the next request: the new config
        assert "Traceback" not in proxy.stderr
    finally:
        proxy.stop()


def _upstream_of_a_request(port: int) -> str:
    """X-LowRouter-Upstream of a plain SDK request to lrproxy on `port`."""
    with _client(port) as client:
        r = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        return str(r.headers["X-LowRouter-Upstream"])


def _with_ca_file(toml: str, ca: Path) -> str:
    """procs.config_toml's text with `ca_file` in its upstream's table."""
    return toml.replace("\n[auto]", f'ca_file = "{ca}"\n\n[auto]', 1)


def test_bad_ca_file_is_a_config_problem_at_start_and_reload(tmp_path: Path, sim: SimThread) -> None:
    """A ca_file that cannot be loaded: check-config and serve exit 78 with one line naming
    the key; a reload to it is refused and the old config keeps serving (SPEC §4, §6)."""
    bad_pem = tmp_path / "not-a-ca.pem"
    bad_pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    good = config_toml(sim.base_url, 0)
    for ca, why in ((tmp_path / "missing.pem", "No such file or directory"), (bad_pem, "")):
        bad = tmp_path / "bad.toml"
        bad.write_text(_with_ca_file(good, ca))
        for args in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
            r = _run(*args)
            assert r.returncode == 78, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1, r.stderr
            assert "bad.toml: upstreams[0].ca_file: cannot load" in lines[0] and why in lines[0]
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(good)
    proxy = Proxy(["serve", "--config", str(cfg), "--log-format", "plain"], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        cfg.write_text(_with_ca_file(good.replace('name = "sim"', 'name = "sim2"'),
                                     tmp_path / "missing.pem"))
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in proxy.stderr, 5, "the refusal")
        refused = [ln for ln in proxy.stderr.splitlines() if "reload refused" in ln]
        assert len(refused) == 1 and "upstreams[0].ca_file" in refused[0], proxy.stderr
        assert _upstream_of_a_request(port) == "sim"
        assert "Traceback" not in proxy.stderr
    finally:
        proxy.stop()


def test_reload_names_what_waits_for_a_restart(tmp_path: Path, sim: SimThread) -> None:
    """A reload that changes settings a running process cannot change (its sockets, the
    upstream session's proxy settings, the header timer) says which, and keeps them."""
    cfg = tmp_path / "lrproxy.toml"
    good = config_toml(sim.base_url, 0)
    cfg.write_text(good)
    proxy = Proxy(["serve", "--config", str(cfg), "--log-format", "plain"], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        cfg.write_text(good.replace("[server]\n", "[server]\ntrust_env = true\n").replace(
            "[timeouts]\n", "[timeouts]\nclient_header = 3\n"))
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in proxy.stderr, 5, "the reload")
        kept = [ln for ln in proxy.stderr.splitlines() if "kept until a restart" in ln]
        assert len(kept) == 1, proxy.stderr
        assert kept[0].endswith("server.trust_env, timeouts.client_header"), kept[0]
        assert _upstream_of_a_request(port) == "sim"
        # Back to what runs: nothing to wait for (compared with the start, not the last)
        cfg.write_text(good)
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: proxy.stderr.count("config reloaded") == 2, 5, "the second reload")
        assert proxy.stderr.count("kept until a restart") == 1, proxy.stderr
    finally:
        proxy.stop()


def _reloads(mport: int) -> dict[str, float] | None:
    """lrproxy_config_reloads_total by result, from /metrics; None while it is not served."""
    try:
        status, body = http_get(mport, "/metrics")
    except OSError:
        return None
    assert status == 200
    return {s.labels["result"]: s.value for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name == "lrproxy_config_reloads_total"}


def test_good_reload_is_counted_ok(tmp_path: Path, sim: SimThread) -> None:
    """A good SIGHUP reload adds one to lrproxy_config_reloads_total{result="ok"} and
    leaves result="error" at 0 (SPEC §5, §6): a reload alert must not see it as failed."""
    cfg = tmp_path / "lrproxy.toml"
    extra = 'metrics_listen = "127.0.0.1:0"\n'
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100, extra_server=extra))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        proxy.wait_healthy()
        mport = proxy.metrics_port()
        assert wait_for(lambda: _reloads(mport), 5, "/metrics") == {"ok": 0.0, "error": 0.0}
        cfg.write_text(config_toml(sim.base_url, 0, intensity=200, extra_server=extra))
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in proxy.stderr, 5, "the reload")
        assert _reloads(mport) == {"ok": 1.0, "error": 0.0}
    finally:
        proxy.stop()


def test_reload_reads_the_feeds_it_names_at_once(tmp_path: Path, sim: SimThread) -> None:
    """A reload that gives a region a feed: the next request's eco has its reading,
    without waiting for the poller's next pass (5 s)."""
    import datetime as dt

    cfg = tmp_path / "lrproxy.toml"
    good = config_toml(sim.base_url, 0, intensity=100)
    cfg.write_text(good)
    feed = tmp_path / "r1.json"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    feed.write_text(json.dumps({"zone": "FR", "carbonIntensity": 42, "datetime": now}))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        with _client(port) as client:
            assert _plain(client, {}) == 100
            cfg.write_text(good.replace("pue = 1.0\n", f'pue = 1.0\nintensity_feed = "{feed}"\n'))
            proxy.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in proxy.stderr, 5, "the reload")
            assert _plain(client, {}) == 42
    finally:
        proxy.stop()


def test_auto_without_auto_models_is_404_and_logged(tmp_path: Path, sim: SimThread) -> None:
    """No [auto] section: lowrouter/auto is a 404 the SDK raises as NotFoundError (not a 503
    to retry for ever), and the start says so."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, auto=False))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        with _client(port) as client, pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="lowrouter/auto", messages=MESSAGES)  # type: ignore[arg-type]
        assert "no [auto] models" in info.value.message
        warned = [ln for ln in proxy.stderr.splitlines() if "no [auto] models" in ln]
        assert len(warned) == 1 and '"level":"warning"' in warned[0]
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------------------
# drain on SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_sigterm_drains_requests_in_flight(tmp_path: Path, sim: SimThread,
                                           sig: signal.Signals) -> None:
    """SIGTERM, or SIGINT (SPEC §6: the same): new connections refused, requests in
    flight finish, then exit 0; a request begun on a kept-alive connection after the
    signal is not run: 503 shutting_down at once, and the connection closes."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    kept = http.client.HTTPConnection("127.0.0.1", 0, timeout=15)  # its port once known
    try:
        kept.port = port = proxy.wait_port()
        proxy.wait_healthy()
        status, headers, _ = _raw_post(kept, {})
        assert status == 200 and headers.get("Connection") != "close"  # kept alive
        with _client(port) as c1, _client(port) as c2:
            before = sim.chat_requests()
            stream = _Runner(_stream, c1, {"chunks": 10, "chunk_delay_s": 0.15})  # ~1.5 s
            plain = _Runner(_plain, c2, {"headers_delay_s": 1.0})
            stream.start()
            plain.start()
            wait_for(lambda: sim.chat_requests() >= before + 2, 5, "both requests upstream")
            t_sig = time.monotonic()
            proxy.signal(sig)
            wait_for(lambda: port_refuses(port), 2, "the listener to close")
            assert proxy.proc.poll() is None  # still draining
            assert not stream.ended and not plain.ended
            # Sent during the drain on the kept-alive connection: new work, not run (it
            # kept the drain going, and a stream begun so could be cut at
            # shutdown_grace_s); the client is told to go elsewhere.
            upstream = sim.chat_requests()
            status, headers, doc = _raw_post(kept, {"headers_delay_s": 2.0})
            assert status == 503, doc
            assert doc["error"]["code"] == "shutting_down"
            assert headers.get("Retry-After") == "1"
            assert headers.get("Connection") == "close"
            assert not stream.ended and sim.chat_requests() == upstream
            assert stream.outcome(10) == 100
            assert plain.outcome(10) == 100
            assert stream.ended - t_sig > 0.8  # it really was in flight across the signal
        assert proxy.wait(10) == 0
        # the two, and the late one when it came within the drain's first 20 ms
        assert re.search(r"draining [23] request\(s\)", proxy.stderr)
        assert "shutdown_grace_s over" not in proxy.stderr
    finally:
        kept.close()
        proxy.stop()


def _healthy(tmp_path: Path, sim: SimThread, *args: str) -> Proxy:
    """`lrproxy serve --no-access-log ARGS` on port 0 in front of `sim`, healthy (its
    `port`, the one it bound)."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log", *args], tmp_path)
    try:
        proxy.wait_healthy()
    except BaseException:
        proxy.stop()
        raise
    return proxy


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_sigterm_answers_the_connections_queued_before_it(
    tmp_path: Path, sim: SimThread, loop: str
) -> None:
    """Connections the kernel had accepted when SIGTERM came, each with its request
    written, but not yet taken by the proxy (its loop busy: SIGSTOP here): each is
    answered. Closing the listening socket over them would reset them, and their
    clients could not tell whether their POST was acted on. (asyncio's loop takes them
    all in the turn that sees the signal, before their bytes are read: they are waited
    for as requests in flight.)"""
    proxy = _healthy(tmp_path, sim, f"--loop={loop}")
    port = proxy.port
    assert port is not None
    try:
        proxy.signal(signal.SIGSTOP)
        try:
            socks = queued_requests(port, 8)
            proxy.signal(signal.SIGTERM)
            time.sleep(0.2)
        finally:
            proxy.signal(signal.SIGCONT)
        assert status_lines(socks) == [b"HTTP/1.1 200 OK"] * 8
        assert proxy.wait(10) == 0
        assert port_refuses(port)
    finally:
        proxy.stop()


def test_sigterm_lets_a_json_answer_being_written_finish(tmp_path: Path, sim: SimThread) -> None:
    """A JSON answer of ~6 MB (more than the kernel's buffers hold) that a slow client
    is still reading when SIGTERM comes (its handler has returned; aiohttp writes it
    after) arrives whole, within shutdown_grace_s, not cut when the server shuts its
    connections a second later."""
    proxy = _healthy(tmp_path, sim)
    port = proxy.port
    assert port is not None
    try:
        body = json.dumps({"model": MODEL, "messages": MESSAGES,
                           "sim": {"chunks": 1_000_000}}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(30)
        with sock:
            sock.sendall(chat_request_bytes(body))
            got = sock.recv(16384)
            proxy.signal(signal.SIGTERM)  # the answer is being written
            # Not read for a while: the kernel's buffers (up to ~4 MB) must not hold what
            # is left when the server's 1 s shutdown comes (a mutation audit found the
            # test passing without the wait for answers being written, among others)
            time.sleep(1.5)
            while data := sock.recv(16384):
                got += data
                time.sleep(0.01)  # ~1.6 MB/s: past the server's 1 s shutdown
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length is not None and len(rest) == int(length[1]) > 5_000_000
        assert json.loads(rest)["choices"][0]["finish_reason"] == "stop"
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()


def test_sigterm_waits_for_a_request_whose_headers_are_coming(tmp_path: Path, sim: SimThread) -> None:
    """A request half sent when SIGTERM comes (its headers still coming, as from a slow
    link) is in flight too: its connection stays open within shutdown_grace_s, and the
    request, once whole, is answered before the exit."""
    proxy = _healthy(tmp_path, sim)
    port = proxy.port
    assert port is not None
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        raw = chat_request_bytes()
        sock.sendall(raw[:40])
        time.sleep(0.2)  # its first bytes read: a request arriving
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: port_refuses(port), 2, "the listener to close")
        time.sleep(0.3)
        assert proxy.proc.poll() is None  # waiting for it
        sock.sendall(raw[40:])
        assert status_lines([sock]) == [b"HTTP/1.1 200 OK"]
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()


def test_sigterm_waits_for_the_request_of_a_connection_just_made(
    tmp_path: Path, sim: SimThread
) -> None:
    """A connection taken just before SIGTERM whose request has not yet come (its client
    connected, and sends a moment later: a loaded host, a slow link) is in flight too:
    its request is answered, not reset by the close as the drain, with nothing else in
    flight, ends at once. (Under connection churn dozens were reset at each stop.)"""
    proxy = _healthy(tmp_path, sim)
    port = proxy.port
    assert port is not None
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        time.sleep(0.1)  # taken by the proxy
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: port_refuses(port), 2, "the listener to close")
        time.sleep(0.4)
        sock.sendall(chat_request_bytes())
        assert status_lines([sock]) == [b"HTTP/1.1 200 OK"]
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()


def _raw_post(conn: http.client.HTTPConnection, sim: dict[str, Any]) -> tuple[int, Any, Any]:
    """A plain chat request on `conn` (kept alive): status, headers, JSON body."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "sim": sim})
    conn.request("POST", "/api/v1/chat/completions", body=body, headers={
        "Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.headers, json.loads(resp.read())


def _raw_stream(port: int, sim: dict[str, Any]) -> bytes:
    """POST a streamed chat request and read the whole body; IncompleteRead if it is cut."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True, "sim": sim})
        conn.request("POST", "/api/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def _serving(tmp_path: Path, sim: SimThread, args: Sequence[str] = (),
             **toml: Any) -> Proxy:
    """`lrproxy serve` (not yet healthy) in front of `sim` on port 0, with
    `config_toml(..., **toml)` and the extra `args` (`wait_healthy` learns its port)."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, **toml))
    return Proxy(["serve", "--config", str(cfg), *args], tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_stopping_changes_no_exit_status(
    tmp_path: Path, sim: SimThread, workers: int
) -> None:
    """A SIGHUP that comes as the proxy stops (a reload script, `systemctl reload` racing
    a stop) reloads nothing and does not end it with 129: SIGTERM still exits 0."""
    proxy = _serving(tmp_path, sim, ["--no-access-log"], grace=1,
                     extra_server=f"workers = {workers}\n" if workers > 1 else "")
    try:
        proxy.wait_healthy()
        if workers > 1:
            wait_for(lambda: proxy.stderr.count("listening on") == workers, 30, "workers")
        proxy.signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while proxy.proc.poll() is None and time.monotonic() < end:
            with contextlib.suppress(ProcessLookupError):
                proxy.signal(signal.SIGHUP)
            time.sleep(0.0005)
        assert proxy.wait(1) == 0
        assert "reload refused" not in proxy.stderr
    finally:
        proxy.stop()


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_starting_is_a_reload_once_it_serves(
    tmp_path: Path, sim: SimThread, workers: int
) -> None:
    """A SIGHUP while `serve` starts (a config tool's `kill -HUP`, a logrotate hook; not
    `systemctl reload`, which waits for READY=1) used to end it with 129, without a word:
    it is now noted and done once it serves, after its READY=1, so the file as it is
    then is in force."""
    # fixed: the API's port is checked to be refused while it starts, before its start line
    port = free_port()
    cfg = tmp_path / "lrproxy.toml"
    extra = 'metrics_listen = "127.0.0.1:0"\n' + (
        f"workers = {workers}\n" if workers > 1 else "")
    cfg.write_text(config_toml(sim.base_url, port, intensity=100, extra_server=extra))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path,
                  env=child_env(NOTIFY_SOCKET=notify.path), port=port)
    try:
        wait_for(lambda: proxy.proc.poll() is not None or _catches(proxy.pid, signal.SIGHUP),
                 15, "a SIGHUP handler", step=0.002)
        assert port_refuses(port) and not proxy.stderr, "no longer in its start"
        proxy.signal(signal.SIGHUP)
        assert [notify.wait_for(k, 30)[k] for k in ("READY", "RELOADING", "READY")] == ["1"] * 3
        mport = proxy.metrics_port()
        assert wait_for(lambda: _reloads(mport), 5, "/metrics") == {"ok": workers, "error": 0}
        assert "SIGHUP came while starting" in proxy.stderr
        cfg.write_text(config_toml(sim.base_url, port, intensity=200, extra_server=extra))
        proxy.signal(signal.SIGHUP)  # and the next ones are reloads as ever
        assert [notify.wait_for(k, 30)[k] for k in ("RELOADING", "READY")] == ["1"] * 2
        wait_for(lambda: _reloads(mport) == {"ok": 2 * workers, "error": 0}, 10, "reloads")
        assert _plain(_client(port), {}) == 200
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(20) == 0, proxy.stderr
    finally:
        proxy.stop()
        notify.close()


def test_sighup_while_the_demo_starts_stops_it(tmp_path: Path) -> None:
    """--demo takes SIGHUP as its terminal's hangup, also while it starts: it stops,
    says so and exits 0 (it used to die with 129, without a word)."""
    port = free_port()  # fixed: checked to be refused while it starts, before its start line
    proxy = Proxy(["serve", "--demo", "--listen", f"127.0.0.1:{port}"], tmp_path, port=port)
    try:
        wait_for(lambda: proxy.proc.poll() is not None or _catches(proxy.pid, signal.SIGHUP),
                 15, "a SIGHUP handler", step=0.002)
        assert port_refuses(port), "no longer in its start"
        proxy.signal(signal.SIGHUP)
        assert proxy.wait(20) == 0, proxy.stderr
        assert "SIGHUP: --demo reads no config file to reload; stopping" in proxy.stderr
    finally:
        proxy.stop()


def test_the_lrproxy_command_catches_signals_before_its_imports() -> None:
    """The installed `lrproxy` command (what the unit runs) enters through __main__,
    whose handlers come before the slow imports, as `python -m lrproxy` does."""
    import importlib.metadata

    import lrproxy.__main__

    [ep] = importlib.metadata.entry_points(group="console_scripts", name="lrproxy")
    assert ep.load() is lrproxy.__main__.main


def test_drain_deadline_answers_waiting_requests_with_503(tmp_path: Path, sim: SimThread) -> None:
    """Past shutdown_grace_s a request whose upstream has not answered yet, JSON or a
    stream before its first event, gets 503 shutting_down with Retry-After, never a cut
    connection, and is counted so (SPEC §6)."""
    proxy = _serving(tmp_path, sim, grace=0.5)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        late = {"headers_delay_s": 5}
        with _client(port) as client:
            before = sim.chat_requests()
            plain = _Runner(_plain, client, late)
            stream = _Runner(_stream, client, {**late, "chunks": 2})
            plain.start()
            stream.start()
            wait_for(lambda: sim.chat_requests() >= before + 2, 5, "both upstream")
            proxy.signal(signal.SIGTERM)
            assert proxy.wait(4) == 0
            for runner in (plain, stream):
                with pytest.raises(openai.APIStatusError) as info:
                    runner.outcome(5)
                assert info.value.status_code == 503
                assert info.value.response.headers["Retry-After"] == "1"
                assert isinstance(info.value.body, dict)
                assert info.value.body["code"] == "shutting_down"
        lines = [json.loads(line) for line in proxy.stdout.splitlines() if '"status"' in line]
        assert [x["status"] for x in lines if x.get("error") == "shutting_down"] == [503, 503]
    finally:
        proxy.stop()


def test_drain_deadline_ends_streams_with_error_event(tmp_path: Path, sim: SimThread) -> None:
    """Past shutdown_grace_s an open stream gets the §1.1 error event (SDK APIError), no cut."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=0.5))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        slow = {"chunks": 10, "chunk_delay_s": 0.5}  # ~5 s
        with _client(port) as client:
            before = sim.chat_requests()
            sdk = _Runner(_stream, client, slow)
            raw = _Runner(_raw_stream, port, slow)
            sdk.start()
            raw.start()
            wait_for(lambda: sim.chat_requests() >= before + 2, 5, "both streams upstream")
            time.sleep(0.2)  # a few chunks on the way
            t_sig = time.monotonic()
            proxy.signal(signal.SIGTERM)
            assert proxy.wait(4) == 0
            assert time.monotonic() - t_sig < 4

            with pytest.raises(openai.APIError) as info:
                sdk.outcome(5)
            assert not isinstance(info.value, openai.APIConnectionError)
            assert isinstance(info.value.body, dict) and info.value.body["code"] == "shutting_down"

            data = raw.outcome(5)  # read to a clean end of the chunked body
            events = [e for e in data.decode().split("\n\n") if e.strip()]
            assert all(e.startswith("data: ") for e in events)
            assert "[DONE]" not in data.decode()
            last = json.loads(events[-1].removeprefix("data: "))
            assert last["error"]["code"] == "shutting_down"
            assert {"message", "type", "code"} <= set(last["error"])
            assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
            assert last["lowrouter"]["eco"]["tokens"]["completion"] >= 1
            assert len(events) >= 3  # role chunk and content came before it
        assert "shutdown_grace_s over" in proxy.stderr
    finally:
        proxy.stop()


def test_drain_deadline_answers_the_next_request_on_a_streams_connection(
    tmp_path: Path, sim: SimThread
) -> None:
    """A stream ended by shutdown_grace_s (its §1.1 error event) on a kept-alive
    connection: the request its client sends on that connection at once (its 200
    promised no close) gets 503 shutting_down, not a reset or a close with no answer."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=1))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True,
                           "sim": {"chunks": 40, "chunk_delay_s": 0.1}}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(chat_request_bytes(body).replace(b"Connection: close\r\n", b""))
            got = sock.recv(65536)
            proxy.signal(signal.SIGTERM)
            while not got.endswith(b"\r\n0\r\n\r\n"):  # the stream's whole body
                data = sock.recv(65536)
                assert data, got
                got += data
            assert b'"code":"shutting_down"' in got and b"[DONE]" not in got
            sock.sendall(chat_request_bytes())  # its next request, at once
            assert status_lines([sock]) == [b"HTTP/1.1 503 Service Unavailable"]
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()


def test_drain_deadline_during_a_keepalive_commit(tmp_path: Path, sim: SimThread) -> None:
    """A stream committed with keep-alives while its upstream still holds its headers: past
    shutdown_grace_s it gets the shutting_down error event too, never a second status line."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, grace=0.6).replace(
        "idle = 20", "idle = 20\nkeepalive = 0.2"))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        before = sim.chat_requests()
        raw = _Runner(_raw_stream, port, {"headers_delay_s": 10})
        raw.start()
        wait_for(lambda: sim.chat_requests() > before, 5, "the stream upstream")
        time.sleep(0.5)  # committed, a keep-alive or two sent
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(5) == 0
        events = [e for e in raw.outcome(5).decode().split("\n\n") if e.strip()]
        assert events[0] == ": keep-alive" and "HTTP/1.1" not in "".join(events)
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "shutting_down"
        assert "eco" in last["lowrouter"]
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------------------
# the access log


def test_access_lines_are_gathered_and_written_by_the_flush_and_at_exit(
    tmp_path: Path, sim: SimThread
) -> None:
    """Access lines wait for --access-log-flush-ms and go out whole; those still waiting
    at SIGTERM are written before the exit, one valid JSON line per request."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    (tmp_path / "slow").mkdir()
    (tmp_path / "fast").mkdir()
    slow = Proxy(["serve", "--config", str(cfg), "--access-log-flush-ms=600000"],
                 tmp_path / "slow")
    try:
        port = slow.wait_port()
        slow.wait_healthy()
        with _client(port) as client:
            for _ in range(5):
                _plain(client, {})
        time.sleep(0.5)
        assert slow.stdout == ""  # gathered: nothing written yet
        slow.signal(signal.SIGTERM)
        assert slow.wait(10) == 0
        lines = [json.loads(ln) for ln in slow.stdout.splitlines()]
        assert [a["model"] for a in lines if a["status"] == 200] == [MODEL] * 5
    finally:
        slow.stop()
    cfg.write_text(config_toml(sim.base_url, 0))
    fast = Proxy(["serve", "--config", str(cfg), "--access-log-flush-ms=50"],
                 tmp_path / "fast")
    try:
        port = fast.wait_port()
        fast.wait_healthy()
        with _client(port) as client:
            for _ in range(40):  # ~14 KiB of lines: written in pieces of whole lines
                _plain(client, {})
        wait_for(lambda: fast.stdout.count("\n") >= 40, 5, "the flush")
        assert all(json.loads(ln)["request_id"] for ln in fast.stdout.splitlines())
    finally:
        fast.stop()


def test_a_log_file_emptied_by_copytruncate_gets_no_hole(tmp_path: Path, sim: SimThread) -> None:
    """`serve > file 2> file` (no O_APPEND) and logrotate's `copytruncate`, the rotation
    for a program with no log file to reopen: the lines after the truncation begin the
    file. They used to land at the old offset, after a hole of NUL bytes as long as what
    was rotated away (`grep` then calls the file binary). stderr the same."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg), "--access-log-flush-ms=5"], tmp_path)
    try:
        proxy.wait_healthy()
        with _client(proxy.port) as client:  # type: ignore[arg-type]
            for _ in range(5):
                _plain(client, {})
            wait_for(lambda: proxy.stdout.count("\n") >= 5, 5, "the first lines")
            os.truncate(proxy.out_path, 0)
            os.truncate(proxy.err_path, 0)
            _plain(client, {})
            wait_for(lambda: proxy.out_path.stat().st_size > 0, 5, "a line after the truncation")
        proxy.signal(signal.SIGUSR1)  # (a line on stderr: ignored, with a warning)
        wait_for(lambda: proxy.err_path.stat().st_size > 0, 5, "a stderr line")
        out, err = proxy.out_path.read_bytes(), proxy.err_path.read_bytes()
        assert b"\0" not in out and json.loads(out.splitlines()[0])["status"] == 200, out[:80]
        assert b"\0" not in err and b"SIGUSR1 ignored" in err, err[:80]
    finally:
        proxy.stop()


def test_a_stdout_nobody_reads_holds_up_no_request(tmp_path: Path, sim: SimThread) -> None:
    """A stdout whose reader stalls (a pipe nobody reads: `| less` on its first page, a
    harness that never reads, a journald that is behind) holds up the access log's
    writer only: requests are answered, and at SIGTERM the proxy exits after a second's
    wait, saying how many lines stdout did not take. Every line is whole and counted."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    r, w = os.pipe()  # 64 KiB: the lines of ~170 requests
    proxy = Proxy(["serve", "--config", str(cfg), "--access-log-flush-ms=5"], tmp_path, stdout=w)
    os.close(w)
    n = 600
    try:
        proxy.wait_healthy()
        with _client(proxy.port) as client:  # type: ignore[arg-type]
            for _ in range(n):
                _plain(client, {})
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()
        with os.fdopen(r, "rb") as pipe:
            out = pipe.read()  # the proxy has exited: up to its end
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert 0 < len(lines) < n and all(a["status"] == 200 for a in lines)
    dropped = [int(k) for k in re.findall(r"access log: (\d+) lines dropped", proxy.stderr)]
    assert len(lines) + sum(dropped) == n, (len(lines), dropped)


def test_a_closed_stdout_is_no_crash(tmp_path: Path, sim: SimThread) -> None:
    """`lrproxy serve … >&-`: with stdout closed there is nowhere for access lines, and
    the proxy serves without them (it died at its start, flushing stdout)."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  wrap=["sh", "-c", 'exec "$@" >&-', "sh"])
    try:
        proxy.wait_healthy()
        with _client(proxy.port) as client:  # type: ignore[arg-type]
            _plain(client, {})
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
        assert "Traceback" not in proxy.stderr, proxy.stderr
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_serve_on_either_event_loop(tmp_path: Path, sim: SimThread, loop: str) -> None:
    """`--loop auto` runs on uvloop when it can be imported (it is installed with
    lrproxy), `--loop asyncio` on asyncio's own loop; both serve plain and streamed
    answers, and the start line names the loop."""
    import importlib.util

    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    proxy = Proxy(["serve", "--config", str(cfg), f"--loop={loop}"], tmp_path)
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        with _client(port) as client:
            _plain(client, {})
            _stream(client, {"chunks": 5})
        want = "uvloop" if loop == "auto" and importlib.util.find_spec("uvloop") else "asyncio"
        start = next(json.loads(ln) for ln in proxy.stderr.splitlines() if "listening" in ln)
        assert start["loop"] == want and f"({want})" in start["msg"]
    finally:
        proxy.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_listen_option_overrides_the_configs(tmp_path: Path, sim: SimThread, workers: int) -> None:
    """`serve --config FILE --listen HOST:PORT` (SPEC §6) serves on the option's address,
    not the file's `server.listen`, with one process and with workers."""
    port = free_port()  # the file's: fixed, as it must be found refused
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, port, extra_server=(
        f"workers = {workers}\n" if workers > 1 else "")))
    proxy = Proxy(["serve", "--config", str(cfg), "--listen", "127.0.0.1:0"], tmp_path)
    try:
        other = proxy.wait_port()
        proxy.wait_healthy()
        assert _plain(_client(other), {}) == 100
        assert port_refuses(port)
    finally:
        proxy.stop()


def test_loop_uvloop_without_uvloop_is_a_usage_error(tmp_path: Path) -> None:
    """`--loop uvloop` where uvloop cannot be imported: exit 64 (EX_USAGE) saying so."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml("http://127.0.0.1:9/v1", 0))
    r = subprocess.run([*LRPROXY, "serve", "--config", str(cfg), "--loop", "uvloop"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                       env=child_env(PYTHONPATH=str(hide)))
    assert r.returncode == 64, r.stderr
    assert "--loop uvloop: uvloop is not installed" in r.stderr


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LRPROXY, *args], capture_output=True, text=True, timeout=30,
                          cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("taken", ["listen", "metrics_listen"])
def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, taken: str) -> None:
    """The API or the /metrics address already in use: one `cannot listen on` line naming
    it, exit 1, no traceback and no unclosed session, whichever of the two it is."""
    with socket.socket() as holder:  # the taken port: the holder's, on port 0; the other, 0
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        port, mport = (busy, 0) if taken == "listen" else (0, busy)
        cfg = tmp_path / "lrproxy.toml"
        cfg.write_text(config_toml("http://127.0.0.1:9/v1", port,
                                   extra_server=f'metrics_listen = "127.0.0.1:{mport}"\n'))
        r = _run("serve", "--config", str(cfg), "--log-format", "plain", "--no-access-log")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{busy}"), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_listen_and_metrics_listen_on_one_address_is_refused(tmp_path: Path) -> None:
    """--metrics-listen equal to the API address is a usage error (64), not a crash."""
    port = free_port()  # a real one, as port 0 twice is two ports; nothing binds it
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml("http://127.0.0.1:9/v1", port))
    r = _run("serve", "--config", str(cfg), "--metrics-listen", f"127.0.0.1:{port}")
    assert r.returncode == 64, r.stderr
    assert r.stderr == ("lrproxy serve: --listen/--metrics-listen: the API and /metrics need "
                        f"different addresses (both 127.0.0.1:{port})\n")


def test_check_config_broken_exits_78(tmp_path: Path) -> None:
    """`lrproxy check-config` exits 78 with one line naming file and key; 0 on a good file."""
    bad = tmp_path / "bad.toml"
    bad.write_text(broken_toml("http://127.0.0.1:9/v1", 8080))
    r = _run("check-config", str(bad))
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.toml" in lines[0] and BROKEN_KEY in lines[0], r.stderr
    good = tmp_path / "good.toml"
    good.write_text(config_toml("http://127.0.0.1:9/v1", 8080))
    r = _run("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_version() -> None:
    """`lrproxy --version` prints the package's version and exits 0."""
    r = _run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"lrproxy {__version__}"


def test_serve_missing_config_exits_78(tmp_path: Path) -> None:
    """`lrproxy serve --config missing.toml` exits 78 with one line on stderr."""
    r = _run("serve", "--config", "missing.toml", cwd=tmp_path)
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.toml" in lines[0], r.stderr
    assert r.stdout == ""


def test_reload_rereads_upstream_key_files(make_stack: Any, tmp_path: Path) -> None:
    """An upstream key in api_key_file is read again on reload: the next request carries the new key."""
    from conftest import ENVIRON, UPSTREAM_KEYS

    from lrproxy.config import parse_config, resolve_secrets

    key_file = tmp_path / "eu-west-a.key"
    key_file.write_text(UPSTREAM_KEYS["eu-west-a"] + "\n")

    def mutate(d: dict[str, Any]) -> None:
        up = d["upstreams"][0]
        del up["api_key_env"]
        up["api_key_file"] = str(key_file)

    stack = make_stack(mutate)
    ask = lambda: stack.client().chat.completions.create(  # noqa: E731
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_body={"route": {"region": "eu-west"}},
    )
    ask()
    seen = [r.headers.get("Authorization") for r in stack.requests_to("eu-west-a")]
    assert seen[-1] == f"Bearer {UPSTREAM_KEYS['eu-west-a']}"
    key_file.write_text("  rotated-key-0042 \n")
    config = parse_config(stack.data, source="test")
    stack.call(lambda: stack.runtime.install(config, resolve_secrets(config, ENVIRON)))
    stack.sims["eu-west-a"].api_key = "rotated-key-0042"
    ask()
    seen = [r.headers.get("Authorization") for r in stack.requests_to("eu-west-a")]
    assert seen[-1] == "Bearer rotated-key-0042"


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_listener_has_the_header_deadline(
    tmp_path: Path, sim: SimThread, workers: int
) -> None:
    """The /metrics listener's connections have the API's header deadline
    (timeouts.client_header, 408 and closed), as a slowloris on it held one for an hour;
    a scrape is served as before, and a kept-alive scraper's next one too (the first
    version sent it an unasked 408 client_header after the connection opened, which
    real Prometheus took for its answer). One process or the workers' supervisor alike."""
    cfg = tmp_path / "lrproxy.toml"
    extra = 'metrics_listen = "127.0.0.1:0"\n' + (
        f"workers = {workers}\n" if workers > 1 else "")
    cfg.write_text(config_toml(sim.base_url, 0, extra_server=extra).replace(
        "[timeouts]\n", "[timeouts]\nclient_header = 0.5\n"))
    proxy = Proxy(["serve", "--config", str(cfg), "--no-access-log"], tmp_path)
    try:
        proxy.wait_healthy()
        mport = proxy.metrics_port()
        conn = http.client.HTTPConnection("127.0.0.1", mport, timeout=5)
        # a kept-alive scraper's next request, past client_header idle, after a 404 too
        for path, status in (("/nope", 404), ("/metrics", 200), ("/metrics", 200)):
            conn.request("GET", path)
            scrape = conn.getresponse()
            body = scrape.read()
            assert scrape.status == status, (path, body[:200])
            assert status != 200 or b"lrproxy_inflight_requests" in body
            # what it does not serve is said in the OpenAI shape, no versions named
            assert scrape.getheader("Server") == "lrproxy"
            assert re.fullmatch(r"[0-9a-f]{32}", scrape.getheader("X-Request-Id") or "")
            assert status != 404 or json.loads(body)["error"]["code"] == "not_found"
            time.sleep(1.0)
        conn.request("POST", "/metrics", b"", {"X-Request-Id": "scrape-7"})
        refused = conn.getresponse()
        assert refused.getheader("X-Request-Id") == "scrape-7"  # a sane one, echoed
        assert refused.status == 405 and refused.getheader("Server") == "lrproxy"
        assert json.loads(refused.read())["error"]["code"] == "method_not_allowed"
        assert refused.getheader("Allow") == "GET,HEAD"
        conn.close()
        with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and no end of headers
            got = b""
            while data := s.recv(65536):
                got += data
            took = time.monotonic() - t0
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b'"code":"request_timeout"' in got
        assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{32}\r\n", got), got[:300]
        assert 0.4 < took < 3.0
    finally:
        proxy.stop()
