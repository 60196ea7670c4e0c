"""Fault injection (issue 5): misbehaving clients, failing upstreams, limits and residency.

Each test is one case of the README's "Fault cases" table and checks four things: the
status and error code, what the client saw, what the upstream saw (the simulators' or a
scripted upstream's records) and what the metrics counted. The autouse `seen` guard
checks after every test that no client key and no upstream (canary) key appears in any
byte lrproxy wrote to a client socket, in any record of its loggers or in the /metrics
exposition, that no client key reached an upstream, and that nothing was logged as an
error (an unexpected exception).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email.utils
import errno
import gc
import gzip
import hashlib
import http.client
import logging
import re
import select
import socket
import socketserver
import threading
import time
import types
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import attrs
import openai
import orjson
import pytest
from conftest import CI_KEY, TEAM_A_KEY, UPSTREAM_KEYS, Stack, await_for, wait_for
from prometheus_client import generate_latest

from lrproxy import protocol, relay, upstream
from lrproxy.config import Upstream
from lrproxy.log import ACCESS, MAIN, JsonFormatter
from lrproxy.sse import EventSplitter, event_data

MINI = "openai/gpt-4o-mini"  # eu-west-a, eu-west-b (equal carbon, the lowest) and us-east-a
LLAMA = "meta/llama-3.1-8b"  # eu-north-a is its cleanest upstream and eu-north's only one
CHAT = "/api/v1/chat/completions"
MSGS: list[Any] = [{"role": "user", "content": "how windy is it in Aberdeen tonight"}]
EU_WEST = ("eu-west-a", "eu-west-b")
SECRETS = (TEAM_A_KEY, CI_KEY, *UPSTREAM_KEYS.values())
CLIENT_KEYS = (TEAM_A_KEY, CI_KEY)
# All that lrproxy ever sends upstream: it builds the headers, it never copies the client's.
UPSTREAM_HEADERS = {"host", "content-type", "content-length", "accept", "accept-encoding",
                    "user-agent", "x-request-id", "authorization"}

MakeStack = Callable[..., Stack]


# ---------------------------------------------------------------------------------------
# the guard: no key in any answer, log line or metric


@attrs.define
class Seen:
    """Everything that left lrproxy during one test, for the guard's checks."""

    stacks: list[Stack] = attrs.Factory(list)
    scripted: list[Scripted] = attrs.Factory(list)
    wire: list[bytes] = attrs.Factory(list)  # every byte lrproxy wrote to a client socket
    logs: list[str] = attrs.Factory(list)  # every record of its loggers, formatted
    expected_errors: list[str] = attrs.Factory(list)  # log messages a test provokes on purpose
    records: list[logging.LogRecord] = attrs.Factory(list)


class _Capture(logging.Handler):
    def __init__(self, seen: Seen) -> None:
        super().__init__(logging.DEBUG)
        self.seen = seen
        self.fmt = JsonFormatter()
        self.ids: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) in self.ids:  # the access logger propagates to the main one
            return
        self.ids.add(id(record))
        self.seen.records.append(record)
        self.seen.logs.append(self.fmt.format(record))


@pytest.fixture(autouse=True)
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    """Capture lrproxy's logs and client-side bytes; check them after the test."""
    s = Seen()
    cap = _Capture(s)
    levels = {MAIN: logging.DEBUG, ACCESS: logging.DEBUG, "aiohttp": logging.INFO}
    saved = {}
    for name, level in levels.items():
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(level)
        lg.addHandler(cap)
    made = protocol.LimitsHandler.connection_made

    def connection_made(self: protocol.LimitsHandler, transport: Any) -> None:
        write, writelines = transport.write, transport.writelines

        def tee(data: bytes) -> None:
            s.wire.append(bytes(data))
            write(data)

        def tee_lines(lines: Any) -> None:
            lines = list(lines)
            s.wire.extend(bytes(b) for b in lines)
            writelines(lines)

        transport.write, transport.writelines = tee, tee_lines
        made(self, transport)

    monkeypatch.setattr(protocol.LimitsHandler, "connection_made", connection_made)
    try:
        yield s
    finally:
        for name, level in saved.items():
            lg = logging.getLogger(name)
            lg.removeHandler(cap)
            lg.setLevel(level)
    wire = b"".join(s.wire)
    if any(set(codes(st)) - {"client_closed"} for st in s.stacks):
        assert wire, "the guard saw none of the answers"
    exposition = [generate_latest(st.registry) for st in s.stacks]
    for secret in SECRETS:
        assert secret.encode() not in wire, "a key in an answer"
        assert not [line for line in s.logs if secret in line], "a key in a log record"
        assert not [m for m in exposition if secret.encode() in m], "a key in /metrics"
    upstream_saw = [(r.headers, r.body) for st in s.stacks for sim in st.sims.values()
                    for r in sim.requests]
    upstream_saw += [(r.headers, r.body) for sc in s.scripted for r in sc.requests]
    for headers, body in upstream_saw:
        for key in CLIENT_KEYS:
            assert key not in repr(headers) and key.encode() not in body, "a client key upstream"
    bad = [line for r, line in zip(s.records, s.logs, strict=True)
           if r.levelno >= logging.ERROR and r.getMessage() not in s.expected_errors]
    assert not bad, bad


@pytest.fixture
def make_stack(make_stack: MakeStack, seen: Seen) -> MakeStack:
    """conftest's make_stack, with every stack known to the guard."""

    def make(mutate: Callable[[dict[str, Any]], None] | None = None) -> Stack:
        st = make_stack(mutate)
        seen.stacks.append(st)
        return st

    return make


@pytest.fixture
def stack(make_stack: MakeStack) -> Stack:
    return make_stack()


def cfg(*, server: dict[str, Any] | None = None, timeouts: dict[str, Any] | None = None,
        keys: dict[str, dict[str, Any]] | None = None,
        upstreams: dict[str, dict[str, Any]] | None = None) -> Callable[[dict[str, Any]], None]:
    """A make_stack mutation: settings merged into the test config."""

    def mutate(d: dict[str, Any]) -> None:
        d["server"].update(server or {})
        d["timeouts"].update(timeouts or {})
        for k in d["auth"]["keys"]:
            k.update((keys or {}).get(k["name"], {}))
        for u in d["upstreams"]:
            u.update((upstreams or {}).get(u["name"], {}))

    return mutate


# ---------------------------------------------------------------------------------------
# what the metrics counted, what the upstreams saw


def codes(stack: Stack, key: str | None = None) -> dict[str, float]:
    """lrproxy_requests_total by code (non-zero only)."""
    out: dict[str, float] = {}
    for fam in stack.registry.collect():
        for s in fam.samples:
            if s.name == "lrproxy_requests_total" and key in (None, s.labels["key"]) and s.value:
                out[s.labels["code"]] = out.get(s.labels["code"], 0) + s.value
    return out


def outcomes(stack: Stack) -> dict[tuple[str, str], float]:
    """lrproxy_upstream_attempts_total by (upstream, outcome) (non-zero only)."""
    return {(s.labels["upstream"], s.labels["outcome"]): s.value
            for fam in stack.registry.collect() for s in fam.samples
            if s.name == "lrproxy_upstream_attempts_total" and s.value}


def hits(stack: Stack) -> dict[str, int]:
    """API requests each simulated upstream received."""
    return {n: len(stack.requests_to(n)) for n in stack.sims}


def only_hit(stack: Stack) -> tuple[str, Any]:
    """The one request the whole pool received, with the upstream's name."""
    recs = [(n, r) for n in stack.sims for r in stack.requests_to(n)]
    assert len(recs) == 1, hits(stack)
    return recs[0]


def usable(stack: Stack, name: str) -> float:
    return stack.metric("lrproxy_upstream_usable", upstream=name)


def idle(stack: Stack) -> dict[str, Any]:
    """What must be back to zero once no request is in flight."""

    def read() -> dict[str, Any]:
        rt = stack.runtime
        return {"tasks": len(rt.tasks), "retries": rt.retries_in_progress,
                "outstanding": {n: h.outstanding for n, h in rt.pool.health.items()},
                "streams": {n: s.open_streams for n, s in stack.sims.items()}}

    return stack.call(read)


def assert_idle(stack: Stack) -> None:
    wait_for(lambda: stack.metric("lrproxy_inflight_requests") == 0)
    # (a simulator's handler sees the proxy drop its connection at its next write)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(idle(stack)["streams"].values()))
    state = idle(stack)
    assert state["tasks"] == 0 and state["retries"] == 0, state
    assert set(state["outstanding"].values()) == {0}, state
    assert set(state["streams"].values()) <= {0}, state


def faults(stack: Stack, names: tuple[str, ...] | list[str], **knobs: Any) -> None:
    def apply() -> None:
        for n in names:
            for k, v in knobs.items():
                setattr(stack.sims[n].faults, k, v)

    stack.call(apply)


# ---------------------------------------------------------------------------------------
# clients: http.client, raw sockets


def chat(model: str = MINI, *, region: str | None = None, stream: bool = False,
         sim: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MSGS, **fields}
    if stream:
        body["stream"] = True
    if region is not None:
        body["route"] = {"region": region}
    if sim:
        body["sim"] = sim
    return body


@attrs.define
class Answer:
    """One HTTP answer as the client saw it."""

    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order, repeats kept
    body: bytes
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def error(self, status: int, code: str) -> dict[str, Any]:
        """The §1 error shape with this status and code."""
        assert self.status == status, (self.status, self.body[:300])
        assert (self.header("content-type") or "").startswith("application/json")
        doc = orjson.loads(self.body)
        assert list(doc) == ["error"]
        err: dict[str, Any] = doc["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == code and isinstance(err["message"], str) and err["message"]
        assert "proxy;dur=" in (self.header("server-timing") or "")  # every answer has it
        return err

    def route(self) -> dict[str, Any]:
        assert self.status == 200, (self.status, self.body[:300])
        route: dict[str, Any] = self.json()["lowrouter"]["route"]
        assert self.header("x-lowrouter-upstream") == route["upstream"]
        return route

    def events(self) -> list[bytes]:
        assert self.status == 200 and (self.header("content-type") or "").startswith("text/event-stream")
        return split_events(self.body)


def split_events(data: bytes | bytearray) -> list[bytes]:
    sp = EventSplitter()
    events = sp.feed(bytes(data))
    assert sp.close() == b""
    return events


def obj_of(event: bytes) -> dict[str, Any]:
    data = event_data(event)
    assert data is not None, event
    doc: dict[str, Any] = orjson.loads(data)
    return doc


def data_events(events: list[bytes]) -> list[bytes]:
    return [e for e in events if event_data(e) is not None]


def post(stack: Stack, body: bytes | dict[str, Any], *, key: str | None = TEAM_A_KEY,
         headers: dict[str, str] | None = None, path: str = CHAT, timeout: float = 15) -> Answer:
    """POST with http.client (a clean chunked end is checked by its reader)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("POST", path, body=data, headers=h)
        r = conn.getresponse()
        got = r.read()
        return Answer(r.status, [(k.lower(), v) for k, v in r.getheaders()], got,
                      time.monotonic() - t0)
    finally:
        conn.close()


def get(stack: Stack, path: str) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return Answer(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def head(*lines: str, key: str | None = TEAM_A_KEY, path: str = CHAT) -> bytes:
    """A raw request head: the request line, Host, Content-Type, Authorization and `lines`."""
    out = [f"POST {path} HTTP/1.1", "Host: lrproxy", "Content-Type: application/json"]
    if key is not None:
        out.append(f"Authorization: Bearer {key}")
    out += lines
    return ("\r\n".join(out) + "\r\n\r\n").encode()


def request(body: bytes, *lines: str, key: str | None = TEAM_A_KEY) -> bytes:
    return head(f"Content-Length: {len(body)}", *lines, key=key) + body


def open_raw(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.port), timeout=5)


def read_answer(sock: socket.socket, timeout: float = 5.0) -> Answer:
    """One HTTP answer from a raw socket: by Content-Length, chunked or until close."""
    sock.settimeout(timeout)
    t0 = time.monotonic()
    buf = b""

    def more() -> None:
        nonlocal buf
        data = sock.recv(65536)
        if not data:
            raise EOFError(buf[:200])
        buf += data

    while b"\r\n\r\n" not in buf:
        more()
    top, _, buf = buf.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    hd = dict(headers)
    if "content-length" in hd:
        n = int(hd["content-length"])
        while len(buf) < n:
            more()
        body = buf[:n]
    elif hd.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                more()
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                more()
            body, buf = body + buf[:size], buf[size + 2:]
            if size == 0:
                break
    else:
        with contextlib.suppress(EOFError):
            while True:
                more()
        body = buf
    return Answer(status, headers, body, time.monotonic() - t0)


def closed_by_peer(sock: socket.socket, within: float = 1.0) -> bool:
    """True when the server closes the connection (and sends nothing more) in time."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A base URL whose port never completes a connect: its accept queue is full."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for c in [*fillers, srv]:
            c.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------
# a scripted upstream, for what the simulator cannot do


@attrs.define
class ScriptedRequest:
    """One request a scripted upstream received."""

    conn: int  # which connection (0, 1, …)
    n: int  # which request on that connection
    headers: dict[str, str]
    body: bytes


# bytes, or parts written `gap` (50 ms) apart (so that the proxy reads them apart); a float
# among the parts waits that many seconds more
Script = Callable[[int, int, bytes], tuple[bytes | list[bytes | float], bool] | None]


class Scripted:
    """A threaded raw-TCP upstream: `script(conn, n, body)` gives (bytes, keep open) or None
    to close the connection without an answer; its parts are written `gap` seconds apart."""

    def __init__(self, script: Script, gap: float = 0.05) -> None:
        self.requests: list[ScriptedRequest] = []
        self._conns = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            disable_nagle_algorithm = gap < 0.05  # each part a segment of its own, at once

            def handle(self) -> None:
                with outer._lock:
                    conn, outer._conns = outer._conns, outer._conns + 1
                n = 0
                while self.rfile.readline():
                    headers = {}
                    while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                        k, _, v = line.decode("latin-1").partition(":")
                        headers[k.strip().lower()] = v.strip()
                    body = self.rfile.read(int(headers.get("content-length", "0")))
                    outer.requests.append(ScriptedRequest(conn, n, headers, body))
                    answer = script(conn, n, body)
                    if answer is None:
                        return
                    parts = answer[0] if isinstance(answer[0], list) else [answer[0]]
                    for i, part in enumerate(parts):
                        if isinstance(part, float):
                            time.sleep(part)
                            continue
                        if i and gap:
                            time.sleep(gap)
                        try:
                            self.wfile.write(part)
                            self.wfile.flush()
                        except OSError:  # the proxy hung up
                            return
                    if not answer[1]:
                        return
                    n += 1

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted(seen: Seen) -> Iterator[Callable[[Script], Scripted]]:
    made: list[Scripted] = []

    def make(script: Script, gap: float = 0.05) -> Scripted:
        sc = Scripted(script, gap)
        made.append(sc)
        seen.scripted.append(sc)
        return sc

    yield make
    for sc in made:
        sc.close()


def json_answer() -> bytes:
    body = orjson.dumps({
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1,
        "model": "llama-3.1-8b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "calm"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    })
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunk(content: str) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1,
        "model": "llama-3.1-8b",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }) + b"\n\n"


def sse_answer(events: list[bytes]) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            + b"".join(events))


# =======================================================================================
# bad input


BODY = orjson.dumps(chat(LLAMA))
SMUGGLED = request(BODY)  # a complete, valid request hidden in the first one's body
SMUGGLING = {
    "cl-and-te": head("Content-Length: 5", "Transfer-Encoding: chunked") + b"0\r\n\r\n" + SMUGGLED,
    "te-and-cl": head("Transfer-Encoding: chunked", "Content-Length: 5") + b"0\r\n\r\n" + SMUGGLED,
    "cl-twice-equal": head(f"Content-Length: {len(BODY)}", f"Content-Length: {len(BODY)}")
    + BODY + SMUGGLED,
    "cl-twice-differ": head(f"Content-Length: {len(BODY)}", "Content-Length: 0") + BODY + SMUGGLED,
    "te-obfuscated": head("Transfer-Encoding: xchunked", f"Content-Length: {len(BODY)}")
    + BODY + SMUGGLED,
    "te-list": head("Transfer-Encoding: chunked, identity") + b"0\r\n\r\n" + SMUGGLED,
    "cl-signed": head(f"Content-Length: +{len(BODY)}") + BODY + SMUGGLED,
    "space-before-colon": head("Transfer-Encoding : chunked", f"Content-Length: {len(BODY)}")
    + BODY + SMUGGLED,
}


def assert_generated_id(a: Answer) -> None:
    """Answers given before a request could be parsed carry an id too (SPEC §1: every
    response), generated like any other: 16 hex digits per process, 16 of a counter."""
    assert re.fullmatch(r"[0-9a-f]{32}", a.header("x-request-id") or ""), a.headers


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_smuggling_attempt_is_400_and_closes(stack: Stack, case: str) -> None:
    """Ambiguous framing (CL with TE, CL twice, odd TE): 400, one answer, connection closed."""
    with open_raw(stack) as sock:
        sock.sendall(SMUGGLING[case])
        a = read_answer(sock)
        a.error(400, "invalid_request")
        assert_generated_id(a)
        assert closed_by_peer(sock)  # and the hidden request got no answer of its own
    assert a.header("connection") in (None, "close")
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="unknown") == {"400": 1}


@pytest.mark.parametrize("case", ["long-line", "too-many"])
def test_header_limits_are_431(stack: Stack, case: str) -> None:
    """A header line over 16 KiB, or more than 128 headers: 431 headers_too_large, closed."""
    lines = ([f"X-Padding: {'a' * (protocol.MAX_FIELD_SIZE + 1)}"] if case == "long-line"
             else [f"X-H{i}: v" for i in range(protocol.MAX_HEADERS + 10)])
    with open_raw(stack) as sock:
        sock.sendall(request(BODY, *lines))
        a = read_answer(sock)
        a.error(431, "headers_too_large")
        assert_generated_id(a)
        assert closed_by_peer(sock)
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="unknown") == {"431": 1}


@pytest.mark.parametrize("case", ["whole", "held", "under"])
def test_a_head_over_64_kib_in_all_is_431(stack: Stack, case: str) -> None:
    """Lines each within 16 KiB, fewer than 128, but over MAX_HEAD_BYTES together:
    431 headers_too_large and the close, whether the head came whole ("whole") or is
    still coming ("held": its blank line never comes; no 408 wait at client_header,
    the memory it took meanwhile being ~2x its size), and nothing goes upstream. A
    head under it ("under") is served. It let 128 lines of 16 KiB through: 2 MiB."""
    n = {"whole": 9, "held": 12, "under": 6}[case]
    lines = [f"X-Padding-{i}: {'a' * 9000}" for i in range(n)]
    data = request(BODY, *lines)
    if case == "held":
        data = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    with open_raw(stack) as sock:
        sock.sendall(data)
        a = read_answer(sock, timeout=3.0)
        if case == "under":
            assert a.status == 200
            return
        a.error(431, "headers_too_large")
        assert_generated_id(a)
        assert closed_by_peer(sock)
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="unknown") == {"431": 1}


def test_an_absolute_form_targets_user_info_stays_out_of_the_log(stack: Stack,
                                                                  seen: Seen) -> None:
    """A request target in absolute form (`GET http://user:key@host/v1/models`) is
    served as its path; the access line's path is that path, never the host or the
    user info, where a key may be."""
    with open_raw(stack) as sock:
        sock.sendall(b"GET http://u:sk-in-userinfo-77@x/api/v1/models HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + TEAM_A_KEY.encode() + b"\r\n\r\n")
        assert read_answer(sock).status == 200
    paths = [orjson.loads(line)["path"] for line in seen.logs if '"duration_ms"' in line]
    assert paths == ["/api/v1/models"]
    assert not [line for line in seen.logs if "sk-in-userinfo" in line]


@pytest.mark.parametrize("line", [b"GET /healthz HTTP/2.0", b"GET /healthz HTTP/1.2",
                                  b"GET /healthz HTTP/0.9"])
def test_other_http_versions_are_400(stack: Stack, line: bytes) -> None:
    """A request line of another version than 1.0 and 1.1 was answered in that version
    (`HTTP/2.0 200 OK`, headers and all): a 400 in the OpenAI shape and the close."""
    with open_raw(stack) as sock:
        sock.sendall(line + b"\r\nHost: x\r\n\r\n")
        a = read_answer(sock)
        a.error(400, "invalid_request")
        assert closed_by_peer(sock)


@pytest.mark.parametrize("te", ["chunked", "identity"])
def test_http10_with_a_transfer_encoding_is_400_and_the_close(stack: Stack, te: str) -> None:
    """HTTP/1.0 has no transfer codings: a request that has one has faulty framing
    (RFC 9112 §6.1), which a front proxy may read otherwise (a desync). It is a 400 and
    the close, as nginx answers it, even with keep-alive asked for and a next request
    behind it, which is never run; nothing goes upstream."""
    body = orjson.dumps(chat(LLAMA))
    framed = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if te == "chunked" else body
    data = (head(f"Transfer-Encoding: {te}", "Connection: keep-alive")
            .replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1) + framed + request(body))
    with open_raw(stack) as sock:
        sock.sendall(data)
        a = read_answer(sock)
        a.error(400, "invalid_request")
        assert_generated_id(a)
        assert closed_by_peer(sock)
    assert sum(hits(stack).values()) == 0


def test_a_head_over_64_kib_behind_a_request_closes_after_its_answer(stack: Stack) -> None:
    """A pipelining client's next head grows past MAX_HEAD_BYTES while its request is
    being answered: that answer comes whole, then the connection closes (a 431 then
    would have gone out before it); the rest of the head is never parsed."""
    slow = orjson.dumps(chat(LLAMA, sim={"headers_delay_s": 0.5}))
    with open_raw(stack) as sock:
        sock.sendall(request(slow))
        time.sleep(0.2)  # the first is upstream: its handler runs
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-P%d: %s\r\n" % (i, b"a" * 9000) for i in range(12)))
        assert read_answer(sock).status == 200
        assert closed_by_peer(sock, within=2.0)
    assert sum(hits(stack).values()) == 1


def tiny_chunks(body: bytes, size: int = 1) -> bytes:
    """`body` as chunks of `size` bytes, and the last chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


@pytest.mark.parametrize("size", [1, 64])
def test_a_body_of_tiny_chunks_is_400_before_it_costs(stack: Stack, size: int) -> None:
    """A chunked body of 1-byte chunks (6 bytes on the wire each; aiohttp spends ~1.2
    us of Python on each: ~0.2 s of CPU per MB) is refused with 400 once its framing
    outweighs it past FRAMING_SLACK, and nothing goes upstream; chunks of 64 bytes
    are served."""
    body = orjson.dumps(chat(LLAMA, user="x" * 150_000))
    with open_raw(stack) as sock:
        sock.sendall(head("Transfer-Encoding: chunked"))
        with contextlib.suppress(ConnectionError):  # (closed as it refuses it)
            sock.sendall(tiny_chunks(body, size))
        a = read_answer(sock)
        if size == 64:
            assert a.status == 200
            return
        assert "framing" in a.error(400, "invalid_request")["message"]
    assert sum(hits(stack).values()) == 0


def test_a_refused_body_of_tiny_chunks_is_not_read_on(stack: Stack) -> None:
    """No key, then an endless body of 1-byte chunks: after the 401 the connection
    closes once the framing outweighs the body past FRAMING_SLACK. aiohttp read such a
    body on, and dropped it, for its lingering 10 s, at ~100 % of a core (a normal
    request's latency went from 1 ms to ~340 ms meanwhile)."""
    with open_raw(stack) as sock:
        sock.sendall(head("Transfer-Encoding: chunked", key=None))
        read_answer(sock).error(401, "invalid_api_key")
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(20):  # 1.2 MB of framing for 200 kB of body, at most
                sock.sendall(b"1\r\nx\r\n" * 10_000)
        assert closed_by_peer(sock, within=2.0)
        assert time.monotonic() - t0 < 3.0


def _statuses_until_close(sock: socket.socket, timeout: float = 5.0) -> list[int]:
    """The statuses of the answers on `sock` until the server closes it."""
    sock.settimeout(timeout)
    got = b""
    with contextlib.suppress(TimeoutError):
        while data := sock.recv(65536):
            got += data
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", got)]


@pytest.mark.parametrize("after", ["refused-body", "32-pipelined"])
def test_a_head_parsed_off_the_usual_read_is_checked_and_its_body_read(
    stack: Stack, after: str,
) -> None:
    """A head that the parser emits outside data_received's main path, the last of a
    refused body's read ("refused-body": the body's end and the next head came in one
    read), or held back by aiohttp's queue of 32 and parsed as it resumes
    ("32-pipelined"), is still that request's head: its body, 300 kB coming in later
    reads, is read as a body (it was counted as head bytes past MAX_HEAD_BYTES: the
    connection closed, and the request waited for client_body), and an HTTP/1.0
    request with a Transfer-Encoding behind it is still the 400 and the close."""
    big = orjson.dumps(chat(LLAMA, user="x" * 300_000))
    te10 = (head("Transfer-Encoding: chunked", "Connection: keep-alive")
            .replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
            + b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY))
    refused = b"x" * 5000
    for case in ("big", "te10"):
        with open_raw(stack) as sock:
            if after == "refused-body":
                sock.sendall(request(refused, key=None)[:-4000])
                read_answer(sock).error(401, "invalid_api_key")
                time.sleep(0.1)
                before, want = refused[-4000:], [200] if case == "big" else [400]
            else:
                models = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
                before = models % TEAM_A_KEY.encode() * 32
                want = [200] * 32 + ([200] if case == "big" else [400])
            if case == "big":
                data = request(big, "Connection: close")
                sock.sendall(before + data[:-len(big) + 100])
                time.sleep(0.1)
                for i in range(100, len(big), 8192):  # reads of a few kB: the body is
                    sock.sendall(big[i:i + 8192])  # far from whole at its 64th kB
                    time.sleep(0.002)
            else:
                sock.sendall(before + te10)
            assert _statuses_until_close(sock) == want, case


def test_a_request_begun_before_the_idle_close_is_served(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kept-alive connection idle for most of KEEPALIVE_S (cut to 2 s here), whose
    next request begins before the idle close and comes whole within client_header
    (1.5 s) of its first byte, past the idle close's time: served, not cut at the idle
    close (aiohttp's own timer closed any connection not holding a whole request). An
    idle connection still closes at KEEPALIVE_S."""
    monkeypatch.setattr(protocol, "KEEPALIVE_S", 2.0)
    stack = make_stack(cfg(timeouts={"client_header": 1.5}))
    with open_raw(stack) as sock, open_raw(stack) as idle:
        for s in (sock, idle):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
            assert read_answer(s).status == 200
        t0 = time.monotonic()
        time.sleep(1.5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(1.0)  # past the idle close
        sock.sendall(b"Host: lrproxy\r\n\r\n")
        assert read_answer(sock).status == 200
        assert closed_by_peer(idle, within=2.0)
        assert time.monotonic() - t0 < 3.5  # at 2 s, not aiohttp's backstop's 4.5 s


@pytest.mark.parametrize("target", ["path", "absolute", "ABSOLUTE", "query", "in-pieces"])
def test_a_target_too_long_is_414(stack: Stack, target: str) -> None:
    """A request target over aiohttp's 8190-byte line limit (a path, an absolute URL in
    any case, a long query string, a line sent in pieces): 414 uri_too_long, as nginx
    answers it, not 431 (a header's)."""
    long = "a" * 9000
    path = {"path": f"/v1/{long}", "absolute": f"http://lrproxy/v1/{long}",
            "ABSOLUTE": f"HTTP://lrproxy/v1/{long}", "query": f"/v1/chat/completions?x={long}",
            "in-pieces": f"/v1/{long}"}[target]
    data = head(f"Content-Length: {len(BODY)}", path=path) + BODY
    with open_raw(stack) as sock:
        if target == "in-pieces":
            for i in range(0, 9000, 3000):
                sock.sendall(data[i:i + 3000])
                time.sleep(0.05)
            sock.sendall(data[9000:])
        else:
            sock.sendall(data)
        a = read_answer(sock)
        a.error(414, "uri_too_long")
        assert closed_by_peer(sock)
    assert codes(stack, key="unknown") == {"414": 1}


@pytest.mark.parametrize("case", ["pipelined-long-target", "target-8190-long-header"])
def test_414_or_431_by_the_limit_that_was_passed(stack: Stack, case: str) -> None:
    """A short request pipelined with one whose target is too long, in one read: 414
    for that one (the proxy does not count lines itself: the parser's error names the
    limit passed); an 8190-byte target, at its limit, with a header over 16 KiB: 431."""
    if case == "pipelined-long-target":
        data = (b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n"
                + head(f"Content-Length: {len(BODY)}", path="/v1/" + "a" * 9000) + BODY)
        want = (414, "uri_too_long")
    else:
        data = request(BODY, "X-Padding: " + "a" * 17000).replace(
            CHAT.encode(), b"/v1/" + b"a" * 8186, 1)  # a target of 8190 bytes
        want = (431, "headers_too_large")
    with open_raw(stack) as sock:
        sock.sendall(data)
        sock.settimeout(5)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
    statuses = re.findall(rb"HTTP/1\.[01] (\d+)", got)
    assert statuses[-1] == str(want[0]).encode(), got[:300]
    assert want[1].encode() in got


@pytest.mark.parametrize("line", ["Referer: https://app.example/", "X-Forwarded-Uri: /",
                                  "X-Foo: POST /"])
def test_a_long_header_that_looks_like_a_target_is_431(stack: Stack, line: str) -> None:
    """A header value over 16 KiB that begins as a target would (a URL, a path): the
    header is the long line, so 431 headers_too_large, not 414."""
    with open_raw(stack) as sock:
        sock.sendall(request(BODY, line + "a" * 17000))
        read_answer(sock).error(431, "headers_too_large")


@pytest.mark.parametrize("kept_alive", [False, True])
def test_slowloris_headers_get_408(make_stack: MakeStack, kept_alive: bool) -> None:
    """Headers dripping in a byte at a time: 408 at timeouts.client_header, connection
    closed; on a kept-alive connection too, counted from the request's first byte (it
    was 75 s + client_header after the last answer, then a close without a 408)."""
    stack = make_stack(cfg(timeouts={"client_header": 0.5}))
    with open_raw(stack) as sock:
        if kept_alive:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
            assert read_answer(sock).status == 200
            time.sleep(0.3)  # idle, as a kept-alive connection is between requests
        t0 = time.monotonic()
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: lrproxy\r\n".encode())
        for byte in b"X-Slow: " + b"a" * 40:
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(bytes([byte]))
        a = read_answer(sock)
        took = time.monotonic() - t0
        a.error(408, "request_timeout")
        assert_generated_id(a)
        assert a.header("server") == "lrproxy"
        assert closed_by_peer(sock)
    assert 0.45 < took < 1.5
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="unknown") == {"408": 1}


@pytest.mark.parametrize("body_sent", [True, False])
def test_a_refused_expect_is_one_answer(make_stack: MakeStack, body_sent: bool) -> None:
    """A refused `Expect:` gets its 417 and nothing more: the connection then waits for
    the next request (no 408 of a header deadline left running, once sent and counted),
    unless the body was held back for the expectation: then `Connection: close`, and the
    close comes once the client has sent its body or given up (aiohttp's lingering close,
    so that body bytes in flight do not reset the connection before the 417 is read)."""
    stack = make_stack(cfg(timeouts={"client_header": 0.5}))
    with open_raw(stack) as sock:
        sock.sendall(request(BODY, "Expect: 200-ok") if body_sent
                     else head(f"Content-Length: {len(BODY)}", "Expect: 200-ok"))
        a = read_answer(sock)
        a.error(417, "expectation_failed")
        assert a.header("connection") == (None if body_sent else "close")
        sock.settimeout(1.0)  # past client_header: nothing more comes
        with contextlib.suppress(TimeoutError):
            assert sock.recv(1) == b""
        if body_sent:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
            assert read_answer(sock).status == 200
        else:
            sock.shutdown(socket.SHUT_WR)  # the client gives up on its body
            assert closed_by_peer(sock)
    wait_for(lambda: codes(stack, key="unknown") == {"417": 1})
    time.sleep(0.2)
    assert codes(stack, key="unknown") == {"417": 1}


@pytest.mark.parametrize("then", ["next_request", "idle"])
@pytest.mark.parametrize("refusal", ["401", "413"])
def test_the_rest_of_a_refused_requests_body_is_no_next_request(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch, refusal: str, then: str,
) -> None:
    """A request refused before its body came (a wrong key, a body over max_body_bytes),
    the body then sent anyway, as the SDK sends it: aiohttp reads and drops the rest,
    and those bytes are no next request's, whose headers would be late; nor is
    aiohttp's data_received(b"") as it resumes reading a body it had paused. Nothing
    follows the refusal (there was an unasked 408 at client_header, or at the keep-alive's
    end, counted and logged): the connection takes the next request, or closes quietly
    at the keep-alive's end (protocol.KEEPALIVE_S, cut to 1 s here)."""
    if then == "idle":
        monkeypatch.setattr(protocol, "KEEPALIVE_S", 1.0)
    stack = make_stack(cfg(timeouts={"client_header": 0.5}, server={"max_body_bytes": 4096}))
    big = orjson.dumps(chat(LLAMA, region="eu-north") | {"pad": "x" * 1_000_000})
    key = "sk-wrong" if refusal == "401" else TEAM_A_KEY
    data = request(big, key=key)
    with open_raw(stack) as sock:
        sock.sendall(data[:len(data) - len(big) + 1000])  # the headers, a little body
        read_answer(sock).error(int(refusal), {"401": "invalid_api_key",
                                               "413": "request_too_large"}[refusal])
        time.sleep(0.1)
        sock.sendall(data[len(data) - len(big) + 1000:])  # the rest, after the answer
        if then == "next_request":
            sock.settimeout(1.5)  # past client_header and a check: nothing more comes
            with contextlib.suppress(TimeoutError):
                assert sock.recv(1) == b""
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
            assert read_answer(sock).status == 200
        else:  # past the keep-alive and client_header: a close, no 408 before it
            sock.settimeout(4.0)
            assert sock.recv(1) == b""
    time.sleep(0.2)
    assert codes(stack) == {refusal: 1}


@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_begun_with_a_refused_bodys_end_has_its_header_deadline(
    make_stack: MakeStack, chunked: bool,
) -> None:
    """A refused request's body whose last bytes come in one read with the start of a
    next request that then stalls (a slowloris): that request's headers are due within
    client_header (0.5 s): a 408, or, after a chunked body (whose framing the proxy
    does not count), a close at client_header; not a wait of the keep-alive's 75 s."""
    stack = make_stack(cfg(timeouts={"client_header": 0.5}))
    body = b"x" * 20
    with open_raw(stack) as sock:
        if chunked:
            sock.sendall(head("Transfer-Encoding: chunked", key="sk-wrong"))
            rest = b"14\r\n" + body + b"\r\n0\r\n\r\n"
        else:
            sock.sendall(head(f"Content-Length: {len(body)}", key="sk-wrong"))
            rest = body
        read_answer(sock).error(401, "invalid_api_key")
        t0 = time.monotonic()
        sock.sendall(rest + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(5.0)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                got += data
        assert time.monotonic() - t0 < 2.5
    if chunked:  # (the framing left the proxy unsure a request began: a quiet close)
        assert got == b""
    else:
        assert got.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("after", ["refused_body", "answer"])
def test_line_ends_before_a_request_line_are_no_request(make_stack: MakeStack, after: str) -> None:
    """A CRLF after a refused request's body (in its read), or alone after an answer:
    the parser skips line ends before a request line (RFC 9112 §2.2), so they begin no
    request, and no 408 follows at client_header."""
    stack = make_stack(cfg(timeouts={"client_header": 0.5}))
    with open_raw(stack) as sock:
        if after == "refused_body":
            sock.sendall(head("Content-Length: 20", key="sk-wrong"))
            read_answer(sock).error(401, "invalid_api_key")
            sock.sendall(b"x" * 20 + b"\r\n")
        else:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
            assert read_answer(sock).status == 200
            sock.sendall(b"\r\n")
        sock.settimeout(1.5)  # past client_header and a check: nothing comes
        with contextlib.suppress(TimeoutError):
            assert sock.recv(1) == b""
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\n\r\n")
        assert read_answer(sock).status == 200
    time.sleep(0.2)
    assert "408" not in codes(stack, key="unknown")


def test_connections_over_max_connections_get_429_and_close(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture,
) -> None:
    """At server.max_connections open connections, a new one takes the place of the
    least recently used kept-alive one idle for a second or more (closed, as nginx
    reuses idle connections); with none idle (new ones yet to send their request count
    as busy), it gets an immediate 429 rate_limited with Retry-After and is closed,
    counted and logged."""
    stack = make_stack(cfg(server={"max_connections": 3}))
    held = [open_raw(stack) for _ in range(3)]
    try:
        time.sleep(0.1)
        with open_raw(stack) as sock:  # none of the three is idle: refused
            a = read_answer(sock)
            a.error(429, "rate_limited")
            assert a.header("retry-after") == "1" and a.header("connection") == "close"
            assert closed_by_peer(sock)
        assert "server.max_connections (3) reached" in caplog.text
        for sock in held[:2]:  # held connections serve as before, then idle
            sock.sendall(request(BODY))
            assert read_answer(sock).status == 200
        time.sleep(1.1)
        held[0].sendall(request(BODY))  # used again: held[1] is now the least recent
        assert read_answer(held[0]).status == 200
        with open_raw(stack) as sock:  # takes held[1]'s place
            sock.sendall(request(BODY))
            assert read_answer(sock).status == 200
            assert closed_by_peer(held[1])
            assert not closed_by_peer(held[0], within=0.2)  # the others are kept
            assert not closed_by_peer(held[2], within=0.2)
    finally:
        for s in held:
            s.close()
    wait_for(lambda: codes(stack, key="unknown") == {"429": 1})
    assert codes(stack, key="team-a") == {"200": 4}


def test_a_request_sent_at_once_still_reads_its_429_at_max_connections(
        make_stack: MakeStack) -> None:
    """A client over server.max_connections that sends its whole request before it reads
    (as HTTP clients do) reads the 429, not a reset on its write: the proxy does not
    close with the request's bytes unread (the kernel then resets the connection), but
    ends its side and reads on until the client closes, as nginx's lingering close."""
    stack = make_stack(cfg(server={"max_connections": 1}))
    body = BODY + b" " * (4 << 20)  # past what the sockets' buffers hold
    with open_raw(stack) as held:
        time.sleep(0.1)
        for _ in range(3):
            with open_raw(stack) as sock:
                sock.sendall(request(body))
                a = read_answer(sock)
                a.error(429, "rate_limited")
                assert closed_by_peer(sock)
        with open_raw(stack) as sock:  # a client that neither closes nor stops sending
            sock.sendall(head("Content-Length: 100000000"))
            read_answer(sock).error(429, "rate_limited")
            t0 = time.monotonic()
            with pytest.raises(OSError):  # BrokenPipe or ConnectionReset: gone
                while time.monotonic() - t0 < protocol.LINGER_S + 2:
                    sock.sendall(b" " * 1024)
                    time.sleep(0.01)
            assert time.monotonic() - t0 >= protocol.LINGER_S - 0.1
        held.sendall(request(BODY))
        assert read_answer(held).status == 200
    wait_for(lambda: codes(stack, key="unknown") == {"429": 4})


def test_a_connection_lingering_after_its_429_holds_no_place(make_stack: MakeStack) -> None:
    """A connection refused at server.max_connections, lingering for its client to close,
    holds no place: a client that connects once a place is free is served (not refused
    for up to LINGER_S), and a drain has no request of it to wait for."""
    stack = make_stack(cfg(server={"max_connections": 1}))
    held = open_raw(stack)
    held.sendall(request(BODY))  # kept alive, used less than a second ago: not idle
    assert read_answer(held).status == 200
    with open_raw(stack) as refused, open_raw(stack) as other:  # their clients stay
        read_answer(refused).error(429, "rate_limited")
        read_answer(other).error(429, "rate_limited")
        assert stack.call(stack.runner.unfinished) == 0
        held.close()
        time.sleep(0.1)  # held's place is free; the refused ones linger
        with open_raw(stack) as sock:
            sock.sendall(request(BODY))
            assert read_answer(sock).status == 200
    wait_for(lambda: codes(stack, key="unknown") == {"429": 2})


def test_a_burst_of_refused_connections_lingers_only_so_many(
        make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections refused at server.max_connections whose clients do not close: at most
    protocol.LINGER_MAX (2 here) linger at once, the rest are closed at once, so that a
    burst of connects cannot hold a file each for LINGER_S past the cap (the files kept
    for upstream connections); each still gets its 429."""
    monkeypatch.setattr(protocol, "LINGER_MAX", 2, raising=False)
    stack = make_stack(cfg(server={"max_connections": 1}))
    held = open_raw(stack)
    time.sleep(0.1)
    refused = [open_raw(stack) for _ in range(6)]
    try:
        for sock in refused:
            read_answer(sock).error(429, "rate_limited")
        server = stack.runner.server
        assert server is not None
        wait_for(lambda: stack.call(lambda: len(server.connections)) <= 1 + 2,
                 timeout=protocol.LINGER_S / 2)
    finally:
        held.close()
        for sock in refused:
            sock.close()
    wait_for(lambda: codes(stack, key="unknown") == {"429": 6})


def _big_answer_to_a_slow_reader(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], client_header: float,
) -> tuple[bytes, Stack, socket.socket]:
    """A stack whose LLAMA upstream answers 4 MB of JSON, and a connected socket whose
    receive buffer is 4 KiB: (the upstream's answer, the stack, the socket)."""
    body = json_answer().partition(b"\r\n\r\n")[2]
    body = body.replace(b'"calm"', b'"' + b"calm " * 800_000 + b'"')
    big = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
           b"\r\n\r\n" % len(body) + body)
    up = scripted(lambda conn, n, body: (big, True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={"client_header": client_header}))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.port))
    return big, stack, sock


def test_an_answer_the_client_never_takes_is_cut(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that asks for a large answer and never reads it held its connection
    (and a max_connections place) for ever: once none of the answer has gone for
    protocol.SEND_TIMEOUT_S (nginx's send_timeout; cut to 1 s here), it is cut."""
    monkeypatch.setattr(protocol, "SEND_TIMEOUT_S", 1.0)
    big, _, sock = _big_answer_to_a_slow_reader(make_stack, scripted, 0.3)
    with sock:
        sock.sendall(request(orjson.dumps(chat(LLAMA, region="eu-north"))))
        time.sleep(3.0)  # not reading: past SEND_TIMEOUT_S plus a check's interval
        got, cut = b"", False
        sock.settimeout(5)
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            cut = True
    assert cut or len(got) < len(big)  # an abort: a reset, or the answer short


def test_a_431_behind_an_answer_the_client_never_takes_is_still_cut(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head over MAX_HEAD_BYTES on a kept-alive connection whose last answer its client
    does not read: the 431 and its lingering close do not stop the SEND_TIMEOUT_S cut
    (1 s here), which the connection would otherwise be held past, for ever."""
    monkeypatch.setattr(protocol, "SEND_TIMEOUT_S", 1.0)
    _, stack, sock = _big_answer_to_a_slow_reader(make_stack, scripted, 0.3)
    server = stack.runner.server
    assert server is not None
    with sock:
        sock.sendall(request(orjson.dumps(chat(LLAMA, region="eu-north"))))
        time.sleep(0.5)  # the answer written, the client not reading it
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: lrproxy\r\n".encode())
        for i in range(10):  # 80 KiB of header lines, never ended
            sock.sendall(b"X-F%d: " % i + b"b" * 8000 + b"\r\n")
            time.sleep(0.02)
        wait_for(lambda: codes(stack, key="unknown") == {"431": 1})
        wait_for(lambda: stack.call(lambda: len(server.connections)) == 0,
                 timeout=protocol.LINGER_S + 4.0)


def test_a_pipelined_request_waiting_for_a_slow_answer_is_not_408(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """A pipelined request whose headers came whole, waiting while the answer before it
    is written to a client slow to read it (past client_header): it is answered, not
    refused with 408 as if its headers had not come."""
    _, stack, sock = _big_answer_to_a_slow_reader(make_stack, scripted, 0.5)
    with sock:
        sock.sendall(request(orjson.dumps(chat(LLAMA, region="eu-north"))))
        time.sleep(0.3)  # the answer is being written, the client not reading
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: lrproxy\r\nConnection: close\r\n\r\n")
        time.sleep(1.5)  # past client_header
        sock.settimeout(10)
        got = b""
        while data := sock.recv(65536):
            got += data
    assert re.findall(rb"HTTP/1\.1 (\d+)", got) == [b"200", b"200"]
    assert len(got) > 4_000_000
    assert codes(stack, key="unknown") == {}


@pytest.mark.parametrize("closing", [False, True])
def test_a_stuck_answer_is_aborted_closing_or_not(closing: bool) -> None:
    """protocol.LimitsHandler's check, on a connection whose answer stopped moving:
    aborted once SEND_TIMEOUT_S passed with the same bytes unsent, also when the answer
    had `Connection: close` (aiohttp's close then waits on those bytes for ever, and
    the check had stopped looking at a closing connection); never while bytes go."""
    import collections

    class Transport:
        unsent, aborted = 1000, False

        def get_write_buffer_size(self) -> int:
            return self.unsent

        def is_closing(self) -> bool:
            return closing or self.aborted

        def abort(self) -> None:
            self.aborted = True

        def get_extra_info(self, name: str) -> Any:
            return None  # (no socket: its send queue is not looked at)

    class Loop:
        now = 100.0

        def time(self) -> float:
            return self.now

        def call_at(self, when: float, cb: Any) -> Any:
            return None

    h = object.__new__(protocol.LimitsHandler)
    t, loop = Transport(), Loop()
    h.transport, h._loop = t, loop  # type: ignore[assignment]
    # (aiohttp drops `transport` as it closes it gracefully: the check looks at its own)
    h.lr_transport = None if closing else t  # type: ignore[assignment]
    if closing:
        h.transport, h.lr_transport = None, t  # type: ignore[assignment]
    h.lr_busy, h._lr_seen, h._messages = False, False, collections.deque()
    h._lr_stuck, h._lr_deadline, h._lr_timer = (0, 0.0), 1e9, None
    for _ in range(20):  # bytes going: never cut
        loop.now += 10
        t.unsent -= 1
        h._lr_check()
    assert not t.aborted
    while loop.now < 100 + 200 + protocol.SEND_TIMEOUT_S + 10:  # stuck: cut
        loop.now += 10
        h._lr_check()
        if t.aborted:
            break
    assert t.aborted


def test_slow_body_gets_408(make_stack: MakeStack) -> None:
    """A body that stops arriving: 408 request_timeout at timeouts.client_body, nothing sent upstream."""
    stack = make_stack(cfg(timeouts={"client_body": 0.5}))
    with open_raw(stack) as sock:
        sock.sendall(request(BODY)[:-20])
        a = read_answer(sock)
        assert a.header("connection") == "close"
        assert closed_by_peer(sock)  # at once: no lingering read of a body that stopped
    a.error(408, "request_timeout")
    assert 0.45 < a.elapsed < 1.5
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="team-a") == {"408": 1}


def test_content_length_over_limit_is_413_before_the_body(make_stack: MakeStack) -> None:
    """Content-Length over server.max_body_bytes: 413 from the headers alone, no body sent."""
    stack = make_stack(cfg(server={"max_body_bytes": 4096}))
    with open_raw(stack) as sock:
        sock.sendall(head("Content-Length: 10000000"))  # and not one byte of the body
        a = read_answer(sock, timeout=2)
    err = a.error(413, "request_too_large")
    assert "4096" in err["message"] and a.elapsed < 1
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="team-a") == {"413": 1}


def test_chunked_body_over_limit_is_413(make_stack: MakeStack) -> None:
    """A chunked body (no Content-Length) growing past max_body_bytes: 413, nothing sent upstream."""
    stack = make_stack(cfg(server={"max_body_bytes": 4096}))
    with open_raw(stack) as sock:
        sock.sendall(head("Transfer-Encoding: chunked"))
        for _ in range(6):
            sock.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        a = read_answer(sock)
    a.error(413, "request_too_large")
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="team-a") == {"413": 1}


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"2\r\nabcdef\r\n"],
                         ids=["size-no-number", "chunk-longer-than-said"])
def test_chunked_body_that_breaks_its_encoding_is_400_at_once(stack: Stack, bad: bytes) -> None:
    """A chunked body whose encoding breaks midway: a 400 in the OpenAI shape at once,
    not a wait for timeouts.client_body (60 s) and a 408; the connection closes."""
    with open_raw(stack) as sock:
        sock.sendall(head("Transfer-Encoding: chunked"))
        time.sleep(0.05)  # the handler is reading the body when the break comes
        sock.sendall(b"5\r\n{\"mod\r\n")
        time.sleep(0.05)
        t0 = time.monotonic()
        sock.sendall(bad + b"0\r\n\r\n")
        a = read_answer(sock)
        assert time.monotonic() - t0 < 2
        assert closed_by_peer(sock)
    err = a.error(400, "invalid_request")
    assert "chunked" in err["message"]
    assert sum(hits(stack).values()) == 0
    wait_for(lambda: codes(stack, key="team-a") == {"400": 1})


@pytest.mark.parametrize("case", ["gzip", "gzip-bomb", "br"])
def test_compressed_body_is_415(stack: Stack, case: str) -> None:
    """A Content-Encoding body (gzip, a 20 MB gzip bomb, br): 415, never decompressed."""
    enc, data = {
        "gzip": ("gzip", gzip.compress(BODY)),
        "gzip-bomb": ("gzip", gzip.compress(b"0" * 20_000_000, compresslevel=1)),
        "br": ("br", b"\x1b\x03\x00\xf8\xa5@\x02"),
    }[case]
    with open_raw(stack) as sock:
        sock.sendall(request(data, f"Content-Encoding: {enc}"))
        a = read_answer(sock)
    a.error(415, "unsupported_media_type")
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="team-a") == {"415": 1}


@pytest.mark.parametrize("lines", [
    ["Content-Encoding: identity", "Content-Encoding: gzip"],  # the second header
    ["Content-Encoding: identity, gzip"],
])
def test_compressed_body_in_any_content_encoding_is_415(stack: Stack, lines: list[str]) -> None:
    """A gzip body whose coding is in a second Content-Encoding header, or the second of
    a list: 415, as for one header, not parsed as JSON (a 400)."""
    with open_raw(stack) as sock:
        sock.sendall(request(gzip.compress(BODY), *lines))
        a = read_answer(sock)
    a.error(415, "unsupported_media_type")
    assert sum(hits(stack).values()) == 0


def test_a_transfer_coding_but_chunked_is_415(stack: Stack) -> None:
    """`Transfer-Encoding: gzip, chunked`: a compressed body as well, refused (415)."""
    data = gzip.compress(BODY)
    with open_raw(stack) as sock:
        sock.sendall(head("Transfer-Encoding: gzip, chunked")
                     + b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
        a = read_answer(sock)
    a.error(415, "unsupported_media_type")
    assert "Transfer-Encoding 'gzip, chunked'" in a.json()["error"]["message"]
    assert sum(hits(stack).values()) == 0


_PREFIX = b'{"model":"meta/llama-3.1-8b","messages":[{"role":"user","content":'
BAD_JSON = {
    "invalid-utf8": _PREFIX + b'"caf\xc3\x28 \xff"}]}',
    "truncated": BODY[:-9],
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "nested-in-message": _PREFIX + b'{"a":' * 1100 + b"1" + b"}" * 1100 + b"}]}",
    # read (orjson takes 1024 levels) but not written again for the upstream (254)
    "nested-too-deep-to-forward": _PREFIX + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}]}",
    "number-overflows-to-infinity": BODY[:-1] + b',"temperature":1e999}',
    "nan-literal": BODY[:-1] + b',"temperature":NaN}',
    "not-an-object": b'["model", "messages"]',
    "empty": b"",
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_unparsable_body_is_400(stack: Stack, case: str) -> None:
    """Invalid UTF-8, truncated, nested past 1024 levels, infinite numbers, non-objects: 400."""
    a = post(stack, BAD_JSON[case])
    a.error(400, "invalid_request")
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="team-a") == {"400": 1}


@pytest.mark.parametrize("text", [5, True, 1.5, None, ["a"]])
def test_content_parts_with_text_of_another_type_are_answered(stack: Stack, text: Any) -> None:
    """A content part whose `text` is no string (validated by the upstream, not here):
    the upstream's answer reaches the client, with its tokens counted, and the
    upstream's place is given back (a 500 here once kept it for ever)."""
    body = chat(LLAMA, region="eu-north")
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    a = post(stack, body)
    assert a.status == 200 and a.json()["lowrouter"]["eco"]["tokens"]["prompt"] > 0
    assert_idle(stack)


def test_huge_integer_is_forwarded_as_a_number(stack: Stack) -> None:
    """A 40-digit integer (beyond 64 bits) does not break the proxy: forwarded as sent."""
    a = post(stack, BODY[:-1] + b',"seed":' + b"9" * 40 + b"}")
    assert a.route()["upstream"] == "eu-north-a"
    _, rec = only_hit(stack)
    assert b'"seed":' + b"9" * 40 + b"}" in rec.body
    assert codes(stack) == {"200": 1}
    assert outcomes(stack) == {("eu-north-a", "ok"): 1}


@pytest.mark.parametrize("digits", [310, 1000])
def test_an_integer_orjson_cannot_read_is_forwarded_as_sent(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], digits: int
) -> None:
    """An integer over 309 digits, which orjson reads as an infinite float and refuses,
    is strict JSON: forwarded as the client wrote it (it was a 400 "not valid JSON"),
    with `route` removed and the model rewritten. 1e999, NaN stay refused (above)."""
    up = scripted(lambda conn, n, body: ([json_answer()], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    big = b"9" * digits
    a = post(stack, BODY[:-1] + b',"route":{"region":"eu-north"},"seed":' + big + b"}")
    assert a.status == 200, a.body[:300]
    (rec,) = up.requests
    assert b'"seed":' + big in rec.body and b"route" not in rec.body
    assert b'"model":"llama-3.1-8b"' in rec.body


@pytest.mark.parametrize("stream_options", [b"null", b'"x"', b"[]", b"5", b'{"a":1}'])
def test_a_big_integer_beside_a_stream_options_of_any_shape_is_forwarded(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], stream_options: bytes
) -> None:
    """A request that does not stream, with an integer beyond 64 bits and a
    `stream_options` that is no object (SDKs write unset fields as null): forwarded as
    sent, stream_options untouched (the first exact path took it for an object: 500)."""
    up = scripted(lambda conn, n, body: ([json_answer()], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    big = b"9" * 40
    a = post(stack, BODY[:-1] + b',"seed":' + big + b',"stream_options":' + stream_options + b"}")
    assert a.status == 200, a.body[:300]
    (rec,) = up.requests
    assert b'"seed":' + big in rec.body
    assert b'"stream_options":' + stream_options in rec.body


# =======================================================================================
# auth


AUTH = {
    "no-header": None,
    "basic-scheme": "Basic " + base64.b64encode(f"{TEAM_A_KEY}:".encode()).decode(),
    "token-scheme": f"Token {TEAM_A_KEY}",
    "bare-bearer": "Bearer",
    "blank-bearer": "Bearer \t ",
    "key-with-inner-space": f"Bearer {TEAM_A_KEY[:7]} {TEAM_A_KEY[7:]}",
    "key-then-word": f"Bearer {TEAM_A_KEY} extra",
    "key-prefix": f"Bearer {TEAM_A_KEY[:-1]}",
    "configured-hash": f"Bearer {hashlib.sha256(TEAM_A_KEY.encode()).hexdigest()}",
    "other-keys-hash-prefix": f"Bearer {hashlib.sha256(CI_KEY.encode()).hexdigest()[:16]}",
    "an-upstream-key": f"Bearer {UPSTREAM_KEYS['eu-west-a']}",
}


@pytest.mark.parametrize("case", list(AUTH))
def test_bad_credentials_are_401(stack: Stack, case: str) -> None:
    """No header, another scheme, empty or altered bearer, a hash, an upstream's key: 401."""
    value = AUTH[case]
    a = post(stack, chat(LLAMA), key=None,
             headers={} if value is None else {"Authorization": value})
    a.error(401, "invalid_api_key")
    token = (value or "").partition(" ")[2].strip()
    assert not token or token.encode() not in a.body  # the answer never echoes it
    assert sum(hits(stack).values()) == 0
    assert codes(stack) == {"401": 1} == codes(stack, key="unknown")


def test_auth_is_checked_before_the_body_is_read(stack: Stack) -> None:
    """No key and a 10 MB Content-Length: 401 at once, without waiting for the body."""
    with open_raw(stack) as sock:
        sock.sendall(head("Content-Length: 10000000", key=None))
        a = read_answer(sock, timeout=2)
    a.error(401, "invalid_api_key")
    assert a.elapsed < 1
    assert sum(hits(stack).values()) == 0
    assert codes(stack, key="unknown") == {"401": 1}


# =======================================================================================
# limits


def test_key_rate_limit_is_429_then_recovers(make_stack: MakeStack) -> None:
    """A key over its rate_per_s gets 429 rate_limited with Retry-After; others do not; it recovers."""
    stack = make_stack(cfg(keys={"ci": {"rate_per_s": 2}}))
    first = [post(stack, chat(LLAMA), key=CI_KEY) for _ in range(2)]
    with stack.client(api_key=CI_KEY) as client, pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model=LLAMA, messages=MSGS)
    other = post(stack, chat(LLAMA))  # team-a has no rate: unaffected
    time.sleep(0.55)  # one token back at 2/s
    again = post(stack, chat(LLAMA), key=CI_KEY)
    assert [a.status for a in first] == [200, 200] and other.status == again.status == 200
    assert ei.value.status_code == 429 and ei.value.code == "rate_limited"
    assert ei.value.response.headers["retry-after"] == "1"
    assert len(stack.requests_to("eu-north-a")) == 4
    assert codes(stack, key="ci") == {"200": 3, "429": 1}
    assert codes(stack, key="team-a") == {"200": 1}


def test_global_inflight_cap_is_a_fast_429(make_stack: MakeStack) -> None:
    """Over server.max_inflight: an immediate 429 rate_limited with Retry-After, never a queue."""
    stack = make_stack(cfg(server={"max_inflight": 2}))
    slow = chat(LLAMA, sim={"headers_delay_s": 0.8})
    with ThreadPoolExecutor(2) as ex:
        busy = [ex.submit(post, stack, slow) for _ in range(2)]
        wait_for(lambda: len(stack.requests_to("eu-north-a")) == 2)
        a = post(stack, chat(LLAMA))
        done = [f.result() for f in busy]
    a.error(429, "rate_limited")
    assert a.header("retry-after") == "1" and a.elapsed < 0.3
    assert [d.status for d in done] == [200, 200]
    assert len(stack.requests_to("eu-north-a")) == 2
    assert codes(stack) == {"200": 2, "429": 1}


def test_upstream_at_capacity_moves_on_then_503(
        make_stack: MakeStack, caplog: pytest.LogCaptureFixture) -> None:
    """max_concurrency=1: the next request takes the region's other upstream; then 503
    with Retry-After, and a warning naming the upstreams at their caps, once a minute."""
    stack = make_stack(cfg(upstreams={n: {"max_concurrency": 1} for n in EU_WEST}))
    slow = chat(MINI, region="eu-west", sim={"headers_delay_s": 0.8})

    def in_eu_west() -> int:
        return sum(len(stack.requests_to(n)) for n in EU_WEST)

    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(post, stack, slow)
        wait_for(lambda: in_eu_west() == 1)
        f2 = ex.submit(post, stack, slow)
        wait_for(lambda: in_eu_west() == 2)
        full = post(stack, chat(MINI, region="eu-west"))
        again = post(stack, chat(MINI, region="eu-west"))
        unpinned = post(stack, chat(MINI))
        busy = [f1.result(), f2.result()]
    full.error(503, "no_upstream_available")
    again.error(503, "no_upstream_available")
    said = re.findall(r"every upstream a request may take is at its max_concurrency: "
                      r"(.*); such requests get 503", caplog.text)
    assert said == ["eu-west-a (1), eu-west-b (1)"]  # (sorted: one line per set)
    assert full.header("retry-after") == "1" and full.elapsed < 0.3
    assert sorted(b.route()["upstream"] for b in busy) == list(EU_WEST)
    assert unpinned.route()["upstream"] == "us-east-a"  # unpinned may leave the region
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 1}
    assert codes(stack) == {"200": 3, "503": 2}
    assert outcomes(stack) == {("eu-west-a", "ok"): 1, ("eu-west-b", "ok"): 1, ("us-east-a", "ok"): 1}


def test_upstream_removed_and_added_back_in_flight_keeps_its_capacity(
        make_stack: MakeStack) -> None:
    """A request in flight to an upstream that one reload removes and the next adds back
    ends on the count it began on: the upstream's new count does not go below zero, and
    its max_concurrency still holds (SPEC §4, §6)."""
    from conftest import ENVIRON

    from lrproxy.config import parse_config, resolve_secrets

    stack = make_stack(cfg(upstreams={n: {"max_concurrency": 1} for n in EU_WEST}))

    def reload(data: dict[str, Any]) -> None:
        config = parse_config(data, source="test")
        stack.call(lambda: stack.runtime.install(config, resolve_secrets(config, ENVIRON)))

    slow = chat(MINI, region="eu-west", sim={"headers_delay_s": 0.8})
    with ThreadPoolExecutor(3) as ex:
        f1 = ex.submit(post, stack, slow)
        wait_for(lambda: sum(len(stack.requests_to(n)) for n in EU_WEST) == 1)
        name = next(n for n in EU_WEST if stack.requests_to(n))
        reload({**stack.data, "upstreams": [u for u in stack.data["upstreams"]
                                            if u["name"] != name]})
        reload(stack.data)
        assert f1.result().status == 200
        assert_idle(stack)  # every count back at 0, none at -1
        busy = [ex.submit(post, stack, slow) for _ in range(2)]
        wait_for(lambda: sum(len(stack.requests_to(n)) for n in EU_WEST) == 3)
        full = post(stack, chat(MINI, region="eu-west"))
        assert sorted(f.result().route()["upstream"] for f in busy) == list(EU_WEST)
    full.error(503, "no_upstream_available")


# =======================================================================================
# upstream faults before the first byte


@pytest.mark.parametrize("down", [("eu-west-a",), EU_WEST], ids=["one", "all"])
def test_connect_refused_fails_over_in_region(make_stack: MakeStack, down: tuple[str, ...]) -> None:
    """An upstream on a closed port: the next in the region answers; none left: 502 upstream_error."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    stack = make_stack(cfg(upstreams={n: {"base_url": url} for n in down}))
    a = post(stack, chat(MINI, region="eu-west"))
    if len(down) == 1:
        assert a.route() == {"model": MINI, "region": "eu-west", "upstream": "eu-west-b",
                             "pinned": True, "attempts": 2}
        assert hits(stack) == {"eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}
        assert outcomes(stack) == {("eu-west-a", "connect_error"): 1, ("eu-west-b", "ok"): 1}
        assert codes(stack) == {"200": 1}
    else:
        err = a.error(502, "upstream_error")
        assert err["message"] == "upstream connection failed: Connection refused"
        assert hits(stack) == {"eu-north-a": 0, "us-east-a": 0}
        got = outcomes(stack)
        assert {u for u, _ in got} == set(EU_WEST) and {o for _, o in got} == {"connect_error"}
        assert sum(got.values()) == 3  # server.retries = 2
        assert codes(stack) == {"502": 1}


def test_an_upstream_name_that_does_not_resolve_says_so(make_stack: MakeStack) -> None:
    """A base_url whose host name does not resolve (.invalid never does, RFC 6761): 502
    saying so in words, not "Unknown error -2" (a resolver's negative errno)."""
    stack = make_stack(cfg(server={"retries": 0},
                           upstreams={"eu-north-a": {"base_url": "http://lrproxy.invalid/v1"}}))
    err = post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert err["message"] == ("upstream connection failed: the upstream's host name did "
                              "not resolve")


def test_connect_timeout_is_504(make_stack: MakeStack) -> None:
    """An upstream whose connect hangs: 504 upstream_timeout after timeouts.connect, not first_byte."""
    with blackhole() as url:
        stack = make_stack(cfg(server={"retries": 0}, timeouts={"connect": 0.3, "first_byte": 5},
                               upstreams={"eu-north-a": {"base_url": url}}))
        a = post(stack, chat(LLAMA, region="eu-north"))
    a.error(504, "upstream_timeout")
    assert 0.25 < a.elapsed < 1.5
    assert sum(hits(stack).values()) == 0
    assert outcomes(stack) == {("eu-north-a", "timeout"): 1}
    assert codes(stack) == {"504": 1}


def test_reset_before_the_answer_fails_over(stack: Stack) -> None:
    """An upstream resetting the connection: failover to the region's other upstream;
    the attempt counted as a lost connection (it was connected), not a connect error."""
    faults(stack, ["eu-west-a"], reset=True)
    a = post(stack, chat(MINI, region="eu-west"))
    route = a.route()
    assert (route["upstream"], route["attempts"]) == ("eu-west-b", 2)
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}
    sent = orjson.loads(bytes(stack.requests_to("eu-west-b")[0].sent))
    assert a.json()["choices"] == sent["choices"]
    assert outcomes(stack) == {("eu-west-a", "connection_lost"): 1, ("eu-west-b", "ok"): 1}
    assert codes(stack) == {"200": 1}


def test_out_of_open_files_is_the_proxys_503_not_the_upstreams_failure(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    seen: Seen,
) -> None:
    """EMFILE on an upstream connect is the proxy's shortage: a 503 to retry and an
    error line for the operator, the upstream's health untouched (it was a
    `connect_error` against it, five of which ejected a healthy upstream)."""
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None)

    async def emfile(*args: Any, **kwargs: Any) -> Any:
        raise aiohttp.ClientConnectorError(key, OSError(errno.EMFILE, "Too many open files"))

    monkeypatch.setattr(aiohttp.TCPConnector, "connect", emfile)  # where EMFILE comes from
    seen.expected_errors.append("out of open files connecting to upstream eu-west-a: raise "
                                "the limit (LimitNOFILE=) or lower server.max_connections")
    for _ in range(upstream.EJECT_AFTER + 1):
        a = post(stack, chat(MINI, region="eu-west"))
        a.error(503, "no_upstream_available")
        assert a.header("retry-after") == "1"
    assert "out of open files connecting to upstream eu-west-a" in caplog.text
    assert caplog.text.count("out of open files") == 1  # once a minute
    assert outcomes(stack) == {("eu-west-a", "cancelled"): upstream.EJECT_AFTER + 1}
    assert usable(stack, "eu-west-a") == 1


@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",  # no status line
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # a header past aiohttp's limit
], ids=["no-status-line", "header-too-long"])
def test_an_answer_that_is_no_http_is_a_bad_response(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], answer: bytes,
) -> None:
    """An upstream that answers, but with no HTTP the client can parse: 502 after the
    retries, each attempt counted `bad_response` (it was `connect_error`)."""
    up = scripted(lambda conn, n, body: (answer, False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert outcomes(stack) == {("eu-north-a", "bad_response"): 3}


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_fails_over_within_the_pinned_region(stack: Stack, status: int) -> None:
    """A 5xx before any byte: the next upstream of the pinned region answers, attempts = 2."""
    faults(stack, ["eu-west-a"], fail_status=status, fail_count=-1)
    a = post(stack, chat(MINI, region="eu-west"))
    assert a.route() == {"model": MINI, "region": "eu-west", "upstream": "eu-west-b",
                         "pinned": True, "attempts": 2}
    assert b"Simulated error" not in a.body
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}
    assert outcomes(stack) == {("eu-west-a", "status_5xx"): 1, ("eu-west-b", "ok"): 1}
    assert codes(stack) == {"200": 1}


@pytest.mark.parametrize("kind", ["5xx", "429", "reset", "refused", "connect_timeout",
                                  "no_http"])
def test_failed_upstream_calls_leave_no_reference_cycles(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], kind: str,
) -> None:
    """An upstream's failure (failed over, or the request's last) leaves no cycle of
    exception, traceback and frame for the cyclic GC: `upstream.send`'s, `_Direct.post`'s
    and `relay._try_candidates`' frames held the request's body, answer and connection
    until a collection, which came every few thousand requests under faults: RSS rose
    ~5 MiB, and a collection that moved them on to an older generation ~8 MiB more
    (round 17's soak of 100,000 requests); with 2 MiB bodies to a refused upstream,
    ~120 MiB per 20 requests (review 17B)."""
    with contextlib.ExitStack() as up:
        if kind == "refused":
            url = f"http://127.0.0.1:{closed_port()}/v1"
        elif kind == "connect_timeout":
            url = up.enter_context(blackhole())
        elif kind == "no_http":
            url = scripted(lambda conn, n, body: (b"garbage\r\n\r\n", False)).base_url
        else:
            url = None
        stack = make_stack(cfg(timeouts={"connect": 0.2}, upstreams={
            n: {"base_url": url} for n in EU_WEST if url is not None}))
        if kind in ("5xx", "429", "reset"):
            knobs: dict[str, Any] = {"reset": True} if kind == "reset" else {
                "fail_status": 503 if kind == "5xx" else 429, "fail_count": -1}
            faults(stack, ["eu-west-a"], **knobs)
        big = "x" * 300_000  # (what a cycle would hold: frames with the body)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection frees stays in gc.garbage
        try:
            first = post(stack, chat(MINI, region="eu-west", user=big))  # failover or all
            if kind in ("5xx", "429", "reset"):
                faults(stack, EU_WEST, **knobs)
            last = post(stack, chat(MINI, region="eu-west", user=big))  # every upstream
            gc.collect()
            frames = [f"{o.f_code.co_filename.rsplit('/', 1)[-1]}:{o.f_code.co_name}"
                      for o in gc.garbage if isinstance(o, types.FrameType)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert first.status == (200 if url is None else last.status) and last.status >= 429
    assert not [f for f in frames if f.split(":")[0] in ("relay.py", "upstream.py")], frames


@pytest.mark.parametrize("limited", [("eu-west-a",), EU_WEST], ids=["one", "all"])
def test_upstream_429_moves_to_a_different_upstream_only(stack: Stack, limited: tuple[str, ...]) -> None:
    """An upstream 429 is never retried on that upstream: another answers, or 429 with its Retry-After."""
    faults(stack, limited, fail_status=429, fail_count=-1, retry_after="7")
    a = post(stack, chat(MINI, region="eu-west"))
    if len(limited) == 1:
        assert (a.route()["upstream"], a.route()["attempts"]) == ("eu-west-b", 2)
        assert outcomes(stack) == {("eu-west-a", "rate_limited"): 1, ("eu-west-b", "ok"): 1}
        assert codes(stack) == {"200": 1}
    else:
        a.error(429, "rate_limited")  # server.retries = 2, but each upstream once only
        assert a.header("retry-after") == "7"
        assert outcomes(stack) == {("eu-west-a", "rate_limited"): 1, ("eu-west-b", "rate_limited"): 1}
        assert codes(stack) == {"429": 1}
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}


@pytest.mark.parametrize(("first", "second", "want"), [
    ("7", "9", "7"), ("7", None, "7"), (None, "9", None), (None, None, None),
])
def test_a_502_carries_the_last_upstreams_retry_after(
    stack: Stack, first: str | None, second: str | None, want: str | None,
) -> None:
    """Both eu-west upstreams answer 503, each with its Retry-After or none: the 502
    carries the Retry-After of the last one tried (eu-west-a again, the 2nd retry), as
    it gave it (a region's one upstream, down for maintenance, tells its pinned clients
    when to come back), and none when that one gave none. (Unlike a 429's, not the
    soonest of all.)"""
    faults(stack, ["eu-west-a"], fail_status=503, fail_count=-1, retry_after=first)
    faults(stack, ["eu-west-b"], fail_status=503, fail_count=-1, retry_after=second)
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(502, "upstream_error")
    assert a.header("retry-after") == want
    assert [len(stack.requests_to(n)) for n in EU_WEST] == [2, 1]  # a, b, a again


@pytest.mark.parametrize(("first", "second", "want"), [
    ("60", "5", "5"), ("5", "60", "5"), ("60", None, "60"), (None, "60", "60"),
    (None, None, "1"), ("0", "30", "1"), ("30", "0", "1"),  # 0: at once (at least 1 s)
])
def test_429_from_every_upstream_gives_the_soonest_retry_after(
    stack: Stack, first: str | None, second: str | None, want: str,
) -> None:
    """Every upstream tried answers 429: the client's Retry-After is the soonest any of
    them gave (when one will take a request again), not the last one's; 1 when none
    gave one."""
    faults(stack, ("eu-west-a",), fail_status=429, fail_count=-1, retry_after=first)
    faults(stack, ("eu-west-b",), fail_status=429, fail_count=-1, retry_after=second)
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(429, "rate_limited")
    assert a.header("retry-after") == want
    assert hits(stack)["eu-west-a"] == hits(stack)["eu-west-b"] == 1


def test_retry_after_is_rounded_up(make_stack: MakeStack) -> None:
    """Retry-After is a whole number of seconds rounded up, never down: a client that
    waits as told is let through (a key's rate), and an upstream's `Retry-After: 2.5`
    passed on is 3, not 2."""
    stack = make_stack(cfg(keys={"ci": {"rate_per_s": 0.8}}))
    assert post(stack, chat(LLAMA), key=CI_KEY).status == 200
    limited = post(stack, chat(LLAMA), key=CI_KEY)  # the next token in 1.25 s
    limited.error(429, "rate_limited")
    assert limited.header("retry-after") == "2"
    time.sleep(int(limited.header("retry-after") or 0))
    assert post(stack, chat(LLAMA), key=CI_KEY).status == 200
    faults(stack, EU_WEST, fail_status=429, fail_count=-1, retry_after="2.5")
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(429, "rate_limited")
    assert a.header("retry-after") == "3"


@pytest.mark.parametrize(("value", "want"), [
    ("7", 7.0), ("2.5", 2.5), ("0", 0.0), ("100000", 86400.0),  # a day at most
    ("Fri, 27 Nov 2026 12:02:00 GMT", 120.0), ("Fri, 27 Nov 2026 12:02:00 -0000", 120.0),
    ("Fri, 27 Nov 2026 11:59:00 GMT", 0.0),  # a date gone by: at once
    ("-1", None), ("nan", None), ("inf", None), ("soon", None), ("", None),
    ("Fri, 32 Nov 2026 12:02:00 GMT", None), (None, None),
    ("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None),  # an OverflowError once: a 500
])
def test_parse_retry_after(value: str | None, want: float | None) -> None:
    """Seconds or an HTTP date (RFC 9110 §10.2.3), capped at a day; else None."""
    now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC).timestamp()
    assert upstream.parse_retry_after(value, now) == want


def test_upstream_retry_after_as_a_date_reaches_the_client(stack: Stack) -> None:
    """An upstream 429 whose Retry-After is an HTTP date: the client is told the seconds
    until then (it was told 1), and the cool-down honours them."""
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    faults(stack, EU_WEST, fail_status=429, fail_count=-1, retry_after=when)
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(429, "rate_limited")
    assert 110 <= int(a.header("retry-after") or 0) <= 121


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_never_exceed_server_retries(make_stack: MakeStack, retries: int) -> None:
    """Every upstream failing: exactly server.retries + 1 attempts, then 502 upstream_error."""
    stack = make_stack(cfg(server={"retries": retries}))
    faults(stack, list(stack.sims), fail_status=503, fail_count=-1)
    a = post(stack, chat(MINI))
    a.error(502, "upstream_error")
    assert sum(hits(stack).values()) == retries + 1
    assert hits(stack)["eu-north-a"] == 0  # it does not serve the model
    got = outcomes(stack)
    assert sum(got.values()) == retries + 1 and {o for _, o in got} == {"status_5xx"}
    assert codes(stack) == {"502": 1}


@pytest.mark.parametrize("fault", ["timeout", "auth"])
def test_no_retry_on_the_upstream_that_timed_out_or_refused_our_key(
    make_stack: MakeStack, fault: str, seen: Seen,
) -> None:
    """A region's only upstream that hangs (or refuses the proxy's key) is not tried
    again in the same request: the same wait (or refusal) would come, and a hung one
    cost a client three first_byte waits for one 504. nginx never retries a server
    within a request. Retries still go to an upstream not tried yet (the 5xx case)."""
    seen.expected_errors.append(_auth_refused_line("eu-north-a", 403))
    stack = make_stack(cfg(server={"retries": 2}, timeouts={"first_byte": 0.4}))
    if fault == "timeout":
        faults(stack, ["eu-north-a"], headers_delay_s=3)
    else:
        faults(stack, ["eu-north-a"], fail_status=403, fail_count=-1)
    a = post(stack, chat(LLAMA, region="eu-north"))
    if fault == "timeout":
        a.error(504, "upstream_timeout")
        assert 0.35 < a.elapsed < 1.0  # one first_byte, not three
    else:
        a.error(502, "upstream_auth_failed")
    assert hits(stack)["eu-north-a"] == 1
    outcome = "timeout" if fault == "timeout" else "auth_failed"
    assert outcomes(stack) == {("eu-north-a", outcome): 1}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_silent_upstream_is_504_after_first_byte(make_stack: MakeStack, stream: bool) -> None:
    """No headers (or no first event) within timeouts.first_byte on every try: 504 upstream_timeout."""
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 0.5}))
    if stream:
        body = chat(MINI, region="eu-west", stream=True, sim={"first_delay_s": 3})
    else:
        faults(stack, EU_WEST, headers_delay_s=3)
        body = chat(MINI, region="eu-west")
    a = post(stack, body)
    a.error(504, "upstream_timeout")  # nothing was committed: a real status, not a stream
    assert 0.9 < a.elapsed < 2.0
    recs = [r for n in EU_WEST for r in stack.requests_to(n)]
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}
    wait_for(lambda: all(r.client_closed for r in recs))  # the proxy hung up on both
    assert outcomes(stack) == {("eu-west-a", "timeout"): 1, ("eu-west-b", "timeout"): 1}
    assert codes(stack) == {"504": 1}


def test_no_upstream_is_tried_once_the_total_is_spent(make_stack: MakeStack) -> None:
    """timeouts.total (1 s) runs out in the first attempt's wait for its headers
    (first_byte 5 s): the answer is that attempt's 504, and the region's other upstream
    is neither tried with no time left nor charged a timeout. The first had all the
    time any attempt gets: its failure, so that five eject it and the sixth request
    goes to the other."""
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 5, "total": 1}))
    faults(stack, ("eu-west-a",), headers_delay_s=3)
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(504, "upstream_timeout")
    assert a.elapsed < 2.0
    assert a.header("x-lowrouter-upstream") == "eu-west-a"
    assert hits(stack)["eu-west-b"] == 0
    assert outcomes(stack) == {("eu-west-a", "timeout"): 1}
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    assert (health["eu-west-a"], health["eu-west-b"]) == (1, 0)
    for _ in range(4):
        post(stack, chat(MINI, region="eu-west")).error(504, "upstream_timeout")
    assert post(stack, chat(MINI, region="eu-west")).route()["upstream"] == "eu-west-b"


def test_a_first_attempt_with_a_big_body_is_charged_at_the_total(make_stack: MakeStack) -> None:
    """The same with a 7 MB prompt of non-ASCII text, whose JSON takes the proxy some
    milliseconds to write before the attempt goes: still a first attempt, with all the
    time any gets, so its timeout at the total is its upstream's failure."""
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 5, "total": 1}))
    faults(stack, ("eu-west-a",), headers_delay_s=3)
    body = chat(MINI, region="eu-west")
    body["messages"] = [{"role": "user", "content": "é" * 3_500_000}]
    post(stack, body).error(504, "upstream_timeout")
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    assert (health["eu-west-a"], health["eu-west-b"]) == (1, 0)


def test_a_retry_after_a_quick_failure_is_charged_at_the_total(make_stack: MakeStack) -> None:
    """The first attempt fails at once (a 503), the retry then has nearly all of
    timeouts.total (1 s, under first_byte) and times out at it: it had a first
    attempt's time, near enough, so it is its upstream's failure."""
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 5, "total": 1}))
    faults(stack, ("eu-west-a",), fail_status=503, fail_count=-1)
    faults(stack, ("eu-west-b",), headers_delay_s=3)
    post(stack, chat(MINI, region="eu-west")).error(504, "upstream_timeout")
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    assert (health["eu-west-a"], health["eu-west-b"]) == (1, 1)


def test_an_attempt_cut_short_by_the_total_is_not_the_upstreams_failure(
    make_stack: MakeStack,
) -> None:
    """The first attempt times out at first_byte (0.8 s), its upstream's failure; the
    second has 0.4 s of timeouts.total left, and timing out then is the request's end,
    not a failure of its upstream."""
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 0.8, "total": 1.2}))
    faults(stack, EU_WEST, headers_delay_s=3)
    post(stack, chat(MINI, region="eu-west")).error(504, "upstream_timeout")
    assert outcomes(stack) == {("eu-west-a", "timeout"): 1, ("eu-west-b", "timeout"): 1}
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    assert (health["eu-west-a"], health["eu-west-b"]) == (1, 0)


@pytest.mark.parametrize("redirecting", [("eu-west-a",), EU_WEST], ids=["one", "all"])
def test_redirect_is_never_followed(stack: Stack, redirecting: tuple[str, ...]) -> None:
    """A 307 from an upstream is a failure: never followed, its target (another region) never reached."""
    target = stack.sims["us-east-a"].base_url + "/chat/completions"
    faults(stack, redirecting, redirect_to=target)
    a = post(stack, chat(MINI, region="eu-west"))
    if len(redirecting) == 1:
        assert (a.route()["upstream"], a.route()["attempts"]) == ("eu-west-b", 2)
        assert outcomes(stack) == {("eu-west-a", "redirect"): 1, ("eu-west-b", "ok"): 1}
        assert codes(stack) == {"200": 1}
    else:
        a.error(502, "upstream_error")
        got = outcomes(stack)
        assert sum(got.values()) == 3 and {o for _, o in got} == {"redirect"}
        assert codes(stack) == {"502": 1}
    assert stack.sims["us-east-a"].requests == []
    assert a.header("location") is None and target.encode() not in a.body


def _auth_refused_line(name: str, status: int) -> str:
    """The error line of an upstream that refused the proxy's key (once a minute)."""
    return f"upstream {name} refused the proxy's key ({status}): check its api_key_env or api_key_file"


@pytest.mark.parametrize("how", ["401-echoing-our-key", "403"])
def test_upstream_auth_failure_is_502_without_its_text(
    make_stack: MakeStack, how: str, caplog: pytest.LogCaptureFixture, seen: Seen,
) -> None:
    """An upstream refusing our key: 502 upstream_auth_failed; its text (echoing the key) dropped."""
    wrong = {"eu-north-a": {"api_key_env": "UP_US_EAST_A"}} if how.startswith("401") else {}
    stack = make_stack(cfg(server={"retries": 0}, upstreams=wrong))
    body = chat(LLAMA, region="eu-north", sim=None if wrong else {"status": 403})
    said = _auth_refused_line("eu-north-a", 401 if wrong else 403)
    seen.expected_errors.append(said)
    a = post(stack, body)
    err = a.error(502, "upstream_auth_failed")
    name, rec = only_hit(stack)
    assert name == "eu-north-a"
    if wrong:
        assert rec.headers["Authorization"] == f"Bearer {UPSTREAM_KEYS['us-east-a']}"
        assert UPSTREAM_KEYS["us-east-a"].encode() in bytes(rec.sent)  # it did echo the key
    assert bytes(rec.sent) not in a.body and "Incorrect" not in err["message"]
    assert outcomes(stack) == {("eu-north-a", "auth_failed"): 1}
    assert stack.call(lambda: stack.runtime.pool.health["eu-north-a"].failures) == 1
    assert codes(stack) == {"502": 1}
    post(stack, body).error(502, "upstream_auth_failed")
    # The operator's to mend (a revoked provider key): said, once a minute at most,
    # without the upstream's text
    assert re.findall(r"upstream eu-north-a refused .*", caplog.text) == [said]
    assert UPSTREAM_KEYS["us-east-a"] not in caplog.text


def test_upstream_auth_failure_tells_the_sdk_not_to_retry(make_stack: MakeStack,
                                                          seen: Seen) -> None:
    """No retry of the client's can help while the upstream refuses the proxy's own key
    (the proxy has failed over already): `x-should-retry: false`, which the OpenAI SDK
    obeys before its rule of retrying every 5xx, so one call is one attempt, not three."""
    seen.expected_errors.append(_auth_refused_line("eu-north-a", 403))
    stack = make_stack(cfg(server={"retries": 0}))
    faults(stack, ["eu-north-a"], fail_status=403, fail_count=-1)
    with stack.client(max_retries=2) as client, pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=LLAMA, messages=MSGS,
                                       extra_body={"route": {"region": "eu-north"}})
    assert ei.value.response.headers["x-should-retry"] == "false"
    assert ei.value.code == "upstream_auth_failed"
    assert len(stack.requests_to("eu-north-a")) == 1
    wait_for(lambda: codes(stack) == {"502": 1})


@pytest.mark.parametrize("status", [400, 404, 422])
def test_upstream_4xx_passes_through_without_retry(stack: Stack, status: int) -> None:
    """Other upstream 4xx: status and body passed through as they are, one attempt only."""
    a = post(stack, chat(MINI, region="eu-west", sim={"status": status}))
    assert a.status == status
    name, rec = only_hit(stack)
    assert a.body == bytes(rec.sent)
    assert a.header("x-lowrouter-upstream") == name
    assert outcomes(stack) == {(name, "passed_4xx"): 1}
    assert codes(stack) == {str(status): 1}


@pytest.mark.parametrize("escaped", [False, True])
def test_upstream_4xx_quoting_our_key_is_withheld(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], escaped: bool
) -> None:
    """An upstream 4xx whose body quotes our key: its status kept, its body replaced;
    also when the quote is JSON-escaped (each `-` as a unicode escape here; PHP escapes
    every `/`), which the SDK decodes back into the key."""
    body = orjson.dumps({"error": {
        "message": f"Key {UPSTREAM_KEYS['eu-north-a']} may not use this model",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
    if escaped:
        body = body.replace(b"-", b"\\u002d")
        assert UPSTREAM_KEYS["eu-north-a"] in orjson.loads(body)["error"]["message"]
    answer = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    up = scripted(lambda conn, n, req: (answer, True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA))
    a.error(404, "upstream_error")
    assert a.header("x-lowrouter-upstream") == "eu-north-a"
    assert len(up.requests) == 1
    assert outcomes(stack) == {("eu-north-a", "passed_4xx"): 1}
    assert codes(stack) == {"404": 1}


def _slow_json(pause: float, pieces: int) -> list[bytes | float]:
    """`json_answer()`: its headers at once, then its body in `pieces`, `pause` s apart."""
    answer = json_answer()
    cut = answer.index(b"\r\n\r\n") + 4
    body = answer[cut:]
    step = -(-len(body) // pieces)
    parts: list[bytes | float] = [answer[:cut]]
    for i in range(0, len(body), step):
        parts += [pause, body[i:i + step]]
    return parts


def test_upstream_4xx_quoting_the_key_a_reload_replaced_is_withheld(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """A key rotated by a reload while a request is in flight: the upstream's 4xx quotes
    the key that request sent, the old one, and is withheld all the same."""
    from conftest import ENVIRON

    from lrproxy.config import parse_config, resolve_secrets

    def answer(conn: int, n: int, body: bytes) -> tuple[list[bytes | float], bool]:
        sent = up.requests[-1].headers["authorization"].partition(" ")[2]
        err = orjson.dumps({"error": {"message": f"Incorrect API key provided: {sent}"}})
        return [0.6, _answer_of("400 Bad Request", "application/json", err)], True

    up = scripted(answer)
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    config = parse_config(stack.data, source="test")
    with ThreadPoolExecutor(1) as ex:
        f = ex.submit(post, stack, chat(LLAMA, region="eu-north"))
        wait_for(lambda: len(up.requests) == 1)
        stack.call(lambda: stack.runtime.install(config, resolve_secrets(
            config, {**ENVIRON, "UP_EU_NORTH_A": "sk-rotated-0123456789"})))
        a = f.result()
    a.error(400, "upstream_error")
    assert UPSTREAM_KEYS["eu-north-a"].encode() not in a.body and b"withheld" in a.body


def _answer_of(status: str, ctype: str, body: bytes, *more: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{h}\r\n" for h in more) + "\r\n").encode() + body


@pytest.mark.parametrize("case", ["html", "sse", "gzip", "array"])
def test_upstream_4xx_that_is_no_json_object_gets_the_openai_shape(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], case: str
) -> None:
    """An upstream 4xx whose body is no JSON object (an HTML page from a wrong base_url,
    an event stream, gzip we did not ask for): its status kept, an OpenAI error body
    naming what came (SPEC §1: errors always have the OpenAI shape)."""
    page = b"<html><body><h1>404 Not Found</h1><hr>nginx</body></html>"
    answer = {
        "html": _answer_of("404 Not Found", "text/html", page),
        "sse": _answer_of("400 Bad Request", "text/event-stream", b"data: {}\n\n"),
        "gzip": _answer_of("400 Bad Request", "application/json",
                           gzip.compress(b'{"error": {"message": "bad"}}'), "Content-Encoding: gzip"),
        "array": _answer_of("422 Unprocessable Entity", "application/json", b'["bad"]'),
    }[case]
    up = scripted(lambda conn, n, req: (answer, True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    status = int(answer.split()[1])
    a = post(stack, chat(LLAMA))
    err = a.error(status, "upstream_error")
    assert a.header("content-type") == "application/json" and a.header("content-encoding") is None
    ctype = {"html": "text/html", "sse": "text/event-stream"}.get(case, "application/json")
    coding = ", compressed: gzip" if case == "gzip" else ""
    assert err["message"] == (f"The upstream answered {status} with a body that is not a "
                              f"JSON object ({ctype}{coding}).")
    assert b"nginx" not in a.body
    assert outcomes(stack) == {("eu-north-a", "passed_4xx"): 1}
    with stack.client() as client, pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model=LLAMA, messages=MSGS)
    assert ei.value.status_code == status and ei.value.code == "upstream_error"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("coding", ["gzip", "identity, deflate", "UTF-8", "identity"])
def test_a_compressed_success_is_a_failure_that_says_so(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], coding: str, stream: bool,
) -> None:
    """A 200 whose body is compressed though the proxy asked for none (`Accept-Encoding:
    identity`), JSON or a stream: a failure of the upstream (retried, then a 502) that
    names the coding; it was "a body that is not JSON", or a stream that "ended before
    any event". `Content-Encoding: identity` is no coding, nor is a value that names no
    compression (`UTF-8`, a known server misconfiguration): such answers are served."""
    if stream:
        finish = chunk("").replace(b'"delta":{"content":""},"finish_reason":null',
                                   b'"delta":{},"finish_reason":"stop"')
        plain, ctype = chunk("calm") + finish + b"data: [DONE]\n\n", "text/event-stream"
    else:
        plain, ctype = json_answer().split(b"\r\n\r\n", 1)[1], "application/json"
    served = coding in ("identity", "UTF-8")
    packed = (plain if served else zlib.compress(plain) if "deflate" in coding
              else gzip.compress(plain))
    up = scripted(lambda conn, n, req: (
        _answer_of("200 OK", ctype, packed, f"Content-Encoding: {coding}"), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=stream))
    if served:
        assert a.status == 200 and b"calm" in a.body
        wait_for(lambda: outcomes(stack) == {("eu-north-a", "ok"): 1})  # (a stream's, at its end)
        return
    named = {"gzip": "gzip", "identity, deflate": "deflate"}[coding]
    err = a.error(502, "upstream_error")
    assert err["message"] == ("the upstream answered with its body compressed "
                              f"(Content-Encoding: {named}), which the proxy did not ask for")
    assert outcomes(stack) == {("eu-north-a", "bad_response"): 3}  # (retries = 2)
    assert len(up.requests) == 3


def test_upstream_200_with_an_error_object_fails_over(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """A 200 whose body is an error object and no choices (a failed generation, as
    OpenRouter answers it) is a failure, as the same object in a stream is: the next
    upstream answers; with retries spent, a 502 (in the proxy's words, as after a 5xx)."""
    body = orjson.dumps({"error": {"message": "Provider returned error", "code": 502}})
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-west-a": {"base_url": up.base_url},
                                      "eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(MINI, region="eu-west"))
    assert a.status == 200 and a.header("x-lowrouter-upstream") == "eu-west-b"
    assert a.json()["choices"][0]["message"]["content"]
    err = post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert err["message"] == "the upstream answered 200 with an error object"
    wait_for(lambda: codes(stack) == {"200": 1, "502": 1})
    assert outcomes(stack) == {("eu-west-a", "bad_response"): 1, ("eu-west-b", "ok"): 1,
                               ("eu-north-a", "bad_response"): 3}


def test_an_answer_over_the_cap_is_not_the_upstreams_failure(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A JSON answer over relay.MAX_UPSTREAM_BODY (256 MiB; cut to 1 MiB here): a 502
    that says so, with `x-should-retry: false` (the SDK would fetch it again twice), one
    attempt (the region's other upstream would answer as much), counted `bad_response`,
    and no failure of its upstream, which answered what it was asked."""
    monkeypatch.setattr(relay, "MAX_UPSTREAM_BODY", 1 << 20)
    body = orjson.dumps({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": [0.125] * 3072} for i in range(80)],
        "model": "text-embedding-3-small", "usage": {"prompt_tokens": 40, "total_tokens": 40}})
    assert len(body) > 1 << 20
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-west-a": {"base_url": up.base_url},
                                      "eu-west-b": {"base_url": up.base_url}}))
    a = post(stack, chat(MINI, region="eu-west"))
    err = a.error(502, "upstream_error")
    assert err["message"].startswith("The upstream's answer is over 1 MiB")
    assert a.header("x-should-retry") == "false"
    assert len(up.requests) == 1
    assert outcomes(stack) == {("eu-west-a", "bad_response"): 1}
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    assert health["eu-west-a"] == 0


def test_upstream_200_with_an_escaped_error_key_fails_over(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """The error object's key written with a JSON escape ("\\u0065rror", as a server
    escaping more than it must might): the same failure as "error", not a 200."""
    body = b'{"\\u0065rror": {"message": "Provider returned error", "code": 502}}'
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    err = post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert err["message"] == "the upstream answered 200 with an error object"


@pytest.mark.parametrize("doc", [
    {"error": {"message": "Provider disconnected", "code": 502},
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "calm"},
                  "finish_reason": "error"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "calm"},
                  "finish_reason": "error"}]},
    {"error": {}},  # an empty error object alone, as a stream's chunk of it is
    {"error": {}, "choices": []},
    {"error": {}, "usage": {"prompt_tokens": 9, "completion_tokens": 0}},  # no answer
    # `data` is an embeddings answer's, no chat answer's: no exemption here
    {"error": {"message": "Provider returned error"}, "data": [{"x": 1}]},
    {"error": {}, "data": [{"x": 1}]},
])
def test_upstream_200_with_a_failed_choice_fails_over(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], doc: dict[str, Any]
) -> None:
    """A 200 whose choice finished with "error" (with an error object beside it or not)
    is a failed generation, not an answer: with retries spent, a 502."""
    body = orjson.dumps(doc)
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    err = post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert err["message"] == "the upstream answered 200 with an error object"
    assert outcomes(stack) == {("eu-north-a", "bad_response"): 3}


def test_json_body_coming_slowly_is_read_while_bytes_keep_coming(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """The headers at once, then a body in pieces 0.25 s apart, 1.5 s in all: past
    timeouts.first_byte (0.5 s), but within it for the first piece and within idle
    (0.5 s) for each next one, so the answer is whole (SPEC §4)."""
    up = scripted(lambda conn, n, req: (_slow_json(0.2, 6), True))
    stack = make_stack(cfg(timeouts={"first_byte": 0.5, "idle": 0.5},
                           upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north"))
    assert a.status == 200 and a.json()["choices"][0]["message"]["content"] == "calm"
    assert a.elapsed > 1.0 and len(up.requests) == 1
    assert codes(stack) == {"200": 1}


def test_json_body_that_stops_coming_is_504_after_idle(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """The body begins, then the upstream goes silent: 504 once timeouts.idle has passed
    since its last bytes, not a whole timeouts.first_byte later."""
    up = scripted(lambda conn, n, req: ([*_slow_json(0.05, 2)[:3], 5.0], True))
    stack = make_stack(cfg(server={"retries": 0}, timeouts={"first_byte": 4, "idle": 0.4},
                           upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north"))
    a.error(504, "upstream_timeout")
    assert 0.4 < a.elapsed < 2.5
    assert outcomes(stack) == {("eu-north-a", "timeout"): 1}


def test_first_event_deadline_counts_from_the_request_not_the_headers(
    make_stack: MakeStack,
) -> None:
    """Headers after 0.35 s, the first event 0.35 s later: past timeouts.first_byte
    (0.5 s from the request, SPEC §4), so 504, though each wait alone was within it."""
    stack = make_stack(cfg(server={"retries": 0}, timeouts={"first_byte": 0.5}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True,
                         sim={"headers_delay_s": 0.35, "first_delay_s": 0.35}))
    a.error(504, "upstream_timeout")
    assert a.elapsed < 1.0
    assert outcomes(stack) == {("eu-north-a", "timeout"): 1}


def test_upstream_answer_that_is_not_json_is_502(stack: Stack) -> None:
    """A 200 whose body is not JSON is a failure: tried in the region only, then 502."""
    a = post(stack, chat(MINI, region="eu-west", sim={"malformed_after": 0}))
    a.error(502, "upstream_error")
    assert b"not json" not in a.body
    assert hits(stack)["eu-west-a"] + hits(stack)["eu-west-b"] == 3
    assert hits(stack)["us-east-a"] == 0
    assert sum(outcomes(stack).values()) == 3
    assert codes(stack) == {"502": 1}


def test_stale_pooled_connection_after_upstream_restart(stack: Stack) -> None:
    """The upstream restarts between two requests: the second still succeeds."""
    sim = stack.sims["eu-north-a"]
    first = post(stack, chat(LLAMA, region="eu-north"))
    port = sim.port
    stack.run(sim.stop())
    stack.run(sim.start(port=port))
    second = post(stack, chat(LLAMA, region="eu-north"))
    assert first.route()["attempts"] == 1 and second.route()["upstream"] == "eu-north-a"
    assert len(stack.requests_to("eu-north-a")) == 2
    retried = second.route()["attempts"] - 1
    assert outcomes(stack) == {("eu-north-a", "ok"): 2,
                               **({("eu-north-a", "connect_error"): 1} if retried else {})}
    assert codes(stack) == {"200": 2}


def test_stale_pooled_connection_closed_on_reuse(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """A pooled keep-alive connection the upstream drops on reuse: retried on a new one, 200."""
    up = scripted(lambda conn, n, body: None if n else (json_answer(), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    first = post(stack, chat(LLAMA, region="eu-north"))
    second = post(stack, chat(LLAMA, region="eu-north"))
    assert first.route()["attempts"] == 1
    assert second.route()["attempts"] == 2 and second.json()["choices"][0]["message"]["content"] == "calm"
    assert [(r.conn, r.n) for r in up.requests] == [(0, 0), (0, 1), (1, 0)]
    assert {r.headers["authorization"] for r in up.requests} == {
        f"Bearer {UPSTREAM_KEYS['eu-north-a']}"}
    assert outcomes(stack) == {("eu-north-a", "ok"): 2, ("eu-north-a", "connection_lost"): 1}
    assert codes(stack) == {"200": 2}


@pytest.mark.parametrize("session", [False, True])
def test_a_connection_idle_past_pool_idle_is_not_reused(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], session: bool,
) -> None:
    """A pooled connection idle for longer than timeouts.pool_idle is closed, not reused:
    an upstream that closes idle connections after about as long (uvicorn's 5 s) would
    close it as the request goes on it (the script drops a reused connection), a 502
    with no retries. Also through the ClientSession (`trust_env`)."""
    up = scripted(lambda conn, n, body: None if n else (json_answer(), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           server={"retries": 0, "trust_env": session},
                           timeouts={"pool_idle": 0.2}))
    first = post(stack, chat(LLAMA, region="eu-north"))
    time.sleep(0.5)
    second = post(stack, chat(LLAMA, region="eu-north"))
    assert first.status == second.status == 200
    assert second.route()["attempts"] == 1
    assert [(r.conn, r.n) for r in up.requests] == [(0, 0), (1, 0)]
    assert outcomes(stack) == {("eu-north-a", "ok"): 2}


@pytest.mark.parametrize("stray", ["answer", "408"])
@pytest.mark.parametrize(("stream", "session"), [(False, False), (True, False), (False, True)])
def test_a_pooled_connection_that_got_bytes_while_idle_is_not_used(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], stray: str, stream: bool,
    session: bool,
) -> None:
    """The upstream writes on a kept-alive connection while it idles in the pool: a
    second answer nobody asked for, or a 408 that announces its close. The next request
    goes on a new connection and gets its own answer, not that one (nor does every
    answer on the connection after it come one request late). Also through the
    ClientSession (`trust_env`, as with an egress proxy)."""
    extra = (_answer_of("200 OK", "application/json", b'{"stray": true}') if stray == "answer"
             else _answer_of("408 Request Timeout", "text/plain", b"idle", "Connection: close"))

    def answer(conn: int, n: int, body: bytes) -> tuple[bytes | list[bytes | float], bool]:
        if orjson.loads(body).get("stream"):
            return sse_answer([chunk(f"c{conn}n{n}"), b"data: [DONE]\n\n"]), False
        own = json_answer().replace(b'"calm"', f'"c{conn}n{n}"'.encode())  # (as long)
        return ([own, 0.2, extra] if (conn, n) == (0, 0) else own), True

    up = scripted(answer)
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           server={"trust_env": session}))
    first = post(stack, chat(LLAMA, region="eu-north"))
    assert first.json()["choices"][0]["message"]["content"] == "c0n0"
    time.sleep(0.6)  # the stray bytes have come
    second = post(stack, chat(LLAMA, region="eu-north", stream=stream))
    assert second.status == 200
    if stream:
        events = [obj_of(ev) for ev in data_events(second.events()) if b"[DONE]" not in ev]
        assert events[0]["choices"][0]["delta"] == {"content": "c1n0"}
        assert events[-1]["lowrouter"]["route"]["attempts"] == 1
    else:
        assert second.json()["choices"][0]["message"]["content"] == "c1n0"
        assert second.route()["attempts"] == 1
    assert [(r.conn, r.n) for r in up.requests] == [(0, 0), (1, 0)]
    wait_for(lambda: codes(stack) == {"200": 2})  # (a stream's, once its end is out)


# =======================================================================================
# passive health


def eject_eu_west_a(stack: Stack, **knobs: Any) -> None:
    """Five requests that eu-west-a fails and eu-west-b serves: eu-west-a is ejected."""
    faults(stack, ["eu-west-a"], fail_status=503, fail_count=-1, **knobs)
    for _ in range(upstream.EJECT_AFTER):
        route = post(stack, chat(MINI, region="eu-west")).route()
        assert (route["upstream"], route["attempts"]) == ("eu-west-b", 2)


def test_five_failures_eject_an_upstream(stack: Stack) -> None:
    """5 consecutive failures eject an upstream: skipped, usable=0, /readyz still 200."""
    eject_eu_west_a(stack)
    for _ in range(3):
        route = post(stack, chat(MINI, region="eu-west")).route()
        assert (route["upstream"], route["attempts"]) == ("eu-west-b", 1)
    assert hits(stack) == {"eu-west-a": 5, "eu-west-b": 8, "eu-north-a": 0, "us-east-a": 0}
    assert usable(stack, "eu-west-a") == 0 and usable(stack, "eu-west-b") == 1
    ready = get(stack, "/readyz")
    assert ready.status == 200 and ready.json()["usable_upstreams"] == 3
    assert outcomes(stack) == {("eu-west-a", "status_5xx"): 5, ("eu-west-b", "ok"): 8}
    assert codes(stack) == {"200": 8}


@pytest.mark.parametrize("region", ["eu-north", "eu-west"])
def test_last_usable_upstream_of_a_region_is_never_ejected(make_stack: MakeStack, region: str) -> None:
    """A whole region failing: one upstream is always kept usable (502s, never 503), and serves again."""
    stack = make_stack(cfg(server={"retries": 0}))
    names = [n for n in stack.sims if n.startswith(region)]
    faults(stack, names, fail_status=503, fail_count=-1)
    model = LLAMA if region == "eu-north" else MINI
    for _ in range(12):
        post(stack, chat(model, region=region)).error(502, "upstream_error")
    counts = hits(stack)
    if region == "eu-north":
        assert counts == {"eu-west-a": 0, "eu-west-b": 0, "eu-north-a": 12, "us-east-a": 0}
        assert usable(stack, "eu-north-a") == 1
    else:  # a is ejected after 5; b then fails 7 times and stays
        assert counts == {"eu-west-a": 5, "eu-west-b": 7, "eu-north-a": 0, "us-east-a": 0}
        assert (usable(stack, "eu-west-a"), usable(stack, "eu-west-b")) == (0, 1)
    assert get(stack, "/readyz").status == 200
    faults(stack, names, fail_status=None)
    route = post(stack, chat(model, region=region)).route()
    assert route["upstream"] == names[-1] and route["attempts"] == 1
    assert sum(v for (_, o), v in outcomes(stack).items() if o == "status_5xx") == 12
    assert codes(stack) == {"502": 12, "200": 1}


def test_a_failing_regions_last_upstream_is_tried_last_by_unpinned_requests(
    make_stack: MakeStack
) -> None:
    """eu-north-a, the cleanest upstream for llama and its region's only one, failing:
    kept usable for eu-north's pinned requests (never ejected), but not in the way of the
    others: after its 5th failure unpinned requests go elsewhere first, and come back to
    it once it has served again."""
    stack = make_stack(cfg(server={"retries": 0}))
    faults(stack, ["eu-north-a"], fail_status=503, fail_count=-1)
    for _ in range(5):
        post(stack, chat(LLAMA)).error(502, "upstream_error")
    for _ in range(3):
        route = post(stack, chat(LLAMA)).route()
        assert route["region"] != "eu-north" and route["attempts"] == 1
    post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")  # never a 503
    assert hits(stack)["eu-north-a"] == 6 and usable(stack, "eu-north-a") == 1
    faults(stack, ["eu-north-a"], fail_status=None)
    assert post(stack, chat(LLAMA, region="eu-north")).route()["upstream"] == "eu-north-a"
    assert post(stack, chat(LLAMA)).route()["upstream"] == "eu-north-a"


def test_a_models_last_upstream_in_a_region_is_never_ejected(make_stack: MakeStack) -> None:
    """eu-west-b serves only gpt-4o-mini, so eu-west-a is eu-west's last for llama: failing,
    it is kept (502s to eu-west's pinned llama requests, never 503), tried after eu-west-b
    by mini requests, and serves again once healthy."""
    stack = make_stack(cfg(server={"retries": 0},
                           upstreams={"eu-west-b": {"models": {MINI: "gpt-4o-mini"}}}))
    faults(stack, ["eu-west-a"], fail_status=503, fail_count=-1)
    for _ in range(upstream.EJECT_AFTER + 2):
        post(stack, chat(LLAMA, region="eu-west")).error(502, "upstream_error")
    assert usable(stack, "eu-west-a") == 1
    for _ in range(3):  # equal carbon, b the less loaded or not: a is the last resort
        assert post(stack, chat(MINI, region="eu-west")).route()["upstream"] == "eu-west-b"
    assert hits(stack) == {"eu-west-a": 7, "eu-west-b": 3, "eu-north-a": 0, "us-east-a": 0}
    faults(stack, ["eu-west-a"], fail_status=None)
    assert post(stack, chat(LLAMA, region="eu-west")).route()["upstream"] == "eu-west-a"
    assert codes(stack) == {"502": 7, "200": 4}


def test_after_cool_down_one_trial_request_readmits(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the cool-down exactly one trial request goes to the ejected upstream; its success readmits it."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.3)
    eject_eu_west_a(stack)
    faults(stack, ["eu-west-a"], fail_status=None)
    time.sleep(0.35)
    with ThreadPoolExecutor(1) as ex:
        trial = ex.submit(post, stack, chat(MINI, region="eu-west", sim={"headers_delay_s": 0.5}))
        wait_for(lambda: len(stack.requests_to("eu-west-a")) == 6)
        during = post(stack, chat(MINI, region="eu-west"))  # the trial is out: not a second one
        route = trial.result().route()
    assert (route["upstream"], route["attempts"]) == ("eu-west-a", 1)
    assert during.route()["upstream"] == "eu-west-b"
    health = stack.call(lambda: attrs.asdict(stack.runtime.pool.health["eu-west-a"]))
    assert (health["failures"], health["ejections"], health["trial"]) == (0, 0, False)
    assert usable(stack, "eu-west-a") == 1
    assert hits(stack)["eu-west-a"] == 6
    assert outcomes(stack) == {("eu-west-a", "status_5xx"): 5, ("eu-west-a", "ok"): 1,
                               ("eu-west-b", "ok"): 6}
    assert codes(stack) == {"200": 7}


def test_failed_trial_ejects_again_for_longer(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed trial ejects the upstream again, for twice the cool-down."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.3)
    eject_eu_west_a(stack)
    time.sleep(0.35)
    route = post(stack, chat(MINI, region="eu-west")).route()  # the trial, failing
    assert (route["upstream"], route["attempts"]) == ("eu-west-b", 2)
    h = stack.call(lambda: stack.runtime.pool.health["eu-west-a"])
    left = stack.call(lambda: h.cool_down_left(time.monotonic()))
    assert h.ejections == 2 and 0.45 < left <= 0.6
    assert post(stack, chat(MINI, region="eu-west")).route()["attempts"] == 1
    assert hits(stack)["eu-west-a"] == 6 and usable(stack, "eu-west-a") == 0
    assert outcomes(stack)[("eu-west-a", "status_5xx")] == 6
    assert codes(stack) == {"200": 7}


def test_ejections_and_the_readmission_are_logged(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each ejection is one warning naming the upstream, its cool-down, the failures
    and the kind of the last (words of ours, not the upstream's), however many requests
    fail meanwhile, as nginx logs "upstream server temporarily disabled"; the trial that
    answers brings one info line. Nothing per request."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.3)
    caplog.set_level(logging.INFO, logger=MAIN)
    eject_eu_west_a(stack)
    for _ in range(3):  # skipped while it cools down: no more lines
        post(stack, chat(MINI, region="eu-west"))
    assert re.findall(r"upstream eu-west-a .*", caplog.text) == [
        "upstream eu-west-a ejected for 0.3 s after 5 failures in a row (the last: "
        "status_5xx 503)"]
    time.sleep(0.35)
    post(stack, chat(MINI, region="eu-west"))  # the trial, failing: again, for longer
    assert re.findall(r"upstream eu-west-a .*", caplog.text)[1:] == [
        "upstream eu-west-a ejected for 0.6 s after 6 failures in a row (the last: "
        "status_5xx 503)"]
    faults(stack, ["eu-west-a"], fail_status=None)
    time.sleep(0.65)
    assert post(stack, chat(MINI, region="eu-west")).route()["upstream"] == "eu-west-a"
    assert re.findall(r"upstream eu-west-a .*", caplog.text)[2:] == [
        "upstream eu-west-a is usable again: it answered"]


@pytest.mark.parametrize("stream", [False, True])
def test_trial_whose_client_leaves_before_the_answer(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """The trial after a cool-down, its client gone before the upstream answered: no
    verdict, and the upstream is not left unusable for good (the next request is a trial)."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.3)
    eject_eu_west_a(stack)
    faults(stack, ["eu-west-a"], fail_status=None)
    time.sleep(0.35)
    with open_raw(stack) as sock:
        sock.sendall(request(orjson.dumps(chat(MINI, region="eu-west", stream=stream,
                                                sim={"headers_delay_s": 5}))))
        wait_for(lambda: len(stack.requests_to("eu-west-a")) == 6)
    rec = stack.requests_to("eu-west-a")[-1]
    wait_for(lambda: rec.client_closed, timeout=2)
    assert_idle(stack)
    h = stack.call(lambda: attrs.asdict(stack.runtime.pool.health["eu-west-a"]))
    assert (h["failures"], h["trial"]) == (upstream.EJECT_AFTER, False)
    route = post(stack, chat(MINI, region="eu-west")).route()  # the next trial, which readmits
    assert (route["upstream"], route["attempts"]) == ("eu-west-a", 1)
    assert usable(stack, "eu-west-a") == 1


@pytest.mark.parametrize(("retry_after", "cool"), [("120", 120.0), ("9999", 300.0)])
def test_ejection_honours_retry_after(stack: Stack, retry_after: str, cool: float) -> None:
    """The cool-down is at least the upstream's Retry-After, capped at 300 s."""
    eject_eu_west_a(stack, retry_after=retry_after)
    left = stack.call(lambda: stack.runtime.pool.health["eu-west-a"].cool_down_left(time.monotonic()))
    assert cool - 5 < left <= cool
    assert usable(stack, "eu-west-a") == 0
    assert outcomes(stack)[("eu-west-a", "status_5xx")] == 5
    assert codes(stack) == {"200": 5}


def test_a_reload_that_leaves_an_ejected_upstream_its_regions_last_keeps_it(
    stack: Stack, seen: Seen
) -> None:
    """eu-west-a ejected while eu-west-b served, then a reload that drops eu-west-b: the
    region's one upstream is kept, as its ejection would have been under the new config
    (SPEC §2: the last usable upstream of a region is never ejected), not left cooling
    down with its region's pinned requests 503 for up to 300 s. Failing still, it gets
    them (502s, never 503); unpinned requests try it last; it serves again once healthy."""
    eject_eu_west_a(stack)
    reload_with(stack, {**stack.data, "upstreams": [
        u for u in stack.data["upstreams"] if u["name"] != "eu-west-b"]})
    assert usable(stack, "eu-west-a") == 1
    assert [line for line in seen.logs if "upstream eu-west-a, ejected, is left by the "
            "reload region eu-west's last usable upstream" in line]
    post(stack, chat(MINI, region="eu-west")).error(502, "upstream_error")
    assert post(stack, chat(MINI)).route()["upstream"] == "us-east-a"  # a: last
    faults(stack, ["eu-west-a"], fail_status=None)
    route = post(stack, chat(MINI, region="eu-west")).route()
    assert (route["upstream"], route["attempts"]) == ("eu-west-a", 1)
    assert post(stack, chat(MINI)).route()["upstream"] == "eu-west-a"  # in its place again
    assert hits(stack)["eu-west-a"] == 5 + 3 + 2  # the 502: its 2 retries on it too
    assert codes(stack) == {"200": 8, "502": 1}


def reload_with(stack: Stack, data: dict[str, Any], environ: dict[str, str] | None = None) -> None:
    """A reload to `data` (with `environ` for the keys), as SIGHUP does it."""
    from conftest import ENVIRON

    from lrproxy.config import parse_config, resolve_secrets

    config = parse_config(data, source="test")
    stack.call(lambda: stack.runtime.install(config, resolve_secrets(config, environ or ENVIRON)))


def with_upstream(data: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    """`data` with the upstream `name`'s fields changed (a copy: `data` stays as it is)."""
    return {**data, "upstreams": [{**u, **fields} if u["name"] == name else u
                                  for u in data["upstreams"]]}


@pytest.mark.parametrize("change", ["api_key", "base_url", "nothing"])
def test_a_reload_that_mends_an_upstream_gives_it_fresh_health(
    stack: Stack, seen: Seen, change: str
) -> None:
    """eu-west-a ejected for failures of its config's making (a wrong key: 401s; a
    wrong base_url: no connection), then a reload that mends it: a changed URL, key,
    proxy or CA bundle is a new upstream, with fresh health, tried at once. A reload
    that leaves them as they were (a new max_concurrency) keeps its ejection."""
    good = stack.data
    wrong = ({"base_url": f"http://127.0.0.1:{closed_port()}/v1"} if change == "base_url"
             else {"api_key_env": "UP_EU_WEST_B"})
    if change != "base_url":
        seen.expected_errors.append(_auth_refused_line("eu-west-a", 401))
    reload_with(stack, with_upstream(good, "eu-west-a", **wrong))
    for _ in range(upstream.EJECT_AFTER):
        route = post(stack, chat(MINI, region="eu-west")).route()
        assert (route["upstream"], route["attempts"]) == ("eu-west-b", 2)
    assert usable(stack, "eu-west-a") == 0
    if change == "nothing":
        reload_with(stack, with_upstream(good, "eu-west-a", max_concurrency=9, **wrong))
        route = post(stack, chat(MINI, region="eu-west")).route()
        assert (route["upstream"], route["attempts"]) == ("eu-west-b", 1)
        assert usable(stack, "eu-west-a") == 0
        assert not [line for line in seen.logs if "upstream eu-west-a changed" in line]
        return
    reload_with(stack, good)
    assert [line for line in seen.logs if "upstream eu-west-a changed" in line]
    assert usable(stack, "eu-west-a") == 1
    route = post(stack, chat(MINI, region="eu-west")).route()
    assert (route["upstream"], route["attempts"]) == ("eu-west-a", 1)
    health = stack.call(lambda: attrs.asdict(stack.runtime.pool.health["eu-west-a"]))
    assert (health["failures"], health["ejections"]) == (0, 0)


# =======================================================================================
# faults during a stream


def stream_error(a: Answer, code: str) -> tuple[list[bytes], dict[str, Any]]:
    """A §1.1 failed stream: 200, events, then one error event, no [DONE]; (before, error)."""
    events = a.events()
    last = obj_of(events[-1])
    assert last["error"]["code"] == code and set(last["error"]) == {"message", "type", "code"}
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert "eco" in last["lowrouter"]
    assert b"[DONE]" not in a.body
    return events[:-1], last


def test_stream_cut_ends_with_error_event(stack: Stack) -> None:
    """An upstream cut mid-stream: what came is relayed, then the error event, no [DONE]."""
    a = post(stack, chat(LLAMA, stream=True, sim={"cut_after": 3}))
    before, last = stream_error(a, "upstream_error")
    _, rec = only_hit(stack)
    assert before == split_events(rec.sent)  # role chunk + 3 words, byte for byte
    assert last["lowrouter"]["eco"]["tokens"]["completion"] == len(before)  # one per chunk
    # in words, not aiohttp's class names (ClientPayloadError)
    assert last["error"]["message"] == ("upstream connection lost: the answer's body "
                                        "broke off")
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    # one attempt, one outcome: a stream's is counted at its end
    assert outcomes(stack) == {("eu-north-a", "stream_connection_lost"): 1}


def test_stream_stall_past_idle_ends_with_timeout_event(make_stack: MakeStack) -> None:
    """Upstream silent past timeouts.idle mid-stream: upstream_timeout event, upstream hung up."""
    stack = make_stack(cfg(timeouts={"idle": 0.5}))
    a = post(stack, chat(LLAMA, stream=True, sim={"stall_after": 2, "stall_s": 5}))
    before, _ = stream_error(a, "upstream_timeout")
    assert 0.45 < a.elapsed < 2
    _, rec = only_hit(stack)
    assert len(data_events(before)) == 3
    wait_for(lambda: rec.client_closed)
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_timeout"): 1}


def test_stream_malformed_event_ends_with_error_event(stack: Stack) -> None:
    """A malformed event mid-stream: never relayed; the error event ends the stream."""
    # 20 ms apart: the role chunk reaches the client before the bad event is read (in one
    # read with the first events, the stream would fail over instead: the next test).
    a = post(stack, chat(LLAMA, stream=True, sim={"malformed_after": 2, "chunk_delay_s": 0.02}))
    before, _ = stream_error(a, "upstream_error")
    _, rec = only_hit(stack)
    assert b"{not json" in bytes(rec.sent) and b"{not json" not in a.body
    assert before == split_events(rec.sent)[:3]
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_bad_response"): 1}


def test_stream_over_total_is_ended(make_stack: MakeStack) -> None:
    """A stream still going at timeouts.total: ended with an upstream_timeout event."""
    stack = make_stack(cfg(timeouts={"total": 1}))
    a = post(stack, chat(LLAMA, stream=True, sim={"chunks": 40, "chunk_delay_s": 0.1}))
    before, _ = stream_error(a, "upstream_timeout")
    assert 0.9 < a.elapsed < 2 and 3 < len(before) < 15
    _, rec = only_hit(stack)
    wait_for(lambda: rec.client_closed)
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_timeout"): 1}
    # the proxy's own cap, not the upstream's failure: it counts towards no ejection
    assert stack.call(lambda: stack.runtime.pool.health["eu-north-a"].failures) == 0


def test_upstream_error_object_in_stream_raises_api_error(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """An error object inside the upstream's stream, after events went to the client: the
    SDK gets the text so far, then APIError."""
    leak = f"Incorrect API key provided: {UPSTREAM_KEYS['eu-north-a']}"
    events = [chunk("calm "), chunk("seas"),
              b'data: {"error": {"message": ' + orjson.dumps(leak) + b', "type": "server_error"}}\n\n',
              chunk("never")]
    up = scripted(lambda conn, n, body: ([sse_answer(events[:2]), b"".join(events[2:])], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    got: list[str] = []
    with stack.client() as client, pytest.raises(openai.APIError) as ei:
        for c in client.chat.completions.create(model=LLAMA, messages=MSGS, stream=True):
            got.append(c.choices[0].delta.content or "")
    assert got == ["calm ", "seas"]
    assert isinstance(ei.value.body, dict) and ei.value.body["code"] == "upstream_error"
    assert "Incorrect" not in str(ei.value.body)
    (rec,) = up.requests
    assert orjson.loads(rec.body)["stream_options"] == {"include_usage": True}
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_bad_response"): 1}


@pytest.mark.parametrize("done", [False, True])
def test_upstream_error_chunk_with_choices_mid_stream_is_a_failure(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], done: bool
) -> None:
    """OpenRouter's failure after tokens went: an error object beside a choice that
    finished with "error" (the §1.1 event's own shape), its body then ending, with or
    without [DONE]. The stream failed: the §1.1 error event and no [DONE] (as for an
    error object alone), stream_error, and the upstream's failure; not a 200 whose
    [DONE] the proxy adds."""
    events = [chunk("calm "), b'data: {"id":"x","object":"chat.completion.chunk",'
              b'"error":{"code":"server_error","message":"Provider disconnected"},'
              b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n']
    if done:
        events.append(b"data: [DONE]\n\n")
    up = scripted(lambda conn, n, body: ([sse_answer(events[:1]), b"".join(events[1:])], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, stream=True))
    assert b"[DONE]" not in a.body
    _, last = stream_error(a, "upstream_error")
    assert last["error"]["message"] == ("the upstream reported an error inside the stream: "
                                        "Provider disconnected")
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_bad_response"): 1}
    assert stack.call(lambda: stack.runtime.pool.health["eu-north-a"].failures) == 1


def test_upstream_error_object_mid_stream_is_quoted(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """An error object inside a started stream: the error event quotes the upstream's
    message (as for an error status after the commit), so the user sees why."""
    events = [chunk("calm "), b'data: {"error": {"message": "overloaded inside", '
              b'"type": "server_error", "code": "overloaded"}}\n\n']
    up = scripted(lambda conn, n, body: ([sse_answer(events[:1]), events[1]], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    _, last = stream_error(post(stack, chat(LLAMA, stream=True)), "upstream_error")
    assert last["error"]["message"] == ("the upstream reported an error inside the stream: "
                                        "overloaded inside")


@pytest.mark.parametrize(("eol", "before"), [(b"\n", b""), (b"\r\n", b""),
                                           (b"\n", b"event: error\n"), (b"\r\n", b"id: 7\r\n")])
def test_llama_cpps_error_field_mid_stream_is_quoted(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], eol: bytes, before: bytes
) -> None:
    """llama.cpp's server (before 2025) failed a stream with an `error:` field, not
    `data:`, then ended it: the error event quotes its message, where it used to say
    only that the stream ended early; the field itself never reaches the client."""
    field = (before + b'error: {"code":500,"message":"failed to decode the batch",'
             b'"type":"server_error"}' + eol + eol)
    up = scripted(lambda conn, n, body: ([sse_answer([chunk("calm ")]), field], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, stream=True))
    assert b"error: {" not in a.body and b"[DONE]" not in a.body
    _, last = stream_error(a, "upstream_error")
    assert last["error"]["message"] == ("the upstream reported an error inside the stream: "
                                        "failed to decode the batch")
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert outcomes(stack) == {("eu-north-a", "stream_bad_response"): 1}


def test_an_error_field_that_is_no_error_object_passes(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """An `error:` field that holds no error object (text, an empty object) is an
    unknown field as any other: passed on, the stream goes on to its end."""
    events = [chunk("calm "), b"error: just a word\n\n", b"error: {}\n\n", chunk("seas"),
              chunk("").replace(b'"finish_reason":null', b'"finish_reason":"stop"'),
              b"data: [DONE]\n\n"]
    up = scripted(lambda conn, n, body: ([sse_answer(events)], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, stream=True))
    assert a.status == 200 and b"error: just a word\n\nerror: {}\n\n" in a.body
    assert b'"content":"seas"' in a.body and a.body.endswith(b"data: [DONE]\n\n")
    wait_for(lambda: codes(stack) == {"200": 1})


ERROR_EVENT = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'


@pytest.mark.parametrize("first", ["error", "content-then-error", "malformed"])
def test_failure_in_a_streams_first_read_fails_over(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], first: str
) -> None:
    """A stream that fails before anything reached the client is failed over like a 5xx
    (SPEC §1, §2): the client gets a clean stream from the next upstream."""
    opening = {"error": [ERROR_EVENT], "content-then-error": [chunk("calm "), ERROR_EVENT],
               "malformed": [b"data: {not json\n\n"]}[first]
    up = scripted(lambda conn, n, body: (sse_answer(opening), False))
    stack = make_stack(cfg(upstreams={"eu-west-a": {"base_url": up.base_url}}))
    with stack.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MINI, messages=MSGS, stream=True, extra_body={"route": {"region": "eu-west"}})
        chunks = list(raw.parse())
    assert raw.headers["X-LowRouter-Upstream"] == "eu-west-b"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and "calm" not in text
    assert chunks[-1].model_extra["lowrouter"]["route"]["attempts"] == 2  # type: ignore[index]
    assert len(up.requests) == 1
    wait_for(lambda: codes(stack) == {"200": 1})
    assert outcomes(stack) == {("eu-west-a", "bad_response"): 1, ("eu-west-b", "ok"): 1}


def test_failure_in_a_streams_first_read_with_retries_spent_is_502(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """The only upstream fails every stream before its first event: a 502, not a 200 with
    an error event; its message is not passed on."""
    up = scripted(lambda conn, n, body: (sse_answer([ERROR_EVENT]), False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    post(stack, chat(LLAMA, region="eu-north", stream=True)).error(502, "upstream_error")
    assert len(up.requests) == 3  # retries = 2
    assert b"overloaded" not in post(stack, chat(LLAMA, region="eu-north", stream=True)).body


def test_streams_cut_mid_way_eject_their_upstream(stack: Stack) -> None:
    """Failures after a stream's first event count towards ejection like any other: five
    streams in a row cut by eu-west-a eject it (its first event does not reset the count)."""
    for n in range(upstream.EJECT_AFTER):
        a = post(stack, chat(MINI, region="eu-west", stream=True,
                             sim={"cut_after": 1, "chunk_delay_s": 0.02}))
        stream_error(a, "upstream_error")
        assert a.header("x-lowrouter-upstream") == "eu-west-a", n
    wait_for(lambda: usable(stack, "eu-west-a") == 0)
    assert post(stack, chat(MINI, region="eu-west")).route()["upstream"] == "eu-west-b"
    assert outcomes(stack)[("eu-west-a", "stream_connection_lost")] == upstream.EJECT_AFTER


def test_a_kept_upstream_cools_down_and_is_tried_as_an_ejected_one() -> None:
    """a, eu-west's only upstream for m2, failing: kept (usable, tried last) for the
    cool-down an ejection would have had, then one trial; a failed trial keeps it for
    longer, honouring Retry-After, and a success of its own (a pinned request) lets it
    back."""
    pool = upstream.Pool()
    pool.configure([Upstream("a", "r", "http://a/v1", {"m1": "x", "m2": "y"}),
                    Upstream("b", "r", "http://b/v1", {"m1": "x"})])
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", 0.0)
    h = pool.health["a"]
    assert pool.usable("a", 1.0) and pool.last_resort("a", 1.0)
    later = upstream.COOL_DOWN_S + 1
    assert not pool.last_resort("a", later)  # cooled down: in its place again, for one
    held, trial = pool.acquire("a", later)
    assert trial is True
    assert pool.usable("a", later) and pool.last_resort("a", later)  # the rest: last
    pool.failed("a", later, retry_after=120, trial=True, held=held)
    assert (h.ejections, h.ejected_until) == (2, later + 120)  # over 2 × 30 s
    assert pool.last_resort("a", later + 119) and pool.usable("a", later + 119)
    pool.failed("a", later + 1)  # a pinned request's failure meanwhile: no change
    assert (h.ejections, h.ejected_until) == (2, later + 120)
    # after this cool-down too, one trial: other requests (pinned ones, which only it
    # serves) are no trial, and their failures lengthen nothing
    again = later + 121
    held, trial = pool.acquire("a", again)
    assert trial is True
    for _ in range(3):
        other, trial = pool.acquire("a", again)
        assert trial is False
        pool.failed("a", again, held=other)
    assert h.ejections == 2
    pool.failed("a", again, trial=True, held=held)
    assert (h.ejections, h.ejected_until) == (3, again + 3 * upstream.COOL_DOWN_S)
    pool.succeeded("a")  # a pinned request served
    assert not pool.last_resort("a", again + 1) and (h.failures, h.ejections) == (0, 0)


def test_an_upstream_awaiting_its_trial_is_no_alternative_to_the_last_usable_one() -> None:
    """a ejected, its cool-down over, its trial not sent yet; b, eu-west's other upstream,
    then fails 5 times: b is its region's last usable one (a has still to prove itself)
    and is kept, not ejected; else, with a's trial out, the region had none usable: every
    pinned request 503 for as long as that trial takes (a first_byte, for a hung one)."""
    pool = upstream.Pool()
    pool.configure([Upstream("a", "r", "http://a/v1", {}), Upstream("b", "r", "http://b/v1", {})])
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", 0.0)
    later = upstream.COOL_DOWN_S + 1
    assert pool.usable("a", later)  # for its trial
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("b", later)
    assert pool.health["b"].kept
    held, trial = pool.acquire("a", later)  # a's trial, out
    assert trial is True
    assert pool.usable("b", later) and pool.last_resort("b", later)
    pool.failed("a", later, trial=True, held=held)  # a fails its trial: b kept, a ejected
    assert not pool.usable("a", later) and not pool.health["a"].kept


def test_a_trial_whose_client_leaves_lets_another_trial_go() -> None:
    """The one trial request after a cool-down ends with no verdict (its client left): the
    upstream is not stuck unusable, the next request is the trial."""
    pool = upstream.Pool()
    pool.configure([Upstream("a", "r", "http://a/v1", {}), Upstream("b", "r", "http://b/v1", {})])
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", 0.0)
    later = upstream.COOL_DOWN_S + 1
    assert not pool.usable("a", 1.0) and pool.usable("a", later)
    held, trial = pool.acquire("a", later)
    assert trial is True  # this attempt is the trial
    assert not pool.usable("a", later)  # the trial is out
    assert pool.acquire("b", later)[1] is False
    pool.release(held)
    pool.abandoned("a")
    assert pool.usable("a", later)
    assert pool.health["a"].failures == upstream.EJECT_AFTER  # no verdict: counts unchanged


def test_verdicts_on_an_upstream_a_reload_replaced_change_nothing() -> None:
    """A request counted on an upstream that one reload removed and the next added back
    gives its verdict on the Health it was counted on: the new one's counts and trial
    stay as they are (only one trial at a time)."""
    ups = [Upstream("a", "r", "http://a/v1", {}), Upstream("b", "r", "http://b/v1", {})]
    pool = upstream.Pool()
    pool.configure(ups)
    old, _ = pool.acquire("a", 0.0)
    pool.configure(ups[1:])
    pool.configure(ups)  # "a" again, with a new Health
    pool.failed("a", 0.0, held=old)
    assert pool.health["a"].failures == 0
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", 0.0)
    later = upstream.COOL_DOWN_S + 1
    _, trial = pool.acquire("a", later)
    assert trial
    pool.abandoned("a", held=old)  # the old request's: not the trial
    assert not pool.usable("a", later)  # the trial is still out: no second one
    pool.succeeded("a", trial=True, held=old)
    assert pool.health["a"].failures == upstream.EJECT_AFTER


def _ejected_pool() -> upstream.Pool:
    """Upstreams a and b of one region, a ejected at time 0 (its first cool-down)."""
    pool = upstream.Pool()
    pool.configure([Upstream("a", "r", "http://a/v1", {}), Upstream("b", "r", "http://b/v1", {})])
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", 0.0)
    assert pool.health["a"].ejected_until == upstream.COOL_DOWN_S
    return pool


def test_late_verdicts_neither_lengthen_nor_end_a_cool_down() -> None:
    """Answers to requests sent before the ejection (in flight meanwhile) change nothing:
    failures do not eject it again for 30 s × n more, a success does not readmit it;
    only the trial's verdict does (SPEC §2)."""
    pool = _ejected_pool()
    for t in (1.0, 2.0, 3.0):
        pool.failed("a", t)
    pool.succeeded("a")
    h = pool.health["a"]
    assert (h.ejections, h.ejected_until) == (1, upstream.COOL_DOWN_S)
    assert not pool.usable("a", upstream.COOL_DOWN_S - 0.1)
    end = upstream.COOL_DOWN_S
    assert pool.acquire("a", end)[1] is True  # the trial
    pool.failed("a", end, trial=True)  # fails: ejected again, for twice as long
    assert not pool.usable("a", end + 2 * upstream.COOL_DOWN_S - 0.1)
    assert pool.usable("a", end + 2 * upstream.COOL_DOWN_S)
    assert pool.acquire("a", end + 2 * upstream.COOL_DOWN_S)[1] is True
    pool.succeeded("a", trial=True)  # the trial answers: back for good
    assert (h.failures, h.ejections) == (0, 0) and pool.usable("a", 0.0)


def test_a_retry_skips_an_upstream_ejected_since_the_order_was_made() -> None:
    """Failover takes the candidates in the order made when the request came; one of
    them ejected since then is not tried during its cool-down."""
    from types import SimpleNamespace

    from lrproxy.relay import _next_candidate

    pool = _ejected_pool()
    order: Any = [SimpleNamespace(upstream=SimpleNamespace(name=n)) for n in ("b", "a")]
    assert _next_candidate(order, ["b"], pool, 1.0).upstream.name == "b"  # not a
    assert _next_candidate(order, ["b"], pool, None).upstream.name == "a"  # 1st try: as ordered


def test_an_upstream_has_no_cap_of_its_own_by_default() -> None:
    """max_concurrency left out (0): an upstream takes any number of requests at once,
    as nginx's max_conns = 0 does (server.max_inflight bounds them); a cap given holds."""
    from types import SimpleNamespace

    from conftest import base_config

    from lrproxy.config import parse_config
    from lrproxy.relay import _next_candidate

    data = base_config()
    for u in data["upstreams"]:
        u["base_url"] = "http://127.0.0.1:9/v1"
    data["upstreams"][1]["max_concurrency"] = 2
    config = parse_config(data, source="test")
    free, capped = config.upstreams[0], config.upstreams[1]
    assert free.max_concurrency == 0 and capped.max_concurrency == 2
    pool = upstream.Pool()
    pool.configure(config.upstreams)
    for _ in range(100_000):
        pool.acquire(free.name, 0.0)
    order: Any = [SimpleNamespace(upstream=free)]
    assert _next_candidate(order, [], pool, None) is order[0]
    order = [SimpleNamespace(upstream=capped)]
    for _ in range(2):
        assert _next_candidate(order, [], pool, None) is order[0]
        pool.acquire(capped.name, 0.0)
    assert _next_candidate(order, [], pool, None) is None


async def test_the_usable_gauge_hears_when_a_cool_down_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool says so when an upstream is ejected and again when its cool-down ends,
    so lrproxy_upstream_usable turns 1 then, not at the next 5 s feed poll."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.05)
    changes: list[float] = []
    pool = upstream.Pool()
    pool.configure([Upstream("a", "r", "http://a/v1", {}), Upstream("b", "r", "http://b/v1", {})])
    pool.on_change = lambda: changes.append(time.monotonic())
    t0 = time.monotonic()
    for _ in range(upstream.EJECT_AFTER):
        pool.failed("a", t0)
    assert len(changes) == 1
    await asyncio.sleep(0.3)
    assert len(changes) == 2 and changes[1] - t0 >= 0.05
    assert pool.usable("a", changes[1])


def test_upstream_silence_gets_keepalive_comments(make_stack: MakeStack) -> None:
    """Upstream silence past timeouts.keepalive mid-stream: `: keep-alive` comments, then the rest."""
    stack = make_stack(cfg(timeouts={"keepalive": 0.3, "idle": 3}))
    a = post(stack, chat(LLAMA, stream=True, sim={"stall_after": 1, "stall_s": 1.0}))
    events = a.events()
    assert events.count(b": keep-alive\n\n") >= 2 and events[-1] == b"data: [DONE]\n\n"
    _, rec = only_hit(stack)
    assert data_events(events)[:2] == split_events(rec.sent)[:2]
    wait_for(lambda: codes(stack) == {"200": 1})
    assert outcomes(stack) == {("eu-north-a", "ok"): 1}


def test_comments_without_end_before_the_first_event_are_bounded(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comments before the first event wait with it (SPEC §1.1), but not without bound:
    past an event's limit of them the attempt has failed (here the limit is cut to 64 KiB)."""
    from lrproxy import relay
    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 1 << 16)
    flood = [b": processing\n\n" * 1000] * 20  # 300 KB in 20 writes, then an event
    up = scripted(lambda conn, n, body: ([sse_answer([]), *flood, chunk("late")], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    err = post(stack, chat(LLAMA, region="eu-north", stream=True)).error(502, "upstream_error")
    assert err["message"] == "the upstream sent over 16 MiB of comments before its first event"
    assert outcomes(stack) == {("eu-north-a", "bad_response"): 3}


@pytest.mark.parametrize("first", [False, True])
def test_an_event_without_end_is_bounded_before_and_after_the_first(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
    monkeypatch: pytest.MonkeyPatch, first: bool,
) -> None:
    """An event that never ends is held to the event limit (cut here to 64 KiB): before
    the first event it fails the attempt (once it was held until first_byte), after it
    the stream ends with the error event."""
    from lrproxy import relay
    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 1 << 16)
    flood = [b"data: {" + b'"x":1,' * 5000] + [b'"x":1,' * 5000] * 20  # 630 KB, no end
    events = [chunk("a")] if first else []
    up = scripted(lambda conn, n, body: ([sse_answer(events), *flood, chunk("late")], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    if first:
        before, last = stream_error(a, "upstream_error")
        assert before == [chunk("a")]
        message, want = last["error"]["message"], {("eu-north-a", "stream_bad_response"): 1}
    else:
        message = a.error(502, "upstream_error")["message"]
        want = {("eu-north-a", "bad_response"): 3}
    assert "the upstream sent an event over 16 MiB" in message
    wait_for(lambda: outcomes(stack) == want)


FINISH_CHUNK = chunk("").replace(b'"finish_reason":null', b'"finish_reason":"stop"')


@pytest.mark.parametrize(("tail", "ok"), [
    (b"", False),  # no finish, no [DONE]: cut (a close ends an unframed body, a reset too)
    (FINISH_CHUNK, True),  # the answer came to its finish: a clean end without [DONE]
    (FINISH_CHUNK + b"data: [DONE]\n", True),  # [DONE] without its blank line
    (FINISH_CHUNK + b"data: [DO", False),  # cut inside an event
    (b'data: {"x":"' + b"a" * 100_000, False),  # inside one past 64 KiB (a bytearray held)
], ids=["no-finish", "finish", "done-without-blank-line", "cut-in-event", "cut-in-long-event"])
def test_an_unframed_stream_that_ends_early_is_a_cut(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], tail: bytes, ok: bool,
) -> None:
    """A stream without chunked framing ends at any close. One that ends before its
    finish chunk was cut: the error event, not a short answer passed as whole."""
    up = scripted(lambda conn, n, body: ([sse_answer([chunk("Hello"), chunk(" world")]),
                                          tail], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    if ok:
        events = a.events()
        assert events[:2] == [chunk("Hello"), chunk(" world")]
        assert events[-1] == b"data: [DONE]\n\n"
        assert obj_of(events[-2])["choices"][0]["finish_reason"] == "stop"
        want = {("eu-north-a", "ok"): 1}
    else:
        before, last = stream_error(a, "upstream_error")
        assert before[:2] == [chunk("Hello"), chunk(" world")]  # (then a finish chunk held)
        assert last["lowrouter"]["eco"]["tokens"]["completion"] == len(before)
        want = {("eu-north-a", "stream_connection_lost" if not tail else
                 "stream_bad_response"): 1}
    wait_for(lambda: outcomes(stack) == want)


@pytest.mark.parametrize("code", [400, "422"])
def test_an_error_event_with_a_client_errors_code_before_the_first_event_is_that_4xx(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], code: int | str,
) -> None:
    """vLLM refuses a request it has begun to stream (an invalid guided-decoding schema)
    with an error event whose code is 400, before any chunk: the client gets that 400
    and the upstream's error object, as for a 4xx answer (SPEC §1), counted
    `passed_4xx`; not a 502 that the SDK retries, nor the upstream's failure (six such
    requests do not eject it)."""
    err = {"object": "error", "message": "Invalid JSON schema for guided decoding",
           "type": "BadRequestError", "param": None, "code": code}
    refusal = sse_answer([b"data: " + orjson.dumps({"error": err}) + b"\n\n",
                          b"data: [DONE]\n\n"])
    up = scripted(lambda conn, n, body: (refusal, False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    for _ in range(6):
        a = post(stack, chat(LLAMA, region="eu-north", stream=True))
        assert a.status == int(code) and a.json() == {"error": err}
        assert a.header("x-lowrouter-upstream") == "eu-north-a"
    assert len(up.requests) == 6  # one attempt each: no failover, no retry
    assert outcomes(stack) == {("eu-north-a", "passed_4xx"): 6}
    assert usable(stack, "eu-north-a") == 1
    with stack.client() as client, pytest.raises(openai.APIStatusError) as e:
        list(client.chat.completions.create(model=LLAMA, messages=MSGS, stream=True))
    assert e.value.status_code == int(code) and e.value.body == err  # type: ignore[comparison-overlap]


def test_an_in_stream_refusal_after_the_keepalive_commit_is_no_failure_of_the_upstream(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """The same refusal, after the upstream's headers and a silence past
    timeouts.keepalive (a queued vLLM request): the client has its 200 and keep-alives,
    so it gets the error event with the upstream's message; the attempt is the
    upstream's success (`passed_4xx`), and six of them do not eject it."""
    err = {"message": "Invalid JSON schema for guided decoding", "code": 400}
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    up = scripted(lambda conn, n, body: (
        [head, 0.5, b"data: " + orjson.dumps({"error": err}) + b"\n\n"], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={"keepalive": 0.2}))
    for _ in range(6):
        a = post(stack, chat(LLAMA, region="eu-north", stream=True))
        assert a.status == 200
        _, last = stream_error(a, "upstream_error")
        assert "Invalid JSON schema for guided decoding" in last["error"]["message"]
    assert len(up.requests) == 6
    wait_for(lambda: outcomes(stack) == {("eu-north-a", "passed_4xx"): 6})
    assert usable(stack, "eu-north-a") == 1


@pytest.mark.parametrize("bad", ["malformed", "error object"])
def test_events_before_a_failure_in_the_first_read_after_the_keepalive_commit_are_relayed(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], bad: str,
) -> None:
    """An upstream that holds its headers past timeouts.keepalive (a long prefill): the
    client has its 200 (no failover). Its first read then holds content chunks, then a
    malformed event or an error object: the chunks go on as they came, then the error
    event, which quotes the error object's message and counts the chunks as the tokens
    used so far, as when a stream fails in a later read. Before, the error event came
    alone, with no tokens, and said only that the upstream reported an error."""
    err = {"message": "the GPU fell over", "type": "server_error", "code": 500}
    fail = (b"data: {not json\n\n" if bad == "malformed"
            else b"data: " + orjson.dumps({"error": err}) + b"\n\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    sent = [chunk(""), chunk("calm "), chunk("seas")]
    up = scripted(lambda conn, n, body: ([0.5, b"".join([head, *sent, fail])], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={"keepalive": 0.2}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    before, last = stream_error(a, "upstream_error")
    assert [e for e in before if e != b": keep-alive\n\n"] == sent
    if bad == "error object":
        assert "the GPU fell over" in last["error"]["message"]
    tokens = last["lowrouter"]["eco"]["tokens"]
    assert tokens["completion"] == 3 and tokens["prompt"] > 0
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert stack.metric_sum("lrproxy_tokens_total", kind="completion") == 3
    assert outcomes(stack) == {("eu-north-a", "stream_bad_response"): 1}


@pytest.mark.parametrize(("before", "code"), [
    ([], 500), ([], 429), ([], 401), ([], "busy"), ([chunk("a")], 400)])
def test_an_error_event_that_is_no_refusal_fails_over(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], before: list[bytes],
    code: int | str,
) -> None:
    """The same event with a server error's code, a rate limit's, an auth failure's or no
    status at all is the upstream's failure, as before: 502, retried, counted. So is one
    coded 400 after a data event, even in the same read: vLLM codes any failure in its
    stream 400 (an out-of-memory after a few tokens too), and nothing having reached the
    client, the request fails over."""
    err = {"message": "overloaded", "type": "server_error", "code": code}
    refusal = sse_answer([*before, b"data: " + orjson.dumps({"error": err}) + b"\n\n"])
    up = scripted(lambda conn, n, body: (refusal, False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    a.error(502, "upstream_error")
    assert len(up.requests) == 3  # and its retries
    assert outcomes(stack) == {("eu-north-a", "bad_response"): 3}


def test_an_in_stream_refusal_quoting_our_key_is_withheld(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """The 4xx made of an error event keeps our key out of the client's sight, as a 4xx
    answer does (issue 5)."""
    key = UPSTREAM_KEYS["eu-north-a"]
    err = {"message": f"Key {key} may not use guided decoding", "code": 400}
    refusal = sse_answer([b"data: " + orjson.dumps({"error": err}) + b"\n\n"])
    up = scripted(lambda conn, n, body: (refusal, False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    a.error(400, "upstream_error")
    assert key.encode() not in a.body


@pytest.mark.parametrize("first", [False, True])
def test_broken_chunked_framing_is_a_lost_connection_at_the_keepalive(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], first: bool,
) -> None:
    """A chunk size that is no number (a broken middlebox), then the close: aiohttp
    closes the connection but leaves the body's reader waiting, which held the client
    until timeouts.idle. The proxy sees the connection gone at its next keep-alive
    point, or at first_byte: before the first event the attempt has failed (not timed
    out) and fails over, after it the stream ends with the error event."""
    events = [chunk("a")] if first else []
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events))
    up = scripted(lambda conn, n, body: ([answer, 0.05, b"zz\r\n", 0.05], False))
    # (before the first event: seen as first_byte runs out, the keep-alive commit far off)
    tmo = {"keepalive": 0.5, "first_byte": 20} if first else {"keepalive": 10, "first_byte": 0.5}
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={**tmo, "idle": 20}))
    t0 = time.monotonic()
    a = post(stack, chat(LLAMA, region="eu-north", stream=True))
    assert time.monotonic() - t0 < 5  # at the keep-alive points, not idle's 20 s
    if first:
        before, _ = stream_error(a, "upstream_error")
        assert before == [chunk("a")]
        want = {("eu-north-a", "stream_connection_lost"): 1}
    else:
        a.error(502, "upstream_error")
        want = {("eu-north-a", "connection_lost"): 3}
    wait_for(lambda: outcomes(stack) == want)


def test_keepalive_after_events_with_ids_is_a_comment_line_only(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted]
) -> None:
    """Once the upstream's events have had `id:` fields, the OpenAI SDK takes any blank
    line for an event (it keeps the last id) and fails on its empty data: the keep-alive
    is then a comment line without a blank line of its own, and the SDK reads on."""
    events = [b"id: 1\n" + chunk("calm "), b"id: 2\n" + chunk("seas"), b"data: [DONE]\n\n"]
    up = scripted(lambda conn, n, body: ([sse_answer(events[:1]), 0.8, b"".join(events[1:])],
                                         False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={"keepalive": 0.3}))
    a = post(stack, chat(LLAMA, stream=True))
    assert b": keep-alive\n" in a.body and b": keep-alive\n\n" not in a.body
    with stack.client() as client:
        got = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=LLAMA, messages=MSGS, stream=True) if c.choices]
    assert "".join(got) == "calm seas"


def test_stream_to_an_http10_client_ends_with_the_connection(stack: Stack) -> None:
    """HTTP/1.0 has no chunked encoding: a stream's end is the connection's, at once,
    even when the client asked for keep-alive."""
    body = orjson.dumps(chat(LLAMA, stream=True))
    with open_raw(stack) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TEAM_A_KEY}"
                     f"\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.settimeout(3.0)
        got = b""
        while data := sock.recv(65536):  # a TimeoutError if the connection stays open
            got += data
    assert got.startswith(b"HTTP/1.0 200 ") and got.endswith(b"data: [DONE]\n\n")
    assert b"transfer-encoding" not in got.split(b"\r\n\r\n")[0].lower()


def test_upstream_slow_to_send_headers_gets_keepalive_comments(make_stack: MakeStack) -> None:
    """An upstream that holds even its headers past timeouts.keepalive (a long prefill): the
    client gets its 200 and `: keep-alive` comments meanwhile (SPEC §1.1), then the stream."""
    stack = make_stack(cfg(timeouts={"keepalive": 0.3, "idle": 3}))
    a = post(stack, chat(LLAMA, stream=True, sim={"headers_delay_s": 1.0}))
    events = a.events()
    assert events[0] == b": keep-alive\n\n" and events.count(b": keep-alive\n\n") >= 2
    assert events[-1] == b"data: [DONE]\n\n"
    _, rec = only_hit(stack)
    assert data_events(events)[:-2] == split_events(rec.sent)[:-3]  # as sent, up to the held end
    assert a.header("x-lowrouter-upstream") == "eu-north-a"
    assert "upstream;dur=" in (a.header("server-timing") or "")
    wait_for(lambda: codes(stack) == {"200": 1})
    assert outcomes(stack) == {("eu-north-a", "ok"): 1}
    assert_idle(stack)


@pytest.mark.parametrize("status", [503, 400])
def test_upstream_fails_after_a_keepalive_commit(make_stack: MakeStack, status: int) -> None:
    """Past the keep-alive commit an upstream that answers an error is not failed over (the
    client has its 200): the stream ends with the §1.1 error event, which the SDK raises."""
    stack = make_stack(cfg(timeouts={"keepalive": 0.3}))
    a = post(stack, chat(MINI, region="eu-west", stream=True,
                         sim={"headers_delay_s": 0.7, "status": status}))
    before, last = stream_error(a, "upstream_error")
    assert before and all(ev == b": keep-alive\n\n" for ev in before)
    assert sum(hits(stack).values()) == 1  # no failover to eu-west-b
    # a refusal says why, in the upstream's words (the status line has gone already)
    assert (status == 400) == (last["error"]["message"] == "the upstream answered 400 once "
                               "the stream had begun: Simulated error 400 from eu-west-a.")
    # refused, with nothing generated: no tokens charged, as for a refusal before the commit
    assert last["lowrouter"]["eco"]["tokens"] == {"prompt": 0, "completion": 0}
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert stack.metric_sum("lrproxy_tokens_total") == 0
    with stack.client() as client, pytest.raises(openai.APIError) as ei:
        for _ in client.chat.completions.create(
                model=MINI, messages=MSGS, stream=True, extra_body={
                    "route": {"region": "eu-west"},
                    "sim": {"headers_delay_s": 0.7, "status": status}}):
            pass
    assert isinstance(ei.value.body, dict) and ei.value.body["code"] == "upstream_error"
    assert_idle(stack)


def test_late_error_status_message_is_bounded_and_never_quotes_our_key() -> None:
    """The error event for a refusal after the commit quotes the upstream's message, cut
    to `LATE_MESSAGE_CHARS` (an object's message, or the error itself when it is a
    string); one quoting the proxy's upstream key is withheld; a body with no message
    gives the status alone."""
    from types import SimpleNamespace as NS

    from lrproxy import relay

    def late(body: bytes) -> str:
        attempt = NS(resp=NS(status=400), body=body, secret=b"sk-upstream-secret")
        return relay._late_status(attempt)  # type: ignore[arg-type]

    said = "the upstream answered 400 once the stream had begun"
    long = "x" * (relay.LATE_MESSAGE_CHARS + 50)
    assert late(orjson.dumps({"error": {"message": long}})) == f"{said}: {long[:-50]}…"
    quoted = late(orjson.dumps({"error": {"message": "bad key sk-upstream-secret"}}))
    assert "sk-upstream" not in quoted and quoted.startswith(said + " (its message was withheld")
    assert late(b'{"error": "flat"}') == f"{said}: flat"  # some servers' shape
    for body in (b"not json", b"[1]", b'{"error": 7}', b'{"error": {"message": " "}}'):
        assert late(body) == said


def test_keepalive_clock_runs_across_failover(make_stack: MakeStack) -> None:
    """The client hears something every timeouts.keepalive seconds however many attempts
    its wait takes: two upstreams that each hold their headers 0.2 s, then fail, with
    keepalive 0.3 s: the commit comes during the second attempt, whose failure is then
    the error event (not a 502 after 0.4 s of silence)."""
    stack = make_stack(cfg(timeouts={"keepalive": 0.3}))
    a = post(stack, chat(MINI, region="eu-west", stream=True,
                         sim={"headers_delay_s": 0.2, "status": 503}))
    before, _ = stream_error(a, "upstream_error")
    assert before == [b": keep-alive\n\n"]
    assert hits(stack)["eu-west-a"] + hits(stack)["eu-west-b"] == 2
    assert_idle(stack)


def test_a_bug_after_a_keepalive_commit_is_an_error_event(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch, seen: Seen
) -> None:
    """An unexpected exception of ours after the keep-alive commit: the §1.1 error event
    on the committed stream (and the traceback in the log), never a second status line."""
    from lrproxy import relay

    seen.expected_errors.append("unexpected error in a stream")

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(relay, "_first_events", broken)
    stack = make_stack(cfg(timeouts={"keepalive": 0.2}))
    a = post(stack, chat(LLAMA, stream=True, sim={"headers_delay_s": 0.5}))
    before, _ = stream_error(a, "internal_error")
    assert before and b"HTTP/1.1" not in a.body
    wait_for(lambda: codes(stack) == {"stream_error": 1})
    assert_idle(stack)


def test_client_leaves_during_a_keepalive_commit(make_stack: MakeStack) -> None:
    """The client leaves while the upstream still holds its headers past the keep-alive
    commit: the upstream request is closed at once, nothing is left running."""
    stack = make_stack(cfg(timeouts={"keepalive": 0.2}))
    with open_raw(stack) as sock:
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=True, sim={"headers_delay_s": 30}))))
        assert select.select([sock], [], [], 5)[0]  # the 200 and a first keep-alive
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        t_close = time.monotonic()
    rec = stack.requests_to("eu-north-a")[0]
    wait_for(lambda: rec.client_closed, timeout=2)
    assert rec.finished_at is not None and rec.finished_at - t_close < 0.5
    wait_for(lambda: codes(stack) == {"client_closed": 1})
    assert_idle(stack)


# =======================================================================================
# client faults


def test_client_leaves_before_the_body_is_complete(stack: Stack) -> None:
    """The client closes with half its body sent: nothing goes upstream, counted client_closed."""
    with open_raw(stack) as sock:
        sock.sendall(request(BODY)[:-30])
        wait_for(lambda: idle(stack)["tasks"] == 1)
    wait_for(lambda: codes(stack) == {"client_closed": 1})
    assert codes(stack, key="team-a") == {"client_closed": 1}
    assert sum(hits(stack).values()) == 0 and outcomes(stack) == {}
    assert_idle(stack)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_client_leaves_while_waiting_for_the_first_byte(stack: Stack, stream: bool) -> None:
    """The client leaves before the upstream's first byte: the upstream request is closed at once."""
    sim = {"first_delay_s": 5} if stream else {"headers_delay_s": 5}
    with open_raw(stack) as sock:
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=stream, sim=sim))))
        wait_for(lambda: stack.requests_to("eu-north-a"))
        time.sleep(0.1)
        t_close = time.monotonic()
    rec = stack.requests_to("eu-north-a")[0]
    wait_for(lambda: rec.client_closed, timeout=2)
    assert rec.finished_at is not None and rec.finished_at - t_close < 0.5
    wait_for(lambda: codes(stack) == {"client_closed": 1})
    # not the upstream's failure, nor an answer: counted as the client's doing
    assert outcomes(stack) == {("eu-north-a", "client_closed"): 1}
    assert stack.call(lambda: stack.runtime.pool.health["eu-north-a"].failures) == 0
    assert_idle(stack)


def test_client_leaves_mid_stream(stack: Stack) -> None:
    """The client leaves mid-stream: the upstream is closed at once; tokens so far counted client_closed."""
    with open_raw(stack) as sock:
        sock.sendall(request(orjson.dumps(
            chat(LLAMA, stream=True, sim={"chunks": 400, "chunk_delay_s": 0.02}))))
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(65536)
        t_close = time.monotonic()
    assert got.startswith(b"HTTP/1.1 200 ")
    rec = stack.requests_to("eu-north-a")[0]
    wait_for(lambda: rec.client_closed)
    assert rec.finished_at is not None and rec.finished_at - t_close < 0.5
    assert len(split_events(rec.sent)) < 40
    wait_for(lambda: codes(stack) == {"client_closed": 1})
    labels = {"key": "team-a", "model": LLAMA, "region": "eu-north"}
    assert stack.metric("lrproxy_tokens_total", **labels, kind="completion") >= 2
    assert outcomes(stack) == {("eu-north-a", "client_closed"): 1}
    assert_idle(stack)


@pytest.mark.parametrize("by", ["total", "send_timeout"])
def test_client_that_stops_reading_is_cut_off_at_total(
    make_stack: MakeStack, seen: Seen, monkeypatch: pytest.MonkeyPatch, by: str,
) -> None:
    """A client that stops reading a stream (its connection open) holds the upstream, its
    max_concurrency place and its in-flight place no longer than timeouts.total (SPEC §4),
    nor than protocol.SEND_TIMEOUT_S (nginx's send_timeout, 60 s, cut to 1 s here) with
    nothing taken: then the upstream is closed, the connection dropped and the tokens so
    far counted."""
    if by == "send_timeout":
        monkeypatch.setattr(protocol, "SEND_TIMEOUT_S", 1.0)
    # (2 s, not 1: on a busy machine 1 s could run out before the stream's status line)
    stack = make_stack(cfg(timeouts={"total": 2 if by == "total" else 600}))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", stack.port))
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=True, sim={"chunks": 200_000}))))
        got = sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        rec = stack.requests_to("eu-north-a")[0]
        wait_for(lambda: rec.client_closed, timeout=10)  # nothing read meanwhile
        assert time.monotonic() - t0 < 4
        wait_for(lambda: codes(stack) == {"stream_error": 1})
        access = [orjson.loads(line) for line in seen.logs if '"duration_ms"' in line]
        assert [a["error"] for a in access] == ["request_timeout"]
        labels = {"key": "team-a", "model": LLAMA, "region": "eu-north"}
        assert stack.metric("lrproxy_tokens_total", **labels, kind="completion") > 0
        # not the upstream's failure: ended on the proxy's side
        assert outcomes(stack) == {("eu-north-a", "cancelled"): 1}
        assert_idle(stack)
        sock.settimeout(3.0)  # what the buffers hold, then the end (a TimeoutError if none)
        tail = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(1 << 16):
                tail = (tail + data)[-4096:]
        # the error event names the bound that ended it
        why = (b"The stream reached timeouts.total before the client had taken it."
               if by == "total" else
               b"The client took none of the stream for 1 s.")
        assert why in tail


@pytest.mark.parametrize("http", ["1.1", "1.0"])
def test_client_that_reads_slowly_is_served_until_it_stops(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch, seen: Seen, http: str,
) -> None:
    """The send timeout (nginx's send_timeout, protocol.SEND_TIMEOUT_S: 1 s here) runs
    while none of the stream is taken, not while one write waits for a client that reads,
    slowly, steadily: that one used to be cut as if it read nothing (a drain only ends
    once the client has taken ~48 KiB: at 700 B/s, past 60 s); an HTTP/1.0 client's
    stream (each write through aiohttp's own) was, after the first fix too. Once it
    stops, it is."""
    monkeypatch.setattr(protocol, "SEND_TIMEOUT_S", 1.0)
    stack = make_stack(cfg(timeouts={"total": 600}))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", stack.port))
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=True, sim={"chunks": 200_000})))
                     .replace(b" HTTP/1.1\r\n", f" HTTP/{http}\r\n".encode(), 1))
        got = sock.recv(4096)
        assert re.match(rb"HTTP/1\.[01] 200 ", got), got[:100]
        taken, end = len(got), time.monotonic() + 4.0
        while time.monotonic() < end:  # ~13 KB/s: the proxy's buffers stay full
            time.sleep(0.3)
            taken += len(sock.recv(4096))
        assert codes(stack) == {}, "cut while it was reading"
        wait_for(lambda: codes(stack) == {"stream_error": 1}, timeout=10)  # stopped: cut
        access = [orjson.loads(line) for line in seen.logs if '"duration_ms"' in line]
        assert [a["error"] for a in access] == ["request_timeout"]
        assert taken > 40_000
        assert_idle(stack)


def test_client_that_stops_reading_loses_its_connection_after_its_stream_ends(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream of a client that stopped reading ended at timeouts.total, its error
    event left in the buffer for it: when none of that is taken for
    protocol.SEND_TIMEOUT_S (nginx's send_timeout; 1 s here) the connection is dropped.
    It was closed gracefully, which waits for the client to read it all: one that never
    did held its socket, its max_connections place and ~2.8 MB of buffers for as long
    as it liked."""
    monkeypatch.setattr(protocol, "SEND_TIMEOUT_S", 1.0)
    stack = make_stack(cfg(timeouts={"total": 2, "client_header": 1}))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", stack.port))
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=True, sim={"chunks": 200_000}))))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: codes(stack) == {"stream_error": 1}, timeout=10)  # nothing read
        assert stack.runner._handler is not None
        conns = stack.runner._handler.connections
        wait_for(lambda: not stack.call(lambda: len(conns)), timeout=5)  # still not reading
        sock.settimeout(3.0)  # what the kernel took before the drop, then the end
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 16):
                pass


def test_client_that_stops_reading_the_streams_end_is_cut_off_after_it(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], seen: Seen
) -> None:
    """The total runs out while the stream's last write (a big event with the finish
    and [DONE]) waits for a client that stopped reading: its body's end is out already,
    so no error event may follow it; the connection is dropped, and the upstream, which
    finished, counts as ok."""
    big = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {
        "content": "x" * 6_000_000}, "finish_reason": None}]}) + b"\n\n"
    end = big + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' + \
        b"data: [DONE]\n\n"
    up = scripted(lambda conn, n, body: ([sse_answer([chunk("calm ")]), end], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}},
                           timeouts={"total": 1}))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", stack.port))
        sock.sendall(request(orjson.dumps(chat(LLAMA, stream=True))))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: codes(stack) == {"stream_error": 1}, timeout=10)  # nothing read
        got = b""
        sock.settimeout(3.0)
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(1 << 16):
                got += data
    assert b"request_timeout" not in got and b'"error"' not in got
    access = [orjson.loads(line) for line in seen.logs if '"duration_ms"' in line]
    assert [a["error"] for a in access] == ["request_timeout"]
    assert outcomes(stack) == {("eu-north-a", "ok"): 1}
    assert_idle(stack)


async def test_thousand_disconnects_mid_stream_leave_nothing_behind(stack: Stack) -> None:
    """1,000 clients leaving mid-stream (50 at a time): no task, slot or stream left; serving goes on."""
    total, width = 1000, 50
    req = request(orjson.dumps(chat(MINI, stream=True, sim={"chunks": 200, "chunk_delay_s": 0.01})))
    sem = asyncio.Semaphore(width)
    statuses: list[bytes] = []

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
            try:
                writer.write(req)
                buf = b""
                while b"data: " not in buf:
                    data = await reader.read(65536)
                    assert data, buf
                    buf += data
                statuses.append(buf[:13])
            finally:
                if i % 2:
                    writer.transport.abort()  # a reset
                else:
                    writer.close()  # a clean close
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    t0 = time.monotonic()
    async with asyncio.timeout(20):
        await asyncio.gather(*(one(i) for i in range(total)))
    assert set(statuses) == {b"HTTP/1.1 200 "} and len(statuses) == total
    await await_for(lambda: codes(stack).get("client_closed") == total, timeout=10)
    await await_for(lambda: stack.metric("lrproxy_inflight_requests") == 0)
    await await_for(lambda: idle(stack)["tasks"] == 0)
    state = idle(stack)
    assert set(state["outstanding"].values()) == {0} and set(state["streams"].values()) == {0}
    recs = [r for n in EU_WEST for r in stack.requests_to(n)]  # MINI's cleanest: eu-west only
    assert len(recs) == total and hits(stack)["us-east-a"] == 0
    await await_for(lambda: all(r.client_closed for r in recs))
    assert time.monotonic() - t0 < 20
    # Business as usual afterwards.
    async with stack.aclient() as client:
        r = await client.chat.completions.create(model=MINI, messages=MSGS)
        assert r.choices[0].message.content
        parts = [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(
            model=MINI, messages=MSGS, stream=True)]
        assert "".join(parts)
    await await_for(lambda: codes(stack) == {"client_closed": total, "200": 2})
    assert outcomes(stack) == {(n, o): v for (n, o), v in outcomes(stack).items()
                               if o in ("ok", "client_closed")}
    assert sum(v for (_, o), v in outcomes(stack).items() if o == "client_closed") == total
    assert sum(v for (_, o), v in outcomes(stack).items() if o == "ok") == 2


# =======================================================================================
# overload


async def test_burst_over_the_inflight_cap_gets_fast_429s(make_stack: MakeStack) -> None:
    """20 concurrent slow requests with max_inflight=5: 5 served, 15 fast 429s, nothing queued."""
    stack = make_stack(cfg(server={"max_inflight": 5}))
    body = orjson.dumps(chat(LLAMA, sim={"headers_delay_s": 0.6}))

    async def one(s: aiohttp.ClientSession) -> Answer:
        t0 = time.monotonic()
        async with s.post(stack.base_url + "/chat/completions", data=body,
                          headers={"Authorization": f"Bearer {TEAM_A_KEY}",
                                   "Content-Type": "application/json"}) as r:
            data = await r.read()
            return Answer(r.status, [(k.lower(), v) for k, v in r.headers.items()], data,
                          time.monotonic() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        answers = await asyncio.gather(*(one(s) for _ in range(20)))
    ok = [a for a in answers if a.status == 200]
    limited = [a for a in answers if a.status != 200]
    assert len(ok) == 5 and len(limited) == 15
    for a in limited:
        a.error(429, "rate_limited")
        assert a.header("retry-after") == "1" and a.elapsed < 0.4
    assert len(stack.requests_to("eu-north-a")) == 5
    assert codes(stack) == {"200": 5, "429": 15}
    assert outcomes(stack) == {("eu-north-a", "ok"): 5}


async def test_retry_budget_spares_a_failing_region(stack: Stack) -> None:
    """30 concurrent requests to a failing region: retries stay within the budget (20 %, min 3)."""
    body = orjson.dumps(chat(MINI, region="eu-west", sim={"status": 503, "headers_delay_s": 0.3}))

    async def one(s: aiohttp.ClientSession) -> Answer:
        async with s.post(stack.base_url + "/chat/completions", data=body,
                          headers={"Authorization": f"Bearer {TEAM_A_KEY}",
                                   "Content-Type": "application/json"}) as r:
            return Answer(r.status, [(k.lower(), v) for k, v in r.headers.items()], await r.read())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        answers = await asyncio.gather(*(one(s) for _ in range(30)))
    for a in answers:
        a.error(502, "upstream_error")
    total = sum(hits(stack).values())
    # Without the budget: 90 (30 × 3). With it: 30 first tries, ≤ 6 (20 % of 30) retries in
    # the first wave, ≤ 3 (the minimum) in the second.
    assert 30 + 3 <= total <= 30 + 6 + 3, total
    assert hits(stack)["us-east-a"] == 0
    assert sum(outcomes(stack).values()) == total
    assert codes(stack) == {"502": 30}


# =======================================================================================
# data residency and what crosses the proxy


RESIDENCY_FAULTS = ["503", "reset", "429", "redirect", "timeout", "auth"]


@pytest.mark.parametrize("pin", ["body", "header"])
@pytest.mark.parametrize("fault", RESIDENCY_FAULTS)
def test_pinned_request_never_leaves_its_region(make_stack: MakeStack, fault: str, pin: str,
                                                seen: Seen) -> None:
    """Every eu-west upstream failing: a pinned request gets 502/504, and no other region sees a byte."""
    wrong = {n: {"api_key_env": "UP_US_EAST_A"} for n in EU_WEST} if fault == "auth" else {}
    seen.expected_errors += [_auth_refused_line(n, 401) for n in wrong]
    stack = make_stack(cfg(timeouts={"first_byte": 0.4}, upstreams=wrong))
    knobs = {
        "503": {"fail_status": 503, "fail_count": -1}, "reset": {"reset": True},
        "429": {"fail_status": 429, "fail_count": -1},
        "redirect": {"redirect_to": stack.sims["us-east-a"].base_url + "/chat/completions"},
        "timeout": {"headers_delay_s": 3}, "auth": {},
    }[fault]
    faults(stack, EU_WEST, **knobs)
    if pin == "body":
        a = post(stack, chat(MINI, region="eu-west"))
    else:
        a = post(stack, chat(MINI), headers={"X-LowRouter-Region": "eu-west"})
    status, code = {"timeout": (504, "upstream_timeout"), "429": (429, "rate_limited"),
                    "auth": (502, "upstream_auth_failed")}.get(fault, (502, "upstream_error"))
    a.error(status, code)
    for name, sim in stack.sims.items():
        if name not in EU_WEST:
            assert sim.requests == [], name
    inside = [r for n in EU_WEST for r in stack.requests_to(n)]
    # (after a 429, a timeout or a refused key, never the same upstream again)
    assert len(inside) == (2 if fault in ("429", "timeout", "auth") else 3)
    assert {u for u, _ in outcomes(stack)} == set(EU_WEST)
    assert codes(stack) == {str(status): 1}


@pytest.mark.parametrize("pinned", [True, False])
def test_body_fields_cannot_redirect_a_request(stack: Stack, pinned: bool) -> None:
    """api_base, base_url, extra_headers, api_key in a body: forwarded inert, routing unchanged."""
    elsewhere = stack.sims["us-east-a"].base_url
    inert = {
        "api_base": elsewhere, "base_url": elsewhere, "api_key": "sk-from-the-body",
        "extra_headers": {"Authorization": "Bearer sk-evil", "X-LowRouter-Region": "us-east",
                          "Host": "us-east.example"},
        "extra_query": {"region": "us-east"}, "api_version": "2024-06-01",
    }
    a = post(stack, chat(MINI, region="eu-west" if pinned else None, **inert))
    route = a.route()
    assert route["region"] == "eu-west" and route["pinned"] is pinned
    name, rec = only_hit(stack)
    assert name in EU_WEST and stack.sims["us-east-a"].requests == []
    assert {k: rec.json[k] for k in inert} == inert and "route" not in rec.json
    assert rec.headers["Authorization"] == f"Bearer {UPSTREAM_KEYS[name]}"
    assert {k.lower() for k in rec.headers} <= UPSTREAM_HEADERS
    assert outcomes(stack) == {(name, "ok"): 1}
    assert codes(stack) == {"200": 1}


def test_client_headers_never_reach_the_upstream(stack: Stack) -> None:
    """Cookie, Proxy-*, hop-by-hop (Connection: X-Foo), X-Forwarded-For, client key: never sent upstream."""
    sent = {
        "Cookie": "session=cookie-value", "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Proxy-Connection": "keep-alive", "Connection": "X-Foo", "X-Foo": "hop-value",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Upgrade": "h2c",
        "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.7", "X-Real-IP": "203.0.113.7", "Via": "1.1 evil",
        "Api-Key": "az-value", "X-Api-Key": "x-value", "OpenAI-Organization": "org-value",
    }
    a = post(stack, chat(MINI), headers=sent)
    name, rec = only_hit(stack)
    assert a.route()["upstream"] == name
    assert {k.lower() for k in rec.headers} <= UPSTREAM_HEADERS
    assert rec.headers["Authorization"] == f"Bearer {UPSTREAM_KEYS[name]}"
    seen_upstream = repr(rec.headers) + rec.body.decode()
    for v in sent.values():
        assert v not in seen_upstream, v
    assert outcomes(stack) == {(name, "ok"): 1}
    assert codes(stack) == {"200": 1}


@pytest.mark.parametrize("kind", ["json", "stream", "passed-4xx", "failed-502"])
def test_upstream_headers_never_reach_the_client(stack: Stack, kind: str) -> None:
    """The upstream's Set-Cookie, Server and own headers never reach the client, whatever the answer."""
    if kind == "failed-502":
        faults(stack, list(stack.sims), fail_status=503, fail_count=-1)
    body = chat(LLAMA, stream=kind == "stream", sim={"status": 400} if kind == "passed-4xx" else None)
    a = post(stack, body)
    assert a.all("set-cookie") == [] and a.header("x-sim-name") is None
    assert a.all("server") == ["lrproxy"]
    status = {"json": 200, "stream": 200, "passed-4xx": 400, "failed-502": 502}[kind]
    assert a.status == status
    assert [r for n in stack.sims for r in stack.requests_to(n)]  # an upstream did answer
    wait_for(lambda: codes(stack) == {str(status): 1})
    expected = {"json": "ok", "stream": "ok", "passed-4xx": "passed_4xx", "failed-502": "status_5xx"}
    assert {o for _, o in outcomes(stack)} == {expected[kind]}


def test_idle_timeout_in_a_cut_short_attempt_is_the_upstreams_failure(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """The first attempt takes 0.5 s to fail (a 503), so the retry is cut short
    (1.5 s left of total 2 < 0.9 x 2). The retry's upstream sends headers and part of
    the body, then stalls: timeouts.idle (0.3 s) ends it long before the total. That is
    the upstream's own failure (it had time; it went silent), so it is charged."""
    slow_503 = scripted(lambda conn, n, req: ([0.5, _answer_of("503 Service Unavailable",
                                                             "application/json", b"{}")], True))
    stall = scripted(lambda conn, n, req: ([*_slow_json(0.05, 2)[:3], 5.0], True))
    stack = make_stack(cfg(server={"retries": 1},
                           timeouts={"first_byte": 5, "total": 2, "idle": 0.3},
                           upstreams={"eu-west-a": {"base_url": slow_503.base_url},
                                      "eu-west-b": {"base_url": stall.base_url}}))
    a = post(stack, chat(MINI, region="eu-west"))
    a.error(504, "upstream_timeout")
    assert a.elapsed < 1.8  # ended by idle, not by the total
    health = stack.call(lambda: {n: h.failures for n, h in stack.runtime.pool.health.items()})
    # whichever went first, both failed on their own: one failure each
    assert (health["eu-west-a"], health["eu-west-b"]) == (1, 1), health


def test_a_trial_answered_over_the_cap_lets_another_trial_go(
    stack: Stack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trial after a cool-down gets an answer over MAX_UPSTREAM_BODY: no verdict
    on the upstream, but the trial is over, so the next request is a trial again and
    readmits it (SPEC §2: one trial request lets it back), not an upstream unusable
    for good."""
    monkeypatch.setattr(upstream, "COOL_DOWN_S", 0.3)
    eject_eu_west_a(stack)
    stack.call(lambda: [setattr(stack.sims["eu-west-a"].faults, "fail_status", None)])
    time.sleep(0.35)
    monkeypatch.setattr(relay, "MAX_UPSTREAM_BODY", 16)  # any answer is over it
    post(stack, chat(MINI, region="eu-west")).error(502, "upstream_error")
    assert len(stack.requests_to("eu-west-a")) == 6  # that was the trial
    monkeypatch.setattr(relay, "MAX_UPSTREAM_BODY", 256 << 20)
    h = stack.call(lambda: stack.runtime.pool.health["eu-west-a"])
    assert h.trial is False
    route = post(stack, chat(MINI, region="eu-west")).route()
    assert (route["upstream"], route["attempts"]) == ("eu-west-a", 1)


@pytest.mark.parametrize("error", [{}, None, ""])
def test_an_embeddings_answer_with_data_and_an_empty_error_is_an_answer(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], error: Any,
) -> None:
    """An embeddings answer with its data and an empty `error` member beside it
    is an answer (200), not a failed generation to fail over from."""
    body = orjson.dumps({"object": "list", "error": error, "data": [
        {"object": "embedding", "index": 0, "embedding": [0.125, 0.5]}],
        "model": "text-embedding-3-small", "usage": {"prompt_tokens": 4, "total_tokens": 4}})
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-west-a": {"base_url": up.base_url},
                                      "eu-west-b": {"base_url": up.base_url}}))
    a = post(stack, {"model": MINI, "input": "hello", "route": {"region": "eu-west"}},
             path="/api/v1/embeddings")
    assert a.status == 200, a.body
    assert a.json()["data"][0]["embedding"] == [0.125, 0.5]
    assert len(up.requests) == 1


def test_a_later_choice_that_failed_fails_the_answer(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """n=2: the first choice stopped, the second finished with "error": a failed
    generation (a 502 with retries spent), as with one choice."""
    body = orjson.dumps({"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "calm"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "ca"}, "finish_reason": "error"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
    up = scripted(lambda conn, n, req: (_answer_of("200 OK", "application/json", body), True))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    err = post(stack, chat(LLAMA, region="eu-north", n=2)).error(502, "upstream_error")
    assert err["message"] == "the upstream answered 200 with an error object"


def test_no_retry_with_a_sliver_of_the_total_left(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """The first attempt fails (a 503) with ~20 ms of timeouts.total left: under
    relay.MIN_ATTEMPT_S, so the region's other upstream is not tried (it could only
    time out) and the answer is the first one's failure."""
    total = 1.0
    slow_503 = scripted(lambda conn, n, req: ([total - 0.07, _answer_of(  # (Scripted pauses
        "503 Service Unavailable", "application/json", b"{}")], True))  # 0.05 s before a part)
    ok = scripted(lambda conn, n, req: ([0.01, _answer_of("200 OK", "application/json", b"{}")], True))
    stack = make_stack(cfg(server={"retries": 1}, timeouts={"first_byte": 5, "total": total},
                           upstreams={"eu-west-a": {"base_url": slow_503.base_url},
                                      "eu-west-b": {"base_url": slow_503.base_url},
                                      "eu-north-a": {"base_url": ok.base_url}}))
    post(stack, chat(MINI, region="eu-west")).error(502, "upstream_error")
    assert len(slow_503.requests) == 1


def test_an_upstream_that_closes_without_an_answer_is_said_in_words(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted],
) -> None:
    """The upstream closes the connection without answering, retries spent: the
    502's message says what happened, in words."""
    up = scripted(lambda conn, n, req: None)
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    err = post(stack, chat(LLAMA, region="eu-north")).error(502, "upstream_error")
    assert err["message"] == "upstream connection lost: the upstream closed it", err


@pytest.mark.parametrize("stream", [False, True])
def test_an_integer_orjson_cannot_write_in_tools_is_no_500(
    make_stack: MakeStack, scripted: Callable[[Script], Scripted], stream: bool
) -> None:
    """A `tools` definition holding an integer over 309 digits (strict JSON, forwarded
    as sent): counting the tools' characters for the prompt estimate does not fail."""
    up = scripted(lambda conn, n, body: (
        [sse_answer([chunk("hi"), b"data: [DONE]\n\n"])] if stream else [json_answer()], False))
    stack = make_stack(cfg(upstreams={"eu-north-a": {"base_url": up.base_url}}))
    tools = (b',"tools":[{"type":"function","function":{"name":"f","parameters":'
             b'{"type":"integer","maximum":' + b"9" * 400 + b"}}}]")
    a = post(stack, BODY[:-1] + b',"stream":' + (b"true" if stream else b"false") + tools + b"}")
    assert a.status == 200, a.body[:300]
    assert b"[DONE]" in a.body if stream else a.json()["choices"]
    (rec,) = up.requests
    assert b"9" * 400 in rec.body
    wait_for(lambda: codes(stack) == {"200": 1})  # (a stream's, at its end)
